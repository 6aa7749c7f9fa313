"""clipkit against itself: training throughput of variants (recipe overrides, or an earlier copy of the code).

The before/after figure of each speed change: every round runs each variant once, in a rotating order, under the
machine-wide benchmark lock; the result is each variant's median samples/s and its ratio to the first variant.
Settings (model, shards, batch, workers, threads, steps, skipped steps) are bench_train.py's.

    python -m tools.bench.bench_variants --preset photo224 --data '/tmp/clipkit-bench/photos/photos-*.tar' \\
        --batch 64 --rounds 3 --variant fast= --variant pil=data.fast_images=false
    # an earlier version of the package: NAME=@FOLDER (a folder that holds clipkit/, e.g. from `git archive`)
    python -m tools.bench.bench_variants ... --variant now= --variant before=@/tmp/clipkit-base
    python -m tools.bench.bench_variants ... --variant now=train.precision=bf16 \\
        --variant before='@/tmp/clipkit-base train.precision=bf16'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from clipkit.data.shards import expand_shards
from tools.bench.bench_train import run_one
from tools.bench.common import (
    LOCK_PATH,
    add_model_arguments,
    bench_lock,
    default_threads,
    log,
    machine,
    matmul_peak,
    median,
    model_config,
    train_flops_per_sample,
    write_json,
)


def parse_variant(spec: str) -> tuple[str, list[str], str | None]:
    """NAME=k=v k=v (recipe overrides) or NAME=@FOLDER [k=v ...] (another copy of the code, with overrides)
    -> (name, overrides, code)."""
    name, _, rest = spec.partition("=")
    if rest.startswith("@"):
        code, *overrides = rest[1:].split()
        return name, overrides, code
    return name, rest.split(), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="NAME=overrides or NAME=@code-folder [overrides]")
    add_model_arguments(p, "photo224")
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json")
    p.add_argument("--lock", default=LOCK_PATH)
    a = p.parse_args(argv)
    a.threads = a.threads or default_threads(a.workers)
    torch.set_num_threads(a.threads)
    variants = [parse_variant(v) for v in a.variant]
    model_cfg = model_config(a)
    shards = [str(Path(s).resolve()) for s in expand_shards(a.data)]
    info = machine() | {"threads": a.threads}
    log(f"machine: {json.dumps(info)}")
    flops = train_flops_per_sample(model_cfg, a.batch)
    results: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    peaks = []
    with tempfile.TemporaryDirectory(prefix="clipkit-variants-") as tmp:
        for r in range(a.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            with bench_lock(a.lock or None):
                load = os.getloadavg()[0]
                peaks.append(matmul_peak(a.precision))
                for name, overrides, code in order:
                    work = Path(tmp) / f"r{r}-{name}"
                    sps, _ = run_one("clipkit", work, model_cfg, shards, a, a.batch, overrides, code)
                    results[name].append(sps)
            print(f"round {r + 1}/{a.rounds} (load {load:.2f}, peak {peaks[-1] / 1e9:.1f} GFLOP/s): "
                  + ", ".join(f"{n} {results[n][-1]:.1f}" for n, _, _ in order) + " samples/s", flush=True)  # fmt: skip
    first, peak = variants[0][0], median(peaks)
    summary = {n: {"runs": v, "median": median(v), "vs_first": median(v) / median(results[first]),
                   "mfu": flops * median(v) / peak} for n, v in results.items()}  # fmt: skip
    for n, s in summary.items():
        runs = ", ".join(f"{x:.1f}" for x in s["runs"])
        print(f"{n}: median {s['median']:.1f} samples/s [{runs}] (MFU {s['mfu']:.1%}); x{s['vs_first']:.3f} of {first}")
    print(f"{flops / 1e9:.3f} GFLOP/sample, peak {peak / 1e9:.1f} GFLOP/s (median of rounds)")
    out = {"benchmark": "variants", "machine": info, "settings": vars(a), "variants": a.variant, "results": summary,
           "flops_per_sample": flops, "peak_flops": peaks}  # fmt: skip
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
