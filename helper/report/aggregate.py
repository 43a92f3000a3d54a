"""Summarise repeated runs as the paper does (SPEC section 6): drop the runs with the highest and the
lowest Acc, report the mean of the rest.

    python -m helper.report.aggregate runs/asd-seed*      # one line per metric, and a Markdown row
"""
import argparse
import json
import os
import statistics
import sys

from helper.run.runlog import read_jsonl

METRICS = ("acc", "asr", "asr_nontarget", "ra")
# summarised too where every run has them: the ASR over a run's last 10 evaluations, the re-tuning test's numbers
OPTIONAL = ("asr_last10_mean", "retune_acc", "retune_asr", "retune_asr_nontarget", "retune_ra")
SAME = ("defense", "defense_label", "n_defense")  # what every summarised run must share (KD and ASD: one defense)


def asr_last10(rows):
    """Mean ASR of the evaluated epochs among the last 10 of a run's log rows (one epoch's ASR can swing by
    0.25); None when none of them was evaluated."""
    recent = [r["asr"] for r in rows[-10:] if r.get("asr") is not None]
    return sum(recent) / len(recent) if recent else None


def trimmed_summary(results):
    """Mean and spread of ``acc``, ``asr``, ``asr_nontarget`` over runs, without the max- and min-Acc runs.

    With fewer than 3 runs nothing is dropped. Returns ``{'n_runs', 'n_kept', metric: mean,
    metric + '_std': population std of the kept runs}``.
    """
    if not results:
        raise ValueError("no runs to summarise")
    kept = sorted(results, key=lambda r: r["acc"])
    if len(kept) >= 3:
        kept = kept[1:-1]
    summary = {"n_runs": len(results), "n_kept": len(kept)}
    for m in METRICS + OPTIONAL:
        if all(isinstance(r.get(m), (int, float)) for r in results):
            values = [r[m] for r in kept]
            summary[m] = statistics.fmean(values)
            summary[m + "_std"] = statistics.pstdev(values)
    return summary


def load_results(folders):
    """The results.json of each run folder, checked: readable, finished (not stopped), every metric a number,
    and all runs of one defense and one defense-set size; else a ValueError naming the file and the key."""
    out = []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found: is {folder} a finished run?")
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable: {e}") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path} holds no results object")
        if "asr_last10_mean" not in r and os.path.isfile(os.path.join(folder, "log.jsonl")):  # runs before the key
            r["asr_last10_mean"] = asr_last10([row for row in read_jsonl(os.path.join(folder, "log.jsonl"))
                                               if "stage" not in row])
        if r.get("stopped"):
            raise ValueError(f"{path}: the run stopped ({r['stopped']}); it is not counted")
        for m in METRICS[:3]:
            if not isinstance(r.get(m), (int, float)) or isinstance(r.get(m), bool):
                raise ValueError(f"{path}: key {m!r} is {r.get(m)!r}, not a number")
        if out:
            for key in SAME:
                if r.get(key) != out[0][1].get(key):
                    raise ValueError(f"{path}: key {key!r} is {r.get(key)!r} but {out[0][0]} has "
                                     f"{out[0][1].get(key)!r}: runs of different cells are not averaged")
        out.append((path, r))
    return [r for _, r in out]


def main(argv=None):
    p = argparse.ArgumentParser(description="Paper-style summary of repeated runs (drop max/min Acc, mean of the rest)")
    p.add_argument("runs", nargs="+", help="run folders, each with a results.json")
    args = p.parse_args(argv)
    try:
        s = trimmed_summary(load_results(args.runs))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{s['n_runs']} runs, {s['n_kept']} kept")
    for m in METRICS:
        if m in s:
            print(f"{m:14s} {s[m]:.4f} +- {s[m + '_std']:.4f}")
    print(f"| {s['acc']:.2f} | {s['asr']:.2f} |")
    return s


if __name__ == "__main__":
    main()
