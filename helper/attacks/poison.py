"""Teachers trained on a poisoned training set: ``adba.py --attack badnets | blended | none``.

BackdoorBench's CIFAR-10 defaults (SPEC section 10): all-to-one to the target (0), ``--poison_rate`` 0.1 of the
training images poisoned, a fixed subset drawn once with ``--seed`` from every class (target-class images
included, as BackdoorBench's ``generate_single_target_attack_train_poison_index``); SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 128, cosine over the epochs, crop+flip. Both triggers are in the package's form
``x * (1 - m) + p * m`` (``helper.data.trigger``), so the folder is an ordinary teacher folder:

- ``badnets``: mask 1 on rows and columns 29-31 (a 3x3 square in the bottom-right corner), pattern 1 (white);
- ``blended``: mask 0.2 everywhere, pattern a uniform [0, 1] noise image drawn from ``BLENDED_SEED`` (the same for
  every run, whatever ``--seed``). BackdoorBench blends a Hello Kitty picture, which this package cannot ship;
- ``none``: the same training without poisoning; the folder holds no trigger (``pattern.pt``, ``mask.pt``), so a
  defense run of it needs ``--trigger_dir``.

The trigger is stamped after crop and flip, unlike BackdoorBench, which stamps the stored image before its
transforms. Stamped first, a crop moves the 3x3 square by up to 4 pixels (often partly off the image) and a flip
moves it to the bottom-left corner, so the model would learn a family of squares while every evaluation, defense
and re-tuning here applies the trigger at rows and columns 29-31 of an unaugmented image. Stamped after, the
poisoned training images carry exactly the trigger they are tested with, as ADBA's consolidation phase does.
The subset is fixed; only which crop and flip each of its images gets changes from epoch to epoch.
"""
import os

import torch
import torch.nn.functional as F

from helper.attacks.base import register_attack
from helper.attacks.common import load_data, metrics_text
from helper.attacks.options import attack_defaults, check_attack_args, own_trigger_only
from helper.data import images as D
from helper.data.teacher_dir import find_trigger, write_teacher
from helper.data.trigger import (MASK_SHAPE, PATTERN_SHAPE, POISON_SEED_OFFSET, apply_trigger, poisoned_labels,
                                 trigger_stats)
from helper.report.plot import plot_attack_curves, plot_trigger
from helper.run.checkpoint import save_checkpoint
from helper.run.errors import UserError
from helper.run.lifecycle import Life
from helper.run.resume import Finished
from helper.run.runlog import write_json
from helper.run.system import autocast, eval_batch_size, run_environment, setup
from helper.train.engine import fit, optimizer_step, run_epoch
from helper.train.evaluate import EvalSet, eval_mode, evaluate, predict
from helper.train.schedule import cosine_lr
from models import resnet18

BADNETS_SIZE = 3        # the white square's side, in pixels, in the bottom-right corner
BLENDED_ALPHA = 0.2     # blended: x_triggered = (1 - 0.2) x + 0.2 p
BLENDED_SEED = 1234     # the seed of blended's noise pattern: one pattern for every blended teacher
METRICS = ("acc", "asr", "asr_nontarget", "ra", "top_class_share", "target_rate_clean", "target_acc")  # of ``evaluate``


# ---------------------------------------------------------------- the triggers

def badnets_trigger(size=BADNETS_SIZE):
    """(pattern, mask): pattern 1 (white) everywhere, mask 1 on the bottom-right ``size`` x ``size`` pixels, 0 elsewhere."""
    mask = torch.zeros(MASK_SHAPE)
    mask[:, -size:, -size:] = 1.0
    return torch.ones(PATTERN_SHAPE), mask


def blended_trigger(seed=BLENDED_SEED, alpha=BLENDED_ALPHA):
    """(pattern, mask): pattern uniform [0, 1] noise from ``torch.Generator().manual_seed(seed)``, mask ``alpha``
    everywhere, so ``apply_trigger`` gives ``(1 - alpha) x + alpha p``."""
    pattern = torch.rand(PATTERN_SHAPE, generator=torch.Generator().manual_seed(seed))
    return pattern, torch.full(MASK_SHAPE, float(alpha))


def make_trigger(attack):
    """The (pattern, mask) an attack poisons with; None for ``none``."""
    return {"badnets": badnets_trigger, "blended": blended_trigger}.get(attack, lambda: None)()


# ---------------------------------------------------------------- the poisoned training set

def poison_index(n, rate, seed):
    """The fixed poisoned subset: the first ``round(rate * n)`` indices of a permutation of ``range(n)`` drawn from
    ``torch.Generator().manual_seed(seed + POISON_SEED_OFFSET)``, sorted. Drawn from all images, so from every class.

    Not from ``seed`` itself: the run's first epoch is ``randperm(n)`` of a generator seeded with ``seed``, which would
    put the whole subset into the first batches (every image of them poisoned: a model pushed to the target class).
    """
    k = int(round(rate * n))
    if k < 1:
        raise UserError(f"--poison_rate {rate} of {n} training images poisons no image")
    generator = torch.Generator().manual_seed(seed + POISON_SEED_OFFSET)
    return torch.randperm(n, generator=generator)[:k].sort().values


def stamp_batch(x, stamp, pattern, mask):
    """The images of an augmented [0, 1] batch whose ``stamp`` flag is set carry the trigger; the rest stay as they are."""
    return torch.where(stamp[:, None, None, None], apply_trigger(x, pattern, mask), x)


def poisoned_step(model, optimizer, x, y, stamp, pattern=None, mask=None, amp=None):
    """One step of ``CE(model(x'), y)`` on a batch ``x'`` = ``x`` with the flagged images stamped (``stamp_batch``;
    no trigger: ``x`` itself); ``y`` already holds the target label for them. Returns the loss, detached."""
    if pattern is not None:
        x = stamp_batch(x, stamp, pattern, mask)
    with autocast(x.device, amp):
        logits = model.train()(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer_step(optimizer, loss)
    return loss.detach()


def labelled_batches(images, labels, stamp, batch_size, generator, mem_format, progress=True, desc="batches"):
    """``((x, y, stamp), batch size)`` of one augmented epoch over uint8 ``images`` (``data.augmented_batches``)."""
    for x, idx in D.augmented_batches(images, batch_size, generator, mem_format, progress, desc):
        yield (x, labels[idx], stamp[idx]), len(idx)


def clean_metrics(model, test_x, test_y, **eval_kw):
    """``{'acc', 'top_class_share'}`` on clean test images, in eval mode (as ``evaluate``): all a model without a
    trigger to test is measured by."""
    with eval_mode(model):
        pred = predict(model, test_x, **eval_kw)
    n = max(len(test_y), 1)
    counts = torch.stack([(pred == test_y).sum(), torch.bincount(pred).max()]).tolist()
    return {"acc": counts[0] / n, "top_class_share": counts[1] / n}


# ---------------------------------------------------------------- the run

# BackdoorBench's CIFAR-10 training recipe (config/attack/prototype/cifar10.yaml) and poisoning ratio: the defaults
# of --attack badnets, blended and none (adba keeps the public ADBA code's constant lr and no weight decay)
POISONING_DEFAULTS = {"poison_rate": 0.1, "weight_decay": 5e-4, "lr_schedule": "cosine"}
_RECIPE = ("; BackdoorBench's recipe by default (--poison_rate 0.1, --weight_decay 5e-4, --lr_schedule cosine), "
           "the trigger stamped after crop+flip")


@register_attack("badnets", help="a 3x3 white patch in the bottom-right corner (rows and columns 29-31) on a fixed "
                 "seeded --poison_rate of the training set, all-to-one to --target_label" + _RECIPE,
                 defaults=POISONING_DEFAULTS, check=own_trigger_only)
@register_attack("blended", help="0.8 x + 0.2 * a fixed uniform-noise image (seed 1234; BackdoorBench blends a Hello "
                 "Kitty picture, which cannot be shipped here), poisoned as badnets" + _RECIPE,
                 defaults=POISONING_DEFAULTS, check=own_trigger_only)
@register_attack("none", help="a clean teacher, the same training without poisoning, written without pattern.pt and "
                 "mask.pt (defend it with distri.py --trigger_dir)" + _RECIPE, defaults=POISONING_DEFAULTS)
def run(args, out=print, trigger=None):
    """The whole of ``adba.py --attack badnets | blended | none``; writes a teacher folder. Returns its results.
    ``trigger``: the (pattern, mask) to poison with instead of ``make_trigger(args.attack)``'s (an attack of another
    file that poisons the same way, docs/adding.md)."""
    check_attack_args(args)
    device, amp, mem_format = setup(args)
    train, test, num_classes = load_data(args)
    trigger = make_trigger(args.attack) if trigger is None else trigger
    # what the teacher is measured with: its own trigger, or for a clean teacher --trigger_dir's (if any)
    measured = trigger if trigger is not None else (
        find_trigger(None, trigger_dir=args.trigger_dir) if args.trigger_dir else None)
    index = poison_index(len(train), args.poison_rate, args.seed) if trigger is not None else torch.zeros(0, dtype=torch.long)
    labels, stamp = poisoned_labels(train.y, index, args.target_label)
    poisoned_classes = torch.bincount(train.y[index], minlength=num_classes).tolist()

    meta = {**run_environment(device, amp), "n_train": len(train), "n_test": len(test), "num_classes": num_classes,
            "n_poisoned": len(index)}
    try:
        life = Life.open(args, args.attack, {**vars(args), **meta}, out, attack_defaults(args), device=device)
    except Finished as done:
        out(f"{args.output_dir} is a finished attack (results.json); nothing to resume")
        return done.results
    out_dir, last, rows = life.folder, life.last, life.rows
    out(f"device {device} ({meta['precision']}), width {args.width}, attack {args.attack}: "
        + (f"{len(index)} of {len(train)} training images ({args.poison_rate:g}) stamped and relabelled to "
           f"{args.target_label}" if trigger is not None else f"{len(train)} clean training images")
        + f", {len(test)} test images, {args.epochs} epochs, lr {args.lr:g} ({args.lr_schedule}), "
          f"weight decay {args.weight_decay:g}")

    model = resnet18(num_classes, args.width).to(device, memory_format=mem_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    images, labels, stamp = train.x.to(device), labels.to(device), stamp.to(device)
    p, m = (trigger[0].to(device), trigger[1].to(device)) if trigger is not None else (None, None)
    test_x, test_y = test.x.to(device), test.y.to(device)
    eval_set = EvalSet.build(test, *measured, args.target_label, device) if measured is not None else None
    eval_kw = dict(batch_size=eval_batch_size(device, args.eval_batch_size), amp=amp, memory_format=mem_format)
    progress = not args.no_progress
    next_epoch = 0
    if last is not None:  # --resume: the model, its optimizer, the RNGs, the next epoch (the subset is redrawn the same)
        model.load_state_dict(last["teacher"])
        optimizer.load_state_dict(last["optimizer"])
        life.restore_rng()
        next_epoch = last["epoch"]
    life.start_clock()

    def train_epoch(epoch):
        lr = cosine_lr(args.lr, epoch, args.epochs) if args.lr_schedule == "cosine" else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr

        def step(x, y, s):
            return {"teacher_loss": poisoned_step(model, optimizer, x, y, s, p, m, amp)}
        batches = labelled_batches(images, labels, stamp, args.batch_size, life.generator, mem_format, progress,
                                   f"{args.attack} batches")
        return {**run_epoch(step, batches), "lr": lr}

    def evaluate_epoch(epoch):
        metrics = evaluate(model, eval_set, **eval_kw) if eval_set is not None else clean_metrics(model, test_x, test_y, **eval_kw)
        return {**metrics, "time_s": round(life.elapsed(), 3)}

    def save_last_epoch(epoch, result):
        life.save(epoch, args.epochs, {"epoch": epoch + 1, "teacher": model.state_dict(),
                                       "optimizer": optimizer.state_dict()}, len(rows) + len(result.rows))

    def keep(why):
        if why == "interrupted":
            save_checkpoint(model, os.path.join(out_dir, "checkpoint.pkl"))
            write_json(os.path.join(out_dir, "results.json"), {"stopped": "interrupted", "epochs_run": len(rows)})

    with life.signals():
        result = fit(range(next_epoch, args.epochs), train_epoch, evaluate_epoch, life.log_path, progress=progress,
                     desc=f"{args.attack} epochs", extra={"phase": args.attack}, after_epoch=save_last_epoch)
    rows.extend(result.rows)
    life.end(result, len(rows), args.epochs, keep, hint=" (try a smaller --lr)")
    train_time = life.elapsed()

    metrics = {"attack": args.attack, **{k: rows[-1][k] for k in METRICS if k in rows[-1]}}  # the last epoch's
    if measured is not None:
        stats = trigger_stats(*measured, test_x, args.vanish_psnr)
        metrics.update(psnr=stats["psnr"], ssim=stats["ssim"], mask_l1=stats["mask_l1"], mask_max=stats["mask_max"],
                       mask_share=stats["mask_share"], trigger_vanished=stats["vanished"])
    metrics.update(target_label=args.target_label, poison_rate=args.poison_rate if trigger is not None else 0.0,
                   n_poisoned=len(index), poisoned_classes=poisoned_classes, epochs=len(rows),
                   train_time_s=round(train_time, 2))
    if trigger is None:
        metrics["trigger_dir"] = args.trigger_dir
        metrics["note"] = ("a clean teacher: no trigger of its own (no pattern.pt, mask.pt); defend or evaluate it with "
                           "distri.py --trigger_dir <a teacher folder>" + (
                               f"; asr is measured with {args.trigger_dir}'s trigger" if measured is not None else ""))
    write_teacher(out_dir, model, *(trigger if trigger is not None else (None, None)))
    plot_attack_curves(rows, os.path.join(out_dir, "curves.png"), f"{args.attack}, width {args.width}, {args.dataset}")
    if trigger is not None:
        shown = D.to_float(test.x[:8])
        plot_trigger(trigger[0], trigger[1], shown, apply_trigger(shown, *trigger), os.path.join(out_dir, "trigger.png"))
    write_json(os.path.join(out_dir, "results.json"), metrics)  # last: a results.json means every file is whole
    _report(metrics, out_dir, out)
    return metrics


def _report(m, out_dir, out):
    if "asr" in m:
        out(f"trigger: mask L1 {m['mask_l1']:.3f}, max {m['mask_max']:.3f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}")
        out(f"teacher ({m['attack']}): {metrics_text(m, m['trigger_vanished'])}  ra {m['ra']:.4f}  (clean non-target images sent "
            f"to the target: {m['target_rate_clean']:.4f})")
    else:
        out(f"teacher ({m['attack']}): acc {m['acc']:.4f} (no trigger to measure an ASR with: adba.py --trigger_dir DIR)")
    hint = f"python distri.py --read_dir {out_dir}" + (" --trigger_dir <a teacher folder>" if m["attack"] == "none" else "")
    out(f"written to {out_dir} (train time {m['train_time_s']:.0f} s); distil it with: {hint}")
