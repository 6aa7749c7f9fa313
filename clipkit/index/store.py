"""Saving and loading an index folder's index.faiss and index.json, with validation; folder file names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.files import atomic_path, write_json_atomic
from clipkit.index.build import get_search_params, metric_name
from clipkit.index.errors import IndexFileError, faiss_message

INDEX_FILE = "index.faiss"
INDEX_INFO_FILE = "index.json"
REPORT_FILE = "report.json"
META_FILE = "meta.jsonl"
META_PARQUET_FILE = "meta.parquet"
EMBED_INFO_FILE = "embed.json"
IMAGE_EMB_FILE = "image_emb.npy"
TEXT_EMB_FILE = "text_emb.npy"
TEXT_TO_IMAGE_FILE = "text_to_image.npy"
PART_INFO_FILE = "part.json"
PARTS_DIR = "parts"
DEFAULT_INDEX_SUBDIR = "index"


def save_index(out_dir: Path, index: faiss.Index, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes `index.faiss` and then `index.json` into out_dir (each via a temporary file and rename).

    Args:
        out_dir: folder to write into (created if missing).
        index: the index.
        meta: extra JSON-serializable info; "factory" should be among it (null otherwise). "metric", "dim"
            and "count" are taken from the index; if meta gives them they must agree.

    Returns:
        The info written to index.json.

    Raises:
        ValueError: if meta contradicts the index.
    """
    out_dir = Path(out_dir)
    computed = {"metric": metric_name(index.metric_type), "dim": int(index.d), "count": int(index.ntotal)}
    for key, value in computed.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"save_index: meta[{key!r}] = {meta[key]!r} but the index has {value!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
        file_bytes = tmp.stat().st_size
    info = {
        "factory": None,
        **meta,
        **computed,
        "search_params": get_search_params(index),
        "faiss_version": faiss.__version__,
        "file_bytes": file_bytes,
    }
    write_json_atomic(out_dir / INDEX_INFO_FILE, info)
    return info


def load_index(out_dir: Path) -> tuple[faiss.Index, dict[str, Any]]:
    """Reads an index folder written by `save_index` and checks that its files agree.

    Args:
        out_dir: the index folder.

    Returns:
        (index, info from index.json).

    Raises:
        FileNotFoundError: if index.faiss or index.json is missing.
        IndexFileError: if index.json is unreadable or lacks "dim"/"count", index.faiss has another size
            than recorded, faiss cannot read it, or its dim/count/metric differ from index.json.
    """
    out_dir = Path(out_dir)
    index_path, info_path = out_dir / INDEX_FILE, out_dir / INDEX_INFO_FILE
    for path in (index_path, info_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (not an index folder written by save_index?)")
    info = read_json(info_path)
    for key in ("dim", "count"):
        if key not in info:
            raise IndexFileError(f"{info_path}: missing key {key!r}")
    expected_bytes = info.get("file_bytes")
    actual_bytes = index_path.stat().st_size
    if expected_bytes is not None and actual_bytes != expected_bytes:
        raise IndexFileError(
            f"{index_path}: {actual_bytes} bytes but {info_path} records {expected_bytes} (truncated or replaced?)"
        )
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise IndexFileError(f"{index_path}: faiss cannot read it (corrupt or truncated?): {faiss_message(e)}") from e
    found = {"dim": int(index.d), "count": int(index.ntotal), "metric": metric_name(index.metric_type)}
    for key, value in found.items():
        if key in info and info[key] != value:
            raise IndexFileError(f"{index_path}: {key} is {value!r} but {info_path} says {info[key]!r}")
    return index, info


def load_npy(path: Path, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from e
    if arr.ndim != ndim:
        raise ValueError(f"{path}: expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise IndexFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
