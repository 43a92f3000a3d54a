"""``scan.py``: is this teacher backdoored, towards which class, and what does its trigger look like?

What a defender without the trigger can run. On the first ``--nc_images`` defense images (unlabelled, the
same ones a defense run draws), for every class and each trigger family (``--families``):

- ``mask``: Neural Cleanse's ``x (1 - m) + p m``, size ``||m||_1``;
- ``universal``: one perturbation ``clip(x + delta, 0, 1)`` for all images, size ``||delta||_2``;

the smallest trigger that sends ``--nc_success`` of the images to that class (``helper.train.perturb.minimal_trigger``).
A backdoor is a shortcut to its target: that class's trigger is much smaller than the others'. Neural
Cleanse's anomaly index (MAD) over the classes of each family; a class below the median with an index above
``--nc_threshold`` is flagged. Verdict: ``backdoored`` when a family flags a class (the target: the class the
most families flag, the larger index first), else ``no backdoor found``.

The folder's ``pattern.pt`` / ``mask.pt`` are not opened until the verdict is written to ``scan.json``; when
they exist they are read afterwards, for evaluation only: the true trigger is drawn beside the inverted ones
and the cosine similarity of each family's perturbation for the named class to the true one is recorded
(``evaluation``), with the true trigger's own size in each family's measure.
"""
import argparse
import os
import time

import torch

from helper.data.images import to_float
from helper.data.teacher_dir import has_trigger, load_trigger
from helper.data.trigger import apply_trigger
from helper.defenses.nc import SCAN_BATCH, SCAN_IMAGES, add_inversion_args, check_inversion, inversion_kw, threshold_of
from helper.data.inputs import load_data
from helper.report.plot import plot_scan
from helper.run.checkpoint import load_model
from helper.run.cli import add_data_args, add_output_args, add_system_args
from helper.run.errors import UserError
from helper.run.lifecycle import Life
from helper.run.runlog import atomic_torch_save, write_json
from helper.run.system import run_environment, setup
from helper.train.evaluate import eval_mode
from helper.train.perturb import INVERTED, STATISTICS, MaskPattern, Universal, anomaly_index, flagged_classes, invert_all

FAMILIES = ("mask", "universal")


def scan_parser():
    p = argparse.ArgumentParser(
        description="Scan a teacher for a backdoor without its trigger: the smallest trigger towards each class "
                    "(mask-and-pattern, universal L2), Neural Cleanse's anomaly index, a verdict; scan.json, scan.png",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p, trigger=False)
    g = p.add_argument_group("Model")
    g.add_argument("--width", type=int, default=None, help="ResNet18 base width; default: read from the checkpoint")
    g = p.add_argument_group("Scan")
    add_inversion_args(g, images=SCAN_IMAGES, batch=SCAN_BATCH)
    g.add_argument("--families", nargs="+", default=["mask"], choices=FAMILIES,
                   help="trigger families searched: mask (x (1 - m) + p m, size ||m||_1), universal (x + delta, "
                        "||delta||_2: at 30 passes its sizes did not tell a backdoored teacher from a clean one, "
                        "docs/experiments.md)")
    g.add_argument("--universal_lr", type=float, default=0.01, help="Adam's lr of the universal perturbation")
    g.add_argument("--eval_target", type=int, default=None,
                   help="evaluation only, when the folder holds the trigger: the class its cosine is measured for "
                        "(default: the scan's target, else each family's smallest trigger's class)")
    add_output_args(p, resumable=False)
    add_system_args(p)
    return p


def family(name, args):
    return MaskPattern(args.nc_mask_max) if name == "mask" else Universal(args.universal_lr)


def summarise(found, threshold, statistic="ratio"):
    """One family's numbers: size, success, reached and passes run per class, the anomaly index of ``statistic``
    (both statistics are recorded: ``index_mad``, ``index_log_mad``), median, MAD, flagged classes, and
    ``gap``: the second-smallest size over the smallest."""
    sizes = [f.size for f in found]
    index, median, mad = anomaly_index(sizes, statistic)
    order = sorted(sizes)
    return {"size": sizes, "success": [f.success for f in found], "reached": [f.reached for f in found],
            "passes": [f.passes for f in found], "statistic": statistic, "anomaly_index": index.tolist(),
            "median": median, "mad": mad, "flagged": flagged_classes(sizes, threshold, statistic),
            **{f"index_{name}": anomaly_index(sizes, name)[0].tolist() for name in STATISTICS},
            "gap": order[1] / max(order[0], 1e-12) if len(order) > 1 else None}


def margin(summary, threshold):
    """How far a family's verdict is from changing: the largest anomaly index of a class below the median minus
    ``threshold`` (positive: a class is flagged by that much; negative: the nearest class is that far below)."""
    sizes = summary["size"]
    below = [c for c in range(len(sizes)) if sizes[c] < sorted(sizes)[(len(sizes) - 1) // 2]]
    return max((summary["anomaly_index"][c] for c in below), default=0.0) - threshold


def verdict(families):
    """(verdict, target) from the families' summaries: the class flagged by the most families, the larger anomaly
    index breaking ties; ``("no backdoor found", None)`` when none is flagged."""
    votes = {}
    for s in families.values():
        for c in s["flagged"]:
            n, best = votes.get(c, (0, 0.0))
            votes[c] = (n + 1, max(best, s["anomaly_index"][c]))
    if not votes:
        return "no backdoor found", None
    return "backdoored", max(votes, key=lambda c: votes[c])


def scan_model(model, images, families, n_classes, threshold=2.5, out=print, statistic="ratio", **kw):
    """The scan of any model (a callable from images to logits): per family of ``families`` ({name: family}),
    the smallest trigger towards each class (``invert_all``, ``kw`` its settings) and the family's summary; then
    the verdict. Returns (found, summaries, verdict, target)."""
    found, summaries = {}, {}
    with eval_mode(model):
        for name, fam in families.items():
            traces = []
            found[name] = invert_all(model, images, fam, range(n_classes), traces=traces, **kw)
            s = summaries[name] = summarise(found[name], threshold, statistic)
            s.update(margin=margin(s, threshold), trace=[[[round(v, 5) for v in t] for t in tr] for tr in traces])
            out(f"{name:>9}: size per class " + " ".join(f"{v:.2f}" for v in s["size"])
                + f"; anomaly index ({statistic}) max {max(s['anomaly_index']):.2f}; flagged {s['flagged'] or 'none'}")
    return (found, summaries, *verdict(summaries))


def perturbation(fam, params, x):
    """The mean change a trigger makes to the images ``x``: what the cosine of ``evaluation`` compares."""
    with torch.no_grad():
        return (fam.apply(x, params) - x).mean(0)


def run_scan(args, out=print, checkpoint="checkpoint.pkl"):
    """The scan of ``args.read_dir``'s ``checkpoint`` into a new folder; returns the results written to scan.json."""
    device, amp, _ = setup(args)
    check_inversion(args)
    if not args.read_dir or not os.path.isdir(args.read_dir):
        raise UserError(f"read_dir not found: {args.read_dir!r} (pass --read_dir DIR, a teacher folder)")
    model = load_model(os.path.join(args.read_dir, checkpoint), args.width).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images = to_float(load_data(args)[2].x[:args.nc_images]).to(device)
    out_dir = Life.open(args, "scan", {**vars(args), **run_environment(device, amp)}, out, device=device).folder
    out(f"scan of {args.read_dir}: {len(images)} defense images, families {', '.join(args.families)}; into {out_dir}")
    start = time.time()
    found, summaries, said, target = scan_model(model, images, {n: family(n, args) for n in args.families},
                                                model.num_classes, threshold_of(args), out, args.nc_statistic,
                                                **inversion_kw(args))
    results = {"verdict": said, "target": target, "families": summaries, "n_images": len(images),
               "threshold": threshold_of(args), "statistic": args.nc_statistic,
               "time_s": round(time.time() - start, 1), "read_dir": args.read_dir, "checkpoint": checkpoint,
               "out_dir": out_dir}
    write_json(os.path.join(out_dir, "scan.json"), results)  # the verdict, before any trigger file is opened
    atomic_torch_save({n: [[p.cpu() for p in f.params] for f in fs] for n, fs in found.items()},
                      os.path.join(out_dir, INVERTED))
    out(f"verdict: {said}" + (f", target class {target} (anomaly index "
                              + ", ".join(f"{n} {summaries[n]['anomaly_index'][target]:.2f}" for n in summaries) + ")"
                              if target is not None else ""))
    truth, true_trigger = evaluate_against_trigger(args, found, target, images)
    if truth:
        results["evaluation"] = truth
        write_json(os.path.join(out_dir, "scan.json"), results)
        out("evaluation (the folder's own trigger, not used above): cosine to the true perturbation "
            + ", ".join(f"{n} (class {truth[n]['class']}) {truth[n]['cosine']:.3f}" for n in found))
    plot_scan(os.path.join(out_dir, "scan.png"), {n: [fam_trigger(family(n, args), f.params) for f in found[n]]
                                                  for n in found}, summaries, target, true_trigger)
    out(f"written to {out_dir}")
    return results


def fam_trigger(fam, params):
    """What scan.png draws of an inverted trigger: ``p * m`` for a mask, ``delta`` for a universal perturbation."""
    t = fam.trigger(params)
    return (t[0] * t[1]) if isinstance(t, tuple) else t[0]


def evaluate_against_trigger(args, found, target, images):
    """Evaluation only, after the verdict: when the folder holds a trigger, (the cosine similarity of the mean
    perturbation of each family's inverted trigger for the named class to the true trigger's, with the true
    trigger's sizes; the true ``p * m`` to draw); else (None, None)."""
    if not has_trigger(args.read_dir):
        return None, None
    pattern, mask = (t.to(images.device) for t in load_trigger(args.read_dir))
    true = (apply_trigger(images, pattern, mask) - images).mean(0)
    res = {"true_mask_l1": float(mask.sum()),
           "true_l2_mean": float((apply_trigger(images, pattern, mask) - images).flatten(1).norm(dim=1).mean())}
    for name, fs in found.items():
        c = args.eval_target if args.eval_target is not None else (
            target if target is not None else min(range(len(fs)), key=lambda k: fs[k].size))
        inv = perturbation(family(name, args), fs[c].params, images)
        res[name] = {"class": c, "cosine": float(torch.nn.functional.cosine_similarity(inv.flatten(), true.flatten(),
                                                                                          dim=0))}
    return res, (pattern * mask).cpu()
