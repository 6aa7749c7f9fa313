"""JPEG "photo" shards for the benchmarks: real renders composed into 256-512 px scenes, JPEG quality 90.

Each photo is a smooth two-colour gradient with film-like grain (so JPEG sizes and decode costs are those of
photos, not of flat clip art), with 1-3 real images from a source shard set (Emoji renders, Fashion-MNIST, ...)
pasted at random scales and places. Width and height are drawn independently from [256, 512]. The caption names
what is in the picture, from the sources' first caption lines: "a photo of <a> and <b>".

    python -m tools.bench.make_photo_shards --source 'data/emoji/train-*.tar' --out /tmp/clipkit-bench/photos \
        --n 4000 --per-shard 500

Output: `<out>/photos-%06d.tar` + `sizes.json` (clipkit's shard writer), and `<out>/stats.json` (count, mean
side, mean JPEG bytes, bits per pixel). Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from clipkit.data.pipeline import decode_captions, decode_image, read_tar_samples
from clipkit.data.shards import expand_shards, write_shards


def load_sources(spec: str, limit: int) -> list[tuple[Image.Image, str]]:
    """Up to `limit` (RGB image, first caption line) pairs from a shard spec."""
    out = []
    stats: dict = {}
    for sample in read_tar_samples(iter(expand_shards(spec)), stats):
        out.append((decode_image(sample), decode_captions(sample)[0]))
        if len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"no usable samples in {spec!r}")
    return out


def background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A diagonal two-colour gradient with grain: [h, w, 3] uint8 whose JPEG weighs like a photo's."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (np.linspace(0, 1, w)[None, :, None] + np.linspace(0, 1, h)[:, None, None]) / 2  # [h, w, 1]
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def compose(rng: np.random.Generator, pyrng: random.Random, sources: list, lo: int, hi: int) -> tuple[Image.Image, str]:
    """One photo of random size in [lo, hi] x [lo, hi] and its caption."""
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    photo = background(rng, w, h)
    names = []
    for img, name in pyrng.sample(sources, k=int(rng.integers(1, 4))):
        side = int(rng.integers(min(w, h) // 4, min(w, h) * 3 // 4 + 1))
        thing = img.resize((side, side), Image.Resampling.BICUBIC).rotate(
            float(rng.uniform(-20, 20)), Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255)
        )
        mask = thing.convert("L").point(lambda v: 0 if v > 250 else 255)  # white backgrounds of renders drop out
        x, y = int(rng.integers(0, max(1, w - thing.width))), int(rng.integers(0, max(1, h - thing.height)))
        photo.paste(thing, (x, y), mask)
        names.append(name.rstrip("."))
    caption = "a photo of " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
    return photo, caption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="data/emoji/train-*.tar", help="shard spec of the real images to compose")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4000, help="photos to write")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sources = load_sources(args.source, 2000)
    rng, pyrng = np.random.default_rng(args.seed), random.Random(args.seed)
    sides, sizes = [], []

    def samples():
        for i in range(args.n):
            photo, caption = compose(rng, pyrng, sources, args.min_side, args.max_side)
            buf = io.BytesIO()
            photo.save(buf, format="JPEG", quality=args.quality)
            sides.append(photo.size)
            sizes.append(buf.tell())
            yield {"__key__": f"photo_{i:07d}", "jpg": buf.getvalue(), "txt": caption, "json": {"i": i}}

    out = Path(args.out)
    counts = write_shards(samples(), out, "photos", maxcount=args.per_shard)
    pixels = sum(w * h for w, h in sides)
    stats = {
        "photos": len(sizes),
        "shards": len(counts),
        "mean_width": sum(w for w, _ in sides) / len(sides),
        "mean_height": sum(h for _, h in sides) / len(sides),
        "mean_jpeg_bytes": sum(sizes) / len(sizes),
        "bits_per_pixel": 8 * sum(sizes) / pixels,
        "quality": args.quality,
        "source": args.source,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
