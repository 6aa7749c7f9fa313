"""Index folders: build one from an embedding folder (tune, measure, save), open it and query it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.files import atomic_path, write_json_atomic
from clipkit.index.build import build_index, choose_factory, hnsw_of, is_compressed
from clipkit.index.embeddings import find_meta_file, image_rows, load_embeddings, read_meta, shard_sources, text_rows
from clipkit.index.errors import IndexFileError
from clipkit.index.measure import (
    DEFAULT_K,
    DEFAULT_TARGET_RECALL,
    evaluate_index,
    index_bytes,
    peak_rss_bytes,
    timed_exact,
    tune_search_params,
)
from clipkit.index.rows import MappedRows
from clipkit.index.search import RERANK_FACTOR, search
from clipkit.index.store import (
    DEFAULT_INDEX_SUBDIR,
    EMBED_INFO_FILE,
    INDEX_FILE,
    INDEX_INFO_FILE,
    META_FILE,
    META_PARQUET_FILE,
    REPORT_FILE,
    load_index,
    save_index,
)

CAPTIONS_SUBDIR = "captions"  # the caption index inside an index folder
EXACT_IN_RAM_BYTES = 4 << 30
_DIRECT_MAP_LOCK = threading.Lock()  # without a budget, the exact baseline of a report loads vectors up to this size
DEFAULT_EVAL_QUERIES = 1000


def build_index_dir(
    emb_dir: Path,
    out_dir: Path | None = None,
    factory: str | None = None,
    *,
    memory_budget_bytes: int | None = None,
    rerank: bool | None = None,
    k: int = DEFAULT_K,
    n_queries: int = DEFAULT_EVAL_QUERIES,
    target_recall: float = DEFAULT_TARGET_RECALL,
    evaluate: bool = True,
    seed: int = 0,
    captions: bool = False,
) -> dict[str, Any]:
    """Builds an inner-product index over the image embeddings of an embedding folder, tunes, measures, saves it.

    Steps: choose the factory from (N, D, budget) unless given; train on a sample and add the vectors in
    windows from disk; with `evaluate`, take held-out queries (up to n_queries caption embeddings, which
    are never in an image index; for an image-only export, image rows searched leave-one-out), tune nprobe /
    efSearch on half of them to reach target_recall@k, and report recall@k, queries/s and bytes on the
    other half (`evaluate_index`); save the index, the metadata (merged from the parts), and report.json.

    Args:
        emb_dir: embedding folder (see the module docstring).
        out_dir: index folder; default `emb_dir / "index"`.
        factory: faiss factory string; None picks one with `choose_factory`.
        memory_budget_bytes: RAM for the index and its build (see `build_index`); None for no limit.
        rerank: re-rank candidates exactly with the vectors on disk; None = only for compressed indexes (PQ/SQ).
        k: recall@k measured and tuned for.
        n_queries: held-out queries at most (half tune, half report).
        target_recall: recall@k the search parameters are tuned to reach.
        evaluate: tune and measure (False: keep faiss defaults, no report).
        seed: seed of the training and query samples.
        captions: also build a caption index in `out_dir / "captions"` (one row per caption, its metadata row
            {"key", "captions": [the caption], "image_row"}; measured with image rows as queries), which
            `IndexDir.captions` opens and the search page's caption mode searches.

    Returns:
        The info written to index.json: "factory", "metric", "dim", "count", "faiss_version", "file_bytes",
        "search_params", "rerank" (null or {"vectors": [files], "factor"}), "source" ("image_emb"),
        "sources" (the shard of each row, see `shard_sources`, or null), "embeddings_dir", "embed" (embed.json),
        "meta_file", "report" (or null), "captions" (the caption index's info, or null).

    Raises:
        ValueError: with `captions`, if the folder has no caption embeddings.
    """
    emb_dir = Path(emb_dir)
    out_dir = Path(out_dir) if out_dir is not None else emb_dir / DEFAULT_INDEX_SUBDIR
    emb = load_embeddings(emb_dir, with_meta=False)
    vectors = image_rows(emb)  # [N, D] read in windows: L2-normalized by `clipkit embed`, inner product = cosine
    texts = text_rows(emb)  # [M, D] or None
    settings = dict(
        factory=factory, memory_budget_bytes=memory_budget_bytes, rerank=rerank, k=k, n_queries=n_queries,
        target_recall=target_recall, evaluate=evaluate, seed=seed,
    )  # fmt: skip
    caption_info = None
    if captions:
        if texts is None:
            raise ValueError(f"{emb_dir}: no caption embeddings (exported with --images-only?); build without captions")
        cap_dir = out_dir / CAPTIONS_SUBDIR
        cap_dir.mkdir(parents=True, exist_ok=True)
        meta_file = _write_caption_meta(emb, len(texts), cap_dir)
        caption_info = _build_one(texts, vectors, cap_dir, {"source": "text_emb", "meta_file": meta_file}, **settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_file = _write_index_meta(emb, out_dir)
    if (out_dir / EMBED_INFO_FILE).resolve() != (emb_dir / EMBED_INFO_FILE).resolve():
        shutil.copyfile(emb_dir / EMBED_INFO_FILE, out_dir / EMBED_INFO_FILE)
    meta = {
        "source": "image_emb",
        "sources": shard_sources(emb),
        "embeddings_dir": str(emb_dir.resolve()),
        "embed": emb["info"],
        "meta_file": meta_file,
        "captions": caption_info and {key: caption_info[key] for key in ("factory", "count", "dim")},
    }
    return _build_one(vectors, texts, out_dir, meta, **settings)


def _build_one(
    vectors: MappedRows,
    other: MappedRows | None,
    out_dir: Path,
    meta: dict[str, Any],
    *,
    factory: str | None,
    memory_budget_bytes: int | None,
    rerank: bool | None,
    k: int,
    n_queries: int,
    target_recall: float,
    evaluate: bool,
    seed: int,
) -> dict[str, Any]:
    """Builds, tunes, measures and saves one index of `vectors` (queries for tuning: rows of `other`, which are
    never in this index, else leave-one-out rows of `vectors`); writes report.json, then index.json (last)."""
    n, d = vectors.shape
    factory = factory or choose_factory(n, d, memory_budget_bytes)
    rerank = is_compressed(factory) if rerank is None else rerank
    t0 = time.perf_counter()
    index = build_index(vectors, factory, metric="ip", seed=seed, memory_budget_bytes=memory_budget_bytes)
    build_seconds = time.perf_counter() - t0
    rerank_vectors = vectors if rerank else None
    report = None
    factor = RERANK_FACTOR
    if evaluate:
        report = _tune_and_measure(
            index, vectors, other, rerank_vectors, k, n_queries, target_recall, seed, memory_budget_bytes
        )
        report.update(
            factory=factory,
            build_seconds=build_seconds,
            index_bytes=index_bytes(index),
            bytes_per_vector=index_bytes(index) / n,
            vectors_bytes_on_disk=int(sum(p.stat().st_size for p in vectors.paths)),
            rerank=bool(rerank),
            peak_rss_bytes=peak_rss_bytes(),
        )
        factor = report["tuning"]["rerank_factor"] or RERANK_FACTOR
    out_dir.mkdir(parents=True, exist_ok=True)
    if report is not None:
        write_json_atomic(out_dir / REPORT_FILE, report)
    # index.json is written last: its presence marks a complete index folder.
    meta = {
        "factory": factory,
        **meta,
        "rerank": {"vectors": [str(p.resolve()) for p in vectors.paths], "factor": factor} if rerank else None,
        "memory_budget_bytes": memory_budget_bytes,
        "report": report,
    }
    return save_index(out_dir, index, meta)


def _tune_and_measure(
    index: faiss.Index,
    vectors: MappedRows,
    other: MappedRows | None,
    rerank_vectors: Any,
    k: int,
    n_queries: int,
    target_recall: float,
    seed: int,
    memory_budget_bytes: int | None,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 1)
    if other is not None and len(other) > 0:
        rows = np.sort(rng.choice(len(other), size=min(n_queries, len(other)), replace=False))
        queries = other.take(rows)  # [Q, D] the other modality: never in this index
        exclude, kind = None, "the other modality's rows (captions for images, images for captions; not in the index)"
    else:
        rows = np.sort(rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False))
        queries = vectors.take(rows)
        exclude, kind = rows, "indexed rows, leave-one-out (each query's own row is dropped from its hits)"
    perm = rng.permutation(len(queries))
    half = len(queries) // 2 if len(queries) >= 2 else 0
    tune_q, test_q = queries[perm[:half]], queries[perm[half:]]
    tune_x = exclude[perm[:half]] if exclude is not None else None
    test_x = exclude[perm[half:]] if exclude is not None else None
    tuning = {"param": None, "value": None, "rerank_factor": None, "recall": None, "tried": []}
    if half and (faiss.try_extract_index_ivf(index) is not None or hnsw_of(index) is not None):
        tune_exact, _ = timed_exact(vectors, tune_q, k, "ip", tune_x)
        tuning = tune_search_params(index, tune_q, tune_exact, k, target_recall, rerank_vectors, tune_x)
    factor = tuning["rerank_factor"] or RERANK_FACTOR
    # The exact baseline scans the vectors in RAM when they fit (the budget, else EXACT_IN_RAM_BYTES), as a flat
    # index would; otherwise from disk, as it must.
    n, d = vectors.shape
    in_ram = n * d * 4 <= (memory_budget_bytes if memory_budget_bytes is not None else EXACT_IN_RAM_BYTES)
    baseline = vectors.read(0, n) if in_ram else vectors
    report = evaluate_index(index, baseline, test_q, k, rerank_vectors, test_x, rerank_factor=factor)
    report["exact_baseline"] = "numpy scan of the vectors in RAM" if in_ram else "numpy scan of the vectors on disk"
    return {"queries": kind, "target_recall": target_recall, "tuning": tuning, **report}


def _write_caption_meta(emb: dict[str, Any], n_texts: int, out_dir: Path) -> str:
    """Writes meta.jsonl of a caption index: per caption row {"key", "captions": [caption], "image_row"}, in the
    order `clipkit embed` stored the caption vectors (each image row's captions in turn)."""
    image_row = written = 0
    with atomic_path(out_dir / META_FILE) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for f in emb["meta_files"]:
            for row in read_meta(f):
                for caption in row.get("captions", []):
                    out.write(json.dumps({"key": row["key"], "captions": [caption], "image_row": image_row}) + "\n")
                    written += 1
                image_row += 1
        if written != n_texts:
            raise IndexFileError(f"{emb['dir']}: the metadata lists {written} captions but {n_texts} are embedded")
    return META_FILE


def _write_index_meta(emb: dict[str, Any], out_dir: Path) -> str:
    """Copies (single) or merges (parts) the metadata files into the index folder; returns the file name."""
    files = emb["meta_files"]
    parquet = files[0].suffix == ".parquet"
    name = META_PARQUET_FILE if parquet else META_FILE
    target = out_dir / name
    if len(files) == 1 and files[0].resolve() == target.resolve():
        return name
    with atomic_path(target) as tmp:
        if parquet:
            import pyarrow.parquet as pq

            schema = pq.read_schema(files[0])
            with pq.ParquetWriter(tmp, schema) as writer:
                for f in files:
                    writer.write_table(pq.read_table(f, schema=schema))
        else:
            with open(tmp, "wb") as out:
                for f in files:
                    with open(f, "rb") as src:
                        shutil.copyfileobj(src, out)
    for stale in (META_FILE, META_PARQUET_FILE):  # a rebuild in another metadata format
        if stale != name:
            (out_dir / stale).unlink(missing_ok=True)
    return name


@dataclass
class IndexDir:
    """An opened index folder: the index, its info, metadata rows and (optional) re-ranking vectors.

    Attributes:
        path: the folder.
        index: the faiss index.
        info: index.json.
        meta: one dict per indexed vector ({"key", "captions", ...}).
        rerank_vectors: `MappedRows` of the indexed vectors when the index re-ranks, else None.
        rerank_factor: candidates per hit when re-ranking.
        model: the model folder recorded in embed.json (None if none).
        captions: the caption index in `path / "captions"` when it was built (`build_index_dir(captions=True)`).
    """

    path: Path
    index: faiss.Index
    info: dict[str, Any]
    meta: list[dict[str, Any]]
    rerank_vectors: MappedRows | None = None
    rerank_factor: int = RERANK_FACTOR
    model: str | None = field(default=None)
    captions: IndexDir | None = None

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def vectors(self, ids: Any) -> np.ndarray:
        """[len(ids), D] float32 stored vectors of rows: the re-ranking vectors when kept, else faiss' reconstruction
        (exact for Flat/HNSW, the decoded codes for PQ/SQ; an IVF index gets its direct map on first use)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.rerank_vectors is not None:
            return self.rerank_vectors.take(ids)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            with _DIRECT_MAP_LOCK:
                if ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.make_direct_map()  # 8 bytes per vector
        return self.index.reconstruct_batch(ids).astype(np.float32, copy=False)

    def source_of(self, row: int) -> tuple[str, str] | None:
        """(shard path, sample key) of image row `row`, or None when the index records no shards (`shard_sources`).

        Raises:
            IndexError: if row is not in [0, count).
        """
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} is not in [0, {self.count})")
        sources = self.info.get("sources")
        if not sources:
            return None
        ends = np.cumsum([s["rows"] for s in sources])  # [S] one past the last row of each shard
        return sources[int(np.searchsorted(ends, row, side="right"))]["shard"], self.meta[row]["key"]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], ids [Q, k']) for [Q, D] L2-normalized queries; see `search`."""
        q = np.asarray(queries)
        if q.shape[-1] != self.dim:
            raise ValueError(f"query dim {q.shape[-1]} does not match index dim {self.dim} of {self.path / INDEX_FILE}")
        return search(self.index, q, k, self.rerank_vectors, self.rerank_factor)

    def query(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Per query, its hits best first: {"rank" (1 = best), "score", "id", "key", "captions", "meta"?}."""
        scores, ids = self.search(queries, k)
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, idx in zip(row_scores, row_ids, strict=True):
                if idx < 0:  # approximate index found fewer than k
                    break
                row = self.meta[idx]
                hit = {
                    "rank": len(hits) + 1,
                    "score": float(score),
                    "id": int(idx),
                    "key": row["key"],
                    "captions": row.get("captions", []),
                }
                extra = {key: v for key, v in row.items() if key not in ("key", "captions")}
                if extra:
                    hit["meta"] = extra
                hits.append(hit)
            results.append(hits)
        return results


def open_index_dir(index_dir: Path) -> IndexDir:
    """Loads and cross-checks an index folder written by `build_index_dir`.

    Raises:
        FileNotFoundError: if the index folder lacks a file, or the re-ranking vectors are gone.
        IndexFileError: if index.faiss is corrupt or truncated, or index.json, the metadata or the re-ranking
            vectors disagree with it (count, dim).
    """
    index_dir = Path(index_dir)
    index, info = load_index(index_dir)
    meta_path = find_meta_file(index_dir)
    if meta_path is None:
        raise FileNotFoundError(f"{index_dir / META_FILE}: missing (build the index folder with build_index_dir)")
    meta = read_meta(meta_path)
    if len(meta) != index.ntotal:
        raise IndexFileError(f"{meta_path}: {len(meta)} rows but {index_dir / INDEX_FILE} holds {index.ntotal}")
    rerank_vectors, factor = None, RERANK_FACTOR
    if info.get("rerank"):
        paths = [Path(p) for p in info["rerank"].get("vectors", [])]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing: {index_dir / INDEX_INFO_FILE} re-ranks with these vectors")
        rerank_vectors = MappedRows(paths)
        if rerank_vectors.shape != (index.ntotal, index.d):
            raise IndexFileError(
                f"{paths[0].parent}: re-ranking vectors have shape {rerank_vectors.shape} but "
                f"{index_dir / INDEX_FILE} holds {index.ntotal} x {index.d}"
            )
        factor = int(info["rerank"].get("factor", RERANK_FACTOR))
    model = (info.get("embed") or {}).get("model")
    captions = None
    if (index_dir / CAPTIONS_SUBDIR / INDEX_INFO_FILE).is_file():
        captions = open_index_dir(index_dir / CAPTIONS_SUBDIR)
    return IndexDir(index_dir, index, info, meta, rerank_vectors, factor, model, captions)


def query_index_dir(index_dir: Path, query_vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Searches an index folder and attaches each hit's metadata.

    Args:
        index_dir: folder written by `build_index_dir`.
        query_vectors: [Q, D] (or [D]) queries, L2-normalized by the caller.
        k: hits per query (clamped to the index size).

    Returns:
        Per query, its hits best first: {"rank" (1 = best), "score", "id" (image row), "key", "captions"}
        (plus "meta": the row's other fields, if any).

    Raises:
        FileNotFoundError: if the index folder lacks a file.
        IndexFileError: if meta.jsonl does not have one row per indexed vector.
        ValueError: on a query dim mismatch.
    """
    return open_index_dir(index_dir).query(query_vectors, k)
