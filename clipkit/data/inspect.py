"""`clipkit data inspect DIR`: what a shard set holds, to read (counts, distributions, labels, skips) and to look at
(a contact sheet PNG of random samples with their captions).

Counts come from ``sizes.json``; skip reasons from ``dataset.json`` (written by `clipkit data import` and `data
build`). Distributions (captions per sample, caption length in characters and words, image width and height) are
read from whole shards spread evenly over the set until ``max_read`` samples: a large set is sampled, not read in full.
Images are opened for their header only, except the few drawn on the contact sheet.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.data.pipeline import IMAGE_EXTS, load_rgb
from clipkit.data.shards import SIZES_FILE, read_sizes
from clipkit.files import atomic_path

QUANTILES = (0, 5, 25, 50, 75, 95, 100)
SHEET_COLUMNS = 6


def distribution(values: list[float]) -> dict:
    """count, mean and the percentiles :data:`QUANTILES` (``p50`` ...) of some values; empty -> count 0."""
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    out = {"count": int(arr.size), "mean": round(float(arr.mean()), 3)}
    out |= {f"p{q}": round(float(v), 3) for q, v in zip(QUANTILES, np.percentile(arr, QUANTILES), strict=True)}
    return out


def _samples(shard: Path):
    """(key, {ext: bytes}) of a tar in order, as webdataset groups members (key = name up to the first dot)."""
    current, parts = None, {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or "." not in Path(member.name).name:
                continue
            key, ext = member.name.split(".", 1) if "/" not in member.name else member.name.rsplit(".", 1)
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext.lower()] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


def _pick_shards(shards: list[Path], counts: list[int], max_read: int) -> list[Path]:
    """Whole shards spread evenly over the set, until they hold at least `max_read` samples (all if fewer)."""
    if sum(counts) <= max_read:
        return shards
    order = sorted(range(len(shards)), key=lambda i: (i * 7919) % len(shards))  # a fixed spread over the list
    chosen, total = [], 0
    for i in order:
        chosen.append(i)
        total += counts[i]
        if total >= max_read:
            break
    return [shards[i] for i in sorted(chosen)]


def inspect_folder(folder: Path, samples: int = 24, sheet: str | Path | None = "", max_read: int = 20000) -> dict:
    """Reports on a shard set folder and draws its contact sheet.

    Args:
        folder: The shard set (``*.tar`` + ``sizes.json``).
        samples: Images on the contact sheet.
        sheet: Contact sheet path; ``""`` for ``{folder}/contact_sheet.png``, None for no sheet.
        max_read: Samples read for the distributions (whole shards, spread over the set).

    Returns:
        The report (JSON-able).

    Raises:
        FileNotFoundError: No shards or no ``sizes.json`` (the message says how to make one).
    """
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.tar shards")
    if not (folder / SIZES_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {SIZES_FILE}; write it with `clipkit data import {folder} --format wds`")
    counts = read_sizes([str(s) for s in shards])
    dataset = _read_json(folder / "dataset.json")
    classnames_file = folder / "classnames.txt"
    classnames = classnames_file.read_text(encoding="utf-8").splitlines() if classnames_file.is_file() else None

    splits: dict[str, dict] = {}
    for shard, n in zip(shards, counts, strict=True):
        split = splits.setdefault(shard.name.rsplit("-", 1)[0] if "-" in shard.name else "all", {"shards": 0})
        split["shards"] += 1
        split["samples"] = split.get("samples", 0) + n

    stats: dict[str, list[float]] = {k: [] for k in ("captions", "chars", "words", "width", "height")}
    formats, labels, unreadable = Counter(), Counter(), 0
    pool = []  # (key, image bytes, first caption) of every sample read: the contact sheet draws from these
    read = _pick_shards(shards, counts, max_read)
    for shard in read:
        for key, parts in _samples(shard):
            captions = [c.strip() for c in parts.get("txt", b"").decode("utf-8", "replace").splitlines() if c.strip()]
            stats["captions"].append(len(captions))
            for c in captions:
                stats["chars"].append(len(c))
                stats["words"].append(len(c.split()))
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if ext is not None:
                formats[ext] += 1
                try:
                    with Image.open(io.BytesIO(parts[ext])) as img:
                        stats["width"].append(img.width)
                        stats["height"].append(img.height)
                except Exception:  # counted, not raised: `clipkit data validate` and training name them
                    unreadable += 1
                pool.append((key, parts[ext], captions[0] if captions else ""))
            label = _read_json_bytes(parts.get("json")).get("label")
            if isinstance(label, int):
                labels[classnames[label] if classnames and 0 <= label < len(classnames) else str(label)] += 1

    report = {
        "folder": str(folder),
        "name": dataset.get("name"),
        "format": dataset.get("format"),
        "samples": sum(counts),
        "splits": splits,
        "read": {"shards": len(read), "samples": len(stats["captions"]), "unreadable_images": unreadable},
        "captions_per_sample": distribution(stats["captions"]),
        "caption_chars": distribution(stats["chars"]),
        "caption_words": distribution(stats["words"]),
        "image_width": distribution(stats["width"]),
        "image_height": distribution(stats["height"]),
        "image_formats": dict(formats.most_common()),
        "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])) if labels else None,
        "skipped": dataset.get("skipped"),
        "skipped_examples": dataset.get("skipped_examples"),
    }
    if sheet is not None and pool:
        path = Path(sheet) if sheet else folder / "contact_sheet.png"
        picks = random.Random(0).sample(pool, min(samples, len(pool)))
        report["contact_sheet"] = str(draw_contact_sheet(picks, path))
    return report


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_json_bytes(raw: bytes | None) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def draw_contact_sheet(picks: list[tuple[str, bytes, str]], path: Path) -> Path:
    """Draws (key, image bytes, caption) tiles in a grid with the caption under each image; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    cols = min(SHEET_COLUMNS, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, data, caption) in zip(axes.flat, picks, strict=False):
        try:
            ax.imshow(np.asarray(load_rgb(Image.open(io.BytesIO(data)))))
        except Exception:
            ax.text(0.5, 0.5, "unreadable image", ha="center", va="center", transform=ax.transAxes)
        text = "\n".join(textwrap.wrap(caption, 28)[:3]) or "(no caption)"
        ax.set_title(text, fontsize=7)
        ax.text(0.5, -0.04, key[-28:], fontsize=5, color="gray", ha="center", va="top", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def format_report(report: dict) -> str:
    """The report as lines for people."""

    def dist(name: str, d: dict) -> str:
        if not d.get("count"):
            return f"  {name:<22} -"
        return (
            f"  {name:<22} min {d['p0']:g}  p5 {d['p5']:g}  median {d['p50']:g}  p95 {d['p95']:g}  max {d['p100']:g}"
            f"  (mean {d['mean']:g})"
        )

    lines = [f"{report['folder']}: {report['samples']} samples" + (f" ({report['name']}, {report['format']})"
                                                                    if report.get("format") else "")]  # fmt: skip
    lines += [f"  {s:<22} {v['samples']} samples in {v['shards']} shards" for s, v in report["splits"].items()]
    r = report["read"]
    lines.append(f"read {r['samples']} samples from {r['shards']} shards ({r['unreadable_images']} unreadable images):")
    lines.append(dist("captions per sample", report["captions_per_sample"]))
    lines.append(dist("caption characters", report["caption_chars"]))
    lines.append(dist("caption words", report["caption_words"]))
    lines.append(dist("image width", report["image_width"]))
    lines.append(dist("image height", report["image_height"]))
    lines.append("  image formats          " + ", ".join(f"{k} {v}" for k, v in report["image_formats"].items()))
    if report["labels"]:
        lines.append("labels (samples read): " + ", ".join(f"{k} {v}" for k, v in report["labels"].items()))
    if report["skipped"] is not None:
        skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
        lines.append(f"skipped when the set was written: {skipped}")
        for reason, examples in (report["skipped_examples"] or {}).items():
            lines.append(f"  {reason}: {'; '.join(examples[:3])}")
    if report.get("contact_sheet"):
        lines.append(f"contact sheet: {report['contact_sheet']}")
    return "\n".join(lines)
