"""Image folder with sidecar captions: ``a/b/x.jpg`` + ``a/b/x.txt`` (one caption per line), optional ``a/b/x.json``.

The layout img2dataset writes with ``--output_format files`` and many datasets ship. Folders are walked recursively
in sorted order; hidden files and folders are ignored. An image without its ``.txt`` is counted as ``no_caption``, a
``.txt`` without an image as ``missing_image``; a sidecar ``.json`` is kept in the sample's json under ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipkit.data.importers.rows import Listing, Row, is_image_file

NAME = "folder"


def _walk(root: Path):
    """(folder, sorted file names) of every non-hidden folder under root, in sorted order."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(f for f in files if not f.startswith("."))


def detect(source: Path) -> bool:
    """A folder where some image has a sibling ``.txt`` of the same stem."""
    if not source.is_dir():
        return False
    for _, files in _walk(source):
        stems = {Path(f).stem for f in files if f.lower().endswith(".txt")}
        if any(is_image_file(Path(f)) and Path(f).stem in stems for f in files):
            return True
    return False


def list_rows(source: Path, **_) -> Listing:
    """Lists every image of the tree with its caption file (and sidecar json, when present)."""
    listing = Listing(NAME, [])
    for folder, files in _walk(source):
        names = set(files)
        images = {Path(f).stem: f for f in files if is_image_file(Path(f))}
        for f in files:
            stem = Path(f).stem
            rel = (folder / f).relative_to(source).as_posix()
            if is_image_file(Path(f)):
                if f"{stem}.txt" not in names:
                    listing.skip("no_caption", f"{rel}: no {stem}.txt beside it")
                    continue
                meta = folder / f"{stem}.json"
                listing.rows.append(
                    Row(
                        rel=rel,
                        image=str(folder / f),
                        caption_file=str(folder / f"{stem}.txt"),
                        meta_file=str(meta) if f"{stem}.json" in names else None,
                    )
                )
            elif f.endswith(".txt") and stem not in images:
                listing.skip("missing_image", f"{rel}: no image named {stem}.*")
    return listing
