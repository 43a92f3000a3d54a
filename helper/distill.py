"""The distillation run of distri.py: KD or ASD from a frozen backdoored teacher (SPEC sections 4-6)."""
import copy
import functools
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from helper import data as D
from helper.checkpoint import load_model, save_checkpoint
from helper.cli import check_args
from helper.errors import UserError
from helper.evaluate import EvalSet, evaluate
from helper.features import FeatureHooks
from helper.losses import attention_shifting_loss, kd_loss
from helper.plot import plot_curves
from helper.runlog import append_jsonl, make_run_dir, write_json
from helper.schedule import LrDrop, asd_ratio, loss_weights
from helper.system import (CompiledOrEager, amp_dtype, autocast, configure, eval_batch_size, memory_format,
                           run_environment, select_device, use_compile)
from helper.trigger import load_trigger, save_trigger
from models import resnet18


class Distiller:
    """Teacher, student, the hooks on both and the loss of one step; one object so the loop and bench.py share it.

    ``step(x, kd_weight, asl_weight)`` runs one optimisation step on a batch and returns the KD loss and
    the ASL (None when its weight is 0, when it is not computed) as device tensors: no host sync.
    """

    def __init__(self, teacher, student, optimizer, layers, temperature=40.0, kd_reduction="mean", eps=0.1,
                 amp=None, compile_losses=False, asl_samples="all"):
        self.teacher, self.student, self.optimizer = teacher.eval(), student, optimizer
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.t_hooks = FeatureHooks(teacher, layers)
        self.s_hooks = FeatureHooks(student, layers)
        self.temperature, self.kd_reduction, self.eps, self.amp = temperature, kd_reduction, eps, amp
        # "first": ASL on sample 0 of each batch only, as the public code computes it (SPEC section 9).
        # "all" takes the features as they are: even a full slice ``x[:]`` would add a SliceBackward whose
        # gradient is a zero-filled contiguous copy, which costs a fill, a copy and a layout change per layer.
        self.first_sample_only = asl_samples == "first"
        self.asl_fn, self.kd_fn = attention_shifting_loss, kd_loss
        if compile_losses:  # ASL: its value-and-gradient kernel is compiled (one fused pass), not the autograd Function
            self.asl_fn = functools.partial(attention_shifting_loss, compiled=True)
            self.kd_fn = CompiledOrEager(kd_loss)

    def losses(self, x, with_asl=True):
        """Forward both models on ``x``; (KD loss, mean ASL over the hooked layers or None)."""
        self.t_hooks.enabled = self.s_hooks.enabled = with_asl
        device = x.device
        with autocast(device, self.amp):
            with torch.no_grad():
                t_logits = self.teacher(x)
            s_logits = self.student(x)
        kd = self.kd_fn(s_logits, t_logits, self.temperature, self.kd_reduction)
        return kd, self.hooked_asl() if with_asl else None

    def hooked_asl(self):
        """Mean ASL over the hooked layers of the last forward of both models (their features are released)."""
        t_feats, s_feats = self.t_hooks.pop(), self.s_hooks.pop()
        if self.first_sample_only:
            t_feats = {n: f[:1] for n, f in t_feats.items()}
            s_feats = {n: f[:1] for n, f in s_feats.items()}
        layers = self.s_hooks.layers
        return sum(self.asl_fn(t_feats[n], s_feats[n], self.eps) for n in layers) / len(layers)

    def step(self, x, kd_weight, asl_weight):
        kd, asl = self.losses(x, with_asl=asl_weight != 0)
        loss = kd_weight * kd + (asl_weight * asl if asl is not None else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return kd.detach(), None if asl is None else asl.detach()

    def close(self):
        self.t_hooks.remove()
        self.s_hooks.remove()


def conv_weight_norm(model):
    """L2 norm of all convolution weights. ASL's gradient grows as 1/|s| and can inflate it many times over;
    behind batch-norm a larger norm means a smaller effective learning rate, so this explains slow recovery."""
    with torch.no_grad():
        norms = [m.weight.float().norm() ** 2 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        return torch.stack(norms).sum().sqrt().item()


def make_optimizer(params, args):
    if args.opt_type == "SGD":
        return torch.optim.SGD(params, lr=args.opt_lr, momentum=args.opt_mo, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.opt_lr, weight_decay=args.weight_decay)


def train_one_epoch(distiller, images, kd_weight, asl_weight, batch_size, generator, mem_format, progress=True):
    """One pass over the defense images (uint8 on the device); the epoch's means, with one host sync."""
    distiller.student.train()
    device = images.device
    kd_sum = torch.zeros((), device=device)
    asl_sum = torch.zeros((), device=device)
    for x, idx in D.augmented_batches(images, batch_size, generator, mem_format, progress):
        kd, asl = distiller.step(x, kd_weight, asl_weight)
        kd_sum += kd * len(idx)
        if asl is not None:
            asl_sum += asl * len(idx)
    kd_mean, asl_mean = (torch.stack([kd_sum, asl_sum]) / len(images)).tolist()
    return {"kd_loss": kd_mean, "asl": asl_mean if asl_weight != 0 else None}


def load_inputs(args):
    """Everything a run reads, checked before its folder is made: teacher, trigger, test set, defense images."""
    read_dir = args.read_dir
    if not read_dir or not os.path.isdir(read_dir):
        raise UserError(f"read_dir not found: {read_dir!r} (set read_dir at the top of distri.py or pass --read_dir)")
    teacher = load_model(os.path.join(read_dir, "checkpoint.pkl"), args.width)
    pattern, mask = load_trigger(read_dir, args.thresh_mask)
    kw = dict(data_root=args.data_root, download=not args.no_download, synthetic_seed=args.synthetic_seed,
              synthetic_train=args.synthetic_train, synthetic_test=args.synthetic_test)
    task_train, task_test = D.load_splits(args.dataset, role="task", **kw)
    if args.finetune_in_out == "in":
        defense_train, defense_test = task_train, task_test
    else:
        defense_train, defense_test = D.load_splits(args.finetunedata, role="ood", **kw)
    pool = D.defense_pool(defense_train, defense_test, args.finetune_extend)
    defense = D.seeded_subset(pool, args.subset_rate, args.seed)
    if not 0 <= args.target_label < teacher.num_classes:
        raise UserError(f"--target_label {args.target_label} is not a class of the {teacher.num_classes}-class teacher")
    if len(task_test) and int(task_test.y.max()) >= teacher.num_classes:
        raise UserError(f"{args.dataset} has labels up to {int(task_test.y.max())} but the teacher has "
                        f"{teacher.num_classes} classes: --dataset must be what the teacher was trained on")
    return teacher, pattern, mask, task_test, defense


def run(args, out=print):
    """A whole distillation run; returns the results dict (also written to results.json)."""
    check_args(args)
    device = select_device(args.device)
    configure(device, args.seed)
    amp, mem_format = amp_dtype(device, args.amp), memory_format(device)
    teacher, pattern, mask, test_split, defense = load_inputs(args)
    layers = [s.strip() for s in args.hook_layers.split(",") if s.strip()]

    teacher = teacher.to(device, memory_format=mem_format)
    if args.using_checkpoint:
        student = copy.deepcopy(teacher)
    else:
        student = resnet18(teacher.num_classes, teacher.width).to(device, memory_format=mem_format)
    for p in student.parameters():
        p.requires_grad_(True)
    optimizer = make_optimizer(student.parameters(), args)
    distiller = Distiller(teacher, student, optimizer, layers, args.temperature, args.kd_reduction, args.eps,
                          amp, use_compile(device, args.compile), args.asl_samples)
    eval_set = EvalSet.build(test_split, pattern, mask, args.target_label, device)
    images = defense.x.to(device)
    lr_drop = LrDrop(optimizer, args.lr_drop_kd, args.lr_drop_to,
                     enabled=args.lr_drop == "on" or (args.lr_drop == "auto" and len(images) >= 50000))
    select_from = args.select_from if args.epoch > args.select_from else 0

    name = ("asd" if args.ratio_type == "scheduler" else "kd") + (f"-{args.msg}" if args.msg else "")
    out_dir = make_run_dir(args.output_dir, name=name)
    meta = {**run_environment(device, amp), "n_defense": len(images),
            "n_test": len(eval_set.labels), "hooked_layers": distiller.s_hooks.layers,
            "teacher_width": teacher.width, "lr_drop_enabled": lr_drop.enabled, "select_from_effective": select_from}
    write_json(os.path.join(out_dir, "args.json"), {**vars(args), **meta})
    save_trigger(out_dir, pattern, mask)
    out(f"run folder: {out_dir}")
    out(f"git {meta['git']}, torch {meta['torch']}, device {device} ({meta['amp']}), teacher width {teacher.width}, "
        f"{len(images)} defense images, "
        f"{len(eval_set.labels)} test images, hooks on {len(distiller.s_hooks.layers)} layers")
    if select_from != args.select_from:
        out(f"note: the run has {args.epoch} epochs, not more than --select_from {args.select_from}: "
            f"the result is selected over all epochs")

    eval_kw = dict(batch_size=eval_batch_size(device, args.eval_batch_size), amp=amp, memory_format=mem_format)
    teacher_metrics = evaluate(teacher, eval_set, **eval_kw)
    init_metrics = evaluate(student, eval_set, **eval_kw)
    out(f"teacher:         acc {teacher_metrics['acc']:.4f}  asr {teacher_metrics['asr']:.4f}  "
        f"asr_nontarget {teacher_metrics['asr_nontarget']:.4f}")
    out(f"student (start): acc {init_metrics['acc']:.4f}  asr {init_metrics['asr']:.4f}  "
        f"asr_nontarget {init_metrics['asr_nontarget']:.4f}")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    log_path = os.path.join(out_dir, "log.jsonl")
    rows, best, best_state = [], None, None
    results = {"teacher_acc": teacher_metrics["acc"], "teacher_asr": teacher_metrics["asr"],
               "teacher_asr_nontarget": teacher_metrics["asr_nontarget"], "student_init": init_metrics,
               "ratio_type": args.ratio_type, "n_defense": len(images), "select_from": select_from}
    start = time.time()
    bar = tqdm(range(args.epoch), desc="epochs", file=sys.stdout, disable=args.no_progress)
    try:
        for epoch in bar:
            kd_w, asl_w = loss_weights(epoch, args.ratio_type, args.main_loss_ratio, args.new_loss_ratio)
            lr = lr_drop.lr
            stats = train_one_epoch(distiller, images, kd_w, asl_w, args.batch_size, generator, mem_format,
                                    progress=not args.no_progress)
            metrics = evaluate(student, eval_set, **eval_kw)
            lam = asd_ratio(epoch) if args.ratio_type == "scheduler" else None
            row = {"epoch": epoch, **stats, "lambda": lam, "kd_weight": kd_w, "asl_weight": asl_w, "lr": lr,
                   **metrics, "conv_weight_norm": conv_weight_norm(student), "time_s": round(time.time() - start, 3)}
            append_jsonl(log_path, row)
            rows.append(row)
            if not math.isfinite(stats["kd_loss"]) or (stats["asl"] is not None and not math.isfinite(stats["asl"])):
                raise FloatingPointError(epoch)
            if lr_drop.step(epoch, stats["kd_loss"]):
                tqdm.write(f"epoch {epoch}: mean KD loss {stats['kd_loss']:.4f} <= {args.lr_drop_kd}: lr -> {args.lr_drop_to}")
            if epoch >= select_from and (best is None or stats["kd_loss"] < best["kd_loss"]):
                best = row
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            asl_text = f"{stats['asl']:.4f}" if stats["asl"] is not None else "-"
            tqdm.write(f"epoch {epoch:3d}  kd {stats['kd_loss']:.4f}  asl {asl_text}  lr {lr:.1e}  "
                       f"acc {metrics['acc']:.4f}  asr {metrics['asr']:.4f}  asr_nt {metrics['asr_nontarget']:.4f}")
    except FloatingPointError as e:
        results["stopped"] = f"non-finite loss at epoch {e.args[0]}"
        _finish(out_dir, rows, results, best, best_state, None, args, lr_drop, start)
        raise UserError(f"non-finite loss at epoch {e.args[0]}; stopped, what was written is kept in {out_dir}") from None
    finally:
        bar.close()
        distiller.close()
    return _finish(out_dir, rows, results, best, best_state, student, args, lr_drop, start, out)


def _finish(out_dir, rows, results, best, best_state, student, args, lr_drop, start, out=None):
    """Write results.json, the checkpoints and curves.png; print the selected result."""
    if best is not None:
        results.update({k: best[k] for k in ("acc", "asr", "asr_nontarget", "top_class_share", "kd_loss")},
                       best_epoch=best["epoch"])
    if rows:
        results["final"] = {k: rows[-1][k] for k in ("epoch", "acc", "asr", "asr_nontarget", "kd_loss")}
    results.update(lr_dropped_at=lr_drop.dropped_at, epochs_run=len(rows), train_time_s=round(time.time() - start, 2))
    write_json(os.path.join(out_dir, "results.json"), results)
    if student is not None:
        save_checkpoint(student, os.path.join(out_dir, "checkpoint.pkl"))
    if best_state is not None:
        torch.save([{k: v.cpu() for k, v in best_state.items()}], os.path.join(out_dir, "selected.pkl"))
    if rows:
        title = f"{args.ratio_type}: selected epoch {results.get('best_epoch')}"
        plot_curves(rows, os.path.join(out_dir, "curves.png"), title, results.get("best_epoch"))
    if out is not None and best is not None:
        out(f"result (epoch {best['epoch']}, lowest KD loss {best['kd_loss']:.4f} from epoch {results['select_from']}): "
            f"acc {best['acc']:.4f}  asr {best['asr']:.4f}  asr_nontarget {best['asr_nontarget']:.4f}")
        if best.get("top_class_share", 0) >= 0.99:
            out(f"warning: at the selected epoch the student gives one class to {best['top_class_share']:.1%} of the "
                f"clean test images: its output no longer depends on its input, so its ASR says nothing about the backdoor")
        out(f"written to {out_dir}")
    return results
