"""One row -> one sample: read, check, decode, resize and encode an image, read its captions; never raises for bad
input, it names the reason instead.

Skip reasons (the keys of `skipped` in dataset.json): ``missing_image`` (no such file), ``bad_image`` (unreadable,
not an image, truncated), ``image_too_large`` (over `MAX_IMAGE_PIXELS`: a decompression bomb, never decoded),
``too_small`` (shorter side under ``min_size``), ``no_caption`` (missing, empty or blank), ``bad_text`` (captions
or sidecar JSON not UTF-8 / not JSON). Duplicates are found later, in order, by the writer.

Resizing (`ImageOptions.resize` = N) follows img2dataset's modes: ``keep`` scales the shorter side to N,
``center-crop`` scales the shorter side to N and crops the centered N x N square, ``border`` scales the longer side
to N and pads to N x N with white. Images are never enlarged unless ``upscale``. A JPEG shrunk by 2x or more is
decoded at reduced size first (libjpeg's DCT scaling, `Image.draft`, as the training loader does); only the kept
region is resampled, with area averaging when shrinking (PIL's box filter, as cv2's INTER_AREA in img2dataset).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass

from PIL import Image

from clipkit.data.importers.rows import Row
from clipkit.data.pipeline import SkipSample, load_rgb, open_image
from clipkit.data.shards import encode_png

RESIZE_MODES = ("keep", "center-crop", "border")
ENCODINGS = ("keep", "jpg", "png")
# Formats whose bytes a shard may hold as they are (the training loader decodes these), by PIL format name.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageOptions:
    """How images are turned into sample bytes.

    Attributes:
        resize: Target side N in pixels (see the module docstring), or None to keep the size.
        mode: One of :data:`RESIZE_MODES`.
        upscale: Also enlarge images smaller than N.
        encode: ``keep`` (unchanged images keep their bytes; changed ones are re-encoded as JPEG if they were JPEG,
            else PNG), ``jpg`` or ``png``.
        quality: JPEG quality.
        min_size: Images whose shorter side is under this are skipped (``too_small``).
    """

    resize: int | None = None
    mode: str = "keep"
    upscale: bool = False
    encode: str = "keep"
    quality: int = 95
    min_size: int = 0

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")
        if self.encode not in ENCODINGS:
            raise ValueError(f"--encode must be one of {', '.join(ENCODINGS)}, got {self.encode!r}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"--resize must be a positive number of pixels, got {self.resize}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")


@dataclass(frozen=True)
class Result:
    """What became of a row: a sample (``reason`` None) or a skip reason with a detail."""

    reason: str | None
    detail: str = ""
    ext: str = ""
    image: bytes = b""
    captions: tuple[str, ...] = ()
    digest: str = ""  # sha1 of the source image bytes: the duplicate test
    size: tuple[int, int] = (0, 0)  # stored (width, height)
    source_size: tuple[int, int] = (0, 0)
    meta: dict | None = None


def _captions(row: Row) -> tuple[str | None, tuple[str, ...] | str]:
    """(skip reason or None, captions or a detail)."""
    if row.captions is not None:
        lines = tuple(c.strip() for c in row.captions if c and c.strip())
    else:
        try:
            raw = open(row.caption_file, "rb").read()  # noqa: SIM115 - closed by refcount at once
        except OSError as e:
            return "no_caption", f"{type(e).__name__}: {e.strerror or e}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return "bad_text", f"{os.path.basename(row.caption_file)} is not UTF-8 ({e.reason} at byte {e.start})"
        lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    # One caption per line in the shard: a caption holding a line break would become two.
    lines = tuple(" ".join(c.split()) for c in lines)
    return (None, lines) if lines else ("no_caption", "no non-blank caption")


def _sidecar_meta(row: Row) -> tuple[str | None, dict | str]:
    meta = dict(row.meta or {})
    if row.meta_file is None:
        return None, meta
    try:
        meta["meta"] = json.loads(open(row.meta_file, "rb").read().decode("utf-8"))  # noqa: SIM115
    except OSError:
        pass  # the sidecar json is optional
    except (UnicodeDecodeError, ValueError) as e:
        return "bad_text", f"{os.path.basename(row.meta_file)} is not UTF-8 JSON ({type(e).__name__})"
    return None, meta


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[float, tuple[int, int]]:
    """(scale factor, size of the scaled full image before any crop or pad) for `opts`; scale 1 when unchanged."""
    if opts.resize is None:
        return 1.0, (width, height)
    side = max(width, height) if opts.mode == "border" else min(width, height)
    scale = opts.resize / side
    if scale >= 1 and not opts.upscale:
        scale = 1.0
    return scale, (max(1, round(width * scale)), max(1, round(height * scale)))


def transform(img: Image.Image, opts: ImageOptions) -> tuple[Image.Image, bool]:
    """Resizes / crops / pads an opened (not yet decoded) image; returns (the image, whether it changed).

    Only the kept region is resampled (a center crop is cut from the source, not from a resized copy). Shrinking uses
    PIL's box filter (area averaging: cv2's INTER_AREA, img2dataset's default), enlarging bicubic.
    """
    width, height = img.size
    scale, (w, h) = target_size(width, height, opts)
    n = opts.resize
    crop = opts.mode == "center-crop" and n is not None and (w > n or h > n)
    pad = opts.mode == "border" and n is not None and (w, h) != (n, n) and (scale != 1 or opts.upscale)
    if scale == 1 and not crop and not pad:
        return img, False
    out_w, out_h = (min(w, n), min(h, n)) if crop else (w, h)
    left, top = (w - out_w) / 2, (h - out_h) / 2  # in scaled pixels; 0 without a crop
    box = (left / scale, top / scale, (left + out_w) / scale, (top + out_h) / scale)  # in source pixels
    k = 1 / scale
    if img.format == "JPEG" and k >= 2:
        img.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))  # >= the requested size, 1/2..1/8 scale
    img = load_rgb(img)
    sx, sy = img.width / width, img.height / height  # < 1 when decoded at reduced size
    # Clamped: w / scale can exceed the width by a rounding error, which PIL refuses.
    box = (box[0] * sx, box[1] * sy, min(box[2] * sx, img.width), min(box[3] * sy, img.height))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    if (out_w, out_h) != img.size or box != (0, 0, img.width, img.height):
        img = img.resize((out_w, out_h), resample, box=box)
    if pad:
        side = max(n, out_w, out_h)
        canvas = Image.new("RGB", (side, side), "white")
        canvas.paste(img, ((side - out_w) // 2, (side - out_h) // 2))
        img = canvas
    return img, True


def encode(img: Image.Image, source_format: str | None, opts: ImageOptions) -> tuple[str, bytes]:
    """(extension, bytes) of an image that must be (re-)encoded."""
    fmt = opts.encode if opts.encode != "keep" else ("jpg" if source_format == "JPEG" else "png")
    rgb = load_rgb(img)
    if fmt == "png":
        return "png", encode_png(rgb)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=opts.quality)
    return "jpg", buf.getvalue()


def process_row(row: Row, opts: ImageOptions) -> Result:
    """Turns a row into sample parts, or names why it is skipped; never raises for bad input.

    Args:
        row: The listed image.
        opts: Resize and encoding options.

    Returns:
        The `Result`; `Result.digest` (sha1 of the source bytes) lets the writer drop exact duplicates.
    """
    reason, captions = _captions(row)
    if reason:
        return Result(reason, captions)
    reason, meta = _sidecar_meta(row)
    if reason:
        return Result(reason, meta)
    try:
        with open(row.image, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Result("missing_image", f"{row.image} does not exist")
    except OSError as e:
        return Result("bad_image", f"{type(e).__name__}: {e.strerror or e}")
    try:
        img = open_image({"jpg": data, "__key__": row.rel})  # the header only: size and format
        source_format, source_size = img.format, img.size
        if min(source_size) < opts.min_size:
            return Result("too_small", f"{source_size[0]}x{source_size[1]} < {opts.min_size}")
        out, changed = transform(img, opts)
        if changed or opts.encode != "keep" or source_format not in KEPT_FORMATS:
            ext, payload = encode(out, source_format, opts)
        else:
            load_rgb(img)  # decode it all: a truncated file is found here, not in training
            ext, payload = KEPT_FORMATS[source_format], data
    except SkipSample as e:
        return Result(e.reason, str(e).split(": ", 1)[-1])
    except Exception as e:  # PIL raises many kinds on a corrupt file (OSError, SyntaxError, ValueError, ...)
        return Result("bad_image", f"{type(e).__name__}: {e}"[:300])
    return Result(
        None,
        ext=ext,
        image=payload,
        captions=captions,
        digest=hashlib.sha1(data).hexdigest(),
        size=out.size,
        source_size=source_size,
        meta=meta,
    )
