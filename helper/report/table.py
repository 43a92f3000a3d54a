"""The paper's table from run folders: one cell per (defense, defense-set size), its trimmed mean (SPEC section 6:
drop the max- and min-Acc runs, mean of the rest), mean and std over all runs; as JSON, Markdown and CSV,
and the Acc-ASR trade-off plot with the paper's published points beside it."""
import csv
import json
import os
import statistics

from helper.report.aggregate import METRICS, OPTIONAL, load_results, trimmed_summary
from helper.run.runlog import atomic_write, write_json, write_text

ROWS = (("acc", "Acc"), ("asr", "ASR"), ("asr_nontarget", "ASR non-target"), ("ra", "RA"))
# the re-tuning attack's numbers (distri.py --retune): shown where a cell's runs all have them
RETUNE_ROWS = (("retune_acc", "re-tuned Acc"), ("retune_asr", "re-tuned ASR"),
               ("retune_asr_nontarget", "re-tuned ASR non-target"))
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
    if results[0].get("defense_label"):  # the defense's own name for tables (its class's ``label``)
        entry["label"] = results[0]["defense_label"]
    try:
        with open(os.path.join(folders[0], "args.json")) as f:
            run_args = json.load(f)
        entry.update(epochs=run_args.get("epoch"), width=run_args.get("teacher_width"))
    except (OSError, ValueError):
        pass
    for m in METRICS + OPTIONAL:
        if m in trimmed:
            values = [r[m] for r in results]
            entry[m] = trimmed[m]
            entry[m + "_mean"] = statistics.fmean(values)
            entry[m + "_std"] = statistics.pstdev(values)
    return entry


def label(entry):
    """A cell's name: its arm's label for an arm of a study (an arm named otherwise than its defense), else the name
    its runs' defense gives itself (``defense_label`` in results.json), else the defense's."""
    arm = entry.get("arm")
    if arm and arm != entry["defense"]:
        return arm
    return entry.get("label") or entry["defense"]


def column(entry):
    return f"{label(entry)} {entry['n_defense']:,}"


def retuned(cells):
    """The re-tuning rows some cell has (``RETUNE_ROWS``); none when no run was re-tuned."""
    return tuple((key, name) for key, name in RETUNE_ROWS if any(key in c for c in cells))


def markdown(cells):
    """The paper's layout: rows Acc, ASR, ASR non-target, RA (and the re-tuned Acc and ASR where runs had
    ``--retune``); a column per defense and size; trimmed mean ± std."""
    lines = ["| | " + " | ".join(column(c) for c in cells) + " |", "|---|" + "---|" * len(cells)]
    for key, label in ROWS + retuned(cells):
        values = [f"{c[key]:.3f} ± {c[key + '_std']:.3f}" if key in c else "—" for c in cells]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines.append("| runs (kept) | " + " | ".join(f"{c['n_runs']} ({c['n_kept']})" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def versus_kd(entry, cells):
    """``(ASR cut, Acc loss)`` of a cell against the plain-KD cell ("kd") of the same size, from trimmed means:
    ``1 - ASR / ASR_KD`` and ``1 - Acc / Acc_KD`` (the issue's goal: a cut >= 0.75 at a loss <= 0.15);
    ``(None, None)`` without a KD cell."""
    kd = [c for c in cells if c.get("arm", c["defense"]) == "kd" and c["n_defense"] == entry["n_defense"]]
    if not kd or not kd[0]["asr"] or not kd[0]["acc"]:
        return None, None
    return 1 - entry["asr"] / kd[0]["asr"], 1 - entry["acc"] / kd[0]["acc"]


def arms_markdown(cells):
    """One row per cell or arm: trimmed means ± std over all runs, the ASR over each run's last 10
    evaluations, the re-tuned Acc and ASR (columns only where some cell's runs had ``--retune``), the cut and
    loss against KD, runs, epochs, teacher width, the arm's own flags."""
    def pm(c, key):
        return f"{c[key]:.3f} ± {c[key + '_std']:.3f}" if key in c else "—"

    def pct(v):
        return "—" if v is None else f"{100 * v:.0f}%"
    extra = retuned(cells)
    head = ["arm", "Acc", "ASR", "ASR non-target", "RA", "ASR last 10", *(name for _, name in extra),
            "ASR cut vs KD", "Acc loss vs KD", "runs (kept)", "epochs", "width", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        cut, loss = versus_kd(c, cells)
        row = [column(c), pm(c, "acc"), pm(c, "asr"), pm(c, "asr_nontarget"), pm(c, "ra"),
               pm(c, "asr_last10_mean"), *(pm(c, key) for key, _ in extra), pct(cut), pct(loss),
               f"{c['n_runs']} ({c['n_kept']})", str(c.get("epochs", "—")), str(c.get("width", "—")),
               " ".join(c.get("flags", ())) or "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_table(cells, out_dir, runs=(), title="Acc against ASR", paper=True):
    """table.json, table.md, table.csv and tradeoff.png in ``out_dir``; ``runs`` are (defense, size, results).
    ``paper``: draw the paper's published points (measured on ADBA teachers) in the plot."""
    write_json(os.path.join(out_dir, "table.json"), cells)
    write_text(os.path.join(out_dir, "table.md"), markdown(cells))
    write_text(os.path.join(out_dir, "table_arms.md"), arms_markdown(cells))
    keys = ["arm", "defense", "n_defense", "n_runs", "n_kept", "epochs", "width"] + [
        k + s for k, _ in ROWS + retuned(cells) for s in ("", "_mean", "_std")]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(cells)
    atomic_write(os.path.join(out_dir, "table.csv"), write_csv)
    plot_tradeoff(cells, runs, os.path.join(out_dir, "tradeoff.png"), title, paper)


def plot_tradeoff(cells, runs, path, title="Acc against ASR", paper=True):
    """Every run a small point, every cell's trimmed mean a large marker, the paper's points as open diamonds
    (``paper``: when the teacher is an ADBA one, as the paper's)."""
    from helper.report.plot import plt, save_figure
    many = len(cells) > 8
    fig, ax = plt.subplots(figsize=(10, 5.6) if many else (7, 5.2))
    palette = [f"C{i}" for i in range(10)] + [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]  # 10 strong, then light
    colours = {}
    for c in cells:
        name = c.get("arm", c["defense"])
        colour = colours.setdefault(name, palette[len(colours) % len(palette)])
        mine = [r for d, n, r in runs if d == name and n == c["n_defense"]]
        ax.scatter([r["asr"] for r in mine], [r["acc"] for r in mine], s=14, color=colour, alpha=0.5)
        for r in mine:
            if r.get("path"):
                ax.plot(*zip(*r["path"]), color=colour, lw=1.3, ls=":")
        marker = "o" if c["n_defense"] <= 5000 else "s"
        ax.scatter([c["asr"]], [c["acc"]], s=110, color=colour, marker=marker, edgecolor="k",
                   label=f"{column(c)} (ours, {c['n_runs']} run{'s' if c['n_runs'] != 1 else ''})" + (", its runs' paths dotted" if any(
                       r.get("path") for r in mine) else ""))
        published = PAPER.get((c["defense"], c["n_defense"])) if paper and name == c["defense"] else None
        if published:
            ax.scatter([published[1]], [published[0]], s=110, marker="D", facecolor="none", edgecolor=colour, lw=1.8,
                       label=f"{column(c)} (the paper's)")
    kd = [c for c in cells if c.get("arm", c["defense"]) == "kd"]
    if kd:  # where a defense would meet the study's goal against the first KD cell (``versus_kd``)
        ax.add_patch(plt.Rectangle((0, 0.85 * kd[0]["acc"]), 0.25 * kd[0]["asr"], 1.03 - 0.85 * kd[0]["acc"],
                                   color="0.85", zorder=0, label="ASR cut >= 75% and Acc loss <= 15% vs KD"))
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("ASR (attack success rate; lower is better)")
    ax.set_ylabel("Acc (clean accuracy; higher is better)")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------- the summary over attacks (reproduce.py --attacks)

SUMMARY_KEYS = ("acc", "asr", "retune_acc", "retune_asr")  # a summary cell: Acc / ASR / re-tuned Acc / re-tuned ASR


def summary(attacks, tables):
    """summary.json: ``attacks`` (one dict per teacher, in column order: ``label``, ``attack``, ``teacher``,
    ``trigger_dir``, ``teacher_acc``, ``teacher_asr``, ``n_runs``) and ``rows``, one per cell or arm, each with
    ``cells``: per attack label the trimmed means of ``SUMMARY_KEYS`` (the re-tuned ones None without ``--retune``),
    ``n_runs`` and ``n_kept``. ``tables`` maps an attack's label to its table.json entries."""
    rows = {}
    for a in attacks:
        for e in tables.get(a["label"], ()):
            key = (e.get("arm", e["defense"]), e["n_defense"])
            row = rows.setdefault(key, {"arm": key[0], "defense": e["defense"], "n_defense": e["n_defense"],
                                        "name": column(e), "cells": {}})
            row["cells"][a["label"]] = {**{k: e.get(k) for k in SUMMARY_KEYS}, "n_runs": e["n_runs"],
                                        "n_kept": e["n_kept"]}
    return {"attacks": list(attacks), "rows": list(rows.values())}


def summary_markdown(s):
    """One row per cell or arm (the teacher itself first), one column per attack; each entry
    ``Acc / ASR / re-tuned Acc / re-tuned ASR`` (a re-tuned ASR is read with its accuracy: a student the re-tuning
    breaks has a low one whatever its backdoor); then a line per teacher saying where it is and whose trigger
    measured it."""
    def entry(*values):
        return " / ".join("—" if v is None else f"{v:.3f}" for v in values)
    labels = [a["label"] for a in s["attacks"]]
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
             "| teacher | " + " | ".join("—" if a.get("teacher_acc") is None else
                                         entry(a["teacher_acc"], a.get("teacher_asr"), None, None) for a in s["attacks"]) + " |"]
    for row in s["rows"]:
        cells = [row["cells"].get(label) for label in labels]
        lines.append(f"| {row['name']} | " + " | ".join(
            "—" if c is None else entry(*(c[k] for k in SUMMARY_KEYS)) for c in cells) + " |")
    lines += ["", "Each entry: Acc / ASR / Acc and ASR after the re-tuning attack, trimmed means over the cell's runs (— : the "
              "runs had no --retune; a column of — : no run of that teacher finished). The teacher row is the teacher "
              "itself on the same test images.", ""]
    for a in s["attacks"]:
        source = (f"; a clean teacher, its ASR measured with {a['trigger_dir']}'s trigger (the floor a defense's ASR "
                  f"is read against)" if a.get("trigger_dir") else "")
        n = a.get("n_runs", 0)
        kind = f"the {a['attack']} teacher" if a.get("attack") else "the teacher"
        lines.append(f"- {a['label']}: {kind} in {a['teacher']}, {n} run{'' if n == 1 else 's'} finished{source}")
    return "\n".join(lines) + "\n"


def write_summary(s, out_dir):
    """summary.json and summary.md in ``out_dir``."""
    write_json(os.path.join(out_dir, "summary.json"), s)
    write_text(os.path.join(out_dir, "summary.md"), summary_markdown(s))
