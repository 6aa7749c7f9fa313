"""The Karpathy split JSON of Flickr30k / COCO / Flickr8k retrieval (``dataset_coco.json``, ``dataset_flickr30k.json``).

Layout: ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}], "imgid", "cocoid"?}, ...]}``.
Each image is one sample with all its sentences (``raw``), one per line: the set CLIP_benchmark evaluates
flickr30k/mscoco retrieval on (5 captions per image). ``split`` is kept (``restval`` counted as ``train``); pass
``--split test`` to import the test split alone. Images are looked up under ``images`` (default: the JSON's folder)
as ``{images}/{filepath}/{filename}``, then ``{images}/{filename}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipkit.data.importers.rows import Listing, Row

NAME = "karpathy"
_HEAD_BYTES = 1 << 16


def json_file(source: Path) -> Path | None:
    """The split JSON a source names: the file itself or the one ``dataset_*.json`` of a folder."""
    if source.is_file():
        return source if source.suffix == ".json" else None
    found = sorted(source.glob("dataset_*.json")) if source.is_dir() else []
    return found[0] if len(found) == 1 else None


def detect(source: Path) -> bool:
    """A JSON file whose images carry ``sentences``."""
    path = json_file(source)
    return path is not None and b'"sentences"' in path.open("rb").read(_HEAD_BYTES)


def list_rows(source: Path, images: str | None = None, **_) -> Listing:
    """Lists every image of the split JSON with its sentences and split."""
    path = json_file(source)
    if path is None:
        raise ValueError(f"{source}: expected a Karpathy split JSON (dataset_*.json)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy split JSON (expected an 'images' list)")
    root = Path(images) if images else path.parent
    listing = Listing(NAME, [])
    for img in data["images"]:
        sub = img.get("filepath") or ""
        candidates = [root / sub / img["filename"], root / img["filename"]]
        file = next((c for c in candidates if c.is_file()), candidates[0])
        meta = {k: img[k] for k in ("imgid", "cocoid") if k in img}
        listing.rows.append(
            Row(
                rel=f"{sub}/{img['filename']}" if sub else img["filename"],
                image=str(file),
                captions=tuple(s.get("raw", "") for s in img.get("sentences", [])),
                split=img.get("split"),
                meta=meta or None,
            )
        )
    listing.rows.sort(key=lambda r: r.rel)
    return listing
