"""COCO captions: ``annotations/captions_*.json`` + the image folder; one sample per image with all its captions.

The source is a captions JSON file or a folder holding ``annotations/captions_*.json`` (each file imported, its
split read from the name: ``captions_train2017`` -> ``train``, ``captions_val2017`` -> ``val``). Images are looked up
under ``images`` (default: the COCO root, i.e. the folder above ``annotations/``) as ``{images}/{train2017 or
val2017...}/{file_name}``, then ``{images}/{file_name}``. Captions are in annotation-id order, one per line; an
image without a caption is counted as ``no_caption``. The json keeps ``coco_id``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clipkit.data.importers.rows import Listing, Row

NAME = "coco"
_HEAD_BYTES = 1 << 16


def caption_files(source: Path) -> list[Path]:
    """The COCO captions files a source names: the file itself or ``annotations/captions_*.json`` of a folder."""
    if source.is_file():
        return [source]
    return sorted((source / "annotations").glob("captions_*.json")) if source.is_dir() else []


def detect(source: Path) -> bool:
    """A ``captions_*.json`` file (or a folder with ``annotations/captions_*.json``) in COCO's layout."""
    files = caption_files(source)
    if not files or not all(f.suffix == ".json" for f in files):
        return False
    head = files[0].open("rb").read(_HEAD_BYTES)
    return b'"sentences"' not in head and (files[0].name.startswith("captions_") or b'"annotations"' in head)


def _split(name: str) -> str | None:
    for split in ("train", "val", "test"):
        if split in name:
            return split
    return None


def _image_path(images: Path, subset: str, file_name: str) -> Path:
    for candidate in (images / subset / file_name, images / file_name):
        if candidate.is_file():
            return candidate
    return images / subset / file_name  # missing: counted as missing_image when it is read


def list_rows(source: Path, images: str | None = None, **_) -> Listing:
    """Lists every image of the captions files with its captions."""
    listing = Listing(NAME, [])
    for path in caption_files(source):
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        image_root = Path(images) if images else root
        subset = re.sub(r"^captions_", "", path.stem)  # train2017, val2014, ...
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{path}: not a COCO captions file (expected 'images' and 'annotations')")
        captions: dict[int, list[tuple[int, str]]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append((ann.get("id", 0), ann.get("caption") or ""))
        for img in sorted(data["images"], key=lambda i: i["file_name"]):
            caps = tuple(c for _, c in sorted(captions.get(img["id"], [])))
            file = _image_path(image_root, subset, img["file_name"])
            listing.rows.append(
                Row(
                    rel=f"{subset}/{img['file_name']}",
                    image=str(file),
                    captions=caps,
                    split=_split(subset),
                    meta={"coco_id": img["id"]},
                )
            )
    return listing
