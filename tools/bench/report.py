"""The comparison table of docs/benchmarks.md, printed from the raw results in docs/bench/*.json.

    python -m tools.bench.report docs/bench

One row per measured configuration: clipkit against open_clip_train (training, data loader) or CLIP_benchmark
(zero-shot evaluation) at equal settings. Throughputs are medians over a benchmark's pairs; the ratio is the median of
the pairs' ratios (clipkit / reference, each pair timed alternately), the pairs' own ratios in brackets; every value
is rounded from the JSON here, never typed. tests/test_bench.py checks that docs/benchmarks.md holds these rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# (JSON file, batch within it (sweeps hold several), what is compared, the benchmark's distinguishing arguments)
ROWS = [
    ("loader.json", None, "data loader alone, photos", "bench_loader --batch 64"),
    ("photo224-w64.json", 64, "training, photos, `photo224-w64`", "bench_train --preset photo224-w64 --batch 64"),
    ("photo224-w96.json", 64, "training, photos, `photo224-w96`", "bench_train --preset photo224-w96 --batch 64"),
    ("photo224.json", 64, "training, photos, `photo224`", "bench_train --preset photo224 --batch 64"),
    ("photo224-wide.json", 64, "training, photos, `photo224-wide`", "bench_train --preset photo224-wide --batch 64"),
    ("sweep_photo224.json", 16, "training, photos, `photo224`", "bench_train --preset photo224 --batch 16,32,64,128"),
    ("sweep_photo224.json", 32, "training, photos, `photo224`", "(same run)"),
    ("sweep_photo224.json", 64, "training, photos, `photo224`", "(same run)"),
    ("sweep_photo224.json", 128, "training, photos, `photo224`", "(same run)"),
    ("quickstart.json", 128, "training, Fashion-MNIST, `quickstart`", "bench_train --preset quickstart --batch 128"),
    ("sweep_quickstart.json", 32, "training, Fashion-MNIST, `quickstart`",
     "bench_train --preset quickstart --batch 32,64,128,256"),
    ("sweep_quickstart.json", 64, "training, Fashion-MNIST, `quickstart`", "(same run)"),
    ("sweep_quickstart.json", 128, "training, Fashion-MNIST, `quickstart`", "(same run)"),
    ("sweep_quickstart.json", 256, "training, Fashion-MNIST, `quickstart`", "(same run)"),
    ("quickstart_bf16.json", 128, "training, Fashion-MNIST, `quickstart`, bf16 autocast",
     "bench_train --preset quickstart --batch 128 --precision bf16"),
    ("quickstart_bothcompile.json", 128, "training, Fashion-MNIST, `quickstart`, both compiled",
     "bench_train --preset quickstart --batch 128 --clipkit-set train.compile=true --open-clip-arg=--torchcompile"),
    ("zeroshot_w1.json", None, "zero-shot evaluation, Fashion-MNIST test, 1 loader worker",
     "bench_zeroshot --workers 1"),
    ("zeroshot_w0.json", None, "zero-shot evaluation, Fashion-MNIST test, no loader worker",
     "bench_zeroshot --workers 0"),
]  # fmt: skip
HEADER = (
    "| comparison | batch | clipkit | reference | ratio, median [pairs] | load at start "
    "| command (`python -m tools.bench.`), results |\n|---|---|---|---|---|---|---|"
)


def pairs_of(result: dict, batch: int | None) -> tuple[str, list[dict]]:
    """(unit, pairs as {"clipkit", "reference", "ratio", "load"}) of one configuration of a result file."""
    if "runs" in result:  # bench_zeroshot: seconds per side; throughput in images/s
        return "img/s", [
            {
                "clipkit": r["clipkit"]["n_images"] / r["clipkit"]["seconds"],
                "reference": r["clip_benchmark"]["n_images"] / r["clip_benchmark"]["seconds"],
                "ratio": r["ratio"],
                "load": r["load_before"][0],
            }
            for r in result["runs"]
        ]
    if batch is not None:  # bench_train: one record per batch size
        result = next(r for r in result["results"] if r["batch"] == batch)
    return "samples/s", [
        {
            "clipkit": p["clipkit_samples_per_s"],
            "reference": p["open_clip_samples_per_s"],
            "ratio": p["ratio"],
            "load": p.get("loadavg_before"),
        }
        for p in result["pairs"]
    ]


def row(folder: Path, name: str, batch: int | None, what: str, command: str) -> str:
    result = json.loads((folder / name).read_text())
    unit, pairs = pairs_of(result, batch)
    batch = batch or result["settings"].get("batch") or result["settings"].get("batch_size")
    med = {k: statistics.median(p[k] for p in pairs) for k in ("clipkit", "reference", "ratio")}
    loads = [p["load"] for p in pairs if p["load"] is not None]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
    each = ", ".join(f"{p['ratio']:.2f}" for p in pairs)
    command = command if command.startswith("(") else f"`{command}`"
    return (
        f"| {what} | {batch} | {med['clipkit']:.0f} {unit} | {med['reference']:.0f} {unit} | "
        f"**{med['ratio']:.2f}** [{each}] | {load} | {command}, [{name}](bench/{name}) |"
    )


def table(folder: Path) -> str:
    """The markdown table of every configuration in ROWS whose JSON is in `folder`."""
    rows = [row(folder, *r) for r in ROWS if (folder / r[0]).is_file()]
    return "\n".join([HEADER, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="docs/bench", help="the folder of result JSON files")
    print(table(Path(p.parse_args(argv).folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
