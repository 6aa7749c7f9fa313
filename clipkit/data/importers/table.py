"""Tables of image paths and captions: CSV, TSV, parquet and JSONL, with open_clip's `CsvDataset` convention.

open_clip's ``--csv-img-key filepath --csv-caption-key title --csv-separator "\\t"`` works with no flags: a ``.csv``
whose header holds a tab is read tab-separated, and the image / caption columns default to the first present of
:data:`IMAGE_COLUMNS` / :data:`CAPTION_COLUMNS`; others are named with ``image_col`` / ``caption_col``. A column
named ``label`` (or ``label_col``) labels the rows: strings become class names (sorted, ``classnames.txt``), integers
stay as they are. A column named ``split`` (or ``split_col``) assigns splits. Relative image paths resolve against the
table's folder; ``file://`` paths work; URLs are not fetched (counted as ``url``: download them with img2dataset).
Rows naming the same image are merged: one sample with every caption, in row order (COCO-style tables).

Per row, left out and counted: ``bad_row`` (a JSONL line that is not a JSON object), ``bad_text`` (a row that is
not UTF-8), ``no_image_path`` (an empty image cell) and ``url``. Other columns are kept in the sample's json.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from clipkit.data.importers.rows import Listing, Row, is_url, local_path

NAME = "table"
SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
IMAGE_COLUMNS = ("filepath", "image", "image_path", "file_name", "filename", "file", "path", "img")
CAPTION_COLUMNS = ("title", "caption", "captions", "text", "sentence", "description")
URL_NOTE = "rows naming URLs are not fetched: download them first with img2dataset (pip install img2dataset)"


def detect(source: Path) -> bool:
    """A file ending in one of :data:`SUFFIXES`."""
    return source.is_file() and source.suffix.lower() in SUFFIXES


def read_records(path: Path, listing: Listing) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    """(column names, iterator of (row name for examples, record)); unreadable rows are counted in `listing`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column_names, ((f"{path.name} row {i + 1}", r) for i, r in enumerate(table.to_pylist()))
    raw = path.read_bytes()
    if suffix == ".jsonl":
        records, columns = [], {}
        for i, line in enumerate(raw.splitlines()):
            name = f"{path.name} line {i + 1}"
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                listing.skip("bad_text", f"{name}: not UTF-8")
                continue
            except ValueError as e:
                listing.skip("bad_row", f"{name}: {e}")
                continue
            if not isinstance(record, dict):
                listing.skip("bad_row", f"{name}: not a JSON object")
                continue
            columns.update(dict.fromkeys(record))
            records.append((name, record))
        return list(columns), iter(records)
    # CSV / TSV: decoded with surrogateescape so one bad row is found and counted instead of failing the file.
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    header = text.split("\n", 1)[0]
    delimiter = "\t" if suffix == ".tsv" or "\t" in header else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[str, dict]]:
        for record in reader:
            name = f"{path.name} line {reader.line_num}"
            if any(isinstance(v, str) and _has_surrogates(v) for v in record.values()):
                listing.skip("bad_text", f"{name}: not UTF-8")
                continue
            yield name, record

    return columns, rows()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def pick_column(columns: list[str], given: str | None, defaults: tuple[str, ...], what: str, path: Path) -> str:
    """The column to use: `given` (must exist) or the first of `defaults` present; errors list the columns."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"{path}: no column {given!r} ({what}); the table has: {', '.join(columns)}")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(
        f"{path}: no {what} column (looked for {', '.join(defaults)}); the table has: {', '.join(columns)}; "
        f"name it with --{what.split()[0]}-col"
    )


def _captions(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if v is not None)
    return (str(value),)


def add_rows(
    listing: Listing,
    path: Path,
    base: Path,
    prefix: str = "",
    split: str | None = None,
    image_col: str | None = None,
    caption_col: str | None = None,
    label_col: str | None = None,
    split_col: str | None = None,
) -> list:
    """Adds the rows of one table to `listing`; returns the raw label values in row order (None where unlabelled).

    Args:
        listing: Where rows and skips go.
        path: The table file.
        base: Folder that relative image paths resolve against.
        prefix: Prepended to each row's name (Hugging Face split folders).
        split: The split of every row (Hugging Face split folders), unless a split column says otherwise.
        image_col: Image path column (default: the first of :data:`IMAGE_COLUMNS`).
        caption_col: Caption column (default: the first of :data:`CAPTION_COLUMNS`).
        label_col: Label column (default: ``label`` when present).
        split_col: Split column (default: ``split`` when present).
    """
    columns, records = read_records(path, listing)
    image_col = pick_column(columns, image_col, IMAGE_COLUMNS, "image path", path)
    caption_col = pick_column(columns, caption_col, CAPTION_COLUMNS, "caption", path)
    label_col = pick_column(columns, label_col, ("label",), "label", path) if label_col or "label" in columns else None
    split_col = pick_column(columns, split_col, ("split",), "split", path) if split_col or "split" in columns else None
    used = {image_col, caption_col, label_col, split_col}
    index: dict[str, int] = {}  # image reference -> its row in listing.rows (rows naming one image are merged)
    labels = []
    for name, record in records:
        ref = record.get(image_col)
        if ref is None or str(ref).strip() == "":
            listing.skip("no_image_path", f"{name}: empty {image_col!r}")
            continue
        ref = str(ref).strip()
        if is_url(ref):
            listing.skip("url", f"{name}: {ref}")
            if URL_NOTE not in listing.notes:
                listing.notes.append(URL_NOTE)
            continue
        captions = _captions(record.get(caption_col))
        if ref in index:
            i = index[ref]
            old = listing.rows[i]
            listing.rows[i] = Row(**{**old.__dict__, "captions": (old.captions or ()) + captions})
            continue
        file = local_path(ref, base)
        try:
            rel = file.relative_to(base).as_posix()
        except ValueError:
            rel = file.as_posix().lstrip("/")
        meta = {k: v for k, v in record.items() if k not in used and _jsonable(v)}
        row_split = record.get(split_col) if split_col else split
        index[ref] = len(listing.rows)
        listing.rows.append(
            Row(
                rel=f"{prefix}{rel}",
                image=str(file),
                captions=captions,
                split=str(row_split) if row_split not in (None, "") else None,
                meta=meta or None,
            )
        )
        labels.append(record.get(label_col) if label_col else None)
    return labels


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def apply_labels(listing: Listing, labels: list, templates: list[str] | None) -> None:
    """Sets each row's label: integers as they are; strings as indexes into sorted class names (written out)."""
    present = [v for v in labels if v not in (None, "")]
    if not present:
        return
    as_int = all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in present)
    if as_int:
        index = {v: int(v) for v in present}
    else:
        listing.classnames = sorted({str(v) for v in present})
        listing.templates = list(templates or ("a photo of a {c}.",))
        index = {v: listing.classnames.index(str(v)) for v in present}
    listing.rows = [
        Row(**{**row.__dict__, "label": index.get(v) if v not in (None, "") else None})
        for row, v in zip(listing.rows, labels, strict=True)
    ]


def list_rows(
    source: Path,
    image_col: str | None = None,
    caption_col: str | None = None,
    label_col: str | None = None,
    split_col: str | None = None,
    templates: list[str] | None = None,
    **_,
) -> Listing:
    """Lists the rows of one table file."""
    listing = Listing(NAME, [])
    labels = add_rows(
        listing,
        source,
        source.parent,
        image_col=image_col,
        caption_col=caption_col,
        label_col=label_col,
        split_col=split_col,
    )
    apply_labels(listing, labels, templates)
    return listing
