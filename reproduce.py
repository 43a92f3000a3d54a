"""The paper's table in one command: a grid of defenses x defense-set sizes x seeds on one teacher.

    python reproduce.py --read_dir DIR --preset paper            # KD, ASD, BCU at 5,000 / 50,000, ASD at 60,000; 7 seeds
    python reproduce.py --read_dir DIR --preset cpu --dataset ../shared/data/cifar10.npz \\
        --finetunedata ../shared/data/cifar100.npz               # a grid a 2-core CPU finishes in about 2 hours
    python reproduce.py --read_dir DIR --defenses asd nad --sizes 5000 --seeds 0 1 2 --epochs 50
    python reproduce.py ... --launcher slurm --partition gpu     # one Slurm job array through submitit

Every run is an ordinary distri.py run folder under --output_dir; any flag reproduce.py does not know is
passed to every run. Run the same command again and finished runs are skipped, interrupted ones resumed.
The table (table.md, table_arms.md: one row per arm with its cut and loss against KD; table.csv, table.json)
and tradeoff.png are written when the runs are done. An arm is a defense with flags of its own (``--arm``,
or the ``study`` preset's variants of ASD); ``--only`` picks cells or arms by label.
"""
import argparse
import json
import os
import sys

from helper.errors import UserError, exits_cleanly


def get_parser():
    from helper.defenses import DEFENSES
    from helper.grid import PRESETS
    p = argparse.ArgumentParser(description="Run a grid of defenses x defense-set sizes x seeds and write the "
                                            "paper's table; unknown flags go to every distri.py run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Grid")
    g.add_argument("--read_dir", required=True, help="the teacher folder every run defends")
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
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate every N epochs (the selected state is always evaluated in full at the end); "
                        "default 1 on CUDA, 5 on a CPU")
    g.add_argument("--output_dir", default=None, help="the grid's folder (default: a new folder under runs/)")
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
    g.add_argument("--table_only", action="store_true", help="write the table from the runs that are finished; run nothing")
    return p


def parse_arm(text, sizes):
    """``--arm 'LABEL DEFENSE [FLAG ...]'`` -> one grid cell ``(defense, n, label, flags)`` per size."""
    import re
    import shlex

    from helper.defenses import DEFENSES
    parts = shlex.split(text)
    if len(parts) < 2 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", parts[0]) or parts[1] not in DEFENSES:
        raise UserError(f"--arm {text!r}: expected 'LABEL DEFENSE [FLAG ...]' with a label of letters, digits, "
                        f"'_.+-' and a defense among {', '.join(sorted(DEFENSES))}")
    return [(parts[1], n, parts[0], parts[2:]) for n in sizes]


@exits_cleanly
def main(argv=None):
    args, passthrough = get_parser().parse_known_args(argv)
    import torch

    from helper import grid as G
    from helper.runlog import make_run_dir
    from helper.table import cell_summary, write_table

    if not os.path.isfile(os.path.join(args.read_dir, "checkpoint.pkl")):
        raise UserError(f"--read_dir {args.read_dir}: no checkpoint.pkl there (a teacher folder as adba.py writes it)")
    preset = G.PRESETS[args.preset]
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
    seeds = args.seeds if args.seeds is not None else list(range(preset["seeds"]))
    gpus = torch.cuda.device_count()
    eval_every = args.eval_every or (1 if gpus else 5)
    out_dir = args.output_dir or make_run_dir(None, name=f"grid-{args.preset}")
    os.makedirs(out_dir, exist_ok=True)
    flags = ["--read_dir", args.read_dir, *preset["flags"], "--eval_every", str(eval_every), *passthrough]
    runs = G.build_grid(out_dir, cells, seeds, args.epochs or preset["epochs"], flags)
    todo = [r for r in runs if r.state() != "finished"]
    print(f"grid {out_dir}: {len(cells)} cells x {len(seeds)} seeds = {len(runs)} runs; {len(runs) - len(todo)} "
          f"finished, {sum(r.state() == 'interrupted' for r in todo)} to resume, "
          f"{sum(r.state() == 'new' for r in todo)} to start")
    failures = []
    if todo and not args.table_only:
        if args.launcher == "local":
            jobs = args.jobs or (gpus * args.runs_per_gpu if gpus else max(1, (os.cpu_count() or 2) // 2))
            failures = G.run_local(todo, out_dir, jobs, gpus, args.runs_per_gpu)
        else:
            failures = G.run_submitit(todo, out_dir, None if args.launcher == "slurm" else "local", args.partition,
                                      args.timeout_min, args.gpus_per_job)
    finished = [r for r in runs if r.state() == "finished"]
    entries, points = [], []
    for cell in cells:
        label, defense, n, _ = G.arm(cell)
        folders = [r.folder for r in finished if (r.cell, r.n_defense) == (f"{label}-n{n}", n)]
        if folders:
            try:
                entries.append({**cell_summary(defense, n, folders, out_dir), "arm": label, "flags": list(G.arm(cell)[3])})
            except ValueError as e:
                raise UserError(str(e)) from None
            for f in folders:
                with open(os.path.join(f, "results.json")) as fh:
                    points.append((label, n, json.load(fh)))
    if entries:
        write_table(entries, out_dir, points)
        print(open(os.path.join(out_dir, "table.md")).read(), end="")
        print(f"written: {out_dir}/table.md, table.csv, table.json, tradeoff.png ({len(finished)} of {len(runs)} runs)")
    if failures:
        raise UserError(f"{len(failures)} runs failed ({', '.join(f'{r.cell} seed {r.seed}' for r in failures[:5])}); "
                        f"their logs are in {out_dir}/logs; run the same command again to retry them")
    return entries


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
