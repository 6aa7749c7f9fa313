"""Embedding folders (single and parts layouts): writing them (for `clipkit embed`), reading them, their metadata
files, and the shard each row came from."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.files import atomic_path, write_json_atomic
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
    load_npy,
    read_json,
)

ARRAY_DTYPES = ("float32", "float16")
META_FORMATS = ("jsonl", "parquet")


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file and rename (np.save on a path would append .npy to the temporary name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_single(
    out_dir: Path,
    image: np.ndarray,
    text: np.ndarray,
    text_to_image: np.ndarray,
    meta: Sequence[dict[str, Any]],
    info: dict[str, Any],
    dtype: str = "float32",
) -> None:
    """Writes a single-layout embedding folder: the three arrays, meta.jsonl, then embed.json (last: the marker).

    Args:
        out_dir: the folder (created).
        image: [N, D] L2-normalized image embeddings.
        text: [M, D] caption embeddings ([0, 0] for an image-only export).
        text_to_image: [M] int64 image row of each caption.
        meta: N row dicts ({"key", "captions", ...}).
        info: facts stored in embed.json (model, shards, shard_rows, skipped).
        dtype: "float32" or "float16" for the stored vectors.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / IMAGE_EMB_FILE, image.astype(dtype))
    save_npy(out / TEXT_EMB_FILE, text.astype(dtype))
    save_npy(out / TEXT_TO_IMAGE_FILE, np.asarray(text_to_image, np.int64))
    write_meta(out / META_FILE, meta)
    facts = {"dim": int(image.shape[1]), "n_images": len(meta), "n_texts": len(text), "dtype": dtype}
    write_json_atomic(out / EMBED_INFO_FILE, {**info, **facts})


def part_name(i: int) -> str:
    """The folder name of part i (one part per input shard)."""
    return f"part-{i:05d}"


def part_matches(part_dir: Path, url: str, recipe: dict[str, Any]) -> bool:
    """Whether part_dir is finished (part.json exists) by a run with this shard and settings; else False.

    Raises:
        ValueError: if it is finished but by another run (mixing would corrupt the export).
    """
    marker = Path(part_dir) / PART_INFO_FILE
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged marker: redo the part
    mine = {"shard": str(url), **recipe}
    diff = {k: (done.get(k), v) for k, v in mine.items() if done.get(k) != v}
    if diff:
        raise ValueError(f"{marker}: made by another run ({diff}: found vs now); use a new --out or delete it")
    return True


def write_part(
    part_dir: Path,
    image: np.ndarray,
    text: np.ndarray | None,
    text_to_image: np.ndarray | None,
    meta: Sequence[dict[str, Any]],
    facts: dict[str, Any],
    dtype: str = "float32",
    meta_format: str = "jsonl",
) -> None:
    """Writes one part of a parts-layout folder; part.json (its done-marker: facts + counts) goes last.

    Args:
        part_dir: `<folder>/parts/<part_name(i)>`.
        image: [N, D] image embeddings; text / text_to_image: [M, D] / [M], or None for an image-only export.
        meta: N row dicts.
        facts: stored in part.json ("shard", "index", the run's settings, "skipped").
        dtype: stored vector dtype; meta_format: "jsonl" or "parquet".
    """
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / PART_INFO_FILE).unlink(missing_ok=True)  # redoing a part: it is not done until the end
    save_npy(part_dir / IMAGE_EMB_FILE, image.astype(dtype))
    if text is not None:
        save_npy(part_dir / TEXT_EMB_FILE, text.astype(dtype))
        save_npy(part_dir / TEXT_TO_IMAGE_FILE, np.asarray(text_to_image, np.int64))
    meta_name = META_PARQUET_FILE if meta_format == "parquet" else META_FILE
    for stale in (META_FILE, META_PARQUET_FILE):
        if stale != meta_name:
            (part_dir / stale).unlink(missing_ok=True)
    write_meta(part_dir / meta_name, meta)
    counts = {"n_images": len(meta), "n_texts": 0 if text is None else len(text), "dim": int(image.shape[1])}
    write_json_atomic(part_dir / PART_INFO_FILE, {**facts, **counts})


def write_manifest_if_complete(out_dir: Path, urls: Sequence[str], facts: dict[str, Any]) -> bool:
    """Writes `out_dir/embed.json` for a parts-layout folder once every part of urls is done; returns whether it did.

    The manifest: facts + {"layout": "parts", "parts", "shards", "dim", "n_images", "n_texts", "skipped"}.
    """
    out_dir = Path(out_dir)
    parts = []
    for i in range(len(urls)):
        marker = out_dir / PARTS_DIR / part_name(i) / PART_INFO_FILE
        if not marker.is_file():
            return False  # another process is still on it: the last one to finish writes the manifest
        parts.append(json.loads(marker.read_text(encoding="utf-8")))
    skipped: Counter = Counter()
    for p in parts:
        skipped.update(p.get("skipped", {}))
    dims = {p["dim"] for p in parts if p["n_images"]}
    manifest = {
        **facts,
        "layout": "parts",
        "parts": [part_name(i) for i in range(len(urls))],
        "shards": [str(u) for u in urls],
        "dim": dims.pop() if len(dims) == 1 else None,
        "n_images": sum(p["n_images"] for p in parts),
        "n_texts": sum(p["n_texts"] for p in parts),
        "skipped": dict(skipped),
    }
    write_json_atomic(out_dir / EMBED_INFO_FILE, manifest)
    return True


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
    out["info"] = read_json(emb_dir / EMBED_INFO_FILE)
    d = out["image_emb"].shape[1]
    if "dim" in out["info"] and out["info"]["dim"] != d:
        raise ValueError(f"{emb_dir / EMBED_INFO_FILE}: dim {out['info']['dim']} but {IMAGE_EMB_FILE} has dim {d}")
    return out


def _load_single(emb_dir: Path, with_meta: bool, needs_info: bool = True) -> dict[str, Any]:
    """The single layout's arrays and metadata (also one part of the parts layout)."""
    meta_path = find_meta_file(emb_dir)
    required = [IMAGE_EMB_FILE] + ([EMBED_INFO_FILE] if needs_info else [])
    for name in required:
        if not (emb_dir / name).is_file():
            raise FileNotFoundError(f"{emb_dir / name}: missing (not an embedding folder from `clipkit embed`?)")
    if meta_path is None:
        raise FileNotFoundError(f"{emb_dir / META_FILE}: missing (not an embedding folder from `clipkit embed`?)")
    image_emb = load_npy(emb_dir / IMAGE_EMB_FILE, ndim=2)  # [N, D]
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
        text_emb = load_npy(emb_dir / TEXT_EMB_FILE, ndim=2)  # [M, D]
        text_to_image = load_npy(emb_dir / TEXT_TO_IMAGE_FILE, ndim=1)  # [M]
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
    info = read_json(info_path)
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


def text_rows(emb: dict[str, Any]) -> MappedRows | None:
    """The windowed reader of an opened embedding folder's caption vectors (None for an image-only export)."""
    x = emb["text_emb"]
    if x is None or len(x) == 0:
        return None
    return x if isinstance(x, MappedRows) else MappedRows([emb["dir"] / TEXT_EMB_FILE])


def shard_sources(emb: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The shard of every image row, as consecutive runs: [{"shard": absolute path, "rows": n}, ...] in row order.

    Row r's image is the member `<key>.<image ext>` of the run's shard that holds r (the key is in its metadata
    row). Parts layout: one run per part (part.json's "shard"); single layout: embed.json's "shards" with
    "shard_rows". None when the folder does not record them (an image folder's export, an older export) or a shard
    is not a local file (a URL or pipe: spec).
    """
    if emb["layout"] == "parts":
        pairs = []
        for name in emb["info"]["parts"]:
            part = read_json(emb["dir"] / PARTS_DIR / name / PART_INFO_FILE)
            pairs.append((part.get("shard"), part.get("n_images", 0)))
    else:
        shards, rows = emb["info"].get("shards"), emb["info"].get("shard_rows")
        if not isinstance(shards, list) or not isinstance(rows, list) or len(shards) != len(rows):
            return None
        pairs = list(zip(shards, rows, strict=True))
    out = []
    for shard, n in pairs:
        if not isinstance(shard, str) or not isinstance(n, int) or ":" in shard.split("/")[0]:
            return None  # not recorded, or a URL / pipe: spec
        out.append({"shard": str(Path(shard).resolve()), "rows": n})
    if sum(p["rows"] for p in out) != len(emb["image_emb"]):
        return None
    return out


def find_meta_file(folder: Path) -> Path | None:
    """meta.jsonl or meta.parquet of a folder, whichever exists (None if neither)."""
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
