"""Hugging Face ``imagefolder`` with captions: ``metadata.jsonl`` / ``metadata.csv`` holding ``file_name`` + a text.

The metadata file sits at the root (one split, the hash split applies) or in split folders (``train/metadata.jsonl``,
``test/metadata.csv``, ...: the folder names the split). The text column defaults to the first present of
`table.CAPTION_COLUMNS` (``text``, ``caption``, ...); ``file_name`` resolves against the metadata file's folder.
Rows are read with `clipkit.data.importers.table`, so the same per-row skips and options apply.
"""

from __future__ import annotations

from pathlib import Path

from clipkit.data.importers import table
from clipkit.data.importers.rows import Listing

NAME = "hf"
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


def metadata_files(source: Path) -> list[tuple[str | None, Path]]:
    """(split or None, metadata file) at the root or one folder down."""
    if not source.is_dir():
        return []
    found = [(None, source / n) for n in METADATA_NAMES if (source / n).is_file()]
    for sub in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [(sub.name, sub / n) for n in METADATA_NAMES if (sub / n).is_file()]
    return found


def detect(source: Path) -> bool:
    """A folder with ``metadata.jsonl`` or ``metadata.csv`` at its root or in split folders."""
    return bool(metadata_files(source))


def list_rows(
    source: Path,
    caption_col: str | None = None,
    label_col: str | None = None,
    templates: list[str] | None = None,
    **_,
) -> Listing:
    """Lists the rows of every metadata file."""
    listing = Listing(NAME, [])
    labels = []
    for split, path in metadata_files(source):
        labels += table.add_rows(
            listing,
            path,
            path.parent,
            prefix=f"{split}/" if split else "",
            split=split,
            image_col="file_name",
            caption_col=caption_col,
            label_col=label_col,
        )
    table.apply_labels(listing, labels, templates)
    return listing
