"""Fine-tuning pictures: training curves with the early-stopping point, and accuracy against the WiSE-FT mix."""

from __future__ import annotations

from pathlib import Path

from clipkit.files import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_file: Path) -> Path:
    fig.tight_layout()
    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_file


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the start is not pulled toward 0.

    One logged loss is one batch (with mixup or CutMix, one random mixing weight), so the raw line swings widely.
    """
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(rows: list[dict], best_step: int | None, monitor: str, out_file: Path) -> Path:
    """Training loss and validation accuracy / macro-F1 / loss against steps; the restored step marked."""
    plt = _plt()
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val/accuracy" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        axes[0].plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="train loss")
        axes[0].plot(steps, smooth(losses), lw=1.5, color="C0", label="train loss, smoothed")
    axes[0].plot(
        [r["step"] for r in val], [r["val/loss"] for r in val], marker="o", ms=3, lw=1, color="C1", label="val loss"
    )
    axes[0].set_title("loss")
    for key in ("accuracy", "macro_f1"):
        axes[1].plot([r["step"] for r in val], [r[f"val/{key}"] for r in val], marker="o", ms=3, lw=1, label=key)
    axes[1].set_title(f"validation (early stopping on {monitor})")
    for ax in axes:
        if best_step is not None:
            ax.axvline(best_step, color="k", ls="--", lw=0.8, label=f"restored: step {best_step}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, out_file)


def plot_wise(rows: list[dict], sets: list[str], chosen: float, out_file: Path) -> Path:
    """Accuracy of each set against the WiSE-FT mixing weight a, the a chosen on validation marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    alphas = [r["alpha"] for r in rows]
    for name in sets:
        ax.plot(alphas, [r[name]["accuracy"] for r in rows], marker="o", ms=3, label=name)
    ax.axvline(chosen, color="k", ls="--", lw=0.8, label=f"chosen on val: a={chosen:g}")
    ax.set_xlabel("a (0: zero-shot, 1: fine-tuned)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("WiSE-FT: (1-a) zero-shot + a fine-tuned")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out_file)
