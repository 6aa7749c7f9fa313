"""Searching an index (with optional exact re-ranking), exact search and recall@k."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from clipkit.index.build import metric_name, metric_type
from clipkit.index.rows import row_reader

EXACT_CHUNK_ROWS = 8192  # rows per exact-search step: [Q, 8192] float32 scores at a time
RERANK_BLOCK_ELEMENTS = 1 << 21  # gathered candidate floats per re-ranking block (8 MiB)
# Exact re-ranking: a PQ index returns factor * k candidates, re-scored with the original vectors; the factor is
# tuned from RERANK_FACTORS with nprobe (dense CLIP neighbourhoods needed 40 at PQ32 for recall@10 0.95).
RERANK_FACTOR = 10
RERANK_FACTORS = (4, 10, 20, 40, 80)


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    rerank_vectors: Any = None,
    rerank_factor: int = RERANK_FACTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Searches the k nearest vectors of each query.

    Queries are not normalized here: for cosine similarity with "ip", the caller L2-normalizes them.

    Args:
        index: a filled index.
        queries: [Q, D] (or [D] for one query, treated as [1, D]).
        k: hits per query; clamped to the index size.
        rerank_vectors: the indexed vectors ([N, D] array or `MappedRows`, row i = id i): when given, the index
            returns rerank_factor * k candidates, which are re-scored exactly with these and the best k kept.
        rerank_factor: candidates per hit when re-ranking.

    Returns:
        (scores [Q, k'] float32, ids [Q, k'] int64), k' = min(k, index.ntotal), best first. Scores are
        inner products ("ip", higher is better) or squared distances ("l2", lower is better). An
        approximate index may return fewer than k' hits: the rest have id -1 (and score -inf / +inf).

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
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = min(int(k), index.ntotal)
    if rerank_vectors is None:
        scores, ids = index.search(q, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
    _, candidates = index.search(q, min(max(k * int(rerank_factor), k), index.ntotal))  # [Q, k * factor]
    return rerank(q, candidates.astype(np.int64, copy=False), rerank_vectors, k, metric_name(index.metric_type))


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: Any, k: int, metric: str = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Re-scores candidate ids exactly and keeps the best k per query.

    Args:
        queries: [Q, D] float32.
        candidates: [Q, C] int64 ids from an approximate search (-1 = none).
        vectors: [N, D] array or `MappedRows`: row i is the vector of id i.
        k: hits to keep per query (<= C).
        metric: "ip" or "l2".

    Returns:
        (scores [Q, k] float32, ids [Q, k] int64), best first; missing hits have id -1.
    """
    rows = row_reader(vectors, "rerank vectors")
    valid = candidates >= 0  # [Q, C]
    worst = -np.inf if metric == "ip" else np.inf
    scores = np.full(candidates.shape, worst, np.float32)  # [Q, C]
    # Queries per block: the gathered candidates [B, C, D] float32 stay near RERANK_BLOCK_ELEMENTS * 4 bytes.
    block = max(1, RERANK_BLOCK_ELEMENTS // max(1, candidates.shape[1] * queries.shape[1]))
    for start in range(0, len(queries), block):
        stop = start + block
        cand_ids, ok = candidates[start:stop], valid[start:stop]  # [B, C]
        unique = np.unique(cand_ids[ok])  # [U] rows to read, sorted
        if unique.size == 0:
            continue
        fetched = rows.take(unique)  # [U, D]
        cand = fetched[np.searchsorted(unique, np.where(ok, cand_ids, unique[0]))]  # [B, C, D]
        q = queries[start:stop]  # [B, D]
        if metric == "ip":
            s = np.einsum("bcd,bd->bc", cand, q)
        else:
            s = np.einsum("bcd,bcd->bc", cand, cand) - 2 * np.einsum("bcd,bd->bc", cand, q) + (q * q).sum(1)[:, None]
        scores[start:stop] = np.where(ok, s, worst)
    order = np.argsort(-scores if metric == "ip" else scores, axis=1, kind="stable")[:, :k]  # [Q, k]
    ids = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(candidates, order, 1), -1)
    return np.take_along_axis(scores, order, 1), ids


def exact_search(
    vectors: Any, queries: np.ndarray, k: int, metric: str = "ip", chunk_rows: int = EXACT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows by a chunked scan (the ground truth for recall; the set may exceed RAM).

    Ties rank the lower row first. Ours rather than `faiss.knn`, which gives the same ids (tests pin it) but needs
    the whole [N, D] array in RAM: this scan reads `MappedRows` window by window from disk.

    Args:
        vectors: [N, D] array, memory map or `MappedRows`.
        queries: [Q, D].
        k: hits per query (clamped to N).
        metric: "ip" (higher is better) or "l2" (squared distance, lower is better).
        chunk_rows: rows scored per step ([Q, chunk_rows] float32 scores at a time).

    Returns:
        (scores [Q, k] float32, ids [Q, k] int64), best first.
    """
    x = row_reader(vectors, "vectors")
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} does not match vector dim {x.shape[1]}")
    metric_type(metric)
    k = min(int(k), x.shape[0])
    best = np.full((len(q), 0), -np.inf, np.float32)  # [Q, <=k] higher-is-better keys
    best_ids = np.zeros((len(q), 0), np.int64)
    for start in range(0, x.shape[0], chunk_rows):
        chunk = x.read(start, start + chunk_rows)  # [c, D]
        s = q @ chunk.T  # [Q, c]
        if metric == "l2":  # -(|x|^2 - 2 q.x): the same order as -|q - x|^2
            s = 2 * s - (chunk**2).sum(1)[None, :]
        del chunk
        kk = min(k, s.shape[1])
        top = (
            np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            if kk < s.shape[1]
            else np.broadcast_to(np.arange(s.shape[1]), s.shape)
        )  # [Q, kk] this chunk's best, then merged with the best so far ([Q, <=2k])
        keys = np.concatenate([best, np.take_along_axis(s, top, 1)], axis=1)
        ids = np.concatenate([best_ids, top + start], axis=1)
        if keys.shape[1] > k:
            keep = np.argpartition(-keys, k - 1, axis=1)[:, :k]
            keys, ids = np.take_along_axis(keys, keep, 1), np.take_along_axis(ids, keep, 1)
        best, best_ids = keys, ids
    order = np.lexsort((best_ids, -best), axis=1) if best.size else np.zeros_like(best_ids)  # score desc, id asc
    best, best_ids = np.take_along_axis(best, order, 1), np.take_along_axis(best_ids, order, 1)
    if metric == "l2":
        best = (q**2).sum(1, keepdims=True) - best
    return best.astype(np.float32), best_ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approximate top k ∩ exact top k| / k (k clamped to the exact lists' width).

    faiss' `knn_intersection_measure` on the first k columns (a missing hit, id -1, never matches an exact id);
    nan for no query.
    """
    k = min(int(k), exact_ids.shape[1])
    if len(exact_ids) == 0 or k == 0:
        return float("nan")
    return float(knn_intersection_measure(np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]))
