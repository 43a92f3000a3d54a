"""Figures of a run, drawn from what it logged (never shown, only saved)."""
import math
import textwrap

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from helper.data.metrics import psnr, ssim
from helper.run.runlog import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path, dpi=110):
    """Save a figure as PNG atomically and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)


def plot_curves(rows, path, title="", best_epoch=None):
    """KD loss, ASL and lambda/lr on the left; Acc, ASR and ASR non-target on the right; saved as PNG."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r.get("kd_loss") for r in rows], label="KD loss")
    asl = [(r["epoch"], r["asl"]) for r in rows if r.get("asl") is not None]
    if asl:
        ax_loss.plot(*zip(*asl), label="ASL")
    values = [r.get("kd_loss") for r in rows] + [v for _, v in asl]
    values = [v for v in values if v is not None and math.isfinite(v)]
    log = bool(values) and min(values) > 0  # a KL at rounding noise can be 0 or -1e-6: then a linear axis
    ax_loss.set_yscale("log" if log else "linear")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (log scale)" if log else "loss")
    ax_lam = ax_loss.twinx()
    lam = [(r["epoch"], r["lambda"]) for r in rows if r.get("lambda") is not None]
    if lam:
        ax_lam.plot(*zip(*lam), "k:", label="lambda")
    ax_lam.set_ylim(-0.05, 1.05)
    ax_lam.set_ylabel("lambda")
    lines = ax_loss.get_lines() + ax_lam.get_lines()
    ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right", fontsize=8)
    for key, label in (("acc", "Acc"), ("asr", "ASR"), ("asr_nontarget", "ASR non-target"), ("ra", "RA")):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]  # --eval_every leaves epochs out
        if pts:
            ax_metric.plot(*zip(*pts), label=label, marker="." if len(pts) < len(rows) else None)
    if best_epoch is not None:
        for ax in (ax_loss, ax_metric):
            ax.axvline(best_epoch, color="grey", lw=0.8, ls="--")
    ax_metric.set_ylim(-0.02, 1.02)
    ax_metric.set_xlabel("epoch")
    ax_metric.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _with_unit_axis(ax, epochs, values, label, ylabel, unit_values, unit_label):
    """``values`` on ``ax``, a [0,1] quantity dotted on a twin axis, one legend for both."""
    ax.plot(epochs, values, label=label)
    ax.set_ylabel(ylabel)
    ax2 = ax.twinx()
    ax2.plot(epochs, unit_values, "k:", label=unit_label)
    ax2.set_ylim(-0.02, 1.02)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)


def plot_attack_curves(rows, path, title=""):
    """adba.py's log: losses; teacher and shadow Acc/ASR; mask L1 and share of trigger pixels; PSNR and SSIM."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    for key, label in (("teacher_loss", "teacher"), ("shadow_loss", "shadow"), ("trigger_loss", "trigger")):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_yscale("log")
    ax.set_title("losses (log scale)")
    ax = axes[1]
    for key, label, style in (("acc", "teacher Acc", "C0-"), ("asr", "teacher ASR", "C1-"),
                              ("shadow_acc", "shadow Acc", "C0--"), ("shadow_asr", "shadow ASR", "C1--")):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("test set")
    _with_unit_axis(axes[2], epochs, [r.get("mask_l1") for r in rows], "mask L1", "mask L1 (sum)",
                    [r.get("mask_share") for r in rows], "share of pixels > 0.01")
    axes[2].set_title("mask")
    psnr = [r["psnr"] if isinstance(r.get("psnr"), float) and math.isfinite(r["psnr"]) else float("nan") for r in rows]
    _with_unit_axis(axes[3], epochs, psnr, "PSNR (dB)", "PSNR (dB; inf = no trigger, not drawn)",
                    [r.get("ssim") for r in rows], "SSIM")
    axes[3].set_title("clean vs triggered")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_trigger(pattern, mask, clean, triggered, path):
    """The trigger and what it does: pattern, mask (its own colour scale), pattern x mask, then the clean /
    triggered test-image pairs, each pair's PSNR and SSIM (``helper.data.metrics``) above it; saved as PNG.

    ``pattern`` (3,H,W), ``mask`` (1,H,W), ``clean`` and ``triggered`` (N,3,H,W), all in [0,1] on the CPU.
    """
    pattern, mask, clean, triggered = (t.detach().float().cpu() for t in (pattern, mask, clean, triggered))
    n = len(clean)
    cols = max(n, 4)
    fig = plt.figure(figsize=(1.45 * cols + 0.4, 5.6), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[1.15, 2.0])
    top, bottom = outer[0].subgridspec(1, 4), outer[1].subgridspec(2, max(n, 1))
    to_img = lambda t: t.permute(1, 2, 0).clamp(0, 1).numpy()  # noqa: E731
    m = mask
    peak = float(m.max())
    ax = fig.add_subplot(top[0, 0])
    ax.imshow(to_img(pattern))
    ax.set_title("pattern p", fontsize=9)
    ax = fig.add_subplot(top[0, 1])
    im = ax.imshow(m[0].numpy(), cmap="magma", vmin=0)
    ax.set_title(f"mask m (max {peak:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    ax = fig.add_subplot(top[0, 2])
    ax.imshow(to_img(pattern * m / peak if peak > 0 else pattern * m))
    ax.set_title("p × m" + (f" (scaled by 1 / {peak:.3f})" if peak > 0 else ""), fontsize=9)
    pairs = [(psnr(clean[i:i + 1], triggered[i:i + 1]), ssim(clean[i:i + 1], triggered[i:i + 1])) for i in range(n)]
    ax = fig.add_subplot(top[0, 3])
    ax.axis("off")
    finite = [p for p, _ in pairs if math.isfinite(p)]
    lines = ["x' = x (1 - m) + p m", f"mask L1 {float(m.abs().sum()):.2f}",
             f"pixels > 0.01: {float((m > 0.01).float().mean()):.1%}"]  # helper.attacks.adba's TRIGGER_PIXEL
    if pairs:
        lines += [f"these {n} pairs:", f"PSNR {sum(finite) / len(finite):.2f} dB" if finite else "PSNR inf (no trigger)",
                  f"SSIM {sum(s for _, s in pairs) / n:.3f}"]
    ax.text(0.02, 0.5, "\n".join(lines), fontsize=9, va="center", ha="left", transform=ax.transAxes)
    for i in range(n):
        a_clean, a_trig = fig.add_subplot(bottom[0, i]), fig.add_subplot(bottom[1, i])
        a_clean.imshow(to_img(clean[i]))
        a_trig.imshow(to_img(triggered[i]))
        p, s = pairs[i]
        a_clean.set_title(f"PSNR {p:.1f} dB\nSSIM {s:.3f}" if math.isfinite(p) else f"PSNR inf\nSSIM {s:.3f}", fontsize=8)
        if i == 0:
            a_clean.set_ylabel("clean", fontsize=9)
            a_trig.set_ylabel("triggered", fontsize=9)
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, path)


def _compact(region):
    """Whether a (H,W) bool region is worth outlining: neither empty nor everything, and no more boundary than
    twice that of a square of its area (a patch, not a scatter of pixels, whose outline would hide the image)."""
    if not region.any() or region.all():
        return False
    r = region.int()
    boundary = int((r[1:] != r[:-1]).sum() + (r[:, 1:] != r[:, :-1]).sum())
    return boundary <= 8 * math.sqrt(int(r.sum()))


def plot_attention(images, row_labels, columns, path, region=None, outlined=None, title="", separators=()):
    """A grid of attention maps over their images, drawn as one mosaic (fast: one image, not one axes per
    panel); saved as PNG.

    ``images`` (N,3,H,W) in [0,1], one row each, drawn alone in the first column and labelled by ``row_labels``;
    ``columns`` a list of ``(label, maps)``, ``maps`` (N,H,W) already in [0,1], each blended over its image with
    the jet colormap at alpha 0.5 (red high, blue low). ``region`` (H,W bool): the trigger's pixels, outlined in
    white on the rows where ``outlined[i]`` is true. ``separators``: indices into ``columns`` before which a wider
    gap is left (blocks of columns).
    """

    n, h, w = len(images), images.shape[-2], images.shape[-1]
    gap, wide = 2, 10
    jet = matplotlib.colormaps["jet"]
    xs, x = [], 0  # left pixel of each column of tiles: the image column, then one per entry of ``columns``
    for c in range(len(columns) + 1):
        xs.append(x)
        x += w + (wide if c == 0 or c in separators else gap)
    width, height = xs[-1] + w, n * (h + gap) - gap
    mosaic = np.ones((height, width, 3))
    outline = np.zeros((height, width))
    show_region = region is not None and _compact(region)
    for r in range(n):
        y = r * (h + gap)
        img = images[r].permute(1, 2, 0).clamp(0, 1).numpy()
        mosaic[y:y + h, xs[0]:xs[0] + w] = img
        for c, (_, maps) in enumerate(columns, start=1):
            mosaic[y:y + h, xs[c]:xs[c] + w] = 0.5 * img + 0.5 * jet(maps[r].clamp(0, 1).numpy())[..., :3]
        if show_region and outlined is not None and outlined[r]:
            for x0 in xs:
                outline[y:y + h, x0:x0 + w] = region.numpy()
    label_lines = max([str(label).count("\n") + 1 for label, _ in columns] + [1])
    tile_in = 1.05 / w  # inches per pixel: a tile is about 1 inch
    left, right, bottom = 1.05, 1.0, 0.15
    fig_w = left + width * tile_in + right
    if title:
        title = textwrap.fill(title, width=int(fig_w * 12))  # ~12 characters of 8 pt per inch
        if outline.any():
            title += "\nwhite outline: the trigger's mask > 0.01"
    top = 0.28 + 0.13 * label_lines + (0.14 * (title.count("\n") + 1) + 0.1 if title else 0.0)
    fig_h = bottom + height * tile_in + top
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([left / fig_w, bottom / fig_h, width * tile_in / fig_w, height * tile_in / fig_h])
    ax.imshow(mosaic, interpolation="nearest")
    if outline.any():
        ax.contour(np.arange(width), np.arange(height), outline, levels=[0.5], colors="white", linewidths=0.8)
    ax.set_axis_off()
    for c, label in enumerate(["image"] + [label for label, _ in columns]):
        ax.text(xs[c] + w / 2 - 0.5, -3, label, ha="center", va="bottom", fontsize=7)
    for r, label in enumerate(row_labels):
        ax.text(-3, r * (h + gap) + h / 2 - 0.5, label, ha="right", va="center", fontsize=7)
    cax = fig.add_axes([(left + width * tile_in + 0.2) / fig_w, (bottom + 0.25 * height * tile_in) / fig_h,
                        0.12 / fig_w, 0.5 * height * tile_in / fig_h])
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=jet), cax=cax)
    bar.set_label("attention, each map from\nits min (blue) to its max (red)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / fig_h, va="top")
    save_figure(fig, path)


def _show(ax, img, title):
    """One (3, H, W) image in [0, 1] on an axis without ticks."""
    ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_scan(path, triggers, summaries, target=None, true_trigger=None):
    """scan.png: a row per trigger family, a column per class (the inverted trigger: ``p * m`` for a mask, the
    perturbation scaled to [0, 1] around grey for a universal one) with its size and anomaly index; the named
    target's title in red; when given (evaluation only), the true trigger's ``p * m`` in a last column."""
    names = list(triggers)
    n_cls = len(next(iter(triggers.values())))
    cols = n_cls + (true_trigger is not None)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols, 1.55 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, t in enumerate(triggers[name]):
            t = t.detach().float().cpu().expand(3, *t.shape[-2:])
            if name == "universal":
                t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
            s = summaries[name]
            _show(axes[r][c], t, f"{name} {c}\n{s['size'][c]:.1f}, idx {s['anomaly_index'][c]:.1f}")
            if c == target:
                axes[r][c].title.set_color("red")
        if true_trigger is not None:
            _show(axes[r][-1], true_trigger.expand(3, *true_trigger.shape[-2:]), "true p*m\n(evaluation)")
    fig.tight_layout()
    save_figure(fig, path)
