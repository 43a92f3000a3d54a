"""Figures a reader expects, drawn by code from run folders (saved, never shown).

    python -m helper.report.figures attention RUN [RUN ...] [--layers layer4] [--out attention_compare.png]
    python -m helper.report.figures trigger TEACHER_DIR [--dataset D] [--out trigger.png]
    python -m helper.report.figures framework [--out fig/framework.png]
    python -m helper.report.figures defenses GRID_DIR [--teachers badnets blended adba] [--floors RUN ...] [--out F]

``attention``: the teacher and the selected student of each run (runs of one teacher), side by side, on the
first test image of each of 4 non-target classes, clean and triggered (``helper.report.attention``). ``trigger``: the
trigger figure ``adba.py`` draws (``helper.report.plot.plot_trigger``), for an existing teacher folder. ``framework``:
the ASD method, drawn from the package's own schedule (``helper.train.schedule``). ``defenses``: the headline of a
``reproduce.py --attacks ... --retune`` grid, one panel per backdoored teacher.
"""
import argparse
import json
import os
import re

from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from helper.data import images as D
from helper.data.teacher_dir import load_trigger, read_teacher
from helper.report.attention import (
    GROUPS,
    PICTURE_IMAGES,
    clean_and_triggered,
    group_attention,
    picture_indices,
    picture_rows,
    trigger_region,
    unit_range,
)
from helper.report.plot import plot_attention, plot_trigger, plt, save_figure
from helper.report.table import cell_summary
from helper.run.checkpoint import load_model
from helper.run.errors import UserError, exits_cleanly
from helper.run.runlog import read_jsonl
from helper.train.schedule import asd_ratio, loss_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMEWORK_PNG = os.path.join(ROOT, "fig", "framework.png")


# ---------------------------------------------------------------- run folders

def _read_json(path, what, kind=dict):
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path} ({what}): {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path} ({what}) is not valid JSON: {e}") from None
    if not isinstance(obj, kind):
        raise UserError(f"{path} ({what}) holds no JSON {'object' if kind is dict else 'list'}")
    return obj


def read_run(folder):
    """``{'dir', 'args', 'results', 'selected'}`` of a defense run folder: args.json (required), results.json
    (None if absent), and the path of the selected student's weights (``selected.pkl``, required)."""
    if not os.path.isdir(folder):
        raise UserError(f"run folder not found: {folder}")
    args_path = os.path.join(folder, "args.json")
    if not os.path.isfile(args_path):
        raise UserError(f"{folder} has no args.json: not a run folder")
    args = _read_json(args_path, "the run's arguments")
    if not args.get("read_dir"):
        raise UserError(f"{args_path} names no read_dir: not a defense run (distri.py) folder")
    selected = os.path.join(folder, "selected.pkl")
    if not os.path.isfile(selected):
        raise UserError(f"{folder} has no selected.pkl (the student at the selected epoch): not a finished defense run")
    res_path = os.path.join(folder, "results.json")
    results = _read_json(res_path, "the run's results") if os.path.isfile(res_path) else None
    return {"dir": folder, "args": args, "results": results, "selected": selected}


def defense_label(run):
    """The run's defense as a reader names it: its results' ``defense_label`` (the defense's ``run_label``), else, for
    a run without one, its ``--defense`` in capitals."""
    return (run.get("results") or {}).get("defense_label") or str(run["args"].get("defense", "asd")).upper()


def folder_label(folder):
    """A run folder's short name: its own, with the arm for a grid run (``grid/asd-bn-n5000/seed0`` ->
    ``asd-bn seed0``)."""
    path = os.path.normpath(folder)
    name, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    arm = re.fullmatch(r"(.+)-n\d+", parent)
    return f"{arm.group(1)} {name}" if re.fullmatch(r"seed\d+", name) and arm else name


def _scores(results, prefix=""):
    if results is None:
        return "no results.json"
    acc, asr = results.get(prefix + "acc"), results.get(prefix + "asr")
    text = (f"Acc {acc:.3f}\nASR {asr:.3f}" if isinstance(acc, (int, float)) and isinstance(asr, (int, float))
            else "Acc ?\nASR ?")
    return text + (" (stopped)" if results.get("stopped") else "")


def task_test_split(args, dataset=None):
    """The test split of the dataset a run (or an attack) was measured on, as its args.json names it.

    ``dataset`` overrides the name. Synthetic data is generated at the run's test size and seed only.
    """
    name = dataset or args.get("dataset", "cifar10")
    if name == "synthetic":
        return D.synthetic_split("task", int(args.get("synthetic_test", 10000)), "test",
                                 int(args.get("synthetic_seed", 0)))
    _, test = D.load_splits(name, data_root=args.get("data_root", "data"), role="task",
                            download=not args.get("no_download", False), flag="--dataset")
    if not len(test):
        raise UserError(f"{name} has no test images")
    return test


def same_teacher(runs):
    """The teacher folder all ``runs`` were distilled from; refuses runs of different teachers or test sets."""
    first = runs[0]
    for key, what in (("read_dir", "teacher (read_dir)"), ("dataset", "test set (dataset)"),
                      ("thresh_mask", "mask threshold (thresh_mask)")):
        def norm(value):  # a folder or an .npz file named two ways (relative, absolute) is one
            return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value
        for run in runs[1:]:
            if norm(run["args"].get(key)) != norm(first["args"].get(key)):
                raise UserError(f"runs of different teachers: {first['dir']} has {what} {first['args'].get(key)!r}, "
                                f"{run['dir']} has {run['args'].get(key)!r}; compare runs of one teacher")
    return first["args"]["read_dir"]


def compare_attention(folders, out, layers=("layer4",), n_images=PICTURE_IMAGES):
    """One figure: rows the images (clean, triggered), columns the teacher and each run's selected student, one
    block of columns per group in ``layers``. Returns the path written."""
    runs = [read_run(f) for f in folders]
    read_dir = same_teacher(runs)
    args = runs[0]["args"]
    if not os.path.isdir(read_dir):
        raise UserError(f"teacher folder {read_dir!r} (read_dir of {runs[0]['dir']}/args.json) not found; run from "
                        f"the folder the run was started in")
    teacher, pattern, mask = read_teacher(read_dir, None, args.get("thresh_mask"))
    students = [load_model(r["selected"]) for r in runs]
    split = task_test_split(args)
    target = int(args.get("target_label", 0))
    images, row_labels, outlined = picture_rows(split, picture_indices(split.y, target, n_images), pattern, mask)
    maps = [group_attention(m, images) for m in [teacher, *students]]
    teacher_label = "teacher\n(frozen)\n" + (_scores(runs[0]["results"], "teacher_") if runs[0]["results"] else "")
    labels = [teacher_label] + [f"{defense_label(r)}\n{folder_label(r['dir'])[:18]}\n"
                                f"{_scores(r['results'])}" for r in runs]
    columns, separators = [], []
    for layer in layers:
        if columns:
            separators.append(len(columns))
        columns += [(f"{label}\n{layer}", unit_range(m[layer])) for label, m in zip(labels, maps)]
    plot_attention(images, row_labels, columns, out, trigger_region(mask), outlined, separators=separators,
                   title=f"attention A = sum_c |F|^2 of the residual groups, teacher {read_dir} "
                         f"(test images of {args.get('dataset')}, target {target} left out)")
    return out


def draw_trigger(teacher_dir, out, dataset=None, n_images=8):
    """``plot_trigger`` of a teacher folder (pattern.pt, mask.pt) on the first ``n_images`` test images of its
    dataset (``dataset``, else the folder's args.json, else cifar10). Returns the path written."""
    if not os.path.isdir(teacher_dir):
        raise UserError(f"teacher folder not found: {teacher_dir}")
    pattern, mask = load_trigger(teacher_dir)
    args_path = os.path.join(teacher_dir, "args.json")
    args = _read_json(args_path, "the attack's arguments") if os.path.isfile(args_path) else {}
    split = task_test_split(args, dataset)
    clean, triggered = clean_and_triggered(split, list(range(min(n_images, len(split)))), pattern, mask)
    plot_trigger(pattern, mask, clean, triggered, out)
    return out


# ---------------------------------------------------------------- the framework figure

TEACHER_C, TEACHER_FACE = "#3b6ea8", "#dce7f5"
STUDENT_C, STUDENT_FACE = "#c8602a", "#fbe4d5"
HOOK_C = "#f3c64f"
ASL_C, ASL_FACE = "#7a4fa3", "#ece2f6"
KD_C, KD_FACE = "#3d8a4f", "#dff0e2"
LOSS_C, LOSS_FACE = "#333333", "#f2f2f2"
BLOCKS = [f"layer{g}.{b}" for g in range(1, 5) for b in range(2)]


def _box(ax, x, y, w, h, text="", edge="k", face="white", size=10, weight="normal", lw=1.4, style="round,pad=0.3",
         **text_kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, edgecolor=edge, facecolor=face, lw=lw, zorder=2))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, zorder=3,
                **text_kw)


def _arrow(ax, points, color="k", lw=1.5, head=True, ls="-"):
    """A polyline through ``points`` with an arrow head at the last point."""
    xs, ys = zip(*points)
    if len(points) > 2:
        ax.plot(xs[:-1], ys[:-1], color=color, lw=lw, ls=ls, zorder=1, solid_capstyle="butt")
    ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>" if head else "-", mutation_scale=14,
                                 color=color, lw=lw, ls=ls, zorder=1, shrinkA=0, shrinkB=0))


def _network_row(ax, y, edge, face, hook_on_top, x0, pitch, width, height):
    """Stem, the 8 residual blocks (each with its hooked conv1) and the head of one model; returns the
    (x, y) where each block's conv1 meets the ASL link."""
    ax.plot([x0 - 9, x0 + 8 * pitch + 6], [y, y], color=edge, lw=1.5, zorder=1)
    _box(ax, x0 - 9, y - height / 2, 6.5, height, "stem\nconv", edge, face, size=9)
    links = []
    for i, name in enumerate(BLOCKS):
        x = x0 + i * pitch
        _box(ax, x, y - height / 2, width, height, "", edge, face)
        hy = y + 0.4 if hook_on_top else y - height / 2 + 0.4
        _box(ax, x + 0.6, hy, width - 1.2, height / 2 - 0.8, "conv1", "#9a7a10", HOOK_C, size=9, style="round,pad=0.15",
             lw=1.0)
        ax.text(x + width / 2, y - height / 4 + 0.1 if hook_on_top else y + height / 4 - 0.1, name, ha="center",
                va="center", fontsize=8.5, zorder=3)
        links.append((x + width / 2, y + height / 2 + 0.3 if hook_on_top else y - height / 2 - 0.3))
    return links


def draw_framework(out=FRAMEWORK_PNG, epochs=60, dpi=130):
    """``fig/framework.png``: teacher and student, the hooked conv1 of every residual block, ASL between each
    pair and its cases, KD on the logits, and lambda's schedule as the package computes it."""
    fig = plt.figure(figsize=(14, 8.65))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 170)
    ax.set_ylim(0, 105)
    ax.set_axis_off()
    x0, pitch, width, height = 27, 9.2, 8.2, 10
    ty, sy, my = 86, 46, 66  # teacher row, student row, the ASL row between them
    ax.text(2, 102.5, "ASD: Attention Shifting Distillation of a backdoored teacher", fontsize=14, weight="bold",
            va="top")

    # the two models
    ax.text(x0 - 9, ty + height / 2 + 5.2, "Teacher T: backdoored (ADBA), frozen, no gradient", color=TEACHER_C,
            fontsize=11, weight="bold", va="center")
    ax.text(x0 - 9, sy - height / 2 - 3.2, "Student S: starts as a copy of T, trained by SGD on L", color=STUDENT_C,
            fontsize=11, weight="bold", va="center")
    t_links = _network_row(ax, ty, TEACHER_C, TEACHER_FACE, False, x0, pitch, width, height)
    s_links = _network_row(ax, sy, STUDENT_C, STUDENT_FACE, True, x0, pitch, width, height)
    for g in range(4):  # group brackets above the teacher
        xa, xb = x0 + 2 * g * pitch, x0 + (2 * g + 1) * pitch + width
        yb = ty + height / 2 + 1.3
        ax.plot([xa, xa, xb, xb], [yb - 0.6, yb, yb, yb - 0.6], color="0.45", lw=1.0)
        ax.text((xa + xb) / 2, yb + 0.4, f"layer{g + 1}", ha="center", va="bottom", fontsize=8.5, color="0.35")
    hx = x0 + 8 * pitch + 0.5
    for y, edge, face, z in ((ty, TEACHER_C, TEACHER_FACE, "z_T"), (sy, STUDENT_C, STUDENT_FACE, "z_S")):
        _box(ax, hx, y - height / 2, 12, height, f"pool +\nlinear\nlogits ${z}$", edge, face, size=9)

    # the input
    _box(ax, 1.5, my - 8, 11.5, 16, "x\nunlabelled\nOOD image\n(CIFAR-100)", "0.3", "white", size=9)
    _arrow(ax, [(7.25, my + 8.3), (7.25, ty), (x0 - 9.3, ty)], "0.3")
    _arrow(ax, [(7.25, my - 8.3), (7.25, sy), (x0 - 9.3, sy)], "0.3")

    # ASL between each pair of hooked convolutions, collected into L_ASL
    asl_x = hx - 1.5
    ax.plot([t_links[0][0], asl_x + 1], [my, my], color=ASL_C, lw=2.0, zorder=1)
    for (xt, yt), (xs, ys) in zip(t_links, s_links):
        ax.plot([xt, xt], [yt, my + 2.6], color=TEACHER_C, lw=1.2, ls=(0, (3, 2)), zorder=1)
        ax.plot([xs, xs], [ys, my - 2.6], color=STUDENT_C, lw=1.2, ls=(0, (3, 2)), zorder=1)
        ax.add_patch(Circle((xt, my), 2.7, edgecolor=ASL_C, facecolor=ASL_FACE, lw=1.6, zorder=2))
        ax.text(xt, my, "ASL", ha="center", va="center", fontsize=8.5, color=ASL_C, weight="bold", zorder=3)
    ax.text(t_links[0][0] - 3.6, my, "t", ha="right", va="bottom", fontsize=10, color=TEACHER_C, style="italic")
    ax.text(t_links[0][0] - 3.6, my, "s", ha="right", va="top", fontsize=10, color=STUDENT_C, style="italic")
    _box(ax, asl_x, my - 5, 16, 10, "$L_{ASL}$ = mean\nover the 8 layers", ASL_C, ASL_FACE, size=9.5)

    # KD on the logits, around the right end, and the total loss between them
    kd_x, kd_w = 146.5, 21
    _arrow(ax, [(hx + 12.3, ty), (kd_x + kd_w / 2, ty), (kd_x + kd_w / 2, my + 7.3)], KD_C)
    _arrow(ax, [(hx + 12.3, sy), (kd_x + kd_w / 2, sy), (kd_x + kd_w / 2, my - 7.3)], KD_C)
    _box(ax, kd_x, my - 7, kd_w, 14, "$L_{KD}$ = KL( softmax($z_T$/T)\n‖ softmax($z_S$/T) ) · T²\n"
         "T = 40, no labels", KD_C, KD_FACE, size=8.5)
    tot_x, tot_w = asl_x + 19.5, kd_x - asl_x - 23
    _arrow(ax, [(asl_x + 16.3, my), (tot_x - 0.3, my)], ASL_C, lw=1.8)
    _arrow(ax, [(kd_x - 0.3, my), (tot_x + tot_w + 0.3, my)], KD_C, lw=1.8)
    _box(ax, tot_x, my - 7, tot_w, 14, "", LOSS_C, LOSS_FACE)
    ax.text(tot_x + tot_w / 2, my + 2.6, "L = m · [ λ · $L_{KD}$\n+ (1 − λ) · $L_{ASL}$ ]", ha="center", va="center",
            fontsize=10.5, weight="bold", zorder=3)
    ax.text(tot_x + tot_w / 2, my - 3.6, "m = 10, and 20 from epoch 20\nλ: the schedule below", ha="center",
            va="center", fontsize=8.5, zorder=3)

    _asl_cases(ax, 1.5, 1.5, 92, 33.5)
    _schedule_inset(fig, (103 / 170, 6.0 / 105, 59 / 170, 22.5 / 105), epochs)
    save_figure(fig, out, dpi=dpi)
    return out


def _asl_cases(ax, x, y, w, h):
    """The table of ASL's cases on one neuron (SPEC section 4, ``helper.train.losses.attention_shifting_loss``)."""
    _box(ax, x, y, w, h, "", ASL_C, "white", lw=1.2, style="round,pad=0.4")
    ax.text(x + 1, y + h - 1.3, "ASL on one neuron: t, s = the conv1 outputs of T and S (before batch-norm); "
            "active = positive", fontsize=9.5, weight="bold", color=ASL_C, va="top")
    ax.text(x + 1, y + h - 4.9, "t' = t / |t|  where t ≠ 0,   t' = (sign(s) − 1)·ε  where t = 0 (ε = 0.1);   "
            "s' = s / |detach(s)|\nASL of a layer = the mean of (1 + t'·s')² over its neurons and the whole batch",
            fontsize=8.5, va="top", linespacing=1.4)
    cols = (x + 1, x + 20, x + 40, x + 56)
    rows = [("teacher t", "student s", "(1 + t'·s')²", "effect on the student"),
            ("active", "active", "4", "pushed to dormant"),
            ("dormant", "dormant", "4", "pushed to active"),
            ("active", "dormant", "0", "no effect (already opposite)"),
            ("dormant", "active", "0", "no effect (already opposite)"),
            ("0 (dead)", "dormant or 0", "(1 + 2ε)² or 1", "weak push to active (ε)"),
            ("0 (dead)", "active", "1", "no effect")]
    top, step = y + h - 11.6, 2.95
    for r, row in enumerate(rows):
        yy = top - r * step
        if r:
            pushed = row[3].startswith(("pushed", "weak"))
            ax.add_patch(plt.Rectangle((x + 0.5, yy - step / 2 + 0.2), w - 1, step - 0.4, zorder=2.5, lw=0,
                                       facecolor="#f6dede" if pushed else "#ececec"))
        for c, text in enumerate(row):
            color = TEACHER_C if c == 0 and r else STUDENT_C if c == 1 and r else "k"
            ax.text(cols[c], yy, text, fontsize=9, va="center", zorder=3, color=color,
                    weight="bold" if r == 0 else "normal")
    ax.text(x + 1, y + 1.0, "The gradient, 2(1 + t's') t' / |s|, grows as |s| → 0: neurons closest to switching get the "
            "largest push.", fontsize=8.5, va="bottom", style="italic")


def _schedule_inset(fig, rect, epochs):
    """λ(epoch) from ``helper.train.schedule.asd_ratio`` and the multiplier m from ``loss_weights``, phases shaded."""
    ax = fig.add_axes(rect)
    e = list(range(epochs))
    lam = [asd_ratio(i) for i in e]
    mult = [sum(loss_weights(i, "scheduler")) for i in e]  # lambda*m + (1 - lambda)*m = m
    ax.step(e, lam, where="post", color=KD_C, lw=2, label="λ: weight of $L_{KD}$")
    ax.step(e, [1 - v for v in lam], where="post", color=ASL_C, lw=2, label="1 − λ: weight of $L_{ASL}$")
    for a, b, text in ((0, 10, "shift:\nASL only"), (10, 20, "λ = 0.9"), (20, 40, "λ: 0.9 → 1"), (40, epochs, "KD only")):
        ax.axvspan(a, b, color="0.93" if (a // 10) % 2 == 0 else "0.98", zorder=0)
        ax.text((a + b) / 2, 1.13, text, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlim(0, epochs)
    ax.set_xlabel("epoch (0-based; the paper trains 300)", fontsize=9)
    ax.set_ylabel("weight", fontsize=9)
    ax.tick_params(labelsize=8)
    ax2 = ax.twinx()
    ax2.step(e, mult, where="post", color="0.25", lw=1.3, ls=":", label="m: loss multiplier")
    ax2.set_ylim(0, 30)
    ax2.set_yticks([0, 10, 20])
    ax2.set_ylabel("m", fontsize=9)
    ax2.tick_params(labelsize=8)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right", bbox_to_anchor=(1, 0.07),
              framealpha=0.95)


# ---------------------------------------------------------------- the defenses over teachers (the README's headline)

def grid_cells_of(folder, cells=None, seeds=None):
    """The table entries (``helper.report.table.cell_summary``) of one teacher's folder of a ``reproduce.py`` grid,
    read from its finished runs (``CELL-nN/seedS/results.json``), whichever invocations made them: ``cells`` only
    these cell or arm names, ``seeds`` only these seeds."""
    entries = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        cell, _, n = name.rpartition("-n")
        if not n.isdigit() or (cells and cell not in cells):
            continue
        runs = [os.path.join(folder, name, s) for s in sorted(os.listdir(os.path.join(folder, name)))
                if s.startswith("seed") and (seeds is None or s[4:] in map(str, seeds))
                and os.path.isfile(os.path.join(folder, name, s, "results.json"))]
        if runs:
            entries.append({**cell_summary(cell, int(n), runs, folder), "arm": cell})
    if cells:
        entries.sort(key=lambda e: cells.index(e["arm"]))
    return entries


def draw_defenses(grid_dir, out, teachers=("badnets", "blended", "adba"), floors=(), cells=None, seeds=None):
    """One panel per teacher of a ``reproduce.py --attacks ... --retune`` grid (``GRID_DIR/LABEL/CELL-nN/seedS``):
    per cell, Acc as a share of KD's against ASR non-target (means over the finished runs of ``seeds``), a filled
    marker after the defense and an open one after the re-tuning attack, joined by a line. ``floors``: run folders of
    the clean teacher measured with each trigger (``distri.py --trigger_dir``, e.g. ``--epoch 0``), in ``teachers``'
    order, whose ``asr_nontarget`` (the floor a removal is read against) is drawn as a dashed line."""
    if floors and len(floors) != len(teachers):
        raise UserError(f"--floors: {len(floors)} folders for {len(teachers)} teachers; give one per teacher, in order")
    tables = {}
    for label in teachers:
        tables[label] = grid_cells_of(os.path.join(grid_dir, label), cells, seeds)
        if not any(e["arm"] == "kd" for e in tables[label]):
            raise UserError(f"{grid_dir}/{label}: no finished kd run, which the panel's Acc is read against")
    names = list(dict.fromkeys(e["arm"] for rows in tables.values() for e in rows))
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    markers = {n: "osD^v<>ph*"[i // 10 % 10] for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(teachers), figsize=(4.2 * len(teachers), 4.4), sharey=True, squeeze=False)
    for k, (ax, label) in enumerate(zip(axes[0], teachers)):
        kd = next(e for e in tables[label] if e["arm"] == "kd")
        for e in tables[label]:
            name = e["arm"]
            x, y = e["asr_nontarget"], e["acc"] / kd["acc"]
            ax.scatter([x], [y], color=colours[name], marker=markers[name], s=60, edgecolor="k", zorder=3,
                       label=name if k == 0 else None)
            if e.get("retune_asr_nontarget") is not None:
                rx = e["retune_asr_nontarget"]
                ax.plot([x, rx], [y, y], color=colours[name], lw=1, alpha=0.7)
                ax.scatter([rx], [y], facecolor="none", edgecolor=colours[name], marker=markers[name], s=60, zorder=3)
        if floors:
            floor = _read_json(os.path.join(floors[k], "results.json"), "a floor run's results")["asr_nontarget"]
            ax.axvline(floor, color="0.4", ls="--", lw=1,
                       label="floor (the clean teacher with this trigger)" if k == 0 else None)
        ax.axhline(0.97, color="0.7", ls=":", lw=1, label="97% of KD's Acc" if k == 0 else None)
        ax.set_xlim(-0.03, 1.03)
        ax.set_title(f"{label} (KD Acc {kd['acc']:.3f})")
        ax.set_xlabel("ASR non-target (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Acc / KD's Acc")
    fig.legend(loc="lower center", ncol=min(8, len(names) + 2), fontsize=8, frameon=False)
    fig.text(0.5, 0.995, "filled: after the defense; open: after the re-tuning attack", ha="center", va="top",
             fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    save_figure(fig, out)
    return out


def draw_curves(folders, out, labels=None, floor=None):
    """Per-epoch Acc and ASR non-target of several runs of one teacher (their ``log.jsonl``: the epochs that were
    evaluated), one line per run, the selected epoch marked; ``floor``: a run of the clean teacher with this
    trigger, whose ``asr_nontarget`` is drawn as a dashed line."""
    labels = labels or [folder_label(f) for f in folders]
    if len(labels) != len(folders):
        raise UserError(f"--labels: {len(labels)} names for {len(folders)} runs; give one per run")
    runs = [read_run(f) for f in folders]
    same_teacher(runs)
    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (run, label) in enumerate(zip(runs, labels)):
        rows = [r for r in read_jsonl(os.path.join(run["dir"], "log.jsonl")) if "acc" in r and "stage" not in r]
        if not rows:
            raise UserError(f"{run['dir']}/log.jsonl holds no evaluated epoch")
        epochs = [r["epoch"] for r in rows]
        for ax, key in ((ax_acc, "acc"), (ax_asr, "asr_nontarget")):
            ax.plot(epochs, [r[key] for r in rows], marker="o", ms=3, color=f"C{k}", label=label)
            best = (run["results"] or {}).get("best_epoch")
            if best in epochs:
                ax.scatter([best], [rows[epochs.index(best)][key]], s=90, facecolor="none", edgecolor=f"C{k}", zorder=3)
    if floor is not None:
        ax_asr.axhline(_read_json(os.path.join(floor, "results.json"), "the floor run's results")["asr_nontarget"],
                       color="0.4", ls="--", lw=1, label="floor (the clean teacher with this trigger)")
    for ax, name in ((ax_acc, "Acc (clean test images)"), (ax_asr, "ASR non-target")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    ax_asr.legend(fontsize=8)
    fig.text(0.5, 0.005, "circled: the selected epoch (lowest KD loss from --select_from)", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, out)
    return out


# ---------------------------------------------------------------- the command

def parser():
    p = argparse.ArgumentParser(prog="python -m helper.report.figures", description="Figures drawn from run folders")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="attention maps of several runs of one teacher, side by side")
    a.add_argument("runs", nargs="+", help="defense run folders (distri.py), all of one teacher")
    a.add_argument("--layers", nargs="+", default=["layer4"], choices=GROUPS, help="groups to draw, a block each")
    a.add_argument("--images", type=int, default=PICTURE_IMAGES, help="test images (each clean and triggered)")
    a.add_argument("--out", default="attention_compare.png")
    t = sub.add_parser("trigger", help="the trigger figure of a teacher folder")
    t.add_argument("teacher_dir")
    t.add_argument("--dataset", default=None, help="test set (default: the folder's args.json, else cifar10)")
    t.add_argument("--images", type=int, default=8)
    t.add_argument("--out", default="trigger.png")
    f = sub.add_parser("framework", help="the ASD method, drawn (fig/framework.png)")
    f.add_argument("--epochs", type=int, default=60, help="epochs shown in the schedule inset")
    f.add_argument("--out", default=FRAMEWORK_PNG)
    d = sub.add_parser("defenses", help="the defenses of a reproduce.py --attacks grid, a panel per teacher")
    d.add_argument("grid_dir", help="the grid's --output_dir (one folder per teacher label, each with table.json)")
    d.add_argument("--teachers", nargs="+", default=["badnets", "blended", "adba"], help="teacher labels, in order")
    d.add_argument("--floors", nargs="*", default=[], metavar="RUN",
                   help="a run of the clean teacher with each teacher's trigger (distri.py --trigger_dir), "
                        "in --teachers' order")
    d.add_argument("--cells", nargs="+", default=None, help="only these cells or arms, in this order (default: all)")
    d.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds (default: all finished)")
    d.add_argument("--out", default="defenses.png")
    c = sub.add_parser("curves", help="per-epoch Acc and ASR non-target of several runs of one teacher")
    c.add_argument("runs", nargs="+", help="defense run folders (distri.py), all of one teacher")
    c.add_argument("--labels", nargs="+", default=None, help="a name per run (default: the folder's)")
    c.add_argument("--floor", default=None, metavar="RUN", help="a run of the clean teacher with this trigger")
    c.add_argument("--out", default="curves.png")
    return p


@exits_cleanly
def main(argv=None):
    args = parser().parse_args(argv)
    if getattr(args, "images", 1) < 1:
        raise UserError(f"--images must be at least 1, not {args.images}")
    if args.command == "attention":
        path = compare_attention(args.runs, args.out, args.layers, args.images)
    elif args.command == "trigger":
        path = draw_trigger(args.teacher_dir, args.out, args.dataset, args.images)
    elif args.command == "curves":
        path = draw_curves(args.runs, args.out, args.labels, args.floor)
    elif args.command == "defenses":
        path = draw_defenses(args.grid_dir, args.out, args.teachers, args.floors, args.cells, args.seeds)
    else:
        if args.epochs < 41:
            raise UserError(f"--epochs {args.epochs}: the schedule reaches lambda = 1 at epoch 40; show at least 41")
        path = draw_framework(args.out, args.epochs)
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    main()
