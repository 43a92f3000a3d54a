"""``distri.py --defense auto``: clean a teacher handed over without its trigger, in one command.

1. **Scan the teacher** (``scan.py``'s search, ``scan-teacher/``): the verdict, the suspected target and both
   families' inverted triggers; the folder's own trigger files are not read for any of it.
2. **Choose** (``choose``, from the measurements in docs/experiments.md): no backdoor found -> plain KD (a clean
   teacher should cost nothing); backdoored, target ``c`` -> ``ibau`` with its perturbation climbing the
   teacher's log-probability of ``c`` in an L2 ball of 6 on every 4th step and the mask-and-pattern trigger of ``c``
   re-inverted on the student every 2 epochs beside it (``RECIPE``), the student keeping the teacher's clean
   probability of ``c`` on the perturbed images (``TRAIN_MODE``, ``--adv_term target``) and its whole clean answer
   on the stamped ones: the ASR at the clean floor on every teacher measured (width-8 BadNets, Blended, ADBA;
   width-16 ADBA with a faint and a big trigger; two teachers it was not tuned on), at 95-99% of KD's accuracy.
   Where the defense images' batch statistics are far from the teacher's running ones (``bn_mismatch`` above
   ``BN_MISMATCH_MAX``: the demo's synthetic images, not CIFAR-100), the student trains in eval mode with its
   gradient clipped and the whole answer's unlearning term at weight 3 (``EVAL_MODE``).
3. **Run it** (``helper.jobs.distill.run`` in ``<choice>/``) with every other flag as given. Without a trigger
   to measure (no ``pattern.pt`` / ``mask.pt`` and no ``--trigger_dir``), the run measures its ASR with the scan's
   inverted mask-and-pattern trigger of the suspected class (of the class with the smallest one when nothing
   was flagged), copied into ``scan-teacher/``, towards that class: what the scan found, not the attack's
   trigger, and the run says so in one line.
4. **Scan the student** selected by the run with the same search (``scan-student/``) and measure the share of
   the scan images the teacher's inverted triggers of the suspected class still send to it on the student.

``results.json`` holds the verdict, the choice and why, the defense's numbers and both scans' summaries. With
``--resume`` a finished step is reused and the defense run is resumed (``--resume`` of distri.py).
"""
import argparse
import json
import os

import torch

from helper.data.images import to_float
from helper.data.inputs import load_data
from helper.data.teacher_dir import has_trigger, save_trigger
from helper.defenses.ibau import frozen_bn_stats
from helper.defenses.nc import add_inversion_args, check_inversion
from helper.defenses.options import check_args, defense_parser
from helper.jobs import distill
from helper.jobs.scan import family, run_scan, scan_parser
from helper.run.checkpoint import load_model
from helper.run.errors import UserError
from helper.run.runlog import make_run_dir, write_json
from helper.run.system import setup
from helper.train.evaluate import eval_mode
from helper.train.perturb import INVERTED, load_inverted, soft_kl

TEACHER_SCAN, STUDENT_SCAN = "scan-teacher", "scan-student"
# the defense of a backdoored verdict, besides its target: measured on the width-8 ADBA, BadNets and Blended teachers
# against radius 3 (which kept 1-2% more accuracy and let re-tuning bring back 0.09-0.40, docs/experiments.md)
RECIPE = ["--adv_search", "teacher", "--ibau_radius", "6", "--adv_every", "4", "--adv_mask_every", "2"]
# where the defense images' batch statistics are far from the teacher's running ones (``bn_mismatch`` above
# BN_MISMATCH_MAX nats on BN_IMAGES of them), the student trains in eval mode, its gradient clipped, the unlearning
# term at weight 3: on the demo's synthetic images (3.2-3.6 nats on three of its teachers, 0.89 on a fourth) the recipe
# in train mode answers one class after an epoch; in eval mode at weight 3 it keeps KD's accuracy with the ASR at the
# clean floor where the backdoor is strong (where it is weaker it unlearns the target class itself). On
# CIFAR-100 eleven CIFAR-10 teachers measure 0.24-0.86, and there eval mode costs accuracy and re-tuning brings the
# backdoor back (docs/experiments.md): the recipe stays in train mode
EVAL_MODE = ["--freeze_bn", "always", "--clip_grad", "1", "--adv_beta", "3"]
# in train mode the unlearning term keeps the teacher's probability of the flagged class alone (the binary KL of
# class c, ``--adv_term target``) instead of the whole answer: up to 2.7 points more accuracy on seven of nine
# teacher rows (none on the width-8 ADBA teacher) at the same or lower ASR, more brought back by re-tuning on the
# width-8 big ADBA triggers (where a clean model's re-tuned student fails too); in eval mode on the demo's strong
# teacher it left more of the backdoor, so eval mode keeps the whole answer (docs/experiments.md)
TRAIN_MODE = ["--adv_term", "target"]
BN_MISMATCH_MAX, BN_IMAGES = 1.5, 1024
METRICS = ("acc", "asr", "asr_nontarget", "ra", "target_acc", "teacher_target_acc", "retune_acc",
           "retune_asr_nontarget", "best_epoch", "train_time_s")


def choose(verdict, target, mismatch=0.0):
    """(the chosen defense's flags, why) for a scan's verdict and target class and the teacher's ``bn_mismatch`` on
    the defense images."""
    if target is None:
        return ["--defense", "kd"], ("the scan found no backdoor: plain KD, which keeps the teacher's accuracy "
                                     "and costs nothing extra")
    flags = ["--defense", "ibau", *RECIPE, "--adv_target", str(target)]
    why = (f"the scan flagged class {target}: ibau's perturbation (L2 radius 6) climbs the teacher's log-probability "
           f"of class {target} (the backdoor's shortcut) on every 4th step and class {target}'s mask-and-pattern "
           f"trigger is re-inverted on the student every 2 epochs; the student unlearns both")
    if mismatch > BN_MISMATCH_MAX:
        return flags + EVAL_MODE, why + (
            f", its whole answer on the perturbed images held to the teacher's clean one. The defense images' batch "
            f"statistics are far from the teacher's running ones (its answers differ by {mismatch:.2f} nats, above "
            f"{BN_MISMATCH_MAX}): the student trains in eval mode, its gradient clipped to norm 1, the unlearning "
            f"term at weight 3 (in train mode such images made the student answer one class; docs/experiments.md)")
    return flags + TRAIN_MODE, why + (
        f", its probability of class {target} on the perturbed images held to the teacher's clean one. Measured on "
        f"width-8 BadNets, Blended and ADBA, width-16 ADBA with a faint and a big trigger and two teachers it was not "
        f"tuned on: ASR at the clean floor on all of them, at 95-99% of KD's accuracy; re-tuning brings some back, "
        f"most on the big ADBA triggers (docs/experiments.md)")


def bn_mismatch(model, images, batch_size):
    """How far the batch statistics of ``images`` are from ``model``'s running ones, as its answers see it:

        mean over batches B of  (1/|B|) sum_{x in B} KL(softmax f_run(x) || softmax f_B(x)),

    ``f_run`` the model in eval mode (running statistics), ``f_B`` in train mode normalised by the batch ``B``'s own
    statistics (the running ones left as they are), consecutive batches of ``batch_size``, nats. 0 where every
    batch's statistics are the running ones."""
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            with eval_mode(model):
                running = model(x)
            with frozen_bn_stats(model):
                own = model(x)
            total += soft_kl(running, own).item() * len(x)
            n += len(x)
    return total / max(n, 1)


def split_argv(argv):
    """(auto's own flags, the rest): ``--defense auto`` and the scan's flags taken out of ``argv``."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--defense")
    p.add_argument("--resume", action="store_true")
    add_inversion_args(p)
    own, rest = p.parse_known_args(argv)
    return own, rest


def scan_args(args, read_dir, output_dir):
    """scan.py's arguments for ``read_dir`` from the run's data, system and inversion flags."""
    ns = scan_parser().parse_args([])
    for k, v in vars(args).items():
        if hasattr(ns, k):
            setattr(ns, k, v)
    ns.read_dir, ns.output_dir, ns.msg, ns.eval_target = read_dir, output_dir, "", None
    return ns


def scan_step(args, read_dir, folder, out, checkpoint="checkpoint.pkl"):
    """The scan of ``read_dir``'s ``checkpoint`` into ``folder``, or the finished one already there."""
    done = os.path.join(folder, "scan.json")
    if os.path.isfile(done) and os.path.isfile(os.path.join(folder, INVERTED)):
        with open(done) as f:
            out(f"{folder}: a finished scan, reused")
            return json.load(f)
    if os.path.isdir(folder) and os.listdir(folder):  # an unfinished scan (stopped before scan.json): redo it
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
    return run_scan(scan_args(args, read_dir, folder), out, checkpoint)


def verdict_of(scan):
    """(verdict, target) of a scan's results."""
    return scan["verdict"], scan["target"]


def suspect(scan):
    """The class whose inverted trigger measures the run: the scan's target, else the smallest mask trigger's."""
    if scan["target"] is not None:
        return scan["target"]
    sizes = scan["families"]["mask"]["size"]
    return min(range(len(sizes)), key=lambda c: sizes[c])


def inverted_mask_trigger(folder, c, mask_max):
    """(pattern, mask) of the scan's inverted mask-and-pattern trigger of class ``c`` (``x (1 - m) + p m``: the
    form of a teacher folder's trigger)."""
    params = load_inverted(folder, "mask", c)
    mask, pattern = family("mask", argparse.Namespace(nc_mask_max=mask_max, universal_lr=0.01)).trigger(params)
    return pattern.clone(), mask.clone()


def share_on(model_path, scan_folder, c, images, families, width):
    """Per family of ``families`` ({name: family}), the share of ``images`` (the scan's) that the inverted trigger of
    class ``c`` (found on the teacher) sends to ``c`` on the model in ``model_path``."""
    model = load_model(model_path, width).to(images.device).eval()
    res = {}
    with torch.no_grad():
        for name, fam in families.items():
            params = [p.to(images.device) for p in load_inverted(scan_folder, name, c)]
            res[name] = float((model(fam.apply(images, params)).argmax(1) == c).float().mean())
    return res


def run_auto(args, argv, out=print):
    """The whole of ``--defense auto`` (module docstring); returns its results (also written to results.json)."""
    own, rest = split_argv(argv)
    check_inversion(args)
    check_args(args)
    device, _, _ = setup(args)
    if not args.read_dir or not os.path.isfile(os.path.join(args.read_dir, "checkpoint.pkl")):
        raise UserError(f"--defense auto needs a teacher folder with checkpoint.pkl; {args.read_dir!r} has none")
    if args.resume and not args.output_dir:
        raise UserError("--resume needs --output_dir: the folder of the auto run to continue")
    if args.resume:
        root = args.output_dir
    else:
        root = make_run_dir(args.output_dir, name="auto" + (f"-{args.msg}" if args.msg else ""))
    out(f"auto: {args.read_dir} -> {root}")
    teacher_scan = scan_step(args, args.read_dir, os.path.join(root, TEACHER_SCAN), out)
    said, target = verdict_of(teacher_scan)
    teacher = load_model(os.path.join(args.read_dir, "checkpoint.pkl"), args.width).to(device)
    defense_images = load_data(args)[2].x  # the run's defense images (the scan's are their first nc_images)
    mismatch = bn_mismatch(teacher, to_float(defense_images[:BN_IMAGES]).to(device), args.batch_size)
    out(f"auto: the teacher's answers under the defense images' batch statistics differ from its answers under its "
        f"running ones by {mismatch:.3f} nats (train in eval mode above {BN_MISMATCH_MAX})")
    flags, why = choose(said, target, mismatch)
    out(f"auto: verdict {said}" + (f", target class {target}" if target is not None else "")
        + f"; running {' '.join(flags)}: {why}")
    c = suspect({**teacher_scan, "target": target})
    extra, measured_with = [], "the folder's own trigger" if args.trigger_dir is None else f"--trigger_dir {args.trigger_dir}"
    if args.trigger_dir is None and not has_trigger(args.read_dir):
        save_trigger(os.path.join(root, TEACHER_SCAN), *inverted_mask_trigger(os.path.join(root, TEACHER_SCAN), c,
                                                                          args.nc_mask_max))
        extra = ["--trigger_dir", os.path.join(root, TEACHER_SCAN), "--target_label", str(c)]
        measured_with = f"the scan's inverted mask trigger of class {c}"
        out(f"note: {args.read_dir} holds no trigger: the ASR below is the share sent to class {c} by the scan's "
            f"inverted mask-and-pattern trigger, not by the attack's own trigger, which nobody here has; it can "
            f"understate what the attack's trigger still does (docs/usage.md)")
    run_dir = os.path.join(root, flags[1])
    resume = ["--resume"] if args.resume and os.path.isdir(run_dir) else []
    run_argv = [*rest, "--read_dir", args.read_dir, *flags, *extra, "--output_dir", run_dir, *resume]
    defended = distill.run(defense_parser(run_argv).parse_args(run_argv), out)
    student_scan = scan_step(args, run_dir, os.path.join(root, STUDENT_SCAN), out, checkpoint="selected.pkl")
    scan_ns = scan_args(args, None, None)
    images = to_float(defense_images[:scan_ns.nc_images]).to(device)  # the scan's images, once
    families = {n: family(n, scan_ns) for n in scan_ns.families}
    shares = {who: share_on(os.path.join(folder, ckpt), os.path.join(root, TEACHER_SCAN), c, images, families,
                            args.width)
              for who, folder, ckpt in (("teacher", args.read_dir, "checkpoint.pkl"),
                                        ("student", run_dir, "selected.pkl"))}
    index = {n: {"teacher": teacher_scan["families"][n]["anomaly_index"][c],
                 "student": student_scan["families"][n]["anomaly_index"][c]} for n in teacher_scan["families"]}
    still = c in [k for s in student_scan["families"].values() for k in s["flagged"]]
    results = {"verdict": said, "target": target, "suspect": c, "bn_mismatch": mismatch,
               "choice": flags, "why": why, "measured_with": measured_with,
               "defense": {k: defended.get(k) for k in METRICS if k in defended},
               "scan": {"teacher": _scan_summary(teacher_scan), "student": _scan_summary(student_scan)},
               "index_of_suspect": index, "share_to_suspect": shares, "suspect_still_flagged": still,
               "scan_flags": {k: v for k, v in vars(own).items() if k not in ("defense", "resume")}}
    write_json(os.path.join(root, "results.json"), results)
    out(f"auto: {flags[1]} -> Acc {defended['acc']:.4f}, ASR non-target {defended['asr_nontarget']:.4f} "
        f"({measured_with}); class {c} on the student: "
        + (f"its own test images' Acc {defended['target_acc']:.4f} (teacher {defended['teacher_target_acc']:.4f}), "
           if defended.get("target_acc") is not None and defended.get("teacher_target_acc") is not None else "")
        + ", ".join(
            f"{n} index {index[n]['student']:.2f} (teacher {index[n]['teacher']:.2f}), share under the teacher's "
            f"trigger {shares['student'][n]:.2f} (teacher {shares['teacher'][n]:.2f})" for n in index)
        + ("; still flagged" if still else "; no longer flagged" if target is not None else "; not flagged")
        + f"; the student's scan: {student_scan['verdict']}"
        + (f", class {student_scan['target']}" if student_scan["target"] is not None else ""))
    out(f"written to {root}")
    return results


def _scan_summary(scan):
    return {"verdict": scan["verdict"], "target": scan["target"], "time_s": scan["time_s"],
            **{n: {k: s[k] for k in ("size", "anomaly_index", "flagged", "margin")} for n, s in scan["families"].items()}}
