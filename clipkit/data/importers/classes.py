"""Class folders (torchvision's ImageFolder): ``root/<class>/**/<image>``; a label per image, captions from templates.

Classes are the subfolder names in sorted order (torchvision's order), written to ``classnames.txt`` with ``_`` read
as a space; every template (``{c}`` = the class name) is one caption line, and ``templates.txt`` is written, so the
set is a zero-shot eval set as it stands. Images directly under the root are counted as ``no_label``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipkit.data.importers.rows import Listing, Row, is_image_file

NAME = "classes"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


def _class_dirs(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect(source: Path) -> bool:
    """A folder whose subfolders hold images and no ``.txt`` captions."""
    if not source.is_dir() or not _class_dirs(source):
        return False
    found = False
    for d in _class_dirs(source):
        for _, _, files in os.walk(d):
            if any(f.endswith(".txt") for f in files):
                return False
            found = found or any(is_image_file(Path(f)) for f in files)
    return found


def list_rows(source: Path, templates: list[str] | None = None, **_) -> Listing:
    """Lists every image under a class folder, labelled by its top folder."""
    templates = list(templates or DEFAULT_TEMPLATES)
    dirs = _class_dirs(source)
    classnames = [d.name.replace("_", " ") for d in dirs]
    listing = Listing(NAME, [], classnames=classnames, templates=templates)
    for f in sorted(p for p in source.iterdir() if p.is_file() and is_image_file(p)):
        listing.skip("no_label", f"{f.name}: not inside a class folder")
    for label, d in enumerate(dirs):
        captions = tuple(t.replace("{c}", classnames[label]) for t in templates)
        paths = []
        for folder, subdirs, files in os.walk(d):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            paths += [Path(folder) / f for f in files if not f.startswith(".") and is_image_file(Path(f))]
        for path in sorted(paths):
            rel = path.relative_to(source).as_posix()
            listing.rows.append(Row(rel=rel, image=str(path), captions=captions, label=label))
    return listing
