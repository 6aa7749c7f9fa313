"""The output-folder guard of `clipkit data build` and `clipkit data import`: never write over someone else's files.

A folder is written only when it is missing, empty, or holds a previous build of the same dataset and nothing else:
its record (``dataset.json`` of a complete build, else the ``.build.json`` claim written when the build started, so an
interrupted build can be re-run) names the same dataset, and every entry is one a build writes (shards,
``sizes.json``, ``dataset.json``, class names, templates, caches, temporaries). Anything else is refused before any
work, naming the folder and what is there; nothing is deleted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clipkit.files import write_json_atomic

CLAIM_FILE = ".build.json"
RECORDS = ("dataset.json", CLAIM_FILE)
OWNED_NAMES = frozenset(
    {"sizes.json", "dataset.json", "classnames.txt", "templates.txt", "contact_sheet.png", ".import", ".cache"}
    | {CLAIM_FILE}
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


def claim_output_folder(out: Path, identity: dict, claim: bool = True) -> None:
    """Checks that a build of `identity` may write into `out`, then records the claim (``.build.json``).

    Args:
        out: The output folder.
        identity: What names the dataset, e.g. ``{"name": "emoji"}`` or ``{"name", "format", "source"}`` of an import.
            A previous build matches when its record holds these same values.
        claim: Write the claim (False: only check, e.g. before a listing that may still fail).

    Raises:
        OutputFolderError: `out` is a file, or holds files a build does not write, or a build of another dataset.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    record = _record(out)
    same = record is not None and all(record.get(k) == v for k, v in identity.items())
    foreign = [e for e in entries if e not in OWNED_NAMES and not OWNED_RE.match(e)]
    if not entries or (same and not foreign):
        if claim:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / CLAIM_FILE, identity)
        return
    what = []
    if record is not None and not same:
        shown = {k: record.get(k) for k in identity}
        what.append(f"a build of another dataset ({', '.join(f'{k}={v!r}' for k, v in shown.items())})")
    elif record is None:
        what.append("no record of a build (dataset.json or .build.json)")
    if foreign:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        what.append(f"files a build does not write: {', '.join(foreign[:SHOWN])}{more}")
    raise OutputFolderError(
        f"--out {out} is not empty and holds {'; '.join(what)} ({len(entries)} entries): refusing to write there, "
        "nothing was changed; choose a new or empty folder, or remove what is there yourself"
    )
