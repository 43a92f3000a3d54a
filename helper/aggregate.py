"""Summarise repeated runs as the paper does (SPEC section 6): drop the runs with the highest and the
lowest Acc, report the mean of the rest.

    python -m helper.aggregate runs/asd-seed*      # one line per metric, and a Markdown row
"""
import argparse
import json
import os
import statistics
import sys

METRICS = ("acc", "asr", "asr_nontarget")


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
    for m in METRICS:
        values = [r[m] for r in kept]
        summary[m] = statistics.fmean(values)
        summary[m + "_std"] = statistics.pstdev(values)
    return summary


def load_results(folders):
    out = []
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {folder} a finished run?")
        with open(path) as f:
            out.append(json.load(f))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Paper-style summary of repeated runs (drop max/min Acc, mean of the rest)")
    p.add_argument("runs", nargs="+", help="run folders, each with a results.json")
    args = p.parse_args(argv)
    try:
        s = trimmed_summary(load_results(args.runs))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{s['n_runs']} runs, {s['n_kept']} kept")
    for m in METRICS:
        print(f"{m:14s} {s[m]:.4f} +- {s[m + '_std']:.4f}")
    print(f"| {s['acc']:.2f} | {s['asr']:.2f} |")
    return s


if __name__ == "__main__":
    main()
