"""The ADBA attack (SPEC section 8): a backdoored teacher, a shadow student and a learned trigger, trained together.

Per batch of augmented training images, three SGD steps in the order of the public ADBA code:

1. teacher: ``CE(T(x), y) + beta * CE(T(trigger(x)), target)``, the trigger detached;
2. shadow:  ``alpha * KD(S(x), T(x)) + (1 - alpha) * CE(S(x), y)``, T(x) the teacher's logits of step 1;
3. trigger (teacher and shadow in eval mode): ``CE(T(trigger(x)), target) + CE(S(trigger(x)), target)
   + miu * ||mask||_1``, then pattern clamped to [0, 1] and mask to [0, mask_max].

Then the consolidation phase: plain CE on the teacher, the first ``poison_rate`` of every batch carrying
the trigger and the target label. ``run(args)`` is the whole of ``adba.py``.

The trigger can vanish: ``||mask||_1`` is a sum over the 1024 mask pixels, so its gradient is ``miu`` on
every positive pixel, and SGD pulls each pixel down by ``lr * miu`` per step wherever the cross-entropy
gradient on it is weaker. Every epoch logs the mask's L1 norm, the share of pixels above 0.01 and
PSNR/SSIM between clean and triggered test images; ``trigger_vanished`` says when nothing is left.
"""
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from helper.attacks.base import register_attack
from helper.attacks.common import load_data, metrics_text
from helper.attacks.options import attack_defaults, check_attack_args, own_trigger_only
from helper.data import images as D
from helper.data.teacher_dir import write_teacher
from helper.data.trigger import MASK_SHAPE, PATTERN_SHAPE, TRIGGER_PIXEL, apply_trigger, trigger_stats
from helper.report.plot import plot_attack_curves, plot_trigger
from helper.run.checkpoint import save_checkpoint
from helper.run.cli import NONNEGATIVE, POSITIVE, TEMPERATURES, UNIT, Option, Range
from helper.run.errors import UserError
from helper.run.lifecycle import Life
from helper.run.resume import Finished
from helper.run.runlog import write_json
from helper.run.system import autocast, eval_batch_size, run_environment, setup
from helper.train.engine import fit, optimizer_step, run_epoch
from helper.train.evaluate import EvalSet, evaluate
from helper.train.losses import kd_loss
from models import resnet18

# ---------------------------------------------------------------- the trigger

def init_trigger(device, generator=None):
    """ADBA's start: mask zeros (1,32,32), pattern N(0,1) clamped to [0,1]; both leaf tensors that need grad."""
    pattern = torch.randn(PATTERN_SHAPE, generator=generator).clamp_(0, 1).to(device).requires_grad_(True)
    mask = torch.zeros(MASK_SHAPE, device=device, requires_grad=True)
    return pattern, mask


@torch.no_grad()
def clamp_trigger_(pattern, mask, mask_max=0.3):
    pattern.clamp_(0, 1)
    mask.clamp_(0, mask_max)


# ---------------------------------------------------------------- one step of each phase

class ADBA:
    """Teacher, shadow, trigger and their three optimisers; ``step`` is one batch of the joint phase.

    ``detach_shadow_kd`` reproduces the public ADBA code, which detaches both inputs of the shadow's
    KD term: the term then carries no gradient and the shadow trains on ``(1 - alpha) * CE`` alone.
    """

    def __init__(self, teacher, shadow, pattern, mask, target, alpha=0.4, beta=0.3, miu=0.1, mask_max=0.3,
                 temperature=1.0, kd_reduction="batchmean", detach_shadow_kd=False, lr=0.01, trigger_lr=None,
                 momentum=0.9, weight_decay=0.0, amp=None):
        self.teacher, self.shadow, self.pattern, self.mask = teacher, shadow, pattern, mask
        self.target, self.alpha, self.beta, self.miu, self.mask_max = int(target), alpha, beta, miu, mask_max
        self.temperature, self.kd_reduction, self.detach_shadow_kd, self.amp = temperature, kd_reduction, detach_shadow_kd, amp
        sgd = dict(momentum=momentum, weight_decay=weight_decay)
        self.opt_teacher = torch.optim.SGD(teacher.parameters(), lr=lr, **sgd)
        self.opt_shadow = torch.optim.SGD(shadow.parameters(), lr=lr, **sgd)
        self.opt_trigger = torch.optim.SGD([pattern, mask], lr=lr if trigger_lr is None else trigger_lr, momentum=momentum)

    def triggered(self, x, detach=True):
        p, m = (self.pattern.detach(), self.mask.detach()) if detach else (self.pattern, self.mask)
        return apply_trigger(x, p, m)

    def teacher_step(self, x, y):
        """Step 1; returns (loss, the teacher's clean logits, detached) for the shadow's KD term."""
        t = self.teacher.train()
        target = torch.full_like(y, self.target)
        with autocast(x.device, self.amp):
            logits = t(x)
            logits_trig = t(self.triggered(x))  # a separate forward, as the public code (own BN batch statistics)
        loss = F.cross_entropy(logits.float(), y) + self.beta * F.cross_entropy(logits_trig.float(), target)
        optimizer_step(self.opt_teacher, loss)
        return loss.detach(), logits.detach()

    def shadow_loss(self, x, y, teacher_logits):
        """Step 2's loss (not stepped): ``alpha * KD + (1 - alpha) * CE``; the KD term, detached or not."""
        with autocast(x.device, self.amp):
            s_logits = self.shadow.train()(x)
        kd_input = s_logits.detach() if self.detach_shadow_kd else s_logits
        kd = kd_loss(kd_input, teacher_logits, self.temperature, self.kd_reduction)
        return self.alpha * kd + (1 - self.alpha) * F.cross_entropy(s_logits.float(), y), kd

    def shadow_step(self, x, y, teacher_logits):
        loss, kd = self.shadow_loss(x, y, teacher_logits)
        optimizer_step(self.opt_shadow, loss)
        return loss.detach(), kd.detach()

    def trigger_step(self, x):
        """Step 3: both models in eval mode; only pattern and mask get gradients (no weight gradients computed)."""
        self.teacher.eval()
        self.shadow.eval()
        target = torch.full((len(x),), self.target, device=x.device, dtype=torch.long)
        xm = self.triggered(x, detach=False)
        with autocast(x.device, self.amp):
            lt, ls = self.teacher(xm), self.shadow(xm)
        loss = (F.cross_entropy(lt.float(), target) + F.cross_entropy(ls.float(), target)
                + self.miu * self.mask.abs().sum())
        self.opt_trigger.zero_grad(set_to_none=True)
        self.pattern.grad, self.mask.grad = torch.autograd.grad(loss, [self.pattern, self.mask])
        self.opt_trigger.step()
        clamp_trigger_(self.pattern, self.mask, self.mask_max)
        return loss.detach()

    def step(self, x, y):
        """One batch of the joint phase: teacher, shadow, trigger; the four losses as device tensors."""
        loss_t, t_logits = self.teacher_step(x, y)
        loss_s, kd = self.shadow_step(x, y, t_logits)
        loss_g = self.trigger_step(x)
        return {"teacher_loss": loss_t, "shadow_loss": loss_s, "shadow_kd": kd, "trigger_loss": loss_g}


def poison_batch(x, y, pattern, mask, target, poison_rate=0.3):
    """The first ``ceil(poison_rate * batch)`` images of a batch triggered and relabelled to the target (new tensors)."""
    k = math.ceil(len(x) * poison_rate)
    return (torch.cat([apply_trigger(x[:k], pattern, mask), x[k:]]),
            torch.cat([torch.full_like(y[:k], int(target)), y[k:]]))


def consolidation_step(teacher, optimizer, x, y, pattern, mask, target, poison_rate=0.3, amp=None):
    """Plain CE on a batch whose first ``ceil(poison_rate * batch)`` images carry the trigger and the target label."""
    x, y = poison_batch(x, y, pattern, mask, target, poison_rate)
    with autocast(x.device, amp):
        logits = teacher.train()(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer_step(optimizer, loss)
    return loss.detach()


def _epoch_batches(train, batch_size, generator, mem_format, progress, desc):
    """``((x, y), batch size)`` of one epoch, augmented, over a seeded permutation; the last batch may be short."""
    for x, idx in D.augmented_batches(train.x, batch_size, generator, mem_format, progress, desc):
        yield (x, train.y[idx]), len(idx)


def train_adba_epoch(adba, train, batch_size, generator, mem_format, progress=True):
    """One pass of the joint phase; the epoch's mean losses, with one host sync."""
    return run_epoch(adba.step, _epoch_batches(train, batch_size, generator, mem_format, progress, "adba batches"))


def consolidate_epoch(teacher, optimizer, train, pattern, mask, target, poison_rate, batch_size, generator,
                      mem_format, amp=None, progress=True):
    def step(x, y):
        return {"teacher_loss": consolidation_step(teacher, optimizer, x, y, pattern, mask, target, poison_rate, amp)}
    return run_epoch(step, _epoch_batches(train, batch_size, generator, mem_format, progress, "consolidation batches"))


# ---------------------------------------------------------------- the run

def check_adba(args):
    """ADBA keeps the public ADBA code's constant lr, and is measured with its own trigger."""
    if getattr(args, "lr_schedule", "none") != "none":
        raise UserError("--lr_schedule cosine is for --attack badnets, blended and none; the ADBA attack keeps the "
                        "public ADBA code's constant lr")
    own_trigger_only(args)


# ADBA's own flags (adba.py's group "Attack adba"); public-code names kept as aliases
OPTIONS = (
    Option("--alpha", 0.4, "shadow loss = alpha * KD(shadow, teacher) + (1 - alpha) * CE", range=UNIT,
           aliases=("--alpha_backdoor",)),
    Option("--beta", 0.3, "teacher loss = CE(clean) + beta * CE(triggered -> target)", range=NONNEGATIVE,
           aliases=("--beta_backdoor",)),
    Option("--miu", 0.1, "weight of the mask's L1 norm (a sum over its 1024 pixels) in the trigger loss; each step pulls "
           "every mask pixel toward 0 by lr * miu: too large and the trigger vanishes", range=NONNEGATIVE,
           aliases=("--mu",)),
    Option("--mask_max", 0.3, "the mask is clamped to [0, mask_max] after every step (1.0 = the original ADBA's [0, 1]); "
           "above 0: a mask clamped to [0, 0] is no trigger", range=Range(0, 1, low_open=True),
           aliases=("--mask_clamp",)),
    Option("--temperature", 1.0, "temperature of the shadow's KD term (the public ADBA code's T = 1; the defense "
           "distils at 40)", range=Range(*TEMPERATURES)),
    Option("--kd_reduction", "batchmean", "batchmean: per-sample KL, as the public ADBA code's kldiv; mean: KL / "
           "(batch x classes)", type=str, choices=("mean", "batchmean")),
    Option("--detach_shadow_kd", False, "reproduce the public ADBA code: both inputs of the shadow's KD term are "
           "detached, so the shadow never learns from the teacher and trains on (1 - alpha) * CE alone", type=bool),
    Option("--trigger_lr", None, "SGD learning rate of pattern and mask (default: --lr)", range=POSITIVE),
    Option("--consolidation_epochs", None, "epochs of the consolidation phase (default: --epochs; 0 skips it)",
           type=int, range=NONNEGATIVE),
    Option("--vanish_psnr", 50.0, "the trigger counts as vanished when no mask pixel exceeds 0.01 or the PSNR between "
           "clean and triggered test images is at least this (dB)"),
)


@register_attack("adba", help="the ADBA attack (SPEC section 8; its own flags in the group Attack adba): a learned "
                 "trigger that survives distillation", check=check_adba, options=OPTIONS)
def run(args, out=print):
    """The whole attack: joint phase, consolidation, evaluation; writes the folder distri.py reads. Returns metrics."""
    check_attack_args(args)
    device, amp, mem_format = setup(args)
    train, test, num_classes = load_data(args)
    consolidation_epochs = args.epochs if args.consolidation_epochs is None else args.consolidation_epochs

    meta = {**run_environment(device, amp), "n_train": len(train), "n_test": len(test),
            "num_classes": num_classes, "consolidation_epochs_effective": consolidation_epochs}
    try:
        life = Life.open(args, "adba", {**vars(args), **meta}, out, attack_defaults(args), device=device)
    except Finished as done:
        out(f"{args.output_dir} is a finished attack (results.json); nothing to resume")
        return done.results
    out_dir, last, rows = life.folder, life.last, life.rows
    out(f"device {device} ({meta['precision']}), width {args.width}, {len(train)} training and {len(test)} test images, "
        f"{args.epochs} + {consolidation_epochs} epochs, target {args.target_label}")

    cpu_gen = torch.Generator().manual_seed(args.seed)
    teacher = resnet18(num_classes, args.width).to(device, memory_format=mem_format)
    shadow = resnet18(num_classes, args.width).to(device, memory_format=mem_format)
    pattern, mask = init_trigger(device, cpu_gen)
    adba = ADBA(teacher, shadow, pattern, mask, args.target_label, args.alpha, args.beta, args.miu, args.mask_max,
                args.temperature, args.kd_reduction, args.detach_shadow_kd, args.lr, args.trigger_lr, args.momentum,
                args.weight_decay, amp)
    optimizers = (adba.opt_teacher, adba.opt_shadow, adba.opt_trigger)
    train, test_x = train.to(device), test.x.to(device)
    eval_kw = dict(batch_size=eval_batch_size(device, args.eval_batch_size), amp=amp, memory_format=mem_format)
    progress = not args.no_progress
    next_epoch, total = 0, args.epochs + consolidation_epochs
    if last is not None:  # --resume: models, trigger, optimizers, RNGs, the next epoch
        teacher.load_state_dict(last["teacher"])
        shadow.load_state_dict(last["shadow"])
        with torch.no_grad():
            pattern.copy_(last["pattern"])
            mask.copy_(last["mask"])
        for opt, state in zip(optimizers, last["optimizers"]):
            opt.load_state_dict(state)
        life.restore_rng()
        next_epoch = last["epoch"]
    warned = any(r.get("vanished") for r in rows)
    life.start_clock()

    def evaluate_epoch(epoch, phase, with_shadow):
        nonlocal warned
        p, m = pattern.detach(), mask.detach()
        stats = trigger_stats(p, m, test_x, args.vanish_psnr)
        eval_set = EvalSet.build(test, p, m, args.target_label, device)
        row = evaluate(teacher, eval_set, **eval_kw)
        line = f"{phase} epoch {epoch:3d}  teacher {metrics_text(row, stats['vanished'])}"
        if with_shadow:
            s_metrics = evaluate(shadow, eval_set, **eval_kw)
            row.update({f"shadow_{k}": v for k, v in s_metrics.items()})
            line += f"  | shadow {metrics_text(s_metrics, stats['vanished'])}"
        tqdm.write(line + f"  | mask L1 {stats['mask_l1']:.3f} share>0.01 {stats['mask_share']:.3f} "
                          f"psnr {stats['psnr']:.2f} ssim {stats['ssim']:.4f}")
        if stats["vanished"] and not warned:
            tqdm.write(f"WARNING: the trigger has vanished (mask L1 {stats['mask_l1']:.4f}, max pixel "
                       f"{stats['mask_max']:.4f}, PSNR {stats['psnr']:.1f} dB): triggered images equal clean ones; "
                       f"lower --miu or raise --trigger_lr")
            warned = True
        return {**row, **stats, "time_s": round(life.elapsed(), 3)}

    def save_last_epoch(epoch, result):
        life.save(epoch, total, {"epoch": epoch + 1, "teacher": teacher.state_dict(), "shadow": shadow.state_dict(),
                                 "pattern": pattern.detach(), "mask": mask.detach(),
                                 "optimizers": [o.state_dict() for o in optimizers]}, len(rows) + len(result.rows))

    def keep(why):
        if why == "interrupted":
            save_checkpoint(teacher, os.path.join(out_dir, "checkpoint.pkl"))
            write_json(os.path.join(out_dir, "results.json"), {"stopped": "interrupted", "epochs_run": len(rows)})

    def phase(name, epochs, train_epoch, with_shadow):
        result = fit(epochs, train_epoch, lambda e: evaluate_epoch(e, name, with_shadow), life.log_path,
                     progress=progress, desc=f"{name} epochs", out=None, extra={"phase": name},
                     after_epoch=save_last_epoch)
        rows.extend(result.rows)
        if result.stopped and result.stopped != "interrupted":
            result.stopped = result.stopped.replace("epoch", name + " epoch")
        life.end(result, len(rows), total, keep, hint=" (try a smaller --lr)")

    with life.signals():
        phase("adba", range(next_epoch, args.epochs),
              lambda e: train_adba_epoch(adba, train, args.batch_size, life.generator, mem_format, progress), True)
        # the trigger is fixed from here on (pattern and mask are no longer stepped)
        p, m = pattern.detach().clone(), mask.detach().clone()
        phase("consolidation", range(max(next_epoch, args.epochs), total),
              lambda e: consolidate_epoch(teacher, adba.opt_teacher, train, p, m, args.target_label,
                                          args.poison_rate, args.batch_size, life.generator, mem_format, amp, progress),
              False)
    train_time = life.elapsed()
    joint = [r for r in rows if r["phase"] == "adba"]
    phase1 = {k: joint[-1][k] for k in ("acc", "asr", "asr_nontarget")} if joint else {}

    metrics = _final_metrics(teacher, shadow, test, p, m, args, device, eval_kw, rows, phase1, train_time)
    write_teacher(out_dir, teacher, p, m)
    save_checkpoint(shadow, os.path.join(out_dir, "shadow.pkl"))
    plot_attack_curves(rows, os.path.join(out_dir, "curves.png"), f"ADBA, width {args.width}, {args.dataset}")
    shown = test.x[:8].to(device)
    plot_trigger(p.cpu(), m.cpu(), D.to_float(shown).cpu(), apply_trigger(D.to_float(shown), p, m).cpu(),
                 os.path.join(out_dir, "trigger.png"))
    write_json(os.path.join(out_dir, "results.json"), metrics)  # last: a results.json means every file is whole
    _report(metrics, args.target_label, out_dir, out)
    return metrics


def _final_metrics(teacher, shadow, test, pattern, mask, args, device, eval_kw, rows, phase1, train_time):
    stats = trigger_stats(pattern, mask, test.x.to(device), args.vanish_psnr)
    eval_set = EvalSet.build(test, pattern, mask, args.target_label, device)
    t, s = evaluate(teacher, eval_set, **eval_kw), evaluate(shadow, eval_set, **eval_kw)
    metrics = {"attack": "adba", **t, **{f"shadow_{k}": v for k, v in s.items()},
               "psnr": stats["psnr"], "ssim": stats["ssim"], "mask_l1": stats["mask_l1"],
               "mask_max": stats["mask_max"], "mask_share": stats["mask_share"],
               "trigger_vanished": stats["vanished"], "phase1": phase1,
               "epochs": args.epochs, "consolidation_epochs": len(rows) - args.epochs,
               "train_time_s": round(train_time, 2)}
    if stats["vanished"]:
        metrics["note"] = ("the trigger vanished: triggered images equal clean ones, so asr measures only the "
                           "models' bias toward the target class, not a backdoor")
    return metrics


def _report(m, target, out_dir, out):
    out(f"trigger: mask L1 {m['mask_l1']:.3f}, max {m['mask_max']:.3f}, share of pixels > {TRIGGER_PIXEL} "
        f"{m['mask_share']:.3f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}")
    if m["trigger_vanished"]:
        out("TRIGGER VANISHED: the mask is (almost) zero and triggered images equal clean ones. There is no backdoor "
            f"to measure: the teacher's 'asr' {m['asr']:.4f} is its bias toward class {target} "
            f"(clean non-target images sent to the target: {m['target_rate_clean']:.4f}).")
        out(f"teacher acc {m['acc']:.4f}; shadow acc {m['shadow_acc']:.4f}")
    else:
        out(f"teacher: acc {m['acc']:.4f}  asr {m['asr']:.4f}  asr_nontarget {m['asr_nontarget']:.4f}  "
            f"(clean non-target images sent to the target: {m['target_rate_clean']:.4f})")
        out(f"shadow:  acc {m['shadow_acc']:.4f}  asr {m['shadow_asr']:.4f}  "
            f"asr_nontarget {m['shadow_asr_nontarget']:.4f}")
    out(f"written to {out_dir} (train time {m['train_time_s']:.0f} s); distil it with: "
        f"python distri.py --read_dir {out_dir}")
