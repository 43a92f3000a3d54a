"""Figures of a run, drawn from what it logged (never shown, only saved)."""
import math

import matplotlib

from helper.runlog import atomic_write

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
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (log scale)")
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
    """The pattern, the mask (its own colour scale) and a row of clean / triggered test images; saved as PNG."""
    n = len(clean)
    fig, axes = plt.subplots(2, n + 1, figsize=(1.6 * (n + 1), 3.4))
    axes[0, 0].imshow(pattern.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0, 0].set_title("pattern", fontsize=8)
    im = axes[1, 0].imshow(mask[0].numpy(), cmap="magma", vmin=0)
    axes[1, 0].set_title(f"mask (max {float(mask.max()):.3f})", fontsize=8)
    fig.colorbar(im, ax=axes[1, 0], fraction=0.046)
    for i in range(n):
        axes[0, i + 1].imshow(clean[i].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[1, i + 1].imshow(triggered[i].permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0, 1].set_title("clean", fontsize=8)
    axes[1, 1].set_title("triggered", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)
