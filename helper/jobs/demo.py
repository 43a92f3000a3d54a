"""``python distri.py --demo``: the whole story offline on synthetic data — attack, plain KD, ASD, an unlearning
defense, and ``--defense auto`` on the teacher handed over without its trigger — in one folder.

1. adba.py's attack trains a small ADBA teacher on the synthetic 10-class task (``synthetic_split('task')``), and
   ``--attack none`` a clean one the same way, whose ASR under the ADBA trigger is the floor a removal is read
   against (a clean model sends some triggered images to the target too);
2. distri.py distils it on out-of-distribution synthetic images (``synthetic_split('ood')``: 100 other
   prototypes, finer gratings, every image a mixture of two) with each of ``STUDENTS``: plain KD
   (``--ratio_type fix``), ASD (``--ratio_type scheduler``) and adversarial unlearning (``--defense ibau``),
   all starting from the teacher's weights;
3. ``--defense auto`` on ``handed/``, a folder holding only the teacher's ``checkpoint.pkl``: the scan, the choice
   and the defense see no trigger; the attack's trigger (``--trigger_dir teacher/``) only measures the row's ASR;
4. one table: Acc, ASR, ASR non-target and the target class's own Acc of the teacher and each student on the
   task's test set.

Nothing here is a second copy of the attack or the defense: the runs are ``helper.attacks.adba.run`` and
``helper.jobs.distill.run`` called with their own parsers' arguments, so each sub-folder is an ordinary run
folder (args.json, log.jsonl, curves.png, ...). The sizes below are chosen for a 2-core CPU.
"""
import json
import os
import shutil
import sys
import time

from helper.attacks import ATTACKS
from helper.attacks.options import attack_parser
from helper.defenses.options import defense_parser
from helper.jobs import distill
from helper.jobs.auto import run_auto
from helper.report.plot import plt, save_figure  # matplotlib with the Agg backend
from helper.run.runlog import make_run_dir, read_jsonl, write_json

# Sizes of the demo, for a 2-core CPU. The attack uses a larger trigger learning rate and a smaller miu
# than the paper (0.01 / 0.1): with the paper's values the L1 term erases the mask in a run this short
# (the warning of SPEC section 8), and there would be no backdoor to defend against.
DEMO = {
    "width": 8,               # ResNet18 base width of teacher, shadow and students (64 = the real model)
    "n_train": 3000,          # synthetic task images the attacker trains on
    "n_test": 500,            # synthetic task test images: Acc and ASR of all three models
    "n_defense": 1000,        # unlabelled out-of-distribution images the defender distils on
    "attack_epochs": 3,       # joint teacher / shadow / trigger epochs (the paper: 100)
    "consolidation_epochs": 3,
    "attack_lr": 0.01,        # SGD lr of teacher and shadow (the public ADBA code's default)
    "trigger_lr": 0.1,        # SGD lr of pattern and mask
    "miu": 0.001,             # weight of the mask's L1 norm
    "distill_epochs": 30,     # KD and ASD; ASD's schedule: ASL only for epochs 0-9, 0.9 KD from 10, ramp to 1 at 40
    "distill_lr": 0.01,       # the paper's 1e-3 is tuned for 300 epochs; in 30 the ASD student barely recovers
    "select_from": 20,        # the result is the epoch >= 20 with the lowest KD loss (SPEC section 6's rule, shortened)
}


def _eval_batch_argv(args):
    return [] if args.eval_batch_size is None else ["--eval_batch_size", str(args.eval_batch_size)]


def _attack_argv(args, out_dir, d, clean_against=None):
    """adba.py's arguments for the demo's ADBA teacher, or with ``clean_against`` (the ADBA teacher's folder) for a
    clean teacher trained the same way (``--attack none``, without ADBA's own flags), measured with that trigger."""
    own = (["--attack", "none", "--trigger_dir", clean_against] if clean_against else
           ["--trigger_lr", str(d["trigger_lr"]), "--miu", str(d["miu"]), "--consolidation_epochs",
            str(d["consolidation_epochs"])])
    return ["--dataset", "synthetic", "--synthetic_seed", str(args.synthetic_seed),
            "--synthetic_train", str(d["n_train"]), "--synthetic_test", str(d["n_test"]),
            "--width", str(d["width"]), "--epochs", str(d["attack_epochs"]), "--lr", str(d["attack_lr"]),
            *own, "--target_label", str(args.target_label),
            "--seed", str(args.seed), "--device", args.device, "--amp", args.amp,
            "--output_dir", out_dir, "--no_progress"] + _eval_batch_argv(args)


# The demo's distillations: (name, folder, distri.py flags). KD and ASD at the demo's lr (``distill_lr``); the
# unlearning defense with its own defaults (helper/defenses/ibau.py).
STUDENTS = (("KD", "kd", ["--defense", "asd", "--ratio_type", "fix"]),
            ("ASD", "asd", ["--defense", "asd", "--ratio_type", "scheduler"]),
            ("I-BAU", "ibau", ["--defense", "ibau"]))


AUTO = ("auto", "auto")  # (name, folder) of step 3: the teacher handed over without its trigger
CLEAN, FLOOR = "clean", "clean teacher (floor)"  # step 1's clean teacher: its folder and its row


def _attack(argv, out):
    """adba.py's run of ``argv``: the attack it names (``ATTACKS``), its results."""
    args = attack_parser(argv).parse_args(argv)
    return ATTACKS[args.attack].run(args, out=out)


def _distill_argv(args, teacher_dir, out_dir, flags, d):
    # synthetic_train sizes the defense pool (the 'ood' train split), synthetic_test the task's test split
    lr = ["--opt_lr", str(d["distill_lr"])] if "asd" in flags else []
    return ["--read_dir", teacher_dir, "--dataset", "synthetic", "--finetunedata", "synthetic",
            "--synthetic_seed", str(args.synthetic_seed), "--synthetic_train", str(d["n_defense"]),
            "--synthetic_test", str(d["n_test"]), "--subset_rate", "1.0", *flags,
            "--epoch", str(d["distill_epochs"]), *lr, "--select_from", str(d["select_from"]),
            "--target_label", str(args.target_label), "--seed", str(args.seed), "--device", args.device,
            "--amp", args.amp, "--output_dir", out_dir, "--no_progress"] + _eval_batch_argv(args)


def format_table(rows):
    """Rows of (name, metrics dict) as a fixed-width table of Acc, ASR, ASR non-target and the target class's own
    Acc (``target_acc``: what a removal took from the class itself; ``-`` where a row has none)."""
    width = max([18] + [len(name) + 1 for name, _ in rows])
    lines = [f"{'model':<{width}}{'Acc':>8}{'ASR':>8}{'ASR non-target':>16}{'target-class Acc':>18}"]
    for name, m in rows:
        target = m.get("target_acc")
        lines.append(f"{name:<{width}}{m['acc']:>8.4f}{m['asr']:>8.4f}{m['asr_nontarget']:>16.4f}"
                     + (f"{target:>18.4f}" if target is not None else f"{'-':>18}"))
    return "\n".join(lines)


def plot_demo(table, curves, path):
    """A bar chart of the table and the Acc/ASR curves of each distillation (``curves``: (name, log rows)); PNG."""
    cols = 3
    rows_n = -(-(1 + len(curves)) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.3 * cols, 4 * rows_n), squeeze=False)
    ax_bar, *ax_curves = axes.flat
    for ax in ax_curves[len(curves):]:
        ax.set_visible(False)
    keys = (("acc", "Acc"), ("asr", "ASR"), ("asr_nontarget", "ASR non-target"))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        ax_bar.bar([j + (i - 1) * width for j in range(len(table))], [m[key] for _, m in table], width, label=label)
    ax_bar.set_xticks(range(len(table)), [name.replace(" student", "") for name, _ in table], rotation=20, fontsize=8)
    ax_bar.set_ylim(0, 1.05)
    ax_bar.legend(fontsize=8)
    ax_bar.set_title("synthetic task test set")
    for ax, (title, rows) in zip(ax_curves, curves):
        epochs = [r["epoch"] for r in rows]
        for key, label in keys:
            ax.plot(epochs, [r[key] for r in rows], label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.set_title(f"student during {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def run_demo(args, sizes=None, out=print):
    """The whole story on synthetic data; ``args`` is distri.py's namespace (seed, device, output_dir, ...).

    ``sizes`` overrides entries of ``DEMO`` (the tests run a tiny version). Returns demo_results.json's dict.
    """
    d = {**DEMO, **(sizes or {})}
    start = time.time()
    out_dir = make_run_dir(args.output_dir, name="demo" + (f"-{args.msg}" if args.msg else ""))
    out(f"demo folder: {out_dir}")
    teacher_dir = os.path.join(out_dir, "teacher")
    folders = {name: os.path.join(out_dir, folder) for name, folder, _ in STUDENTS}
    n_steps = 2 + len(STUDENTS)

    out(f"\n== 1/{n_steps} ADBA teacher: width {d['width']}, {d['n_train']} synthetic images, "
        f"{d['attack_epochs']} + {d['consolidation_epochs']} epochs; a clean teacher the same way (the floor) ==")
    t0 = time.time()
    teacher = _attack(_attack_argv(args, teacher_dir, d), out)
    clean_dir = os.path.join(out_dir, CLEAN)
    clean = _attack(_attack_argv(args, clean_dir, d, clean_against=teacher_dir), out)
    times = {"attack_s": round(time.time() - t0, 1)}

    results = {}
    for step, (name, _, flags) in enumerate(STUDENTS, 2):
        out(f"\n== {step}/{n_steps} {name}: {d['n_defense']} out-of-distribution images, {d['distill_epochs']} epochs ==")
        t0 = time.time()
        argv = _distill_argv(args, teacher_dir, folders[name], flags, d)
        results[name] = distill.run(defense_parser(argv).parse_args(argv), out=out)
        times[f"{name.lower().replace('-', '')}_s"] = round(time.time() - t0, 1)
    auto, auto_run = _run_auto(args, teacher_dir, out_dir, d, n_steps, out)
    times["auto_s"] = round(time.time() - start - sum(times.values()), 1)
    times["total_s"] = round(time.time() - start, 1)

    name_auto = f"auto ({auto['choice'][1]}) student"
    table = ([("ADBA teacher", teacher), (FLOOR, clean)]
             + [(f"{name} student", results[name]) for name, _, _ in STUDENTS]
             + [(name_auto, auto_run)])
    summary = {name: {k: m.get(k) for k in ("acc", "asr", "asr_nontarget", "target_acc")} for name, m in table}
    for name, m in [(f"{name} student", results[name]) for name, _, _ in STUDENTS] + [(name_auto, auto_run)]:
        summary[name]["selected_epoch"] = m["best_epoch"]
        summary[name]["final"] = m["final"]
    summary[name_auto].update({k: auto[k] for k in ("verdict", "target", "choice")})
    demo = {"table": summary, "trigger": {k: teacher[k] for k in ("psnr", "ssim", "mask_l1", "mask_share",
                                                                  "trigger_vanished")},
            "teacher_target_rate_clean": teacher["target_rate_clean"], "sizes": d, "times_s": times,
            "seed": args.seed, "folders": {"teacher": teacher_dir, CLEAN: clean_dir,
                                           **{f: folders[n] for n, f, _ in STUDENTS},
                                           AUTO[1]: os.path.join(out_dir, AUTO[1])}}
    write_json(os.path.join(out_dir, "demo_results.json"), demo)
    plot_demo(table, [(name, read_jsonl(os.path.join(folders[name], "log.jsonl"))) for name, _, _ in STUDENTS]
              + [(f"auto ({auto['choice'][1]})", read_jsonl(os.path.join(out_dir, AUTO[1], auto["choice"][1],
                                                                        "log.jsonl")))],
              os.path.join(out_dir, "demo.png"))

    out("\n== result (synthetic task test set; students at the epoch >= "
        f"{d['select_from']} with the lowest KD loss) ==")
    out(format_table(table))
    if teacher["trigger_vanished"]:
        out("the trigger vanished during the attack: the ASR column measures a bias toward the target, not a backdoor")
    else:
        out(f"trigger: PSNR {teacher['psnr']:.2f} dB, SSIM {teacher['ssim']:.4f}; clean non-target test images the "
            f"teacher sends to the target anyway: {teacher['target_rate_clean']:.4f}")
    out(f"the floor: a clean teacher trained the same way sends {clean['asr_nontarget']:.4f} of the triggered "
        f"non-target images to the target; a removal is an ASR non-target near it")
    out(f"auto saw only handed/checkpoint.pkl: scan verdict {auto['verdict']}"
        + (f", target class {auto['target']}" if auto["target"] is not None else "")
        + f", ran {' '.join(auto['choice'])}; its ASR is measured with the attack's trigger, which it never read")
    out("time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items()))
    out(f"written to {out_dir} (demo_results.json, demo.png; teacher/, {CLEAN}/, "
        + ", ".join(f"{f}/" for _, f, _ in STUDENTS) + f" are ordinary run folders, {AUTO[1]}/ an auto folder)")
    sys.stdout.flush()
    return demo


def _run_auto(args, teacher_dir, out_dir, d, n_steps, out):
    """Step 3: ``--defense auto`` on ``handed/`` (the teacher's checkpoint.pkl alone); (auto's results, its
    defense run's results). The attack's trigger is named by ``--trigger_dir`` for the ASR and nothing else."""
    handed = os.path.join(out_dir, "handed")
    os.makedirs(handed, exist_ok=True)
    shutil.copy(os.path.join(teacher_dir, "checkpoint.pkl"), os.path.join(handed, "checkpoint.pkl"))
    out(f"\n== {n_steps}/{n_steps} auto on handed/ (checkpoint.pkl only): scan, choose, defend, scan the student ==")
    argv = _distill_argv(args, handed, os.path.join(out_dir, AUTO[1]), ["--defense", "auto", "--trigger_dir", teacher_dir], d)
    auto = run_auto(defense_parser(argv).parse_args(argv), argv, out=out)
    with open(os.path.join(out_dir, AUTO[1], auto["choice"][1], "results.json")) as f:
        return auto, json.load(f)
