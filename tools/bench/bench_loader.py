"""The data loader alone, clipkit vs open_clip_train: decode + preprocess + tokenize + batch, samples/s and ratio.

Both sides read the same shards (resampled, with replacement) with the same image transform and tokenizer
objects (open_clip's, built from the model config's preprocess settings), batch size and worker count:

- clipkit: `TrainStream` + `train_loader`, and the device-side finish of the batch (`stream.finish_images`: the
  uint8 -> normalized float step that clipkit moves out of the workers) on the CPU here, inside the timing;
- open_clip_train: `open_clip_train.data.get_wds_dataset` (its WebDataset pipeline and WebLoader), with the
  end-of-shard fix of tools/bench/runner.py.

Each side runs in a fresh process; batches after the first --skip (worker start, shuffle-buffer fill) are timed.
Pairs alternate their order and hold the machine-wide benchmark lock; the last line is the ratio (median).

    python -m tools.bench.make_photo_shards --out /tmp/clipkit-bench/photos --n 4000
    python -m tools.bench.bench_loader --data '/tmp/clipkit-bench/photos/photos-*.tar' --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from tools.bench.common import (
    LOCK_PATH,
    PRESETS,
    bench_lock,
    default_threads,
    log,
    machine,
    median,
    thread_env,
    write_json,
)


def transforms_and_tokenizer(model_cfg: dict):
    """open_clip's train transform and tokenizer for the model config (what both frameworks would build)."""
    from clipkit.config import ModelCfg
    from clipkit.models.factory import build_tokenizer, build_transforms, resolve_config

    resolved = resolve_config(ModelCfg(config=model_cfg))
    return build_transforms(resolved["preprocess_cfg"])[0], build_tokenizer(resolved["model_cfg"])


def clipkit_batches(shards: list[str], transform, tokenizer, a):
    """clipkit's training batches as the training loop gets them: (images [B, 3, H, W] float, tokens [B, L])."""
    from clipkit.data.pipeline import Source, TrainStream, train_loader

    stream = TrainStream([Source(tuple(shards))], a.batch, transform, tokenizer, seed=0, resampled=True)
    finish = getattr(stream, "finish_images", lambda images: images)  # absent before the fast path (baselines)
    for batch in train_loader(stream, a.workers, a.prefetch):
        yield finish(batch["image"]), batch["text"]


def open_clip_batches(shards: list[str], transform, tokenizer, a):
    """open_clip_train's training batches: (images, tokens) from get_wds_dataset's WebLoader."""
    from open_clip_train.data import get_wds_dataset

    from tools.bench.runner import patch_open_clip_train_eof

    patch_open_clip_train_eof()
    args = SimpleNamespace(
        train_data="::".join(shards),
        val_data=None,
        dataset_resampled=True,
        train_num_samples=(a.batches + a.skip + 4) * a.batch * max(a.workers, 1),
        train_data_upsampling_factors=None,
        batch_size=a.batch,
        workers=a.workers,
        world_size=1,
        seed=0,
    )
    yield from get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer).dataloader


def measure_side(side: str, a) -> dict:
    """Samples/s of one side over --batches batches after --skip."""
    import torch

    from clipkit.data.shards import expand_shards

    torch.manual_seed(0)
    model_cfg = PRESETS[a.preset]()
    transform, tokenizer = transforms_and_tokenizer(model_cfg)
    shards = expand_shards(a.data)
    batches = (clipkit_batches if side == "clipkit" else open_clip_batches)(shards, transform, tokenizer, a)
    start, shape = None, None
    for i, (images, texts) in enumerate(batches):
        if i == a.skip:
            start = time.perf_counter()
        if i == a.skip + a.batches:
            elapsed = time.perf_counter() - start
            shape = (list(images.shape), str(images.dtype), list(texts.shape))
            break
    return {"samples_per_s": a.batches * a.batch / elapsed, "last_batch": shape}


def run_side(side: str, argv: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench.bench_loader", "--side", side, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="photo224", help="image size and context length")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=2, help="clipkit's prefetch_factor (open_clip_train: default 2)")
    p.add_argument("--batches", type=int, default=30, help="batches timed")
    p.add_argument("--skip", type=int, default=5, help="first batches left out of the timing")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--threads", type=int, help="torch threads of each side's main process (default: cores - workers)")
    p.add_argument("--lock", default=LOCK_PATH, help="benchmark lock file ('' for none)")
    p.add_argument("--side", choices=["clipkit", "open_clip"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        print(json.dumps(measure_side(a.side, a)))
        return 0
    child = [x for x in argv if x != "--json"]
    if a.json:
        i = argv.index("--json")
        child = argv[:i] + argv[i + 2 :]
    a.threads = a.threads or default_threads(a.workers)
    info = machine() | {"threads": a.threads}
    log(f"machine: {json.dumps(info)}")
    pairs = []
    for i in range(a.pairs):
        order = ["clipkit", "open_clip"] if i % 2 == 0 else ["open_clip", "clipkit"]
        with bench_lock(a.lock or None):
            load_before = os.getloadavg()[0]
            res = {side: run_side(side, child, a.threads) for side in order}
            load_after = os.getloadavg()[0]
        pair = {
            "order": order,
            "clipkit_samples_per_s": res["clipkit"]["samples_per_s"],
            "open_clip_samples_per_s": res["open_clip"]["samples_per_s"],
            "loadavg_before": round(load_before, 2),
            "loadavg_after": round(load_after, 2),
            "last_batch": {k: v["last_batch"] for k, v in res.items()},
        }
        pair["ratio"] = pair["clipkit_samples_per_s"] / pair["open_clip_samples_per_s"]
        pairs.append(pair)
        print(
            f"pair {i + 1}/{a.pairs} ({order[0]} first): clipkit {pair['clipkit_samples_per_s']:.1f} samples/s, "
            f"open_clip_train {pair['open_clip_samples_per_s']:.1f} samples/s; ratio {pair['ratio']:.3f}; "
            f"load {load_before:.2f} -> {load_after:.2f}",
            flush=True,
        )
    ratio = median([p["ratio"] for p in pairs])
    out = {
        "benchmark": "loader",
        "machine": info,
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "lock", "side")},
        "pairs": pairs,
        "median_ratio": ratio,
    }
    write_json(a.json, out)
    ratios = ", ".join(f"{p['ratio']:.3f}" for p in pairs)
    print(f"loader ratio clipkit/open_clip_train (median of {len(pairs)}): {ratio:.3f} [{ratios}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
