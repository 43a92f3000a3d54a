"""Figures of a run, drawn from what it logged (never shown, only saved)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    ax_lam.plot(epochs, [r.get("lambda") for r in rows], "k:", label="lambda")
    ax_lam.set_ylim(-0.05, 1.05)
    ax_lam.set_ylabel("lambda")
    lines = ax_loss.get_lines() + ax_lam.get_lines()
    ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right", fontsize=8)
    for key, label in (("acc", "Acc"), ("asr", "ASR"), ("asr_nontarget", "ASR non-target")):
        ax_metric.plot(epochs, [r.get(key) for r in rows], label=label)
    if best_epoch is not None:
        for ax in (ax_loss, ax_metric):
            ax.axvline(best_epoch, color="grey", lw=0.8, ls="--")
    ax_metric.set_ylim(-0.02, 1.02)
    ax_metric.set_xlabel("epoch")
    ax_metric.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
