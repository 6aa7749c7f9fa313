"""Training curves as a picture: `<run>/metrics.png`, drawn from `<run>/metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, out_file: Path) -> Path | None:
    """Draws loss, temperature, learning rate and throughput against steps, plus eval metrics if logged.

    Returns:
        The PNG path, or None when the log has no training rows yet.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    if not train:
        return None
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    panels = [("loss", "loss"), ("logit_scale", "logit scale (1/temperature)"), ("lr", "learning rate"),
              ("samples_per_s", "samples/s")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels) + bool(evals), figsize=(4 * (len(panels) + bool(evals)), 3.2))
    steps = [r["step"] for r in train]
    for ax, (key, title) in zip(axes, panels, strict=False):  # one more axis when evals exist
        ax.plot(steps, [r.get(key) for r in train], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evals:
        ax = axes[-1]
        keys = sorted({k for r in evals for k in r if k.startswith("eval/") and isinstance(r[k], float)})
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts, strict=True), marker="o", lw=1, label=k.removeprefix("eval/"))
        ax.set_title("evaluation")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
