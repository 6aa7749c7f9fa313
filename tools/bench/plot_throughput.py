"""Plots training throughput of clipkit and open_clip_train from bench_train.py's JSON files.

Against batch size (default): one panel per JSON file (e.g. the quickstart model and the 224 px photo model), median
samples/s of the pairs at each batch size, the individual pairs as dots, and each point's MFU as a label.
Against model cost (`--by flops`): one panel, one point per JSON file (the same data, batch and workers, models of
different width), samples/s against GFLOP per sample, each labelled with the clipkit/open_clip_train ratio: where
the loader sets the pace and where the model does.

    python -m tools.bench.plot_throughput docs/bench/train_vs_batch_quickstart.json \
        docs/bench/train_vs_batch_photo224.json --out docs/images/train_vs_batch.png
    python -m tools.bench.plot_throughput docs/bench/photo224*.json --by flops --loader docs/bench/loader.json \
        --out docs/images/train_vs_model.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SIDES = (("clipkit", "clipkit", "tab:blue"), ("open_clip", "open_clip_train", "tab:orange"))


def panel(ax, data: dict, title: str) -> None:
    """One framework-vs-framework throughput curve over batch sizes."""
    results = sorted(data["results"], key=lambda r: r["batch"])
    batches = [r["batch"] for r in results]
    for key, label, color in SIDES:
        medians = [r["median"][f"{key}_samples_per_s"] for r in results]
        ax.plot(batches, medians, "o-", color=color, label=label)
        for r in results:
            ax.scatter([r["batch"]] * len(r["pairs"]), [p[f"{key}_samples_per_s"] for p in r["pairs"]], s=10,
                       color=color, alpha=0.35)  # fmt: skip
        for b, m, r in zip(batches, medians, results, strict=True):
            ax.annotate(f"{r['median'][f'{key}_mfu']:.0%}", (b, m), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size per process")
    ax.set_ylabel("samples/s (labels: MFU)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def flops_panel(ax, datas: list[dict], loader: dict | None = None) -> None:
    """Throughput of both frameworks against the model's FLOPs per sample, one batch size (the first result).

    `loader` (bench_loader.py's JSON on the same shards) adds each side's loader-alone rate: the ceiling a model
    cheaper than its loading reaches.
    """
    points = sorted((d["results"][0] for d in datas), key=lambda r: r["flops_per_sample"])
    x = [r["flops_per_sample"] / 1e9 for r in points]
    for key, label, color in SIDES:
        ax.plot(x, [r["median"][f"{key}_samples_per_s"] for r in points], "o-", color=color, label=label)
        for xi, r in zip(x, points, strict=True):
            ax.scatter([xi] * len(r["pairs"]), [p[f"{key}_samples_per_s"] for p in r["pairs"]], s=10, color=color,
                       alpha=0.35)  # fmt: skip
    for xi, r in zip(x, points, strict=True):
        ax.annotate(f"x{r['median']['ratio']:.2f}", (xi, r["median"]["clipkit_samples_per_s"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8, color="tab:blue")  # fmt: skip
    for key, label, color in SIDES if loader else ():
        rate = median([p[f"{key}_samples_per_s"] for p in loader["pairs"]])
        ax.axhline(rate, color=color, linestyle="--", linewidth=1, label=f"{label} loader alone")
    d, m = datas[0], datas[0]["machine"]
    ax.set_xlabel("model GFLOP per sample (forward + backward)")
    ax.set_ylabel("samples/s (labels: clipkit / open_clip_train)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"batch {points[0]['batch']}, {d['settings']['workers']} worker(s), {m['cores']} cores, "
                 f"{d['settings']['precision']}, {m['date'][:10]}", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="bench_train.py --json files")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--by", choices=["batch", "flops"], default="batch", help="the x axis")
    p.add_argument("--loader", help="--by flops: bench_loader.py's JSON, drawn as each side's loader-alone rate")
    a = p.parse_args(argv)
    datas = [json.loads(Path(f).read_text()) for f in a.inputs]
    if a.by == "flops":
        fig, ax = plt.subplots(figsize=(6, 4))
        flops_panel(ax, datas, json.loads(Path(a.loader).read_text()) if a.loader else None)
    else:
        fig, axes = plt.subplots(1, len(datas), figsize=(5.5 * len(datas), 4), squeeze=False)
        for ax, data in zip(axes[0], datas, strict=True):
            m, s = data["machine"], data["settings"]
            name = data.get("preset") or "custom model"
            title = (
                f"{name}: {m['cores']} cores ({m['cpu']}), {s['precision']}, {s['workers']} worker(s), {m['date'][:10]}"
            )
            panel(ax, data, title)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
