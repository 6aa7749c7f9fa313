"""Existing WebDataset shards (img2dataset's output: ``{key}.jpg/.txt/.json`` in ``00000.tar``, ``00000_stats.json``,
``00000.parquet``): `clipkit train` reads them as they are; this writes the ``sizes.json`` they lack.

Every shard is read to the end (`clipkit.data.shards.validate_shards`): its sample count goes into ``sizes.json``
(so epoch mode and exact resume work), and a truncated or unreadable shard is named and stops the import, with no
``sizes.json`` written. Samples the training loader would skip (no image, no caption) are counted and named. Where
img2dataset's ``{shard}_stats.json`` is present, its ``successes`` must agree with the count. Nothing else in the
folder is touched; an existing ``sizes.json`` that disagrees is an error (remove it to recount).
"""

from __future__ import annotations

import json
from pathlib import Path

from clipkit.data.shards import SIZES_FILE, validate_shards
from clipkit.files import write_json_atomic

NAME = "wds"


class BadShards(Exception):
    """Shards that cannot be read to the end (truncated, corrupt): named in the message."""


def detect(source: Path) -> bool:
    """A folder holding ``.tar`` files and no loose images."""
    return source.is_dir() and any(source.glob("*.tar"))


def write_sizes(source: Path) -> dict:
    """Counts and validates every ``*.tar`` of `source` and writes its ``sizes.json``.

    Args:
        source: The shard folder.

    Returns:
        A summary: shards, samples, samples the loader would skip (with examples), img2dataset stats checked.

    Raises:
        BadShards: A shard cannot be read to the end; nothing is written.
        ValueError: An existing ``sizes.json`` or an img2dataset ``_stats.json`` disagrees with the count.
    """
    shards = sorted(source.glob("*.tar"))
    report = validate_shards(shards)
    broken = {Path(p).name: r["error"] for p, r in report.items() if r["error"]}
    if broken:
        listed = "; ".join(f"{name}: {error}" for name, error in broken.items())
        raise BadShards(
            f"{len(broken)} of {len(shards)} shards in {source} are damaged ({listed}); no {SIZES_FILE} "
            "written: re-create or remove them"
        )
    sizes = {Path(p).name: r["samples"] for p, r in report.items()}
    problems = [f"{Path(p).name}: {b}" for p, r in report.items() for b in r["bad"] if "lists" not in b]
    stats_checked = 0
    for shard, count in sizes.items():
        stats = source / f"{Path(shard).stem}_stats.json"
        if stats.is_file():
            successes = json.loads(stats.read_text(encoding="utf-8")).get("successes")
            if successes is not None and successes != count:
                raise ValueError(f"{stats}: img2dataset counted {successes} samples, {shard} holds {count}")
            stats_checked += 1
    existing = source / SIZES_FILE
    if existing.is_file():
        old = json.loads(existing.read_text(encoding="utf-8"))
        if old != sizes:
            differ = sorted(k for k in old.keys() | sizes.keys() if old.get(k) != sizes.get(k))
            raise ValueError(
                f"{existing} disagrees with the shards ({', '.join(differ[:5])}); remove it and run again to recount"
            )
    else:
        write_json_atomic(existing, sizes)
    return {
        "format": NAME,
        "source": str(source.resolve()),
        "shards": len(sizes),
        "samples": sum(sizes.values()),
        "sizes": SIZES_FILE,
        "samples_the_loader_skips": len(problems),
        "skip_examples": problems[:5],
        "img2dataset_stats_checked": stats_checked,
    }
