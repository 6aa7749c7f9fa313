"""What every importer yields: one `Row` per image (path, captions, label, split, metadata), and a `Listing` of them.

An importer only lists; it never opens an image. Reading, decoding, resizing and the per-row skip reasons happen in
`clipkit.data.importers.images` (in worker processes), the order, split and shards in `clipkit.data.importers.writer`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "ftp://")
MAX_EXAMPLES = 5
_KEY_CHARS_RE = re.compile(r"[^0-9A-Za-z_-]")
MAX_KEY_CHARS = 80


@dataclass(frozen=True)
class Row:
    """One image to import.

    Attributes:
        rel: The image's name relative to the source (the sample key is made from it; examples name it).
        image: Local path of the image file.
        captions: Captions given inline (tables, COCO, class templates), or None to read `caption_file`.
        caption_file: A text file with one caption per line (sidecar captions), read as UTF-8 by the worker.
        label: Class index into the listing's `classnames`, or None.
        split: The split the source assigns (a split column, Karpathy's `split`), or None for the hash split.
        meta: Extra JSON-able metadata kept in the sample's json (table columns, COCO ids).
        meta_file: A sidecar JSON file kept in the sample's json under "meta".
    """

    rel: str
    image: str
    captions: tuple[str, ...] | None = None
    caption_file: str | None = None
    label: int | None = None
    split: str | None = None
    meta: dict | None = None
    meta_file: str | None = None


@dataclass
class Listing:
    """What an importer found: rows, class names (when labelled), and rows it could not even list, by reason."""

    format: str
    rows: list[Row]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, example: str) -> None:
        """Counts one source entry left out at listing time (e.g. a URL, a malformed row)."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)


def sample_key(rel: str) -> str:
    """A webdataset key for a source-relative name: no dots or separators, at most :data:`MAX_KEY_CHARS` long.

    `a/b/x.jpg` -> `a_b_x`; a long name keeps its start and gains 8 hex digits of its sha1, so keys stay unique.
    """
    stem = rel.rsplit(".", 1)[0] if Path(rel).suffix.lower() in IMAGE_SUFFIXES else rel
    key = _KEY_CHARS_RE.sub("_", stem) or "_"
    if len(key) > MAX_KEY_CHARS:
        key = f"{key[: MAX_KEY_CHARS - 9]}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
    return key


def unique_keys(rels: list[str]) -> list[str]:
    """:func:`sample_key` of each name; names whose keys clash (``a b.jpg``, ``a_b.jpg``) get a sha1 suffix each."""
    keys = [sample_key(r) for r in rels]
    clashes = Counter(keys)
    return [
        k if clashes[k] == 1 else f"{k[: MAX_KEY_CHARS - 9]}_{hashlib.sha1(r.encode()).hexdigest()[:8]}"
        for k, r in zip(keys, rels, strict=True)
    ]


def is_url(path: str) -> bool:
    """Whether an image reference is remote (not fetched: use img2dataset for those)."""
    return path.lower().startswith(URL_PREFIXES)


def local_path(ref: str, base: Path) -> Path:
    """A table's image reference as a local path: `file://` stripped, relative paths against `base`."""
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def is_image_file(path: Path) -> bool:
    """Whether a name looks like an image (by suffix; content is checked when it is decoded)."""
    return path.suffix.lower() in IMAGE_SUFFIXES
