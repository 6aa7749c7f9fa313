"""Tuning search parameters to a target recall and measuring recall, queries/s and memory."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import faiss
import numpy as np

from clipkit.index.build import EF_SEARCH_GRID, hnsw_of, metric_name, set_search_params
from clipkit.index.search import RERANK_FACTOR, RERANK_FACTORS, exact_search, recall_at_k, search

DEFAULT_K = 10
DEFAULT_TARGET_RECALL = 0.95
# Wall time spent on each one-query-at-a-time throughput measurement (approximate and exact).
SINGLE_QUERY_SECONDS = 2.0


def tune_search_params(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    k: int = DEFAULT_K,
    target_recall: float = DEFAULT_TARGET_RECALL,
    rerank_vectors: Any = None,
    exclude: np.ndarray | None = None,
) -> dict[str, Any]:
    """Sets the cheapest nprobe / efSearch (and re-ranking depth) whose recall@k on the queries reaches the target.

    Tries growing values (IVF nprobe: 1, 2, 4, ... nlist; HNSW efSearch: EF_SEARCH_GRID) and stops at the first
    that reaches target_recall. With re-ranking, this runs for each factor of RERANK_FACTORS (candidates = factor
    x k) and the setting that answered the tuning queries fastest wins: dense neighbourhoods need deep candidate
    lists more than many lists. If no setting reaches the target, the one with the best recall is kept. Exact
    indexes are left alone.

    Args:
        index: the index (changed in place).
        queries: [Q, D] tuning queries (not the ones the recall is reported on).
        exact_ids: [Q, k] exact top-k ids of the queries.
        k: recall@k.
        target_recall: the recall to reach.
        rerank_vectors: passed to `search` (re-ranked recall is what queries get).
        exclude: [Q] an id to drop from each query's hits (leave-one-out queries that are in the index).

    Returns:
        {"param": "nprobe" | "ef_search" | None, "value", "rerank_factor" (None without re-ranking), "recall",
        "tried": [[value, rerank_factor, recall, seconds], ...]}.
    """
    ivf, hnsw = faiss.try_extract_index_ivf(index), hnsw_of(index)
    if ivf is not None:
        name, grid = "nprobe", [v for v in (2**i for i in range(17)) if v < ivf.nlist] + [ivf.nlist]
    elif hnsw is not None:
        name, grid = "ef_search", list(EF_SEARCH_GRID)
    else:
        return {"param": None, "value": None, "rerank_factor": None, "recall": None, "tried": []}
    tried = []
    for factor in RERANK_FACTORS if rerank_vectors is not None else (None,):
        for value in grid:
            set_search_params(index, **{name: value})
            t0 = time.perf_counter()
            ids = _search_ids(index, queries, k, rerank_vectors, exclude, factor or RERANK_FACTOR)
            seconds = time.perf_counter() - t0
            recall = recall_at_k(ids, exact_ids, k)
            tried.append([value, factor, recall, seconds])
            if recall >= target_recall:
                break
    reached = [t for t in tried if t[2] >= target_recall]
    value, factor, recall, _ = min(reached, key=lambda t: t[3]) if reached else max(tried, key=lambda t: t[2])
    set_search_params(index, **{name: value})
    return {"param": name, "value": value, "rerank_factor": factor, "recall": recall, "tried": tried}


def evaluate_index(
    index: faiss.Index,
    vectors: Any,
    queries: np.ndarray,
    k: int = DEFAULT_K,
    rerank_vectors: Any = None,
    exclude: np.ndarray | None = None,
    exact: tuple[np.ndarray, float] | None = None,
    rerank_factor: int = RERANK_FACTOR,
) -> dict[str, Any]:
    """Recall@k against exact search and throughput, batched and one query at a time, of a filled index.

    The exact baseline is `exact_search` (a chunked BLAS scan of the same vectors, the work of a FAISS flat
    index). Throughput uses every thread faiss and BLAS may use; the load average is recorded beside it.

    Args:
        index: the index, with its search parameters set.
        vectors: the indexed vectors ([N, D] array, memory map or `MappedRows`), row i = id i.
        queries: [Q, D] held-out queries.
        k: recall@k and hits per query.
        rerank_vectors: passed to `search`.
        exclude: [Q] id to drop from each query's hits (leave-one-out queries), or None.
        exact: (exact ids [Q, k], batched seconds) if already computed.
        rerank_factor: candidates per hit when re-ranking.

    Returns:
        {"k", "n_queries", "recall", "qps_batch", "qps_single", "exact_qps_batch", "exact_qps_single",
        "speedup_batch", "speedup_single", "threads", "loadavg"}.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    metric = metric_name(index.metric_type)
    if exact is None:
        exact = timed_exact(vectors, q, k, metric, exclude)
    exact_ids, exact_seconds = exact
    t0 = time.perf_counter()
    ids = _search_ids(index, q, k, rerank_vectors, exclude, rerank_factor)
    approx_seconds = time.perf_counter() - t0
    extra = int(exclude is not None)
    single = single_query_qps(lambda row: search(index, row, k + extra, rerank_vectors, rerank_factor), q)
    exact_single = single_query_qps(lambda row: exact_search(vectors, row, k + extra, metric), q)
    return {
        "k": int(k),
        "n_queries": len(q),
        "recall": recall_at_k(ids, exact_ids, k),
        "qps_batch": len(q) / approx_seconds,
        "qps_single": single,
        "exact_qps_batch": len(q) / exact_seconds,
        "exact_qps_single": exact_single,
        "speedup_batch": exact_seconds / approx_seconds,
        "speedup_single": single / exact_single,
        "threads": faiss.omp_get_max_threads(),
        "loadavg": list(os.getloadavg()),
    }


def timed_exact(
    vectors: Any, queries: np.ndarray, k: int, metric: str, exclude: np.ndarray | None
) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    _, ids = exact_search(vectors, queries, k + (exclude is not None), metric)
    seconds = time.perf_counter() - t0
    return (_drop(ids, exclude, k) if exclude is not None else ids), seconds


def _search_ids(
    index: faiss.Index, queries: np.ndarray, k: int, rerank_vectors: Any, exclude: Any, factor: int = RERANK_FACTOR
) -> np.ndarray:
    _, ids = search(index, queries, k + (exclude is not None), rerank_vectors, factor)
    return _drop(ids, exclude, k) if exclude is not None else ids


def _drop(ids: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] ids without each row's excluded id (the query itself, in leave-one-out), padded with -1."""
    out = np.full((len(ids), k), -1, np.int64)
    for i, (row, x) in enumerate(zip(ids, exclude, strict=True)):
        kept = row[row != x][:k]
        out[i, : len(kept)] = kept
    return out


def single_query_qps(
    fn: Any, queries: np.ndarray, seconds: float = SINGLE_QUERY_SECONDS, min_queries: int = 3
) -> float:
    """Queries/s answering one query per call, for about `seconds` (at least `min_queries` queries)."""
    done, t0 = 0, time.perf_counter()
    while done < len(queries) and (done < min_queries or time.perf_counter() - t0 < seconds):
        fn(queries[done : done + 1])
        done += 1
    return done / (time.perf_counter() - t0)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM from /proc (ru_maxrss elsewhere).

    On Linux ru_maxrss is not used: exec carries the parent's peak into it, so a small child of a large process
    reports the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def index_bytes(index: faiss.Index) -> int:
    """Bytes of the serialized index: what it occupies in RAM, to within small headers."""
    return int(faiss.serialize_index(index).size)
