"""The defense run of distri.py: any registered defense (``helper.defenses``) of a frozen backdoored teacher."""
import copy
import os

from helper.data.inputs import load_inputs
from helper.data.teacher_dir import teacher_attack, write_teacher
from helper.data.trigger import inert_trigger_warning, trigger_stats
from helper.defenses import DEFENSES
from helper.defenses.options import check_args, defense_parser
from helper.jobs.retune import retune_results
from helper.report.aggregate import asr_last10
from helper.report.attention import write_run_attention
from helper.report.plot import plot_curves
from helper.run.errors import UserError
from helper.run.lifecycle import Life
from helper.run.resume import Finished
from helper.run.runlog import atomic_torch_save, write_json
from helper.run.system import eval_batch_size, eval_every, run_environment, setup
from helper.train.engine import Fit, fit, image_epoch
from helper.train.evaluate import EvalSet, conv_weight_norm, evaluate
from models import resnet18

METRICS = ("acc", "asr", "asr_nontarget", "ra", "target_acc")  # target_acc: the target class's own clean Acc


def _run_name(args):
    return DEFENSES[args.defense].run_name(args) + (f"-{args.msg}" if args.msg else "")


def _metrics_line(label, m):
    return f"{label:<17}" + "  ".join(f"{k} {m[k]:.4f}" for k in METRICS)


def parser_defaults(args):
    """The defaults of the run's defense's flags (what a flag newer than a resumed run was, in effect)."""
    argv = ["--defense", args.defense]
    return vars(defense_parser(argv).parse_args(argv))


def run(args, out=print):
    """A whole defense run; returns the results dict (also written to results.json). The steps, in order: check the
    flags, set the device up, read the inputs, build the student and the defense, open (or resume) the run folder,
    measure the start, train every stage, select, re-tune, write."""
    check_args(args)
    kind = DEFENSES[args.defense]
    device, amp, mem_format = _device(args, kind)
    every = eval_every(device, args.eval_every)  # --eval_every auto: decided here, on the run's own device
    teacher, pattern, mask, test_split, defense_split, retune_data = load_inputs(args)
    teacher, student = _models(args, teacher, device, mem_format)
    images = defense_split.x.to(device)
    defense = kind(args, teacher, device, amp, len(images), images)
    prepared = defense.prepare(student)
    stages = defense.stages(student)
    eval_set = EvalSet.build(test_split, pattern, mask, args.target_label, device)
    select_from = defense.selection_start(args.select_from if args.epoch > args.select_from else 0)
    meta = {**run_environment(device, amp), "n_defense": len(images), "n_test": len(eval_set.labels),
            **defense.run_meta(), "teacher_width": teacher.width, "lr_drop_enabled": defense.lr_drop_enabled,
            "select_from_effective": select_from, "eval_precision": "fp32", "eval_every_effective": every}
    try:
        life = Life.open(args, kind.run_name(args), {**vars(args), **meta}, out, parser_defaults(args),
                         resolved={"eval_every": every}, device=device)
    except Finished as done:
        out(f"{args.output_dir} is a finished run (results.json); nothing to resume")
        defense.close()
        return done.results
    out(f"git {meta['git']}, torch {meta['torch']}, device {device} ({meta['precision']}), defense {args.defense}, "
        f"teacher width {teacher.width}, {len(images)} defense images, {len(eval_set.labels)} test images"
        + (f", {defense.start_line()}" if defense.start_line() else ""))
    if select_from != args.select_from:
        out(f"note: {defense.selection_note(args.select_from, select_from)}")

    # one evaluation precision for every defense: fp32 with TF32 off (evaluate), whatever the training ran in
    eval_kw = dict(batch_size=eval_batch_size(device, args.eval_batch_size), memory_format=mem_format)
    results, init_metrics = _start(args, kind, teacher, student, eval_set, pattern, mask, eval_kw, prepared,
                                   select_from, meta, len(images), out)
    run = Training(args, life, defense, stages, student, images, eval_set, eval_kw, select_from, every, mem_format)
    try:
        with life.signals():
            run.train(results, pattern, mask)
    finally:
        defense.close()
    selection = run.selection
    if args.epoch == 0:  # no training: the prepared student is the result (CLP alone, BCU's re-initialisation alone)
        results.update({k: init_metrics[k] for k in (*METRICS, "top_class_share")}, best_epoch=None, kd_loss=None)
        selection.best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if selection.best is not None and "acc" not in selection.best:  # --eval_every skipped it: evaluate it now
        selection.best = {**selection.best, **evaluate(_selected(student, selection), eval_set, **eval_kw)}
        results["selected_evaluated_at_end"] = True
    if args.retune:  # the re-tuning attack on a copy of the selected student; selected.pkl is written as selected
        results.update(retune_results(_selected(student, selection), *retune_data, pattern, mask, eval_set, args, amp,
                                      mem_format, eval_kw, out))
    write_run_attention(life.folder, teacher, student, selection.best_state, test_split, pattern, mask,
                        args.target_label, out)
    return _finish(life, run.rows, results, selection.best, selection.best_state, defense.evaluated_model(student),
                   pattern, mask, args, stages, out)


def _device(args, kind):
    """(device, autocast dtype, memory format) of the run; ``--amp bf16`` refused for a defense that needs fp32."""
    needs_fp32 = kind.needs_fp32(args)
    if needs_fp32 and args.amp == "bf16":
        raise UserError(kind.fp32_reason)
    return setup(args, needs_fp32=needs_fp32)


def _models(args, teacher, device, mem_format):
    """(teacher, student) on the device: the student a copy of the teacher, or fresh weights (--using_checkpoint 0)."""
    teacher = teacher.to(device, memory_format=mem_format)
    if args.using_checkpoint:
        student = copy.deepcopy(teacher)
    else:
        student = resnet18(teacher.num_classes, teacher.width).to(device, memory_format=mem_format)
    return teacher, student.requires_grad_(True)


def _selected(student, selection):
    """A copy of the student holding the selected state (the student itself where nothing was selected)."""
    selected = copy.deepcopy(student)
    if selection.best_state is not None:
        selected.load_state_dict(selection.best_state)
    return selected


def _start(args, kind, teacher, student, eval_set, pattern, mask, eval_kw, prepared, select_from, meta, n_defense,
           out):
    """The teacher and the starting student measured, and the results dict begun with them; a teacher without a
    working backdoor (a clean one, a failed attack) is no test of a defense: the warning says so before training."""
    teacher_metrics = evaluate(teacher, eval_set, **eval_kw)
    init_metrics = evaluate(student, eval_set, **eval_kw)
    out(_metrics_line("teacher:", teacher_metrics))
    out(_metrics_line("student (start):", init_metrics))
    results = {**{f"teacher_{k}": teacher_metrics[k] for k in METRICS}, "student_init": init_metrics,
               "defense": args.defense, "defense_label": kind.run_label(args), **kind.result_fields(args),
               "n_defense": n_defense, "train_precision": meta["precision"], "eval_precision": "fp32",
               "select_from": select_from, **prepared}
    attack = teacher_attack(args.read_dir)
    trigger = trigger_stats(pattern, mask, eval_set.clean, with_ssim=False)
    results.update(teacher_attack=attack, trigger_dir=args.trigger_dir, trigger_psnr=trigger["psnr"])
    warning = inert_trigger_warning(teacher_metrics["asr_nontarget"], trigger, attack)
    if warning:
        out(f"warning: {warning}")
        results["warnings"] = [warning]
    return results, init_metrics


class Training:
    """The defense's stages trained one after the other through the engine's ``fit``, resumable: the rows logged, the
    last stage's selection (``Fit``), ``last.pt`` after each epoch (``Life.save``)."""

    def __init__(self, args, life, defense, stages, student, images, eval_set, eval_kw, select_from, every, mem_format):
        self.args, self.life, self.defense, self.stages, self.student = args, life, defense, stages, student
        self.images, self.eval_set, self.eval_kw, self.select_from = images, eval_set, eval_kw, select_from
        self.every, self.mem_format = every, mem_format
        self.first_stage, self.first_epoch, self.rows, self.selection = 0, 0, [], Fit()
        last = life.last
        if last is not None:  # --resume: every stage's model and optimizer, the lr drop, the RNGs, the selection
            for stage, model, opt, dropped in zip(stages, last["models"], last["optimizers"], last["lr_drops"]):
                stage.model.load_state_dict(model)
                stage.optimizer.load_state_dict(opt)
                stage.lr_drop.restore(dropped)
            life.restore_rng()
            defense.restore(last.get("defense", {}))
            self.first_stage, self.first_epoch, self.rows = last["stage"], last["epoch"], life.rows
            self.selection = Fit(best=last["best"], best_state=last["best_state"])
        life.start_clock()

    def train(self, results, pattern, mask):
        """Every stage from where the run stands; a stop ends the run (``Life.end``) with what it has written."""
        args, defense = self.args, self.defense
        for i, stage in enumerate(self.stages):
            if i < self.first_stage:
                continue
            is_last = i == len(self.stages) - 1
            result = fit(range(self.first_epoch if i == self.first_stage else 0, stage.epochs),
                         lambda epoch, stage=stage: self.train_epoch(stage, epoch),
                         lambda epoch, stage=stage: self.evaluate_epoch(stage, epoch), self.life.log_path,
                         select_key="kd_loss" if is_last else None, select_from=self.select_from,
                         state=lambda: {k: v.detach().clone()
                                        for k, v in defense.evaluated_model(self.student).state_dict().items()},
                         progress=not args.no_progress, desc=f"{stage.name or args.defense} epochs",
                         extra={"stage": stage.name} if stage.name else None,
                         result=self.selection if is_last else Fit(),
                         after_epoch=lambda e, r, i=i: self.save(i, e, r), quiet=defense.quiet)
            self.rows += result.rows
            result.rows = []

            def keep(why, result=result):
                results["stopped"] = why
                interrupted = why == "interrupted"
                _finish(self.life, self.rows, results, result.best if interrupted else None,
                        result.best_state if interrupted else None,
                        defense.evaluated_model(self.student) if interrupted else None, pattern, mask, args,
                        self.stages)
            self.life.end(result, len([r for r in self.rows if "stage" not in r]), args.epoch, keep)

    def train_epoch(self, stage, epoch):
        schedule = stage.begin(epoch)
        stage.model.train(self.args.opt_lr > 0)  # --opt_lr 0 trains nothing, batch-norm statistics included
        means = image_epoch(stage.step, self.images, self.args.batch_size, self.life.generator, self.mem_format,
                            not self.args.no_progress)
        stage.end(epoch, means)
        return {**means, **schedule}

    def evaluate_epoch(self, stage, epoch):
        full = (epoch + 1) % self.every == 0 or epoch == stage.epochs - 1
        model = self.defense.evaluated_model(stage.model)  # stage.model unless the defense reports another
        return {**(evaluate(model, self.eval_set, **self.eval_kw) if full else {}),
                "conv_weight_norm": conv_weight_norm(model), "diag": self.defense.diagnostics(model),
                "time_s": round(self.life.elapsed(), 3)}

    def save(self, i, epoch, fit_result):
        stages = self.stages
        nxt = (i, epoch + 1) if epoch + 1 < stages[i].epochs else (i + 1, 0)
        self.life.save(epoch, stages[i].epochs, {
            "stage": nxt[0], "epoch": nxt[1], "models": [s.model.state_dict() for s in stages],
            "optimizers": [s.optimizer.state_dict() for s in stages], "lr_drops": [s.lr_drop.state() for s in stages],
            "best": fit_result.best, "best_state": fit_result.best_state, "defense": self.defense.state()},
            len(self.rows) + len(fit_result.rows))


def _finish(life, rows, results, best, best_state, student, pattern, mask, args, stages, out=None):
    """Write the checkpoints, curves.png and, last, results.json; print the selected result."""
    out_dir = life.folder
    if best is not None:
        results.update({k: best.get(k) for k in (*METRICS, "top_class_share", "kd_loss")}, best_epoch=best["epoch"])
    final = [r for r in rows if "stage" not in r]
    if final:
        results["final"] = {k: final[-1].get(k) for k in ("epoch", *METRICS, "kd_loss")}
        results["asr_last10_mean"] = asr_last10(final)
    results.update(lr_dropped_at=stages[-1].lr_drop.dropped_at, epochs_run=len(final),
                   train_time_s=round(life.elapsed(), 2))
    if student is not None:
        write_teacher(out_dir, student, pattern, mask)
    if best_state is not None:
        atomic_torch_save([{k: v.cpu() for k, v in best_state.items()}], os.path.join(out_dir, "selected.pkl"))
    if final:
        title = f"{_run_name(args)}: selected epoch {results.get('best_epoch')}"
        plot_curves(final, os.path.join(out_dir, "curves.png"), title, results.get("best_epoch"))
    write_json(os.path.join(out_dir, "results.json"), results)  # last: a results.json means every file is whole
    if out is not None and best is not None:
        out(f"result (epoch {best['epoch']}, lowest KD loss {best['kd_loss']:.4f} from epoch {results['select_from']}): "
            + "  ".join(f"{k} {best[k]:.4f}" for k in METRICS if best.get(k) is not None))
        if best.get("top_class_share", 0) >= 0.99:
            out(f"warning: at the selected epoch the student gives one class to {best['top_class_share']:.1%} of the "
                f"clean test images: its output no longer depends on its input, so its ASR says nothing about the backdoor")
        out(f"written to {out_dir}")
    return results
