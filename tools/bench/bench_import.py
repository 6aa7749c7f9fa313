"""Import speed: `clipkit data import` against the same resize by img2dataset's resizer (or a plain PIL loop).

Both sides turn the same folder of 256-512 px JPEG photos with sidecar captions (made from real renders by
`tools.bench.make_photo_shards.compose`) into one tar of resized JPEGs with their captions, with the same number of
worker processes, the same target size, resize mode, JPEG quality and samples per tar:

- clipkit: `clipkit.data.importers.import_source` (what `clipkit data import DIR --out OUT --resize N --resize-mode
  M --encode jpg --quality Q --workers W` runs): list, read, decode (a JPEG shrunk 2x or more at reduced size, DCT
  scaling), resize, encode, hash for duplicates, write the shard and its records, sizes.json, dataset.json;
- reference: img2dataset's `Resizer` (cv2 decode, INTER_AREA resize, cv2 encode; what img2dataset runs per image)
  in a pool of W processes, the parent writing the tar; or, where img2dataset cannot be imported, the same steps with
  PIL in a plain loop per worker (full decode, bicubic resize, encode). img2dataset pins webdataset<0.3 and
  pandas<3, so it is not installed beside clipkit; give its files with --img2dataset-path:

      pip install --no-deps --target /tmp/i2d img2dataset opencv-python-headless albumentations==1.4.24 \\
          albucore==0.0.23 simsimd stringzilla

Runs alternate (clipkit first in odd pairs, the reference first in even ones) in this process, each with a fresh
output folder and fresh worker processes; the machine's load average is recorded before each pair. Ratio =
reference seconds / clipkit seconds (clipkit's samples/s over the reference's).

    python -m tools.bench.bench_import --source 'data/emoji/train-*.tar' --photos runs/bench/photo-files \\
        --n 1000 --resize 224 --workers 2 --pairs 3 --img2dataset-path runs/i2d --json docs/bench/import.json
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.importers import ImageOptions, ImportOptions, import_source
from tools.bench.common import bench_lock, log, machine, median, write_json

_RESIZER = None  # the reference's per-process resizer (img2dataset's Resizer, or the PIL loop's options)


def make_photos(source: str, out: Path, n: int, seed: int = 0, quality: int = 90) -> Path:
    """Writes `n` photos (256-512 px JPEGs, quality 90) with their captions as ``{i}.jpg`` + ``{i}.txt``; kept if
    the folder already holds them."""
    from tools.bench.make_photo_shards import compose, load_sources

    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) == n:
        return out
    sources = load_sources(source, 2000)
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    for i in range(n):
        photo, caption = compose(rng, pyrng, sources, 256, 512)
        photo.save(out / f"{i:06d}.jpg", format="JPEG", quality=quality)
        (out / f"{i:06d}.txt").write_text(caption + "\n", encoding="utf-8")
    return out


def load_img2dataset_resizer(path: str | None):
    """img2dataset's resizer module from its installed files (its package __init__ imports the whole downloader)."""
    if not path:
        return None
    file = Path(path) / "img2dataset" / "resizer.py"
    if not file.is_file():
        raise SystemExit(f"--img2dataset-path {path}: no img2dataset/resizer.py there")
    sys.path.insert(0, str(path))  # its cv2 / albumentations live beside it
    spec = importlib.util.spec_from_file_location("img2dataset_resizer", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init_reference(impl: str, size: int, mode: str, quality: int, i2d_path: str | None) -> None:
    global _RESIZER
    if impl == "img2dataset":
        module = load_img2dataset_resizer(i2d_path)
        modes = {"keep": module.ResizeMode.keep_ratio, "center-crop": module.ResizeMode.center_crop,
                 "border": module.ResizeMode.border}  # fmt: skip
        _RESIZER = module.Resizer(size, modes[mode], resize_only_if_bigger=True, encode_quality=quality)
    else:
        _RESIZER = ImageOptions(resize=size, mode=mode, encode="jpg", quality=quality)


def _reference_one(path: str) -> tuple[str, bytes, bytes]:
    """One photo through the reference: (name, resized JPEG, caption bytes)."""
    caption = Path(path).with_suffix(".txt").read_bytes()
    if isinstance(_RESIZER, ImageOptions):  # plain PIL: full decode, resize (area, as cv2's INTER_AREA), crop, encode
        opts = _RESIZER
        img = Image.open(path).convert("RGB")
        w, h = img.size
        scale = min(1.0, opts.resize / min(w, h))
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BOX)
        if opts.mode == "center-crop":
            left, top = (img.width - opts.resize) // 2, (img.height - opts.resize) // 2
            img = img.crop((left, top, left + opts.resize, top + opts.resize))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.quality)
        return Path(path).stem, buf.getvalue(), caption
    with open(path, "rb") as f:
        data, *_, err = _RESIZER(f)
    if err is not None:
        raise RuntimeError(f"{path}: {err}")
    return Path(path).stem, data, caption


def run_reference(photos: Path, out: Path, workers: int, impl: str, size: int, mode: str, quality: int,
                  i2d_path: str | None) -> int:  # fmt: skip
    """The reference side: a pool of `workers` resizers, the parent writing one tar; returns the sample count."""
    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    out.mkdir(parents=True)
    init = (impl, size, mode, quality, i2d_path)
    with get_context("fork").Pool(workers, _init_reference, init) as pool, tarfile.open(out / "ref.tar", "w") as tar:
        for key, image, caption in pool.imap(_reference_one, paths, chunksize=8):
            for ext, data in (("jpg", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(paths)


def run_clipkit(photos: Path, out: Path, workers: int, size: int, mode: str, quality: int) -> int:
    opts = ImportOptions(ImageOptions(resize=size, mode=mode, encode="jpg", quality=quality), shard_size=10**9)
    return import_source(photos, out, "folder", opts, workers=workers)["samples"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="data/emoji/train-*.tar", help="shard spec of real images to compose from")
    p.add_argument("--photos", required=True, help="folder of the photos (made once, then reused)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--resize", type=int, default=224)
    p.add_argument("--resize-mode", default="center-crop", choices=["keep", "center-crop", "border"])
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--img2dataset-path", help="folder holding img2dataset's files (pip --target); else PIL loop")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-lock", action="store_true", help="do not take the machine-wide benchmark lock")
    args = p.parse_args(argv)

    photos = make_photos(args.source, Path(args.photos), args.n)
    impl = "img2dataset" if args.img2dataset_path else "pil"
    if impl == "pil" and args.resize_mode == "border":
        raise SystemExit("the plain PIL reference does keep and center-crop; use --img2dataset-path for border")
    if impl == "img2dataset":
        load_img2dataset_resizer(args.img2dataset_path)  # fail before timing anything
    settings = {k: getattr(args, k) for k in ("n", "resize", "resize_mode", "quality", "workers", "pairs")}
    pairs = []
    with bench_lock(None if args.no_lock else "/tmp/clipkit-bench.lock"), tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            load = os.getloadavg()[0]
            order = ["clipkit", "reference"] if i % 2 == 0 else ["reference", "clipkit"]
            seconds = {}
            for side in order:
                out = Path(tmp) / f"{side}-{i}"
                start = time.perf_counter()
                if side == "clipkit":
                    count = run_clipkit(photos, out, args.workers, args.resize, args.resize_mode, args.quality)
                else:
                    count = run_reference(photos, out, args.workers, impl, args.resize, args.resize_mode,
                                          args.quality, args.img2dataset_path)  # fmt: skip
                seconds[side] = time.perf_counter() - start
                if count != args.n:
                    raise SystemExit(f"{side} wrote {count} of {args.n} samples")
                shutil.rmtree(out)
            ratio = seconds["reference"] / seconds["clipkit"]
            pairs.append({"order": order, "seconds": seconds, "ratio": ratio, "load_before": load})
            log(f"pair {i + 1}: clipkit {args.n / seconds['clipkit']:.0f} samples/s, {impl} "
                f"{args.n / seconds['reference']:.0f} samples/s, ratio {ratio:.2f} (load {load:.1f})")  # fmt: skip
    result = {
        "settings": settings,
        "reference": impl,
        "pairs": pairs,
        "median_ratio": median([x["ratio"] for x in pairs]),
        "clipkit_samples_per_s": median([args.n / x["seconds"]["clipkit"] for x in pairs]),
        "reference_samples_per_s": median([args.n / x["seconds"]["reference"] for x in pairs]),
        "machine": machine(),
    }
    write_json(args.json, result)
    print(f"import ratio clipkit / {impl}: median {result['median_ratio']:.2f} over {args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
