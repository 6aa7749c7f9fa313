"""The output-folder guard of `clipkit data build` and `clipkit data import`: never write over someone else's files.

A folder is written only when it is missing, empty, or holds a previous build of the same dataset and nothing else:
its record (``dataset.json``, or ``.import/plan.json`` of an interrupted import) names the same dataset, and every
entry is one a build writes (shards, ``sizes.json``, ``dataset.json``, class names, templates, caches, temporaries).
Anything else is refused before any work, naming the folder and what is there; nothing is deleted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RECORDS = ("dataset.json", ".import/plan.json")
OWNED_NAMES = frozenset(
    {"sizes.json", "dataset.json", "classnames.txt", "templates.txt", "contact_sheet.png", ".import", ".cache"}
)
OWNED_RE = re.compile(r"^([A-Za-z0-9_]+-\d{6}\.tar|\..+\.tmp)$")
SHOWN = 5


class OutputFolderError(ValueError):
    """The output folder holds something other than a previous build of the same dataset."""


def _record(out: Path) -> dict | None:
    for name in RECORDS:
        try:
            record = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return None


def claim_output_folder(out: Path, identity: dict) -> None:
    """Checks that a build of `identity` may write into `out`; raises before anything is written.

    Args:
        out: The output folder.
        identity: What names the dataset, e.g. ``{"name": "emoji"}`` or ``{"name", "format", "source"}`` of an import.
            A previous build matches when its record holds these same values.

    Raises:
        OutputFolderError: `out` is a file, or holds files a build does not write, or a build of another dataset.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    record = _record(out)
    same = record is not None and all(record.get(k) == v for k, v in identity.items())
    foreign = [e for e in entries if e not in OWNED_NAMES and not OWNED_RE.match(e)]
    if same and not foreign:
        return
    what = []
    if record is not None and not same:
        shown = {k: record.get(k) for k in identity}
        what.append(f"a build of another dataset ({', '.join(f'{k}={v!r}' for k, v in shown.items())})")
    elif record is None:
        what.append("no dataset.json of a build")
    if foreign:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        what.append(f"files a build does not write: {', '.join(foreign[:SHOWN])}{more}")
    raise OutputFolderError(
        f"--out {out} is not empty and holds {'; '.join(what)} ({len(entries)} entries): refusing to write there, "
        "nothing was changed; choose a new or empty folder, or remove what is there yourself"
    )
