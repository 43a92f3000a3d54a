"""The per-epoch diagnostics a defense run logs (``diag`` in log.jsonl: ``helper.train.diagnostics``) as a table:

    python -m helper.report.diagnostics RUN [RUN ...] [--epochs 0 9 -1]
"""
import argparse
import os

from helper.run.runlog import read_jsonl


def summary_row(row):
    """One log row's diagnostics in a few numbers: dead share of the stem and mean over the blocks, ASL's
    four case shares, the gradient-norm ratio ASL/KD, the convolution weight norm, Acc and ASR if evaluated."""
    d = row.get("diag") or {}
    dead = d.get("dead", {})
    blocks = [v for k, v in dead.items() if k != "stem"]
    out = {"epoch": row["epoch"], "dead_stem": dead.get("stem"),
           "dead_blocks": sum(blocks) / len(blocks) if blocks else None,
           **{f"asl_{k}": v for k, v in d.get("asl_states", {}).items()},
           "grad_ratio": d["grad_asl"] / d["grad_kd"] if d.get("grad_kd") else None,
           "conv_weight_norm": row.get("conv_weight_norm"), "acc": row.get("acc"), "asr": row.get("asr")}
    return out


def markdown(runs, epochs):
    """``| run | epoch | dead stem | dead blocks | aa | dd | ad | da | |g_ASL|/|g_KD| | conv norm | Acc | ASR |``
    for each ``(name, log rows)`` at each of ``epochs`` it logged (negative: from the end)."""
    keys = ("dead_stem", "dead_blocks", "asl_aa", "asl_dd", "asl_ad", "asl_da", "grad_ratio", "conv_weight_norm",
            "acc", "asr")
    lines = ["| run | epoch | dead stem | dead blocks | aa | dd | ad | da | ‖g_ASL‖/‖g_KD‖ | conv norm | Acc | ASR |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, rows in runs:
        rows = [r for r in rows if "stage" not in r]
        for e in epochs:
            if not -len(rows) <= e < len(rows):
                continue
            s = summary_row(rows[e])
            cells = ["—" if s.get(k) is None else f"{s[k]:.3g}" if k in ("grad_ratio", "conv_weight_norm") else
                     f"{s[k]:.2f}" for k in keys]
            lines.append(f"| {name} | {s['epoch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """``python -m helper.report.diagnostics RUN [RUN ...] [--epochs 0 9 -1]``: the diagnostics table of runs."""
    p = argparse.ArgumentParser(description="A Markdown table of the per-epoch diagnostics (log.jsonl 'diag') of runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--epochs", nargs="+", type=int, default=[0, 9, 19, -1],
                   help="log rows to show (0-based; negative counts from the end)")
    args = p.parse_args(argv)
    runs = []
    for folder in args.runs:
        path = os.path.join(folder, "log.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found: is {folder} a run folder?")
        runs.append((os.path.relpath(folder), read_jsonl(path)))
    print(markdown(runs, args.epochs), end="")


if __name__ == "__main__":
    main()
