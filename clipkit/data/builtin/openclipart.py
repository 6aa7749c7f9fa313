"""OpenClipart image-text pairs: Debian's clip art SVGs rendered with cairosvg, captioned by their own metadata.

Source: ``/usr/share/openclipart/svg/**/*.svg`` (Debian package ``openclipart-svg``). The title is the ``<dc:title>``
of the ``cc:Work`` in the RDF metadata, else the SVG's own ``<title>``; keywords are the ``<rdf:li>`` of
``<dc:subject><rdf:Bag>``.

Images: each SVG is rendered by cairosvg on white (transparent drawings included) into a square canvas with its aspect
ratio kept, cropped to the drawing (pixels more than :data:`INK_THRESHOLD` away from white; many drawings sit small on
a large page), centered on a white square with about 3% margin and resized to ``image_size`` (128 by default: clip art
is thin lines that blur into blobs below about 96 px, while a small CPU CLIP trains at 32-112 px, so 128 leaves every
model a downscale and keeps the shards small). Renders are cached under ``{out}/.cache`` keyed by the SVG's path, byte
size and mtime and the image size, so a rebuild renders nothing. One render is limited to ``timeout`` seconds and
files over :data:`MAX_SVG_BYTES` are not rendered.

Left out, counted per reason (``skipped`` in ``dataset.json``, with a few example paths): symlinks to an SVG inside
the tree (the target is built under its own path), files too large, XML that does not parse, cairosvg errors, renders
over the timeout, blank renders, and renders identical pixel for pixel to the render of an earlier path in sorted order
(the package holds the same drawing in several folders with different metadata).

Captions (``txt``, one per line): the cleaned title, then the useful keywords comma-joined. Cleaning is conservative:
emails and URLs, a "Clipart by AUTHOR - " prefix, file extensions, underscores, the word "openclipart", ``#N`` and
zero-padded (``01``) trailing numbers and digits glued to the end of a word (``Tigre02``) are removed, camelCase is
split and a "bw" word becomes "black and white"; a title that is empty after cleaning or is the author's name is no
title. Many titles name a collection, not the picture; a title is a collection title when it is shared by more than
``max_share`` distinct images, when it reads "Part of the ... Collection", or when it is shared by two or more and
names a set (:data:`COLLECTION_RE`: collection, theme, icons, iconset, clipart, submission, road signs, map symbols,
...). A sample whose titles are all collection titles or missing is captioned by its useful keywords alone (generic
ones such as "hash", "icons", "theme", "unsorted" or "clipart" removed, see :data:`GENERIC_KEYWORDS`), and dropped
when none remain or when that keyword caption is itself shared by more than ``max_share`` images (a caption that names
hundreds of different pictures describes none of them).

Split: a sample is in ``test`` when ``int(sha1(key).hexdigest(), 16) % 10 == 0`` (about 10%), else in ``train``; the
key is ``openclipart_`` plus the path relative to the SVG folder without ``.svg``, every character other than letters,
digits, ``-`` and ``_`` replaced by ``_``. The rule depends only on the key, so it is stable across package versions
and subsets. Within a split, samples are ordered by that same hash.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipkit.data.builtin.svg_captions import MAX_SHARE, SvgMetadata, assign_captions, parse_svg_metadata, title_group
from clipkit.data.shards import encode_png, write_shards
from clipkit.files import write_bytes_atomic, write_json_atomic

SVG_DIR = Path("/usr/share/openclipart/svg")
DEBIAN_PACKAGE = "openclipart-svg"
SHARD_MAXCOUNT = 1000
TEST_MODULUS = 10
# The largest SVG of openclipart-svg 0.18 is 1.7 MB and renders in under 6 s; ten times that is pathological.
MAX_SVG_BYTES = 16 * 2**20
RENDER_TIMEOUT_S = 30.0
# A pixel is ink when one of its channels is more than this far from white (out of 255).
INK_THRESHOLD = 8
# Renders are made at this multiple of image_size, then cropped and downsampled (thin lines stay crisp).
SUPERSAMPLE = 2
# A drawing that fills little of its page is rendered again larger, up to this canvas side.
MAX_RENDER_SIDE = 2048
MAX_EXAMPLES = 5
# Bump when rendering or metadata parsing changes: old cache entries are then ignored.
CACHE_VERSION = 1
_KEY_CHARS_RE = re.compile(r"[^0-9A-Za-z_-]")
TEMPLATES = ("a clip art of {c}.", "{c}", "a drawing of {c}.")


def category_of(relpath: str) -> str:
    """The top folder of an SVG (animals, food, ...): the zero-shot label; files at the top count as unsorted."""
    return relpath.split("/", 1)[0] if "/" in relpath else "unsorted"


def sample_key(relpath: str) -> str:
    """The sample key of an SVG, e.g. ``openclipart_animals_birds_cigno_01`` for ``animals/birds/cigno_01.svg``."""
    stem = relpath[:-4] if relpath.lower().endswith(".svg") else relpath
    return "openclipart_" + _KEY_CHARS_RE.sub("_", stem)


def split_of(key: str) -> str:
    """The split of a sample: ``test`` for about one key in :data:`TEST_MODULUS`, else ``train``."""
    return "test" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % TEST_MODULUS == 0 else "train"


# --- rendering ----------------------------------------------------------------------------------------------------


class RenderTimeout(BaseException):
    """A render ran past its time limit (a BaseException, so that no ``except Exception`` in cairosvg swallows it)."""


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    # SIGALRM fires between Python steps of cairosvg; only the main thread of a process can install the handler.
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise RenderTimeout(f"render took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cairosvg():
    try:
        import cairosvg
        import cairosvg.parser
        import cairosvg.surface
    except ImportError as exc:
        raise ModuleNotFoundError("openclipart needs cairosvg: pip install 'clipkit[data]'") from exc
    except OSError as exc:  # cairocffi finds no libcairo
        raise FileNotFoundError(f"cairosvg cannot load cairo ({exc}): apt-get install -y libcairo2") from exc
    return cairosvg


def _render_square(data: bytes, side: int) -> np.ndarray:
    cairosvg = _cairosvg()
    # cairosvg's own svg2png would encode a PNG only for it to be decoded here; read the cairo surface instead.
    tree = cairosvg.parser.Tree(bytestring=data)
    surface = cairosvg.surface.PNGSurface(
        tree, None, 96, output_width=side, output_height=side, background_color="white"
    )
    try:
        image = surface.cairo
        image.flush()
        width, height, stride = image.get_width(), image.get_height(), image.get_stride()
        # FORMAT_ARGB32 is a native-endian uint32 per pixel: B, G, R, A in memory on little-endian machines.
        pixels = np.frombuffer(image.get_data(), np.uint8).reshape(height, stride // 4, 4)[:, :width]
        order = [2, 1, 0] if sys.byteorder == "little" else [1, 2, 3]
        return np.ascontiguousarray(pixels[..., order])
    finally:
        surface.finish()


def _ink_bbox(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    ink = (255 - pixels).max(axis=2) > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render_svg(data: bytes, image_size: int) -> Image.Image | None:
    """Renders an SVG onto white, cropped to its drawing and centered on a white square.

    The SVG is drawn into a square canvas of ``SUPERSAMPLE * image_size`` (aspect ratio kept, as SVG's default
    ``preserveAspectRatio`` does); when the drawing covers less than half of it, it is drawn again larger (up to
    :data:`MAX_RENDER_SIDE`) so the crop keeps its detail.

    Args:
        data: The SVG file contents.
        image_size: Side of the output image in pixels.

    Returns:
        An RGB image, or None when nothing is drawn (blank or white on white).
    """
    side = SUPERSAMPLE * image_size
    pixels = _render_square(data, side)
    bbox = _ink_bbox(pixels)
    if bbox is None:
        return None
    extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    if extent < image_size and side < MAX_RENDER_SIDE:
        side = min(MAX_RENDER_SIDE, side * SUPERSAMPLE * image_size // extent)
        pixels = _render_square(data, side)
        bbox = _ink_bbox(pixels) or (0, 0, side, side)
    drawing = Image.fromarray(pixels).crop(bbox)
    square_side = max(drawing.size) * 17 // 16 + 1  # about 3% white on each side of the longer axis
    square = Image.new("RGB", (square_side, square_side), "white")
    square.paste(drawing, ((square_side - drawing.width) // 2, (square_side - drawing.height) // 2))
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


def process_svg(path: str, image_size: int, timeout: float | None = RENDER_TIMEOUT_S) -> dict:
    """Reads, parses and renders one SVG; never raises for a bad file.

    Args:
        path: The SVG file.
        image_size: Side of the output image.
        timeout: Seconds one render may take (None: no limit).

    Returns:
        ``{"status": "ok" | reason, "error": message or None, "metadata": dict or None, "png": bytes or None}``;
        reasons are ``too_large``, ``parse_error``, ``render_error``, ``timeout`` and ``blank_render``.
    """
    result = {"status": "ok", "error": None, "metadata": None, "png": None}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {**result, "status": "read_error", "error": f"{type(exc).__name__}: {exc}"}
    if len(data) > MAX_SVG_BYTES:
        return {**result, "status": "too_large", "error": f"{len(data)} bytes > {MAX_SVG_BYTES}"}
    try:
        result["metadata"] = asdict(parse_svg_metadata(data))
    except (ET.ParseError, ValueError) as exc:
        return {**result, "status": "parse_error", "error": f"{type(exc).__name__}: {exc}"}
    try:
        with _time_limit(timeout):
            image = render_svg(data, image_size)
    except RenderTimeout as exc:
        return {**result, "status": "timeout", "error": str(exc)}
    except Exception as exc:  # any cairosvg failure skips the file
        return {**result, "status": "render_error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    if image is None:
        return {**result, "status": "blank_render", "error": "nothing drawn"}
    return {**result, "png": encode_png(image)}


def _process_task(task: tuple[str, str, int, float | None]) -> tuple[str, dict]:
    rel, path, image_size, timeout = task
    return rel, process_svg(path, image_size, timeout)


# --- cache --------------------------------------------------------------------------------------------------------


def cache_key(relpath: str, stat: os.stat_result, image_size: int) -> str:
    """The cache entry name of an SVG: its path, byte size and mtime, the image size and :data:`CACHE_VERSION`."""
    ident = f"{CACHE_VERSION}\0{relpath}\0{stat.st_size}\0{stat.st_mtime_ns}\0{image_size}"
    return hashlib.sha1(ident.encode()).hexdigest()


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    folder = cache_dir / key[:2]
    return folder / f"{key}.json", folder / f"{key}.png"


def _cache_read(cache_dir: Path, key: str, timeout: float | None) -> dict | None:
    meta_path, png_path = _cache_paths(cache_dir, key)
    try:
        entry = json.loads(meta_path.read_text(encoding="utf-8"))
        if entry["status"] == "timeout" and (timeout is None or entry["timeout"] is None or timeout > entry["timeout"]):
            return None  # a longer limit may now succeed
        entry["png"] = png_path.read_bytes() if entry["status"] == "ok" else None
    except (OSError, ValueError, KeyError):
        return None
    return entry


def _cache_write(cache_dir: Path, key: str, result: dict, timeout: float | None) -> None:
    meta_path, png_path = _cache_paths(cache_dir, key)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    if result["png"] is not None:
        write_bytes_atomic(png_path, result["png"])
    # Written last: an entry counts only once its json exists.
    write_json_atomic(meta_path, {**{k: v for k, v in result.items() if k != "png"}, "timeout": timeout})


# --- build --------------------------------------------------------------------------------------------------------


def _require(path: Path, package: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: install it with `apt-get install -y {package}`")


def list_svgs(svg_dir: Path, limit: int | None = None) -> list[str]:
    """The SVG paths of the tree, relative to it and sorted; with ``limit``, that many spread evenly over the list.

    Args:
        svg_dir: The SVG folder.
        limit: How many paths to keep (None: all).

    Returns:
        Relative paths with ``/`` separators.
    """
    paths = sorted(
        p.relative_to(svg_dir).as_posix() for p in svg_dir.rglob("*") if p.suffix.lower() == ".svg" and p.is_file()
    )
    if limit is not None and limit < len(paths):
        paths = [paths[i * len(paths) // limit] for i in range(limit)]
    return paths


def _is_inner_symlink(path: Path, svg_dir: Path) -> bool:
    if not path.is_symlink():
        return False
    target = path.resolve()
    return target.is_file() and target.is_relative_to(svg_dir.resolve())


def _render_all(
    svg_dir: Path,
    relpaths: list[str],
    image_size: int,
    cache_dir: Path,
    processes: int,
    timeout: float | None,
) -> tuple[dict[str, dict], Counter[str]]:
    results: dict[str, dict] = {}
    todo: dict[str, str] = {}  # relpath -> cache key
    for rel in relpaths:
        key = cache_key(rel, (svg_dir / rel).stat(), image_size)
        if (entry := _cache_read(cache_dir, key, timeout)) is not None:
            results[rel] = entry
        else:
            todo[rel] = key
    cache = Counter(hits=len(results), misses=len(todo))
    if not todo:
        return results, cache
    _cairosvg()  # fail early, naming the fix, if cairosvg or libcairo is missing
    tasks = [(rel, str(svg_dir / rel), image_size, timeout) for rel in todo]
    processes = max(1, min(processes, os.cpu_count() or 1, len(tasks)))
    pool = multiprocessing.get_context().Pool(processes) if processes > 1 else None
    # Unordered, so one slow file does not hold back the others; small chunks balance the workers.
    outputs = map(_process_task, tasks) if pool is None else pool.imap_unordered(_process_task, tasks, chunksize=4)
    bar = tqdm(total=len(tasks), desc="openclipart render", unit="svg", disable=None)
    try:
        for rel, result in outputs:
            _cache_write(cache_dir, todo[rel], result, timeout)
            results[rel] = result
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return results, cache


def _unique_keys(relpaths: list[str]) -> dict[str, str]:
    keys = {rel: sample_key(rel) for rel in relpaths}
    clashes = Counter(keys.values())
    # Two paths that differ only in replaced characters: both get a suffix from their full path.
    return {
        rel: key if clashes[key] == 1 else f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        for rel, key in keys.items()
    }


def build_openclipart(
    out: Path,
    image_size: int = 128,
    limit: int | None = None,
    cache_dir: Path | None = None,
    processes: int = 2,
    timeout: float | None = RENDER_TIMEOUT_S,
    max_share: int = MAX_SHARE,
) -> dict:
    """Renders the OpenClipart SVGs into ``train-*.tar`` and ``test-*.tar`` shards.

    Args:
        out: Output folder.
        image_size: Side of the square images in pixels.
        limit: Build only this many SVGs, spread evenly over the sorted paths (tests); collections are then found
            within that subset.
        cache_dir: Render cache (default ``{out}/.cache``).
        processes: Render processes.
        timeout: Seconds one SVG may take to render; a file over it is skipped (None: no limit).
        max_share: See :func:`is_collection_title` and :func:`assign_captions`.

    Returns:
        The summary also written to ``{out}/dataset.json``: samples and shards per split, skip counts per reason with
        examples, caption sources, the collection titles found, and cache hits.

    Raises:
        FileNotFoundError: The SVG folder is missing; the message names the Debian package that provides it.
    """
    out = Path(out)
    svg_dir = SVG_DIR
    _require(svg_dir, DEBIAN_PACKAGE)
    cache_dir = Path(cache_dir) if cache_dir is not None else out / ".cache"

    relpaths = list_svgs(svg_dir, limit)
    skipped: Counter[str] = Counter()
    examples: defaultdict[str, list[str]] = defaultdict(list)

    def skip(reason: str, rel: str, error: str | None = None) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLES:
            examples[reason].append(f"{rel}: {error}" if error else rel)

    to_render = []
    for rel in relpaths:
        if _is_inner_symlink(svg_dir / rel, svg_dir):
            skip("symlink", rel)
        else:
            to_render.append(rel)
    results, cache = _render_all(svg_dir, to_render, image_size, cache_dir, processes, timeout)

    # Sorted path order decides which copy of a drawing is kept.
    images: list[tuple[str, dict]] = []
    first_of: dict[str, str] = {}
    duplicates: defaultdict[str, list[str]] = defaultdict(list)
    for rel in to_render:
        result = results[rel]
        if result["status"] != "ok":
            skip(result["status"], rel, result["error"])
            continue
        digest = hashlib.sha1(result["png"]).hexdigest()
        if digest in first_of:
            skip("duplicate_image", rel, f"same render as {first_of[digest]}")
            duplicates[first_of[digest]].append(rel)
            continue
        first_of[digest] = rel
        images.append((rel, result))

    metas = [
        SvgMetadata(m["title"], m["svg_title"], tuple(m["keywords"]), tuple(m["creators"]))
        for m in (r["metadata"] for _, r in images)
    ]
    captions, collections = assign_captions(metas, max_share)
    keys = _unique_keys([rel for rel, _ in images])

    reasons = Counter(c.reason for c in captions)
    kept: list[tuple[str, str, dict]] = []  # (hash, key, sample)
    categories = sorted({category_of(rel) for rel in relpaths})  # the label space: every top folder of the source
    for (rel, result), meta, cap in zip(images, metas, captions, strict=True):
        if cap.text is None:
            skip(f"caption_{cap.reason}", rel)
            continue
        key = keys[rel]
        sample_meta = {
            "path": rel,
            "category": category_of(rel),
            "label": categories.index(category_of(rel)),
            "title": meta.title or meta.svg_title,
            "keywords": list(cap.keywords),
            "raw_keywords": list(meta.keywords),
            "caption_source": cap.source,
            "caption_reason": cap.reason,
            "duplicates": duplicates.get(rel, []),
            "split": split_of(key),
        }
        sample = {"__key__": key, "png": result["png"], "txt": cap.text, "json": sample_meta}
        kept.append((hashlib.sha1(key.encode()).hexdigest(), key, sample))
    kept.sort()

    shards = {}
    for split in ("train", "test"):
        samples = (s for _, key, s in kept if split_of(key) == split)
        shards[split] = write_shards(samples, out, split, maxcount=SHARD_MAXCOUNT)

    shown = {title_group(t): t for m in metas for t in (m.svg_title, m.title) if t}  # the dc:title spelling wins
    raw_titles = {"title": lambda m: m.title, "svg_title": lambda m: m.svg_title}
    cleaned = sum(
        1 for m, c in zip(metas, captions, strict=True) if c.source in raw_titles and c.title != raw_titles[c.source](m)
    )
    summary = {
        "name": "openclipart",
        "image_size": image_size,
        "splits": {split: sum(counts.values()) for split, counts in shards.items()},
        "shards": shards,
        "svg_files": len(relpaths),
        "rendered": len(images) + skipped["duplicate_image"],
        "distinct_images": len(images),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "captions": {
            "title": reasons["title"] + reasons["svg_title"],
            "keywords": reasons["collection_title"] + reasons["no_title"],
            "dropped": reasons["no_keywords"] + reasons["shared_keywords"],
            "by_reason": dict(sorted(reasons.items())),
        },
        "titles_changed_by_cleaning": cleaned,
        "collection_titles": [[shown[g], n] for g, n in sorted(collections.items(), key=lambda x: (-x[1], x[0]))],
        "max_share": max_share,
        "cache": dict(cache),
        "split_rule": f"test if int(sha1(key).hexdigest(), 16) % {TEST_MODULUS} == 0, else train",
        "sources": {"svg_dir": str(svg_dir), "debian_package": DEBIAN_PACKAGE},
        "classes": categories,
        "files": sorted(
            [*shards["train"], *shards["test"], "sizes.json", "dataset.json", "classnames.txt", "templates.txt"]
        ),
    }
    (out / "classnames.txt").write_text("".join(f"{c.replace('_', ' ')}\n" for c in categories))
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    write_json_atomic(out / "dataset.json", summary)
    return summary
