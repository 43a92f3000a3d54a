"""The table runner behind reproduce.py (its docstring has the commands): the parser, the grid of cells x
seeds on one teacher or on each teacher of ``--attacks``, launching (``helper.jobs.grid``) and the tables.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shlex
from statistics import fmean

import torch

from helper.attacks import ATTACKS
from helper.attacks.options import attack_parser, check_attack_args
from helper.data.teacher_dir import has_trigger, teacher_attack
from helper.defenses import DEFENSES
from helper.defenses.options import defense_parser
from helper.jobs import grid as G
from helper.jobs.grid import PRESETS
from helper.report.table import cell_summary, summary, summary_markdown, write_summary, write_table
from helper.run.cli import eval_every_value
from helper.run.errors import UserError, exits_cleanly
from helper.run.resume import differing_flags
from helper.run.runlog import make_run_dir, read_jsonl


def get_parser():
    p = argparse.ArgumentParser(description="Run a grid of defenses x defense-set sizes x seeds on one teacher (or on "
                                            "each teacher of --attacks) and write the paper's table; unknown flags go "
                                            "to every distri.py run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Grid")
    g.add_argument("--read_dir", default=None,
                   help="the teacher folder every run defends (required unless --attacks is given; not with it)")
    g.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="the grid to start from")
    g.add_argument("--defenses", nargs="+", choices=sorted(DEFENSES), default=None,
                   help="only these defenses (default: the preset's)")
    g.add_argument("--sizes", nargs="+", type=int, default=None, help="only these defense-set sizes (default: the preset's)")
    g.add_argument("--arm", action="append", default=[], metavar="'LABEL DEFENSE [FLAG ...]'",
                   help="add an arm: a defense with flags of its own, under its own label (repeatable), e.g. "
                        "--arm 'asd-bn asd --hook_layers layer*.*.bn1'")
    g.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help="run and tabulate only these cells or arms of the grid (by label: kd, asd-bn, ...), in this order")
    g.add_argument("--seeds", nargs="+", type=int, default=None, help="these seeds (default: 0 .. the preset's count - 1)")
    g.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the preset's)")
    g.add_argument("--eval_every", type=eval_every_value, default="auto", metavar="N|auto",
                   help="evaluate every N epochs (the selected state is always evaluated in full at the end); "
                        "auto: each run decides on the device it runs on, 1 on CUDA, 5 on a CPU (a Slurm job on a "
                        "GPU evaluates every epoch, whatever machine submitted it)")
    g.add_argument("--output_dir", default=None, help="the grid's folder (default: a new folder under runs/)")
    g.add_argument("--retune", action="store_true",
                   help="every run ends with the re-tuning attack (appends distri.py's --retune; its --retune_* "
                        "flags pass through); the tables get re-tuned Acc and ASR")
    g = p.add_argument_group("Teachers: a grid per attack (instead of --read_dir)")
    g.add_argument("--attacks", nargs="+", default=None, metavar="SPEC",
                   help="run the grid on each of these teachers: a teacher folder (with checkpoint.pkl; LABEL=FOLDER "
                        "names its column, otherwise its results.json's attack or the folder's name), or an attack "
                        f"name among {', '.join(sorted(ATTACKS))}, trained first with adba.py --attack NAME --attack_flags "
                        "into OUT/teachers/NAME (skipped once finished, resumed if interrupted; a folder named like an "
                        "attack: ./NAME). Each teacher's runs and tables go to OUT/LABEL/, the summary over teachers "
                        "to OUT/summary.md and summary.json. A teacher without a trigger (none) is measured with the "
                        "trigger (--trigger_dir) of the first teacher in this list that has one")
    g.add_argument("--attack_flags", default="", metavar="'FLAG ...'",
                   help="adba.py's flags for every teacher --attacks trains, one quoted string (write "
                        "--attack_flags='--width 8 --epochs 20 --dataset ../shared/data/cifar10.npz'); "
                        "--attack, --output_dir and --resume are set by reproduce.py")
    g = p.add_argument_group("Where the runs go")
    g.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"],
                   help="local: a pool on this machine; slurm: a job array through submitit; submitit-local: the "
                        "same through submitit's local executor (for testing the path)")
    g.add_argument("--jobs", type=int, default=None,
                   help="runs at once with --launcher local (default: GPUs x --runs_per_gpu, or half the CPU cores)")
    g.add_argument("--runs_per_gpu", type=int, default=2, help="runs sharing one GPU with --launcher local")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--timeout_min", type=int, default=600, help="time limit of each Slurm job, minutes")
    g.add_argument("--gpus_per_job", type=int, default=1, help="GPUs per Slurm job")
    g.add_argument("--trace", nargs="+", default=[], metavar="LABEL",
                   help="in tradeoff.png, also draw the (ASR, Acc) path over the evaluated epochs of every run of "
                        "these cells or arms (e.g. kd-scratch: where a weak student of the teacher sits)")
    g.add_argument("--table_only", action="store_true", help="write the table from the runs that are finished; run nothing")
    return p


def parse_arm(text, sizes):
    """``--arm 'LABEL DEFENSE [FLAG ...]'`` -> one grid cell ``(defense, n, label, flags)`` per size."""

    parts = shlex.split(text)
    if len(parts) < 2 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", parts[0]) or parts[1] not in DEFENSES:
        raise UserError(f"--arm {text!r}: expected 'LABEL DEFENSE [FLAG ...]' with a label of letters, digits, "
                        f"'_.+-' and a defense among {', '.join(sorted(DEFENSES))}")
    return [(parts[1], n, parts[0], parts[2:]) for n in sizes]


LABEL = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"  # an arm's or a teacher's label: a folder name and a column of a table
RESERVED = ("teachers", "logs", "submitit")  # folders of OUT itself in a grid over attacks


def grid_cells(args, preset):
    """The grid's cells (``helper.jobs.grid.arm``): the preset's, narrowed or widened by --defenses and --sizes, with
    --arm's arms, and only --only's labels in their order."""
    cells = preset["cells"]
    if args.defenses or args.sizes:  # narrow or widen: every requested defense (and arm of one) at every size
        arms = [G.arm(c) for c in cells]
        sizes = args.sizes or sorted({n for _, _, n, _ in arms})
        plain = args.defenses or sorted({d for label, d, _, _ in arms if label == d})
        own = dict.fromkeys((label, d, f) for label, d, _, f in arms if label != d and (not args.defenses or d in plain))
        cells = [(d, n) for n in sizes for d in plain] + [(d, n, label, f) for n in sizes for label, d, f in own]
    arm_sizes = args.sizes or sorted({G.arm(c)[2] for c in cells}) or [5000]
    cells = list(cells) + [cell for text in args.arm for cell in parse_arm(text, arm_sizes)]
    if args.only:
        unknown = set(args.only) - {G.arm(c)[0] for c in cells}
        if unknown:
            raise UserError(f"--only {' '.join(sorted(unknown))}: no such cell or arm in the grid "
                            f"(it has: {', '.join(dict.fromkeys(G.arm(c)[0] for c in cells))})")
        cells = sorted((c for c in cells if G.arm(c)[0] in args.only), key=lambda c: args.only.index(G.arm(c)[0]))
    if not cells:
        raise UserError("the grid is empty: no cell of the preset matches --defenses and --sizes")
    return cells


def attack_specs(specs):
    """--attacks as one dict per teacher, in order: ``label`` (unique), ``attack`` (the name, or a folder's
    results.json ``attack``; None when it does not say), ``folder`` (None: adba.py trains it), ``has_trigger``.

    A folder's label is LABEL of ``LABEL=FOLDER``; else its attack's name when no other SPEC claims that name, else
    the folder's own name. A bad SPEC or two teachers with one label is a UserError."""
    found = []
    for spec in specs:
        named = re.fullmatch(rf"({LABEL})=(.+)", spec)
        label, path = named.groups() if named and not os.path.isdir(spec) else (None, spec)
        if label is None and spec in ATTACKS:
            found.append({"label": spec, "attack": spec, "folder": None, "has_trigger": spec != "none", "spec": spec})
            continue
        if not os.path.isdir(path):
            raise UserError(f"--attacks {spec}: neither an attack name ({', '.join(sorted(ATTACKS))}) nor a teacher folder")
        if not os.path.isfile(os.path.join(path, "checkpoint.pkl")):
            raise UserError(f"--attacks {spec}: no checkpoint.pkl in {path} (a teacher folder as adba.py writes it)")
        found.append({"label": label, "attack": teacher_attack(path), "folder": path, "has_trigger": has_trigger(path),
                      "spec": spec})
    claimed = [t["label"] or t["attack"] for t in found]
    for t in found:
        if t["label"] is None:
            unique = t["attack"] is not None and claimed.count(t["attack"]) == 1
            t["label"] = t["attack"] if unique else os.path.basename(os.path.normpath(t["folder"]))
    seen = {}
    for t in found:
        if not re.fullmatch(LABEL, t["label"]) or t["label"] in RESERVED:
            raise UserError(f"--attacks {t['spec']}: {t['label']!r} cannot label a teacher (letters, digits, '_.+-'; "
                            f"not {', '.join(RESERVED)}); name it: LABEL=FOLDER")
        if t["label"] in seen:
            raise UserError(f"--attacks {seen[t['label']]} and {t['spec']}: two teachers labelled {t['label']!r}; "
                            f"name one: LABEL=FOLDER")
        seen[t["label"]] = t["spec"]
    return found


def attack_flags(text, attacks):
    """--attack_flags as a list, checked by adba.py's parser and range checks for each attack to train (one
    UserError naming the flag, before anything runs)."""

    try:
        flags = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--attack_flags {text!r}: {e}") from None
    for attack in attacks:
        argv = ["--attack", attack, *flags]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = attack_parser(argv).parse_args(argv)
        except SystemExit:
            why = (err.getvalue().strip().splitlines() or ["refused"])[-1].split("error: ", 1)[-1]
            raise UserError(f"--attack_flags {text!r}: adba.py --attack {attack}: {why}") from None
        if args.attack != attack or args.output_dir is not None or args.resume:
            raise UserError(f"--attack_flags {text!r}: --attack, --output_dir and --resume are reproduce.py's to set")
        try:
            check_attack_args(args)
        except UserError as e:
            raise UserError(f"--attack_flags {text!r}: adba.py --attack {attack}: {e}") from None
    return flags


def teacher_changes(folder, attack, flags):
    """The flags a teacher folder's args.json has otherwise than adba.py --attack ATTACK FLAGS would
    (``helper.run.resume.differing_flags``); [] for a folder without args.json."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return []
    argv = ["--attack", attack, *flags]
    defaults = vars(attack_parser(argv[:2]).parse_args(argv[:2]))
    return differing_flags(saved, attack_parser(argv).parse_args(argv), defaults)


def tabulate(cells, runs, out_dir, title="Acc against ASR", paper=True, traces=()):
    """The tables of one teacher's grid in ``out_dir`` (``helper.report.table.write_table``) from its finished runs:
    ``(table.json entries, the runs' results)``; nothing written when no run finished."""
    finished = [r for r in runs if r.state() == "finished"]
    entries, points = [], []
    for cell in cells:
        label, defense, n, _ = G.arm(cell)
        folders = [r.folder for r in finished if (r.cell, r.n_defense) == (f"{label}-n{n}", n)]
        if folders:
            try:
                summary_of = cell_summary(defense, n, folders, out_dir)
                summary_of.setdefault("label", DEFENSES[defense].label)  # runs from before results.json named it
                entries.append({**summary_of, "arm": label, "flags": list(G.arm(cell)[3])})
            except ValueError as e:
                raise UserError(str(e)) from None
            for f in folders:
                with open(os.path.join(f, "results.json")) as fh:
                    result = json.load(fh)
                if label in traces:  # the run's evaluated (ASR, Acc) path, drawn as a line
                    result["path"] = [(r["asr"], r["acc"]) for r in read_jsonl(os.path.join(f, "log.jsonl"))
                                      if "stage" not in r and r.get("acc") is not None]
                points.append((label, n, result))
    if entries:
        write_table(entries, out_dir, points, title, paper)
    return entries, [r for _, _, r in points]


def launch(todo, out_dir, args, gpus, desc="grid"):
    """Run ``todo`` (grid runs or teachers) with --launcher; returns the failed ones."""
    if not todo or args.table_only:
        return []
    if args.launcher == "local":
        jobs = args.jobs or (gpus * args.runs_per_gpu if gpus else max(1, (os.cpu_count() or 2) // 2))
        return G.run_local(todo, out_dir, jobs, gpus, args.runs_per_gpu, desc=desc)
    return G.run_submitit(todo, out_dir, None if args.launcher == "slurm" else "local", args.partition,
                          args.timeout_min, args.gpus_per_job)


def failed(failures, logs, what="runs"):
    return UserError(f"{len(failures)} {what} failed ({', '.join(r.name for r in failures[:5])}); their logs are in "
                     f"{logs}; run the same command again to retry them")


def check_precision(cells, common):
    """Refuse, before any run starts, a grid whose flags ask for bf16 where a cell computes ASL (its runs would each
    stop on the same line, ``helper.jobs.distill.run``): one line naming those cells."""
    bad = []
    for cell in cells:
        label, defense, _, own = G.arm(cell)
        argv = ["--defense", defense, *common, *own]
        args, _ = defense_parser(argv).parse_known_args(argv)
        if args.amp == "bf16" and DEFENSES[defense].needs_fp32(args):
            bad.append(label)
    if bad:
        raise UserError(f"--amp bf16 with {', '.join(bad)}: ASL's gradient is rounding noise in bf16 (docs/gpu.md); "
                        f"leave --amp at auto (bf16 for the others, fp32 for ASD) or narrow --defenses")


@exits_cleanly
def main(argv=None):
    args, passthrough = get_parser().parse_known_args(argv)


    if args.eval_every != "auto" and args.eval_every < 1:
        raise UserError(f"--eval_every must be at least 1 (or auto), not {args.eval_every}")
    if (args.read_dir is None) == (args.attacks is None):
        raise UserError("give the teacher: --read_dir DIR (one teacher) or --attacks SPEC [SPEC ...] (a grid per "
                        "teacher), " + ("not both" if args.attacks else "one of them"))
    if args.read_dir is not None and not os.path.isfile(os.path.join(args.read_dir, "checkpoint.pkl")):
        raise UserError(f"--read_dir {args.read_dir}: no checkpoint.pkl there (a teacher folder as adba.py writes it)")
    preset = G.PRESETS[args.preset]
    cells = grid_cells(args, preset)
    teachers = attack_specs(args.attacks) if args.attacks else None
    if teachers:
        if "--trigger_dir" in passthrough or any(a.startswith("--trigger_dir=") for a in passthrough):
            raise UserError("--trigger_dir with --attacks: each teacher is measured with its own trigger, a clean one "
                            "with the first teacher's in --attacks that has one; order --attacks to choose it")
        if not any(t["has_trigger"] for t in teachers):
            raise UserError(f"--attacks {' '.join(args.attacks)}: no teacher has a trigger to measure an ASR with (a "
                            f"clean one takes the first other teacher's); add one: adba, badnets, blended or a folder")
        flags_of_teachers = attack_flags(args.attack_flags, [t["attack"] for t in teachers if t["folder"] is None])
    seeds = args.seeds if args.seeds is not None else list(range(preset["seeds"]))
    gpus = torch.cuda.device_count()  # this machine's, for --launcher local; each run decides --eval_every auto itself
    common = [*preset["flags"], "--eval_every", str(args.eval_every), *passthrough,
              *(["--retune"] if args.retune else [])]
    check_precision(cells, common)
    out_dir = args.output_dir or make_run_dir(None, name=f"grid-{args.preset}")
    os.makedirs(out_dir, exist_ok=True)
    epochs = args.epochs or preset["epochs"]
    if teachers:
        return over_attacks(args, teachers, flags_of_teachers, cells, seeds, epochs, common, out_dir, gpus)

    runs = G.build_grid(out_dir, cells, seeds, epochs, ["--read_dir", args.read_dir, *common])
    todo = [r for r in runs if r.state() != "finished"]
    print(f"grid {out_dir}: {len(cells)} cells x {len(seeds)} seeds = {len(runs)} runs; {len(runs) - len(todo)} "
          f"finished, {sum(r.state() == 'interrupted' for r in todo)} to resume, "
          f"{sum(r.state() == 'new' for r in todo)} to start")
    failures = launch(todo, out_dir, args, gpus)
    entries, _ = tabulate(cells, runs, out_dir, traces=args.trace)
    if entries:
        with open(os.path.join(out_dir, "table.md")) as f:
            print(f.read(), end="")
        print(f"written: {out_dir}/table.md, table.csv, table.json, tradeoff.png "
              f"({sum(r.state() == 'finished' for r in runs)} of {len(runs)} runs)")
    if failures:
        raise failed(failures, f"{out_dir}/logs")
    return entries


def over_attacks(args, teachers, flags, cells, seeds, epochs, common, out_dir, gpus):
    """The grid on each teacher of --attacks: train the named ones (OUT/teachers/NAME), then every teacher's runs
    in one pool (OUT/LABEL/...), its tables in OUT/LABEL, and the summary over teachers in OUT. Returns the
    summary (``helper.report.table.summary``)."""


    training = []
    for t in teachers:
        t["trained"] = t["folder"] is not None  # a folder given is a teacher as it is
        if t["folder"] is None:
            t["folder"] = os.path.join(out_dir, "teachers", t["attack"])
            run = G.TeacherRun(t["attack"], t["folder"], ["--no_progress", *flags, "--output_dir", t["folder"]])
            state = run.state()
            changes = teacher_changes(t["folder"], t["attack"], flags) if state != "new" else []
            if changes and state == "interrupted":
                raise UserError(f"{t['folder']} was started with other --attack_flags ({'; '.join(changes)}): give the "
                                f"same ones to resume it, or remove the folder to start it again")
            if changes:
                print(f"note: {t['folder']} was trained with other --attack_flags ({'; '.join(changes)}); it is used as "
                      f"it is (remove the folder to train it again)")
            if state != "finished":
                training.append(run)
    if training and not args.table_only:
        print(f"teachers {out_dir}/teachers: {len(training)} to train "
              f"({', '.join(f'{r.attack} ({r.state()})' for r in training)})")
        failures = launch(training, out_dir, args, gpus, "teachers")
        if failures:
            raise failed(failures, f"{out_dir}/logs", "teachers")
    source = next(t for t in teachers if t["has_trigger"])
    runs = {}
    for t in teachers:
        t["trigger_dir"] = None if t["has_trigger"] else source["folder"]
        if not (t["trained"] or G.folder_state(t["folder"]) == "finished"):  # --table_only before it was trained
            print(f"{t['label']}: the teacher in {t['folder']} is not trained yet; its grid is left out")
            runs[t["label"]] = []
            continue
        flags_t = ["--read_dir", t["folder"], *(["--trigger_dir", t["trigger_dir"]] if t["trigger_dir"] else []), *common]
        runs[t["label"]] = G.build_grid(os.path.join(out_dir, t["label"]), cells, seeds, epochs, flags_t, t["label"])
    every = [r for label in runs for r in runs[label]]
    todo = [r for r in every if r.state() != "finished"]
    print(f"grid {out_dir}: {len(teachers)} teachers x {len(cells)} cells x {len(seeds)} seeds = {len(every)} runs; "
          f"{len(every) - len(todo)} finished, {sum(r.state() == 'interrupted' for r in todo)} to resume, "
          f"{sum(r.state() == 'new' for r in todo)} to start")
    failures = launch(todo, out_dir, args, gpus)
    tables, columns = {}, []
    for t in teachers:
        sub = os.path.join(out_dir, t["label"])
        entries, results = tabulate(cells, runs[t["label"]], sub, f"Acc against ASR, teacher {t['label']}",
                                    paper=t["attack"] in ("adba", None))
        tables[t["label"]] = entries
        column = {k: t[k] for k in ("label", "attack", "trigger_dir")}
        column.update(teacher=t["folder"], n_runs=len(results), teacher_acc=None, teacher_asr=None)
        for key in ("teacher_acc", "teacher_asr"):
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            column[key] = fmean(values) if values and len(values) == len(results) else None
        columns.append(column)
        if entries:
            print(f"written: {sub}/table.md, table_arms.md, table.csv, table.json, tradeoff.png "
                  f"({len(results)} of {len(runs[t['label']])} runs)")
    s = summary(columns, tables)
    write_summary(s, out_dir)
    print(summary_markdown(s), end="")
    print(f"written: {out_dir}/summary.md, summary.json")
    if failures:
        raise failed(failures, f"{out_dir}/<teacher>/logs")
    return s
