"""The model's own training step, alone: forward, loss, backward, gradient clipping and clipkit's AdamW, no loader.

What a loader-fed run can reach at best on this model: the bench_train.py ratios are bounded by it (see "Where the
end-to-end ratio comes from" in docs/benchmarks.md). Synthetic inputs of the right shapes, one process, the same
threads as a training process beside one loader worker (--threads, default cores - 1); the median of --repeats steps
after one warm-up step, per preset, each preset in turn. `--profile N` adds torch.profiler's table of the N ops with
the most self time over those steps (ms a step).

    python -m tools.bench.bench_step --preset photo224-w64 --preset photo224-w96 --preset photo224 --batch 64
    python -m tools.bench.bench_step --preset photo224 --batch 64 --profile 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from clipkit.optim import make_optimizer
from tools.bench.common import (
    LOCK_PATH,
    PRESETS,
    bench_lock,
    default_threads,
    log,
    loss_backward,
    machine,
    matmul_peak,
    synthetic_model,
    train_flops_per_sample,
    write_json,
)


def step_fn(model_cfg: dict, batch: int):
    """One full training step of the model on fixed synthetic inputs (images [B, 3, S, S], tokens [B, L])."""
    model, images, texts = synthetic_model(model_cfg, batch)
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6)

    def step() -> None:
        loss_backward(model, images, texts)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: photo224)")
    p.add_argument("--model-config", help="a model config JSON file instead of the presets")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads (default: cores - 1, as beside one loader worker)")
    p.add_argument("--profile", type=int, default=0, help="print the N ops with the most self time")
    p.add_argument("--json")
    p.add_argument("--lock", default=LOCK_PATH)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or default_threads(1))
    info = machine() | {"threads": torch.get_num_threads(), "batch": a.batch}
    log(f"machine: {json.dumps(info)}")
    results = {}
    if a.model_config:
        configs = {Path(a.model_config).stem: json.loads(Path(a.model_config).read_text())}
    else:
        configs = {name: PRESETS[name]() for name in a.preset or ["photo224"]}
    for preset, cfg in configs.items():
        flops, step = train_flops_per_sample(cfg, a.batch), step_fn(cfg, a.batch)
        with bench_lock(a.lock or None):
            peak = matmul_peak()
            step()  # warm-up: optimizer state, kernel selection
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            if a.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(a.repeats):
                        step()
        sec = statistics.median(times)
        results[preset] = {"step_s": times, "ms_per_sample": sec / a.batch * 1e3, "samples_per_s": a.batch / sec,
                           "mfu": flops * a.batch / sec / peak, "flops_per_sample": flops}  # fmt: skip
        r = results[preset]
        print(f"{preset}: {sec * 1e3:.1f} ms a step of {a.batch}, {r['ms_per_sample']:.2f} ms a sample, "
              f"{r['samples_per_s']:.1f} samples/s, MFU {r['mfu']:.1%} ({flops / 1e9:.3f} GFLOP a sample)")  # fmt: skip
        if a.profile:
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: a.profile]
            for e in ops:
                ms = e.self_cpu_time_total / 1e3 / a.repeats
                print(f"  {e.key[:60]:60s} {ms:7.1f} ms a step ({e.count // a.repeats} calls)")
    write_json(a.json, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
