"""Per-image cost of each loader stage, open_clip_train's way and clipkit's, on one thread (ms an image).

The stages of bench_loader.py's two pipelines, timed one by one on the same images: the best of --repeats passes
over --n images for each stage (the passes interleave the stages, so background load hits all alike).

    python -m tools.bench.bench_stages --data '/tmp/clipkit-bench/photos/photos-000000.tar' --size 224
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import open_clip
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from clipkit.data.pipeline import FastCrop, decode_jpeg_tensor, read_tar_samples
from clipkit.data.shards import expand_shards
from tools.bench.common import LOCK_PATH, bench_lock, log, machine, write_json


def stages(samples: list[dict], size: int) -> dict:
    """name -> function of an image index, each one stage of one of the two pipelines."""
    train = open_clip.image_transform(size, is_train=True)
    crop, to_tensor, norm = train.transforms[0], train.transforms[2], train.transforms[3]
    fast = FastCrop.of(train)
    tok = open_clip.SimpleTokenizer(context_length=32)
    jpgs = [s["jpg"] for s in samples]
    texts = [s["txt"].decode() for s in samples]
    pil = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpgs]
    params = [crop.get_params(p, list(crop.scale), list(crop.ratio)) for p in pil]
    cropped = [crop(p) for p in pil]
    chw = [decode_jpeg_tensor(j) for j in jpgs]
    batch = torch.stack([fast(s) for s in samples[:64]])

    def draft(i: int) -> Image.Image:
        img = Image.open(io.BytesIO(jpgs[i]))
        img.draft("RGB", (img.width // 2, img.height // 2))
        return img.convert("RGB")

    return {
        "open_clip_train: PIL decode, full size (+ RGB)": lambda i: Image.open(io.BytesIO(jpgs[i])).convert("RGB"),
        "open_clip_train: RandomResizedCrop on PIL (bicubic)": lambda i: crop(pil[i]),
        "open_clip_train: ToTensor + Normalize, per image": lambda i: norm(to_tensor(cropped[i])),
        "open_clip_train: tokenize one caption": lambda i: tok(texts[i])[0],
        "clipkit: torchvision decode_jpeg into a tensor": lambda i: decode_jpeg_tensor(jpgs[i]),
        "clipkit: PIL decode at 1/2 size (Image.draft)": draft,
        "clipkit: crop + resize on uint8 (torch bicubic)": lambda i: TF.resized_crop(
            chw[i], *params[i], [size, size], T.InterpolationMode.BICUBIC, antialias=True
        ),
        "clipkit: normalize per batch (64), per image": lambda i: fast.normalize(batch) if i % 64 == 0 else None,
        "clipkit: tokenize per batch (64), per caption": lambda i: tok(texts[i : i + 64]) if i % 64 == 0 else None,
        "clipkit: the whole FastCrop (header, draws, decode, crop)": lambda i: fast(samples[i]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=256, help="images (a multiple of 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--lock", default=LOCK_PATH)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    samples = []
    for s in read_tar_samples(iter(expand_shards(a.data)), {}):
        if "jpg" in s:
            samples.append(s)
        if len(samples) == a.n:
            break
    info = machine() | {"threads": 1, "images": len(samples)}
    log(f"machine: {json.dumps(info)}")
    fns = stages(samples, a.size)
    best = {name: float("inf") for name in fns}
    with bench_lock(a.lock or None):
        for _ in range(a.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for i in range(len(samples)):
                    fn(i)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(samples))
    sides = {"open_clip_train": 0.0, "clipkit": 0.0}
    for name, sec in best.items():
        print(f"{name:58s} {sec * 1e3:6.3f} ms")
    for side in sides:
        sides[side] = sum(v for k, v in best.items() if k.startswith(side) and not ("1/2 size" in k or "whole" in k))
    print(f"sum, open_clip_train stages: {sides['open_clip_train'] * 1e3:.3f} ms; clipkit stages (full-size decode "
          f"path): {sides['clipkit'] * 1e3:.3f} ms an image")  # fmt: skip
    write_json(a.json, {"machine": info, "ms": {k: v * 1e3 for k, v in best.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
