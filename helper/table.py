"""The paper's table from run folders: one cell per (defense, defense-set size), its trimmed mean (SPEC section 6:
drop the max- and min-Acc runs, mean of the rest), mean and std over all runs; as JSON, Markdown and CSV,
and the Acc-ASR trade-off plot with the paper's published points beside it."""
import csv
import os
import statistics

from helper.aggregate import METRICS, load_results, trimmed_summary
from helper.runlog import atomic_write, write_json

ROWS = (("acc", "Acc"), ("asr", "ASR"), ("asr_nontarget", "ASR non-target"), ("ra", "RA"))
NAMES = {"asd": "ASD", "kd": "KD", "bcu": "BCU", "nad": "NAD", "finetune": "Fine-tuning", "abd": "ABD"}
# SPEC section 7: the paper's (defense, defense images) -> (Acc, ASR); not measured here
PAPER = {("kd", 5000): (0.74, 0.53), ("asd", 5000): (0.46, 0.18), ("bcu", 5000): (0.87, 0.86),
         ("kd", 50000): (0.88, 0.98), ("asd", 50000): (0.65, 0.21), ("bcu", 50000): (0.90, 0.97),
         ("asd", 60000): (0.70, 0.29)}


def cell_summary(defense, n_defense, folders, root):
    """One table.json entry: trimmed mean of each metric, ``_mean`` and ``_std`` over all runs, the run folders."""
    results = load_results(folders)
    trimmed = trimmed_summary(results)
    entry = {"defense": defense, "n_defense": n_defense, "n_runs": trimmed["n_runs"], "n_kept": trimmed["n_kept"],
             "runs": [os.path.relpath(f, root) for f in folders]}
    for m in METRICS:
        if m in trimmed:
            values = [r[m] for r in results]
            entry[m] = trimmed[m]
            entry[m + "_mean"] = statistics.fmean(values)
            entry[m + "_std"] = statistics.pstdev(values)
    return entry


def column(entry):
    return f"{NAMES.get(entry['defense'], entry['defense'])} {entry['n_defense']:,}"


def markdown(cells):
    """The paper's layout: rows Acc, ASR, ASR non-target, RA; a column per defense and size; trimmed mean ± std."""
    lines = ["| | " + " | ".join(column(c) for c in cells) + " |", "|---|" + "---|" * len(cells)]
    for key, label in ROWS:
        values = [f"{c[key]:.3f} ± {c[key + '_std']:.3f}" if key in c else "—" for c in cells]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines.append("| runs (kept) | " + " | ".join(f"{c['n_runs']} ({c['n_kept']})" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(cells, out_dir, runs=()):
    """table.json, table.md, table.csv and tradeoff.png in ``out_dir``; ``runs`` are (defense, size, results)."""
    write_json(os.path.join(out_dir, "table.json"), cells)
    atomic_write(os.path.join(out_dir, "table.md"), lambda tmp: open(tmp, "w").write(markdown(cells)))
    keys = ["defense", "n_defense", "n_runs", "n_kept"] + [k + s for k, _ in ROWS for s in ("", "_mean", "_std")]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(cells)
    atomic_write(os.path.join(out_dir, "table.csv"), write_csv)
    plot_tradeoff(cells, runs, os.path.join(out_dir, "tradeoff.png"))


def plot_tradeoff(cells, runs, path, title="Acc against ASR"):
    """Every run a small point, every cell's trimmed mean a large marker, the paper's points as open diamonds."""
    from helper.plot import plt, save_figure
    fig, ax = plt.subplots(figsize=(7, 5.2))
    colours = {}
    for c in cells:
        colour = colours.setdefault(c["defense"], f"C{len(colours)}")
        mine = [r for d, n, r in runs if d == c["defense"] and n == c["n_defense"]]
        ax.scatter([r["asr"] for r in mine], [r["acc"] for r in mine], s=14, color=colour, alpha=0.5)
        marker = "o" if c["n_defense"] <= 5000 else "s"
        ax.scatter([c["asr"]], [c["acc"]], s=110, color=colour, marker=marker, edgecolor="k",
                   label=f"{column(c)} (ours, {c['n_runs']} runs)")
        paper = PAPER.get((c["defense"], c["n_defense"]))
        if paper:
            ax.scatter([paper[1]], [paper[0]], s=110, marker="D", facecolor="none", edgecolor=colour, lw=1.8,
                       label=f"{column(c)} (the paper's)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("ASR (attack success rate; lower is better)")
    ax.set_ylabel("Acc (clean accuracy; higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
