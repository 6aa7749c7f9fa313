"""FAISS indexes over exported embeddings: choose, build, save/load with validation, search, query by folder.

Never imports torch: building and querying an index needs only numpy arrays (queries are encoded by the
caller). An index folder holds:

- `index.faiss`: the FAISS index (faiss.write_index);
- `index.json`: {"factory", "metric", "dim", "count", "faiss_version", "file_bytes", ...}, written last
  and checked against the index on load;
- `meta.jsonl` and `embed.json`: copied from the embedding folder (`build_index_dir`), so the index
  folder answers queries on its own.

An embedding folder (written by `clipkit embed`) holds `image_emb.npy` [N, D] float32 (L2-normalized),
`text_emb.npy` [M, D], `text_to_image.npy` [M] int64, `meta.jsonl` (one JSON object per image row, with
"key" and "captions") and `embed.json` (model name, dim, counts).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

# Exact search up to this many vectors: a flat scan of 100k x 512 float32 (200 MB) takes milliseconds
# per query batch, and exact results need no tuning.
FLAT_MAX_VECTORS = 100_000
# HNSW up to this many vectors (and only if it fits the memory budget); IVF-PQ beyond.
HNSW_MAX_VECTORS = 2_000_000
HNSW_M = 32  # graph neighbours per node (2 * HNSW_M on the base level)
IVF_MIN_LISTS = 256
IVF_MAX_LISTS = 65_536
PQ_MAX_SUBQUANTIZERS = 64  # PQ code bytes per vector at most (x8: 8 bits per subquantizer)
# Training rows: faiss warns below 39 points per centroid and subsamples above 256; 8-bit PQ codebooks
# have 256 centroids each, hence at least 256 * 39 rows.
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_ROWS = 256 * 39
ADD_CHUNK_ROWS = 65_536
# Search-time defaults stored in the index file (faiss persists nprobe and efSearch).
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64

INDEX_FILE = "index.faiss"
INDEX_INFO_FILE = "index.json"
META_FILE = "meta.jsonl"
EMBED_INFO_FILE = "embed.json"
IMAGE_EMB_FILE = "image_emb.npy"
TEXT_EMB_FILE = "text_emb.npy"
TEXT_TO_IMAGE_FILE = "text_to_image.npy"
DEFAULT_INDEX_SUBDIR = "index"

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class IndexFileError(ValueError):
    """An index folder's files are corrupt, truncated or disagree with each other."""


def choose_factory(n: int, d: int, memory_budget_bytes: int | None = None) -> str:
    """Picks a FAISS index factory string for n vectors of dimension d.

    The rule:
    - n <= FLAT_MAX_VECTORS: "Flat" (exact).
    - n <= HNSW_MAX_VECTORS and the HNSW graph plus raw vectors (about n * (4 d + 8 HNSW_M) bytes) fit
      the budget (or no budget): f"HNSW{HNSW_M},Flat" (no training, high recall, float vectors in RAM).
    - otherwise "IVF{nlist},PQ{m}x8": nlist = the power of two nearest 4 sqrt(n), clamped to
      [IVF_MIN_LISTS, IVF_MAX_LISTS] (faiss's guideline is 4-16 sqrt(n)); m = the largest divisor of d
      that is at most min(PQ_MAX_SUBQUANTIZERS, d // 4) (4+ dims per code byte) and whose memory, about
      n * (m + 8) + nlist * d * 4 bytes (codes, ids, centroids), fits the budget.

    Args:
        n: number of vectors.
        d: vector dimension.
        memory_budget_bytes: RAM the index may take; None for no limit.

    Returns:
        A factory string for faiss.index_factory.

    Raises:
        ValueError: if n or d is not positive, or no IVF-PQ configuration fits the budget.
    """
    if n < 1 or d < 1:
        raise ValueError(f"choose_factory: need n >= 1 and d >= 1, got n={n}, d={d}")
    if n <= FLAT_MAX_VECTORS:
        return "Flat"
    hnsw_bytes = n * (4 * d + 8 * HNSW_M)  # float vectors + 2*M int32 base-level links
    if n <= HNSW_MAX_VECTORS and (memory_budget_bytes is None or hnsw_bytes <= memory_budget_bytes):
        return f"HNSW{HNSW_M},Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = min(max(nlist, IVF_MIN_LISTS), IVF_MAX_LISTS)
    for m in sorted((m for m in range(1, d + 1) if d % m == 0), reverse=True):
        if m > min(PQ_MAX_SUBQUANTIZERS, max(1, d // 4)):
            continue
        if memory_budget_bytes is None or n * (m + 8) + nlist * d * 4 <= memory_budget_bytes:
            return f"IVF{nlist},PQ{m}x8"
    raise ValueError(
        f"choose_factory: no index for n={n}, d={d} fits memory_budget_bytes={memory_budget_bytes} "
        f"(IVF{nlist},PQ1x8 needs about {n * 9 + nlist * d * 4} bytes)"
    )


def build_index(vectors: np.ndarray, factory: str | None = None, metric: str = "ip", seed: int = 0) -> faiss.Index:
    """Builds a FAISS index over vectors: trains it if needed, then adds every row (ids = row numbers).

    Args:
        vectors: [N, D] float32 (float16/float64 are cast chunk by chunk; a memory map is read in chunks).
        factory: faiss.index_factory string; None picks one with `choose_factory`.
        metric: "ip" (inner product; cosine on L2-normalized vectors) or "l2" (squared distance).
        seed: seed of the random training sample.

    Returns:
        The filled index, with search defaults set (IVF nprobe = DEFAULT_NPROBE, HNSW efSearch =
        DEFAULT_EF_SEARCH); change them with `set_search_params`.

    Raises:
        ValueError: on a bad shape, metric or factory string, or non-finite vectors.
    """
    x = _as_matrix(vectors, "vectors")
    n, d = x.shape
    factory = factory or choose_factory(n, d)
    try:
        index = faiss.index_factory(d, factory, _metric_type(metric))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build factory {factory!r} for dim {d}: {_faiss_message(e)}") from e
    if not index.is_trained:
        index.train(_training_sample(x, index, seed))
    with tqdm(total=n, desc=f"index add ({factory})", unit="vec", disable=None) as bar:
        for start in range(0, n, ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(x[start : start + ADD_CHUNK_ROWS], dtype=np.float32)  # [<=65536, D]
            if not np.all(np.isfinite(chunk)):
                raise ValueError(f"vectors rows {start}..{start + len(chunk) - 1}: non-finite values")
            index.add(chunk)
            bar.update(len(chunk))
    _set_default_search_params(index)
    return index


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Sets search-time knobs in place (they are saved with the index).

    Args:
        index: an index from `build_index` or `load_index`.
        nprobe: IVF lists visited per query (clamped to nlist); more = higher recall, slower.
        ef_search: HNSW candidate list size per query; more = higher recall, slower.

    Raises:
        ValueError: if a knob is given for an index that has no such knob.
    """
    if nprobe is not None:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            raise ValueError(f"nprobe applies to IVF indexes only, not {type(index).__name__}")
        ivf.nprobe = max(1, min(int(nprobe), ivf.nlist))
    if ef_search is not None:
        hnsw = _hnsw_of(index)
        if hnsw is None:
            raise ValueError(f"ef_search applies to HNSW indexes only, not {type(index).__name__}")
        hnsw.efSearch = max(1, int(ef_search))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Searches the k nearest vectors of each query.

    Queries are not normalized here: for cosine similarity with "ip", the caller L2-normalizes them.

    Args:
        index: a filled index.
        queries: [Q, D] (or [D] for one query, treated as [1, D]).
        k: hits per query; clamped to the index size.

    Returns:
        (scores [Q, k'] float32, ids [Q, k'] int64), k' = min(k, index.ntotal), best first. Scores are
        inner products ("ip", higher is better) or squared distances ("l2", lower is better). An
        approximate index may return fewer than k' hits: the rest have id -1.

    Raises:
        ValueError: if the query dim differs from the index dim, k < 1 or the index is empty.
    """
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries: expected [Q, D], got shape {q.shape}")
    if q.shape[1] != index.d:
        raise ValueError(f"query dim {q.shape[1]} does not match index dim {index.d}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index.ntotal == 0:
        raise ValueError("cannot search an empty index")
    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), min(int(k), index.ntotal))
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


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
    computed = {"metric": _metric_name(index.metric_type), "dim": int(index.d), "count": int(index.ntotal)}
    for key, value in computed.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"save_index: meta[{key!r}] = {meta[key]!r} but the index has {value!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    tmp = index_path.with_name(INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    file_bytes = tmp.stat().st_size
    os.replace(tmp, index_path)
    info = {"factory": None, **meta, **computed, "faiss_version": faiss.__version__, "file_bytes": file_bytes}
    _write_json(out_dir / INDEX_INFO_FILE, info)
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
    info = _read_json(info_path)
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
        raise IndexFileError(f"{index_path}: faiss cannot read it (corrupt or truncated?): {_faiss_message(e)}") from e
    found = {"dim": int(index.d), "count": int(index.ntotal), "metric": _metric_name(index.metric_type)}
    for key, value in found.items():
        if key in info and info[key] != value:
            raise IndexFileError(f"{index_path}: {key} is {value!r} but {info_path} says {info[key]!r}")
    return index, info


def load_embeddings(emb_dir: Path) -> dict[str, Any]:
    """Opens an embedding folder written by `clipkit embed`, memory-mapping the arrays.

    Args:
        emb_dir: the folder.

    Returns:
        {"dir": Path, "image_emb": [N, D] memmap, "text_emb": [M, D] memmap or None,
        "text_to_image": [M] memmap or None, "meta": N dicts from meta.jsonl, "info": embed.json}.
        text_emb.npy and text_to_image.npy are optional (an image-only export) but must come together.

    Raises:
        FileNotFoundError: naming a missing required file (image_emb.npy, meta.jsonl, embed.json) or the
            missing half of text_emb.npy / text_to_image.npy.
        ValueError: naming the file whose shape, row count or contents disagree.
    """
    emb_dir = Path(emb_dir)
    for name in (IMAGE_EMB_FILE, META_FILE, EMBED_INFO_FILE):
        if not (emb_dir / name).is_file():
            raise FileNotFoundError(f"{emb_dir / name}: missing (not an embedding folder from `clipkit embed`?)")
    image_emb = _load_npy(emb_dir / IMAGE_EMB_FILE, ndim=2)  # [N, D]
    n, d = image_emb.shape
    info = _read_json(emb_dir / EMBED_INFO_FILE)
    if "dim" in info and info["dim"] != d:
        raise ValueError(f"{emb_dir / EMBED_INFO_FILE}: dim {info['dim']} but {IMAGE_EMB_FILE} has dim {d}")
    meta = read_meta(emb_dir / META_FILE)
    if len(meta) != n:
        raise ValueError(f"{emb_dir / META_FILE}: {len(meta)} rows but {IMAGE_EMB_FILE} has {n}")
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
        "image_emb": image_emb,
        "text_emb": text_emb,
        "text_to_image": text_to_image,
        "meta": meta,
        "info": info,
    }


def build_index_dir(emb_dir: Path, out_dir: Path | None = None, factory: str | None = None) -> dict[str, Any]:
    """Builds an inner-product index over the image embeddings of an embedding folder and saves it.

    The index folder gets copies of meta.jsonl and embed.json, so it answers queries on its own.

    Args:
        emb_dir: embedding folder (see the module docstring).
        out_dir: index folder; default `emb_dir / "index"`.
        factory: faiss factory string; None picks one with `choose_factory`.

    Returns:
        The info written to index.json, with "factory", "metric", "dim", "count", "faiss_version",
        "file_bytes", "source" ("image_emb"), "embeddings_dir" and "embed" (the embed.json contents).
    """
    emb_dir = Path(emb_dir)
    out_dir = Path(out_dir) if out_dir is not None else emb_dir / DEFAULT_INDEX_SUBDIR
    emb = load_embeddings(emb_dir)
    image_emb = emb["image_emb"]  # [N, D], L2-normalized by `clipkit embed`: inner product = cosine
    factory = factory or choose_factory(*image_emb.shape)
    index = build_index(image_emb, factory, metric="ip")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (META_FILE, EMBED_INFO_FILE):
        if (out_dir / name).resolve() != (emb_dir / name).resolve():
            shutil.copyfile(emb_dir / name, out_dir / name)
    # index.json is written last: its presence marks a complete index folder.
    meta = {
        "factory": factory,
        "source": "image_emb",
        "embeddings_dir": str(emb_dir.resolve()),
        "embed": emb["info"],
    }
    return save_index(out_dir, index, meta)


def query_index_dir(index_dir: Path, query_vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Searches an index folder and attaches each hit's metadata.

    Args:
        index_dir: folder written by `build_index_dir`.
        query_vectors: [Q, D] (or [D]) queries, L2-normalized by the caller.
        k: hits per query (clamped to the index size).

    Returns:
        Per query, its hits best first: {"rank" (1 = best), "score", "id" (image row), "key", "captions"}.

    Raises:
        FileNotFoundError: if the index folder lacks a file.
        IndexFileError: if meta.jsonl does not have one row per indexed vector.
        ValueError: on a query dim mismatch.
    """
    index_dir = Path(index_dir)
    index, _ = load_index(index_dir)
    meta_path = index_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (build the index folder with build_index_dir)")
    meta = read_meta(meta_path)
    if len(meta) != index.ntotal:
        raise IndexFileError(f"{meta_path}: {len(meta)} rows but {index_dir / INDEX_FILE} holds {index.ntotal}")
    scores, ids = search(index, query_vectors, k)
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        hits = []
        for score, idx in zip(row_scores, row_ids, strict=True):
            if idx < 0:  # approximate index found fewer than k
                break
            row = meta[idx]
            hits.append(
                {
                    "rank": len(hits) + 1,
                    "score": float(score),
                    "id": int(idx),
                    "key": row["key"],
                    "captions": row.get("captions", []),
                }
            )
        results.append(hits)
    return results


def read_meta(path: Path) -> list[dict[str, Any]]:
    """Reads meta.jsonl: one JSON object with a "key" per line (blank lines skipped).

    Raises:
        ValueError: naming the file and line of an invalid row.
    """
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


def _training_sample(x: np.ndarray, index: faiss.Index, seed: int) -> np.ndarray:
    """[n_train, D] float32 random rows of x (sorted row order, so a memory map is read forward)."""
    n = x.shape[0]
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    n_train = min(n, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    if not np.all(np.isfinite(sample)):
        raise ValueError("vectors: non-finite values in the training sample")
    return sample


def _set_default_search_params(index: faiss.Index) -> None:
    if faiss.try_extract_index_ivf(index) is not None:
        set_search_params(index, nprobe=DEFAULT_NPROBE)
    if _hnsw_of(index) is not None:
        set_search_params(index, ef_search=DEFAULT_EF_SEARCH)


def _hnsw_of(index: faiss.Index) -> Any:
    """The HNSW graph of an HNSW index (possibly behind a pre-transform), else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index.hnsw if hasattr(index, "hnsw") else None


def _as_matrix(vectors: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(vectors)  # no copy: a memory map stays one, cast per chunk
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected floating-point vectors, got dtype {x.dtype}")
    return x


def _metric_type(metric: str) -> int:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    return _METRICS[metric]


def _metric_name(metric_type: int) -> str:
    for name, value in _METRICS.items():
        if value == metric_type:
            return name
    return f"faiss_metric_{metric_type}"


def _load_npy(path: Path, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from e
    if arr.ndim != ndim:
        raise ValueError(f"{path}: expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise IndexFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _faiss_message(error: Exception) -> str:
    # faiss errors span lines ("Error in <C++ signature> at <file>:<line>: <what>"): keep one line.
    return " ".join(str(error).split()) or repr(error)
