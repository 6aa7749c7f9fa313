"""Choosing and building a FAISS index: factory choice, memory estimate, training sample, search knobs."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from clipkit.index.errors import faiss_message
from clipkit.index.rows import TAKE_WINDOW_ROWS, MappedRows, row_reader

# Exact search up to this many vectors: below it a flat scan answers a query in about a millisecond on 2 cores
# (128-d) and is exact. Measured with tools/bench_index.py on real CLIP embeddings (docs/evaluation.md).
FLAT_MAX_VECTORS = 50_000
# IVF-Flat (float vectors, nprobe tuned) up to this many vectors if they fit the memory budget; IVF-PQ with exact
# re-ranking from disk beyond. IVF-Flat, not HNSW, because caption queries (text->image, the usual CLIP search)
# lie outside the image distribution, where HNSW needed efSearch 512 for recall@10 0.95 and IVF-Flat nprobe 8-16
# (6-10x more queries/s, 30% less memory): see docs/evaluation.md. HNSW stays available by factory string.
IVF_FLAT_MAX_VECTORS = 2_000_000
HNSW_M = 32  # graph neighbours per node (2 * HNSW_M on the base level), for factory strings that name HNSW
HNSW_EF_CONSTRUCTION = 80  # candidate list while adding: faiss's default 40 loses recall on clustered CLIP sets
IVF_MIN_LISTS = 256
IVF_MAX_LISTS = 65_536
PQ_MAX_SUBQUANTIZERS = 64  # PQ code bytes per vector at most (x8: 8 bits per subquantizer)
OPQ_MIN_DIM = 64  # an OPQ rotation before PQ helps CLIP embeddings (correlated dims); below 64 dims it is noise
# Training rows: faiss warns below 39 points per centroid and subsamples above 256; 8-bit PQ codebooks
# have 256 centroids each, hence at least 256 * 39 rows.
TRAIN_POINTS_PER_LIST = 64
MIN_POINTS_PER_LIST = 39
MIN_TRAIN_ROWS = 256 * 39
TRAIN_BUDGET_SHARE = 0.5  # of a memory budget, for the training sample (freed before the adds)
ADD_CHUNK_ROWS = 65_536
MIN_CHUNK_ROWS = 1024
# Search-time defaults stored in the index file (faiss persists nprobe and efSearch); `build_index_dir` tunes
# them on held-out queries to reach `DEFAULT_TARGET_RECALL`.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def estimate_index_bytes(factory: str, n: int, d: int) -> int:
    """Approximate RAM of a filled index of a factory string `choose_factory` returns (and Flat/IVF-Flat/SQ8).

    Returns:
        Bytes: vectors or codes, ids, graph links, centroids, rotation; unknown factories count as Flat.
    """
    parts = factory.split(",")
    total = 0
    for p in parts:
        if p.startswith("OPQ"):
            total += d * d * 4
        elif p.startswith("IVF"):
            nlist = int("".join(ch for ch in p[3:].split("_")[0] if ch.isdigit()) or 1)
            total += nlist * d * 4 + n * 8  # centroids + one int64 id per vector
        elif p.startswith("HNSW"):
            m = int("".join(ch for ch in p[4:] if ch.isdigit()) or HNSW_M)
            total += n * 2 * m * 4 * 9 // 8  # base-level links + about 1/8 more for the upper levels
    code = parts[-1]
    if code.startswith("PQ"):
        m = int(code[2:].split("x")[0])
        total += n * m + 256 * d * 4
    elif code.startswith("SQ8"):
        total += n * d
    elif code.startswith("SQfp16"):
        total += n * d * 2
    else:
        total += n * d * 4
    return total


def choose_factory(n: int, d: int, memory_budget_bytes: int | None = None) -> str:
    """Picks a FAISS index factory string for n vectors of dimension d.

    The rule (thresholds measured by tools/bench_index.py, see docs/evaluation.md):
    - n <= FLAT_MAX_VECTORS: "Flat" (exact; a flat scan is fast at this size).
    - n <= IVF_FLAT_MAX_VECTORS and the float vectors plus ids and centroids (about n * (4 d + 8) bytes) fit the
      budget (or no budget): f"IVF{nlist},Flat", nprobe tuned at build time to the target recall.
    - otherwise f"OPQ{m},IVF{nlist},PQ{m}x8" (no OPQ below OPQ_MIN_DIM dims), searched with exact re-ranking
      from the vectors on disk (`is_compressed`): m = the largest divisor of d that is at most
      min(PQ_MAX_SUBQUANTIZERS, d // 4) (4+ dims per code byte) and whose memory, about n * (m + 8) + nlist * d * 4
      bytes (codes, ids, centroids), fits the budget.
    nlist = the power of two nearest 4 sqrt(n) (faiss's guideline is 4-16 sqrt(n)), clamped to [IVF_MIN_LISTS,
    IVF_MAX_LISTS], then halved while there are fewer than 39 vectors per list to train it.

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
    fits = lambda factory: memory_budget_bytes is None or estimate_index_bytes(factory, n, d) <= memory_budget_bytes
    if n <= FLAT_MAX_VECTORS and fits("Flat"):
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = min(max(nlist, IVF_MIN_LISTS), IVF_MAX_LISTS)
    # Fewer vectors than 39 per list cannot train the lists; nor can a training sample larger than the budget allows.
    train_rows = n if memory_budget_bytes is None else min(n, int(memory_budget_bytes * TRAIN_BUDGET_SHARE) // (4 * d))
    while nlist > 1 and train_rows < MIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    if n <= IVF_FLAT_MAX_VECTORS and fits(f"IVF{nlist},Flat"):
        return f"IVF{nlist},Flat"
    if train_rows < min(n, MIN_TRAIN_ROWS):
        raise ValueError(
            f"choose_factory: memory_budget_bytes={memory_budget_bytes} cannot hold the {MIN_TRAIN_ROWS} x {d} "
            f"float32 training rows PQ codebooks need (in half the budget: at least {MIN_TRAIN_ROWS * 4 * d * 2} bytes)"
        )
    for m in sorted((m for m in range(1, d + 1) if d % m == 0), reverse=True):
        if m > min(PQ_MAX_SUBQUANTIZERS, max(1, d // 4)):
            continue
        factory = f"IVF{nlist},PQ{m}x8"
        if d >= OPQ_MIN_DIM:
            factory = f"OPQ{m},{factory}"
        if fits(factory):
            return factory
    need = estimate_index_bytes(f"IVF{nlist},PQ1x8", n, d)
    raise ValueError(
        f"choose_factory: no index for n={n}, d={d} fits memory_budget_bytes={memory_budget_bytes} "
        f"(IVF{nlist},PQ1x8 needs about {need} bytes)"
    )


def is_compressed(factory: str | None) -> bool:
    """Whether a factory stores lossy codes (PQ, scalar quantizers), whose scores benefit from re-ranking."""
    code = (factory or "").split(",")[-1]
    return code.startswith(("PQ", "SQ", "LSH", "RQ", "LSQ"))


def build_index(
    vectors: Any,
    factory: str | None = None,
    metric: str = "ip",
    seed: int = 0,
    memory_budget_bytes: int | None = None,
    chunk_rows: int | None = None,
) -> faiss.Index:
    """Builds a FAISS index over vectors: trains it on a random sample if needed, then adds every row in chunks.

    Ids are row numbers. Vectors on disk (a `MappedRows`, or a memory map of a whole .npy file) are read one
    window of `chunk_rows` rows at a time and released, so the set may be larger than RAM; then the index
    itself, the training sample and one window are what is resident.

    Args:
        vectors: [N, D] float32/float16/float64 array, memory map or `MappedRows`.
        factory: faiss.index_factory string; None picks one with `choose_factory`.
        metric: "ip" (inner product; cosine on L2-normalized vectors) or "l2" (squared distance).
        seed: seed of the random training sample.
        memory_budget_bytes: RAM for index + training sample + add window; None for no limit. The index estimate
            must fit it, the window (float32) takes at most 1/8 of it and the training sample (freed before the
            adds) at most 1/2.
        chunk_rows: rows per add window; default from the budget, at most ADD_CHUNK_ROWS.

    Returns:
        The filled index, with search defaults set (IVF nprobe = DEFAULT_NPROBE, HNSW efSearch =
        DEFAULT_EF_SEARCH); change them with `set_search_params` or `tune_search_params`.

    Raises:
        ValueError: on a bad shape, metric or factory string, non-finite vectors, or a budget too small for
            the index estimate plus the minimum training sample.
    """
    x = row_reader(vectors, "vectors")
    n, d = x.shape
    factory = factory or choose_factory(n, d, memory_budget_bytes)
    if memory_budget_bytes is not None and estimate_index_bytes(factory, n, d) > memory_budget_bytes:
        raise ValueError(
            f"index {factory!r} over {n} x {d} vectors needs about {estimate_index_bytes(factory, n, d)} bytes, more "
            f"than the memory budget of {memory_budget_bytes}: raise the budget or let choose_factory pick"
        )
    try:
        index = faiss.index_factory(d, factory, metric_type(metric))
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build factory {factory!r} for dim {d}: {faiss_message(e)}") from e
    if chunk_rows is None:
        chunk_rows = ADD_CHUNK_ROWS
        if memory_budget_bytes is not None:
            chunk_rows = min(ADD_CHUNK_ROWS, max(MIN_CHUNK_ROWS, memory_budget_bytes // 8 // (4 * d)))
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = max(hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    _disable_polysemous_training(index)
    if not index.is_trained:
        index.train(_training_sample(x, index, seed, memory_budget_bytes, pq=is_compressed(factory), window=chunk_rows))
    with tqdm(total=n, desc=f"index add ({factory})", unit="vec", disable=None) as bar:
        for start in range(0, n, chunk_rows):
            chunk = x.read(start, start + chunk_rows)  # [<=chunk_rows, D] float32
            if not np.all(np.isfinite(chunk)):
                raise ValueError(f"vectors rows {start}..{start + len(chunk) - 1}: non-finite values")
            index.add(chunk)
            del chunk
            bar.update(min(chunk_rows, n - start))
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
        hnsw = hnsw_of(index)
        if hnsw is None:
            raise ValueError(f"ef_search applies to HNSW indexes only, not {type(index).__name__}")
        hnsw.efSearch = max(1, int(ef_search))


def get_search_params(index: faiss.Index) -> dict[str, int]:
    """{"nprobe"} for IVF, {"ef_search"} for HNSW, {} for exact indexes."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    hnsw = hnsw_of(index)
    return {"ef_search": int(hnsw.efSearch)} if hnsw is not None else {}


def _training_sample(
    x: Any,
    index: faiss.Index,
    seed: int,
    memory_budget_bytes: int | None = None,
    pq: bool = False,
    window: int = TAKE_WINDOW_ROWS,
) -> np.ndarray:
    """[n_train, D] float32 random rows of x, read in row order (windows move forward through a file)."""
    n, d = x.shape
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    n_train = min(n, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS))
    if memory_budget_bytes is not None:
        cap = int(memory_budget_bytes * TRAIN_BUDGET_SHARE) // (4 * d)  # freed before the adds: half the budget
        floor = min(n, max(MIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS if pq else 1))
        if cap < floor:
            raise ValueError(
                f"memory budget {memory_budget_bytes} bytes is too small to train {nlist} lists on {d}-d vectors "
                f"(needs at least {floor} training rows = {4 * floor * d} bytes in half the budget)"
            )
        n_train = min(n_train, cap)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    sample = x.take(rows, window) if isinstance(x, MappedRows) else x.take(rows)
    if not np.all(np.isfinite(sample)):
        raise ValueError("vectors: non-finite values in the training sample")
    return sample


def _disable_polysemous_training(index: faiss.Index) -> None:
    """Turns off faiss's polysemous PQ training (on by default for factory PQ codes): it only serves Hamming
    pre-filtering, which clipkit does not use, and took 40 s of a 0.5 s IVF-PQ training on 10k vectors."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def _set_default_search_params(index: faiss.Index) -> None:
    if faiss.try_extract_index_ivf(index) is not None:
        set_search_params(index, nprobe=DEFAULT_NPROBE)
    if hnsw_of(index) is not None:
        set_search_params(index, ef_search=DEFAULT_EF_SEARCH)


def hnsw_of(index: faiss.Index) -> Any:
    """The HNSW graph of an HNSW index (possibly behind a pre-transform), else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index.hnsw if hasattr(index, "hnsw") else None


def metric_type(metric: str) -> int:
    """The faiss metric constant of "ip" or "l2"."""
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    return _METRICS[metric]


def metric_name(code: int) -> str:
    """ "ip" or "l2" for a faiss metric constant."""
    for name, value in _METRICS.items():
        if value == code:
            return name
    return f"faiss_metric_{code}"
