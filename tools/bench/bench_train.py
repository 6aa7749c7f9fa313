"""Training throughput, clipkit vs open_clip_train, at equal settings: samples/s, MFU and their ratio.

Both frameworks train the same model config (registered with open_clip from a JSON file) on the same shards
(resampled), with the same per-process batch, loader workers, precision, AdamW hyper-parameters, warmup + cosine
schedule, gradient clipping (1.0), log interval and number of steps, one process each, the same torch thread
count (--threads, default cores - workers: see common.default_threads).
Each job is a fresh process (tools/bench/runner.py) whose optimizer steps are timestamped by the same hook;
throughput counts the steps after the first --skip (worker start, shuffle-buffer fill, compilation) on both sides.

Runs come in A/B pairs, the order alternating between pairs so background load hits both sides, each pair
holding the machine-wide benchmark lock. Beside each pair: the matmul peak at the run's precision, on the training
device (the GPU if there is one), measured in this run before the pair (common.matmul_peak), and each side's
MFU = FLOPs/sample x samples/s / peak, with FLOPs/sample counted by torch's FlopCounterMode on one forward +
backward of the model and loss. The last line is the ratio (median of pairs).

    python -m tools.bench.bench_train --preset quickstart --data 'data/fashion-mnist/train-*.tar' --pairs 3
    python -m tools.bench.bench_train --preset photo224 --data '/tmp/clipkit-bench/photos/photos-*.tar' \
        --batch 64 --workers 1 --pairs 3
    python -m tools.bench.bench_train --preset quickstart --data 'data/fashion-mnist/train-*.tar' \
        --batch 32,64,128,256 --pairs 1 --json docs/images/train_vs_batch.json   # input of plot_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from clipkit.data.shards import expand_shards
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
    thread_env,
    throughput,
    train_flops_per_sample,
    write_json,
)

RUNNER = "tools.bench.runner"
MODEL_NAME = "clipkit-bench"  # the name open_clip_train knows the registered config by


def clipkit_recipe(model_cfg: dict, shards: list[str], a: argparse.Namespace, batch: int) -> dict:
    """The clipkit recipe of a run: the settings open_clip_train gets too (see open_clip_args)."""
    return {
        "name": "bench",
        "model": {"config": model_cfg},
        "data": {"sources": [{"shards": "::".join(shards)}], "batch_size": batch, "workers": a.workers},
        "train": {
            "steps": a.steps,
            "lr": a.lr,
            "warmup": a.warmup,
            "weight_decay": 0.1,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "grad_clip": 1.0,
            "precision": a.precision,
            "log_every": a.log_every,
            "checkpoint_every": 0,
        },
    }


def open_clip_args(shards: list[str], a: argparse.Namespace, batch: int, logs: Path) -> list[str]:
    """open_clip_train's command line for the same run as `clipkit_recipe`."""
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[a.precision]
    return [
        "--train-data", "::".join(shards), "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(a.steps * batch), "--epochs", "1",
        "--batch-size", str(batch), "--workers", str(a.workers), "--model", MODEL_NAME, "--precision", precision,
        "--lr", str(a.lr), "--warmup", str(a.warmup), "--lr-scheduler", "cosine", "--wd", "0.1",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
        "--log-every-n-steps", str(a.log_every), "--seed", "0", "--logs", str(logs), "--name", "run",
        "--report-to", "",
    ]  # fmt: skip


def run_one(
    framework: str,
    work: Path,
    model_cfg: dict,
    shards: list[str],
    a,
    batch: int,
    overrides: list[str] | None = None,
    code: str | None = None,
) -> tuple[float, int]:
    """Runs one job in a fresh process; returns (samples/s after --skip steps, steps timed).

    `overrides` replace --clipkit-set for this run; `code` is a folder holding another copy of the clipkit package
    (put first on PYTHONPATH: an earlier version, for before/after figures).
    """
    work.mkdir(parents=True, exist_ok=True)
    times = work / "times.json"
    env = thread_env(a.threads)
    if code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", RUNNER, framework, "--times", str(times)]
    if framework == "clipkit":
        recipe = work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(clipkit_recipe(model_cfg, shards, a, batch)))
        sets = a.clipkit_set if overrides is None else overrides
        cmd += ["--", "train", str(recipe), "--out", str(work / "run"), *sets]
    else:
        cfg = work / f"{MODEL_NAME}.json"
        cfg.write_text(json.dumps(model_cfg))
        cmd += ["--model-config", str(cfg), "--", *open_clip_args(shards, a, batch, work / "logs"), *a.open_clip_arg]
    # Run from the job folder: `python -m` puts the current folder first on sys.path, where a checkout's clipkit
    # would shadow `code`.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0 or not times.is_file():
        raise SystemExit(f"{framework} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    steps = json.loads(times.read_text())["times"]
    if len(steps) != a.steps:
        raise SystemExit(f"{framework}: {len(steps)} optimizer steps timed, expected {a.steps}")
    return throughput(steps, batch, a.skip), len(steps) - 1 - a.skip


def bench_batch(model_cfg: dict, shards: list[str], a, batch: int, tmp: Path) -> dict:
    """All pairs at one batch size; returns its result record."""
    flops = train_flops_per_sample(model_cfg, batch)
    pairs = []
    for i in range(a.pairs):
        order = ["clipkit", "open_clip"] if i % 2 == 0 else ["open_clip", "clipkit"]
        with bench_lock(a.lock):
            load_before = os.getloadavg()[0]
            peak = matmul_peak(a.precision)
            sps = {fw: run_one(fw, tmp / f"b{batch}-p{i}-{fw}", model_cfg, shards, a, batch)[0] for fw in order}
            load_after = os.getloadavg()[0]
        pair = {
            "order": order,
            "peak_flops": peak,
            "loadavg_before": round(load_before, 2),
            "loadavg_after": round(load_after, 2),
            **{f"{fw}_samples_per_s": v for fw, v in sps.items()},
            **{f"{fw}_mfu": flops * v / peak for fw, v in sps.items()},
            "ratio": sps["clipkit"] / sps["open_clip"],
        }
        pairs.append(pair)
        print(
            f"batch {batch} pair {i + 1}/{a.pairs} ({order[0]} first): clipkit {sps['clipkit']:.1f} samples/s "
            f"(MFU {pair['clipkit_mfu']:.1%}), open_clip_train {sps['open_clip']:.1f} samples/s "
            f"(MFU {pair['open_clip_mfu']:.1%}); ratio {pair['ratio']:.3f}; peak {peak / 1e9:.1f} GFLOP/s; "
            f"load {load_before:.2f} -> {load_after:.2f}",
            flush=True,
        )
    return {
        "batch": batch,
        "flops_per_sample": flops,
        "pairs": pairs,
        "median": {
            "clipkit_samples_per_s": median([p["clipkit_samples_per_s"] for p in pairs]),
            "open_clip_samples_per_s": median([p["open_clip_samples_per_s"] for p in pairs]),
            "clipkit_mfu": median([p["clipkit_mfu"] for p in pairs]),
            "open_clip_mfu": median([p["open_clip_mfu"] for p in pairs]),
            "peak_flops": median([p["peak_flops"] for p in pairs]),
            "ratio": median([p["ratio"] for p in pairs]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="training shard spec (both frameworks read exactly these)")
    p.add_argument("--batch", default="128", help="per-process batch size; a comma list sweeps")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (even: workers split them)")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timing, on both sides")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--clipkit-set", action="append", default=[], help="extra clipkit override, e.g. train.compile=true")
    p.add_argument("--open-clip-arg", action="append", default=[], help="extra open_clip_train argument")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--threads", type=int, help="torch threads of each side's main process (default: cores - workers)")
    p.add_argument("--lock", default=LOCK_PATH, help="benchmark lock file ('' for none)")
    p.add_argument("--tmp", help="work folder (default: a temp folder, removed)")
    a = p.parse_args(argv)
    a.lock = a.lock or None
    a.threads = a.threads or default_threads(a.workers)
    torch.set_num_threads(a.threads)  # the peak is measured with the training processes' thread count
    if a.steps < a.skip + 2:
        p.error("--steps must exceed --skip + 1")
    model_cfg = model_config(a)
    shards = [str(Path(s).resolve()) for s in expand_shards(a.data)]
    batches = [int(b) for b in a.batch.split(",")]
    info = machine() | {"threads": a.threads}
    log(f"machine: {json.dumps(info)}")
    with tempfile.TemporaryDirectory(prefix="clipkit-bench-", dir=a.tmp) as tmp:
        results = [bench_batch(model_cfg, shards, a, b, Path(tmp)) for b in batches]
    out = {
        "benchmark": "train",
        "machine": info,
        "preset": None if a.model_config else a.preset,
        "model_config": model_cfg,
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "tmp", "lock")},
        "shards": shards,
        "results": results,
    }
    write_json(a.json, out)
    for r in results:
        m = r["median"]
        print(
            f"batch {r['batch']}: clipkit {m['clipkit_samples_per_s']:.1f} samples/s (MFU {m['clipkit_mfu']:.1%}), "
            f"open_clip_train {m['open_clip_samples_per_s']:.1f} samples/s (MFU {m['open_clip_mfu']:.1%}), "
            f"{r['flops_per_sample'] / 1e9:.3f} GFLOP/sample, peak {m['peak_flops'] / 1e9:.1f} GFLOP/s"
        )
        ratios = ", ".join(f"{p['ratio']:.3f}" for p in r["pairs"])
        print(f"ratio clipkit/open_clip_train at batch {r['batch']} (median of {len(r['pairs'])}): "
              f"{m['ratio']:.3f} [{ratios}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
