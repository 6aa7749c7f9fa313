"""Embedding folders written by `clipkit embed` (single and parts layouts) and their metadata files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.files import atomic_path
from clipkit.index.errors import IndexFileError
from clipkit.index.rows import MappedRows
from clipkit.index.store import (
    EMBED_INFO_FILE,
    IMAGE_EMB_FILE,
    META_FILE,
    META_PARQUET_FILE,
    PART_INFO_FILE,
    PARTS_DIR,
    TEXT_EMB_FILE,
    TEXT_TO_IMAGE_FILE,
    _load_npy,
    _read_json,
)


def is_parts_layout(emb_dir: Path) -> bool:
    """Whether an embedding folder uses the parts layout (embed.json says so, or parts/ exists without arrays)."""
    emb_dir = Path(emb_dir)
    info_path = emb_dir / EMBED_INFO_FILE
    if info_path.is_file():
        try:
            return json.loads(info_path.read_text(encoding="utf-8")).get("layout") == "parts"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    return (emb_dir / PARTS_DIR).is_dir() and not (emb_dir / IMAGE_EMB_FILE).is_file()


def load_embeddings(emb_dir: Path, with_meta: bool = True) -> dict[str, Any]:
    """Opens an embedding folder written by `clipkit embed` (single or parts layout), memory-mapping the arrays.

    Args:
        emb_dir: the folder.
        with_meta: read the metadata rows (False skips reading them, e.g. to build an index of a huge set).

    Returns:
        {"dir": Path, "layout": "single" | "parts", "image_emb": [N, D] memmap (single) or `MappedRows`
        (parts), "text_emb": [M, D] memmap / `MappedRows` or None, "text_to_image": [M] int64 (memmap or
        array with global image rows) or None, "meta": N dicts (None without with_meta), "meta_files":
        the metadata files in row order, "info": embed.json}. text_emb.npy and text_to_image.npy are optional
        (an image-only export) but must come together.

    Raises:
        FileNotFoundError: naming a missing required file (image_emb.npy, meta.jsonl, embed.json) or the
            missing half of text_emb.npy / text_to_image.npy, or a part without its done-marker.
        ValueError: naming the file whose shape, row count or contents disagree.
    """
    emb_dir = Path(emb_dir)
    if is_parts_layout(emb_dir):
        return _load_parts(emb_dir, with_meta)
    out = _load_single(emb_dir, with_meta)
    out["info"] = _read_json(emb_dir / EMBED_INFO_FILE)
    d = out["image_emb"].shape[1]
    if "dim" in out["info"] and out["info"]["dim"] != d:
        raise ValueError(f"{emb_dir / EMBED_INFO_FILE}: dim {out['info']['dim']} but {IMAGE_EMB_FILE} has dim {d}")
    return out


def _load_single(emb_dir: Path, with_meta: bool, needs_info: bool = True) -> dict[str, Any]:
    """The single layout's arrays and metadata (also one part of the parts layout)."""
    meta_path = _meta_path(emb_dir)
    required = [IMAGE_EMB_FILE] + ([EMBED_INFO_FILE] if needs_info else [])
    for name in required:
        if not (emb_dir / name).is_file():
            raise FileNotFoundError(f"{emb_dir / name}: missing (not an embedding folder from `clipkit embed`?)")
    if meta_path is None:
        raise FileNotFoundError(f"{emb_dir / META_FILE}: missing (not an embedding folder from `clipkit embed`?)")
    image_emb = _load_npy(emb_dir / IMAGE_EMB_FILE, ndim=2)  # [N, D]
    n, d = image_emb.shape
    meta = read_meta(meta_path) if with_meta else None
    n_meta = len(meta) if meta is not None else count_meta_rows(meta_path)
    if n_meta != n:
        raise ValueError(f"{meta_path}: {n_meta} rows but {emb_dir / IMAGE_EMB_FILE} has {n}")
    text_emb = text_to_image = None
    have = [(emb_dir / name).is_file() for name in (TEXT_EMB_FILE, TEXT_TO_IMAGE_FILE)]
    if any(have):
        if not all(have):
            missing = TEXT_TO_IMAGE_FILE if have[0] else TEXT_EMB_FILE
            raise FileNotFoundError(f"{emb_dir / missing}: missing (text_emb.npy and text_to_image.npy go together)")
        text_emb = _load_npy(emb_dir / TEXT_EMB_FILE, ndim=2)  # [M, D]
        text_to_image = _load_npy(emb_dir / TEXT_TO_IMAGE_FILE, ndim=1)  # [M]
        # An image-only export may store an empty [0, 0] text_emb: no dim to check then.
        if len(text_emb) and text_emb.shape[1] != d:
            raise ValueError(f"{emb_dir / TEXT_EMB_FILE}: dim {text_emb.shape[1]} but {IMAGE_EMB_FILE} has dim {d}")
        if len(text_to_image) != len(text_emb):
            raise ValueError(
                f"{emb_dir / TEXT_TO_IMAGE_FILE}: {len(text_to_image)} rows but {TEXT_EMB_FILE} has {len(text_emb)}"
            )
        if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= n):
            raise ValueError(f"{emb_dir / TEXT_TO_IMAGE_FILE}: image indices must lie in [0, {n})")
    return {
        "dir": emb_dir,
        "layout": "single",
        "image_emb": image_emb,
        "text_emb": text_emb,
        "text_to_image": text_to_image,
        "meta": meta,
        "meta_files": [meta_path],
    }


def _load_parts(emb_dir: Path, with_meta: bool) -> dict[str, Any]:
    info_path = emb_dir / EMBED_INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: missing: the export is incomplete (rerun `clipkit embed`, it resumes)")
    info = _read_json(info_path)
    names = info.get("parts")
    if not isinstance(names, list) or not names:
        raise IndexFileError(f"{info_path}: 'parts' must list the part folders")
    parts = []
    for name in names:
        part_dir = emb_dir / PARTS_DIR / name
        if not (part_dir / PART_INFO_FILE).is_file():
            raise FileNotFoundError(
                f"{part_dir / PART_INFO_FILE}: missing: part {name} is not finished (rerun `clipkit embed`)"
            )
        parts.append(_load_single(part_dir, with_meta, needs_info=False))
    dims = {p["image_emb"].shape[1] for p in parts if len(p["image_emb"])}
    if len(dims) > 1 or ("dim" in info and dims and info["dim"] not in dims):
        raise ValueError(
            f"{emb_dir}: parts disagree on the embedding dim ({sorted(dims)}, embed.json: {info.get('dim')})"
        )
    image_emb = MappedRows([p["dir"] / IMAGE_EMB_FILE for p in parts])
    text_emb = text_to_image = None
    with_text = [p["text_emb"] is not None for p in parts]
    if any(with_text):
        if not all(with_text):
            bad = parts[with_text.index(False)]["dir"]
            raise FileNotFoundError(f"{bad / TEXT_EMB_FILE}: missing while other parts have text embeddings")
        text_emb = MappedRows([p["dir"] / TEXT_EMB_FILE for p in parts])
        offsets = np.cumsum([0] + [len(p["image_emb"]) for p in parts])  # [P + 1] first image row per part
        text_to_image = np.concatenate(
            [np.asarray(p["text_to_image"], np.int64) + offsets[i] for i, p in enumerate(parts)]
        )  # [M] global image rows
    meta = [row for p in parts for row in p["meta"]] if with_meta else None
    return {
        "dir": emb_dir,
        "layout": "parts",
        "image_emb": image_emb,
        "text_emb": text_emb,
        "text_to_image": text_to_image,
        "meta": meta,
        "meta_files": [f for p in parts for f in p["meta_files"]],
        "info": info,
    }


def image_rows(emb: dict[str, Any]) -> MappedRows:
    """The windowed reader of an opened embedding folder's image vectors."""
    x = emb["image_emb"]
    return x if isinstance(x, MappedRows) else MappedRows([emb["dir"] / IMAGE_EMB_FILE])


def _meta_path(folder: Path) -> Path | None:
    for name in (META_FILE, META_PARQUET_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_meta(path: Path) -> list[dict[str, Any]]:
    """Reads meta.jsonl (one JSON object with a "key" per line, blank lines skipped) or meta.parquet.

    A parquet file has columns "key" (string), "captions" (list of strings) and "extra" (the row's other
    fields as a JSON object string), written by `write_meta`.

    Raises:
        ValueError: naming the file and line (row) of an invalid row.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_meta_parquet(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from e
            if not isinstance(row, dict) or "key" not in row:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'key'")
            rows.append(row)
    return rows


def write_meta(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes metadata rows as JSONL or, for a .parquet path, as parquet (key, captions, extra); atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        _write_meta_to(tmp, path.suffix == ".parquet", rows)


def _write_meta_to(tmp: Path, parquet: bool, rows: Sequence[dict[str, Any]]) -> None:
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "key": pa.array([str(r["key"]) for r in rows], pa.string()),
                "captions": pa.array([list(r.get("captions", [])) for r in rows], pa.list_(pa.string())),
                "extra": pa.array(
                    [json.dumps({k: v for k, v in r.items() if k not in ("key", "captions")}) for r in rows],
                    pa.string(),
                ),
            }
        )
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def count_meta_rows(path: Path) -> int:
    """Rows of a metadata file without parsing them (JSONL: non-blank lines; parquet: its footer)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _read_meta_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    if "key" not in table.column_names:
        raise ValueError(f"{path}: no 'key' column")
    cols = table.to_pydict()
    rows = []
    for i, key in enumerate(cols["key"]):
        row = json.loads(cols["extra"][i]) if "extra" in cols and cols["extra"][i] else {}
        rows.append({"key": key, "captions": cols["captions"][i] if "captions" in cols else [], **row})
    return rows
