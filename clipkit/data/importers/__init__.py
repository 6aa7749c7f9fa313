"""`clipkit data import`: the user's own images and captions -> a clipkit shard set (tars, sizes.json, dataset.json).

One module per source format, each with ``detect(source) -> bool`` and ``list_rows(source, **options) -> Listing``
(``wds`` instead writes the ``sizes.json`` existing shards lack). :data:`FORMATS` is the registry, tried in this order
by :func:`detect_format`; `clipkit.data.importers.writer` turns any listing into shards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

from clipkit.data.importers import classes, coco, folder, hf, karpathy, table, wds
from clipkit.data.importers.images import ImageOptions
from clipkit.data.importers.rows import Listing
from clipkit.data.importers.writer import ImportOptions, write_import
from clipkit.data.outdir import claim_output_folder

# Detection order: the most specific layouts first (a COCO root also holds images; an HF folder holds class-like
# split folders; a sidecar folder would also pass for class folders if its .txt files were ignored).
FORMATS: dict[str, ModuleType] = {
    "wds": wds,
    "table": table,
    "karpathy": karpathy,
    "coco": coco,
    "hf": hf,
    "folder": folder,
    "classes": classes,
}

__all__ = [
    "FORMATS",
    "ImageOptions",
    "ImportOptions",
    "Listing",
    "detect_format",
    "import_source",
    "list_source",
    "summary_line",
]
log = logging.getLogger(__name__)


def detect_format(source: Path) -> str:
    """The first format of :data:`FORMATS` whose ``detect`` accepts `source`.

    Raises:
        FileNotFoundError: `source` does not exist.
        ValueError: No format recognizes it; the message says what each expects.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    for name, module in FORMATS.items():
        if module.detect(source):
            return name
    expected = "; ".join(f"{name}: {(module.detect.__doc__ or '').strip()}" for name, module in FORMATS.items())
    raise ValueError(f"cannot tell the format of {source}; pass --format. Expected one of: {expected}")


def list_source(source: Path, fmt: str, **options) -> Listing:
    """The rows of `source` read as format `fmt` (options: image_col, caption_col, label_col, split_col, images,
    templates; each format takes those it knows)."""
    if fmt not in FORMATS or fmt == "wds":
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    listing = FORMATS[fmt].list_rows(Path(source), **options)
    if not listing.rows and not listing.skipped:
        raise ValueError(f"{source}: no image found (read as {fmt})")
    return listing


def import_source(
    source: Path,
    out: Path | None,
    fmt: str = "auto",
    opts: ImportOptions | None = None,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    **options,
) -> dict:
    """Imports `source` into the shard set `out` (or, for ``wds``, writes `source`'s ``sizes.json``).

    Args:
        source: A folder or table file.
        out: The output folder (refused when it holds anything but an earlier import of the same source); for
            ``wds`` None or `source`.
        fmt: A name of :data:`FORMATS`, or ``auto``.
        opts: What shapes the output.
        workers: Image processes.
        rank: This process's rank; it writes shards ``rank::world_size``.
        world_size: Processes sharing the import.
        **options: Listing options (see :func:`list_source`).

    Returns:
        The summary (``dataset.json``), with ``detected`` True when the format was auto-detected.
    """
    source = Path(source)
    detected = fmt == "auto"
    fmt = detect_format(source) if detected else fmt
    if detected:
        log.info("%s: detected format %r (%s)", source, fmt, FORMATS[fmt].__doc__.strip().split("\n")[0])
    if fmt == "wds":
        if out is not None and Path(out).resolve() != source.resolve():
            raise ValueError(f"--format wds writes sizes.json beside the shards in {source}; drop --out")
        return {**wds.write_sizes(source), "detected": detected}
    if out is None:
        raise ValueError("--out is required (the folder to write the shard set into)")
    out = Path(out)
    identity = {"name": source.stem if source.is_file() else source.resolve().name, "format": fmt}
    identity["source"] = str(source.resolve())
    claim_output_folder(out, identity, claim=False)  # refuse before reading anything ...
    listing = list_source(source, fmt, **options)
    claim_output_folder(out, identity)  # ... and claim the folder once there is something to write
    summary = write_import(listing, out, opts or ImportOptions(), identity, workers, rank, world_size)
    return {**summary, "detected": detected}


def summary_line(summary: dict, where: str | Path) -> str:
    """The one line `clipkit data import` prints: samples per split and skips per reason."""
    detected = " (detected)" if summary.get("detected") else ""
    if summary.get("format") == "wds":
        return (
            f"{where}: {summary['shards']} shards, {summary['samples']} samples counted into sizes.json "
            f"(format wds{detected}); samples the loader will skip: {summary['samples_the_loader_skips']}"
        )
    if not summary.get("complete"):
        return (
            f"rank {summary['rank']}/{summary['world_size']}: wrote {summary['written']} shards; "
            f"{len(summary['missing'])} shards still to come from other ranks"
        )
    splits = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()) or "none"
    shards = sum(len(v) for v in summary["shards"].values())
    return (
        f"{where}: imported {summary['samples']} samples ({splits}) from {summary['rows']} images, format "
        f"{summary['format']}{detected}; skipped: {skipped}; {summary['written']} shards written now, "
        f"{shards} in the set"
    )
