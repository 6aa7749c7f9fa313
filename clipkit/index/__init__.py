"""FAISS indexes over exported embeddings: choose, build, tune, measure, save/load with validation, search, query.

Never imports torch: building and querying an index needs only numpy arrays (queries are encoded by the
caller). An index folder holds:

- `index.faiss`: the FAISS index (faiss.write_index);
- `index.json`: {"factory", "metric", "dim", "count", "faiss_version", "file_bytes", "rerank", "report", ...},
  written last and checked against the index on load;
- `meta.jsonl` (or `meta.parquet`) and `embed.json`: the row-aligned metadata of the indexed vectors, so the
  index folder answers queries on its own;
- `report.json`: recall@k against exact search on held-out queries, queries/s, bytes (see `evaluate_index`).

An embedding folder (written by `clipkit embed`) comes in two layouts, both read by `load_embeddings`:

- single: `image_emb.npy` [N, D] float32/float16 (L2-normalized), `text_emb.npy` [M, D], `text_to_image.npy`
  [M] int64, `meta.jsonl` (one JSON object per image row, with "key" and "captions") and `embed.json`;
- parts: `embed.json` with {"layout": "parts", "parts": [names]} and one folder per part,
  `parts/<name>/` holding the single layout's arrays, `meta.jsonl` or `meta.parquet`, and `part.json` (its
  done-marker, written last). Part arrays are memory-mapped and read as one row-concatenated array
  (`MappedRows`); a part's text_to_image indexes its own images.

Large sets: vectors are read window by window (`MappedRows`: each window is its own short-lived memory map,
so resident memory stays at one window however large the file), the index trains on a random sample, and
an IVF-PQ index re-ranks its candidates exactly against the vectors on disk. `memory_budget_bytes` bounds
the index, the training sample and the add windows together.

Modules (`from clipkit.index import X` reaches every public name and constant of them):

- `errors`: `IndexFileError`, raised for damaged index and embedding folders;
- `rows`: memory-mapped rows (`MappedRows`);
- `build`: factory choice and index build (`choose_factory`, `estimate_index_bytes`, `build_index`, search knobs);
- `store`: `save_index` / `load_index` and the folder file names;
- `search`: `search` (with exact re-ranking), `rerank`, `exact_search`, `recall_at_k`;
- `measure`: `tune_search_params`, `evaluate_index`, `peak_rss_bytes`;
- `embeddings`: embedding folders (`load_embeddings`) and metadata files (`read_meta`, `write_meta`);
- `folder`: index folders (`build_index_dir`, `IndexDir`, `open_index_dir`, `query_index_dir`).
"""

from __future__ import annotations

from clipkit.index.build import _METRICS as _METRICS
from clipkit.index.build import (
    ADD_CHUNK_ROWS,
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    EF_SEARCH_GRID,
    FLAT_MAX_VECTORS,
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVF_FLAT_MAX_VECTORS,
    IVF_MAX_LISTS,
    IVF_MIN_LISTS,
    MIN_CHUNK_ROWS,
    MIN_POINTS_PER_LIST,
    MIN_TRAIN_ROWS,
    OPQ_MIN_DIM,
    PQ_MAX_SUBQUANTIZERS,
    TRAIN_BUDGET_SHARE,
    TRAIN_POINTS_PER_LIST,
    build_index,
    choose_factory,
    estimate_index_bytes,
    get_search_params,
    is_compressed,
    set_search_params,
)
from clipkit.index.embeddings import (
    count_meta_rows,
    image_rows,
    is_parts_layout,
    load_embeddings,
    read_meta,
    write_meta,
)
from clipkit.index.errors import IndexFileError
from clipkit.index.folder import (
    DEFAULT_EVAL_QUERIES,
    EXACT_IN_RAM_BYTES,
    IndexDir,
    build_index_dir,
    open_index_dir,
    query_index_dir,
)
from clipkit.index.measure import (
    DEFAULT_K,
    DEFAULT_TARGET_RECALL,
    SINGLE_QUERY_SECONDS,
    evaluate_index,
    peak_rss_bytes,
    single_query_qps,
    tune_search_params,
)
from clipkit.index.rows import TAKE_WINDOW_ROWS, MappedRows
from clipkit.index.search import (
    EXACT_CHUNK_ROWS,
    RERANK_BLOCK_ELEMENTS,
    RERANK_FACTOR,
    RERANK_FACTORS,
    exact_search,
    recall_at_k,
    rerank,
    search,
)
from clipkit.index.store import (
    DEFAULT_INDEX_SUBDIR,
    EMBED_INFO_FILE,
    IMAGE_EMB_FILE,
    INDEX_FILE,
    INDEX_INFO_FILE,
    META_FILE,
    META_PARQUET_FILE,
    PART_INFO_FILE,
    PARTS_DIR,
    REPORT_FILE,
    TEXT_EMB_FILE,
    TEXT_TO_IMAGE_FILE,
    load_index,
    save_index,
)

__all__ = [
    "ADD_CHUNK_ROWS",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_EVAL_QUERIES",
    "DEFAULT_INDEX_SUBDIR",
    "DEFAULT_K",
    "DEFAULT_NPROBE",
    "DEFAULT_TARGET_RECALL",
    "EF_SEARCH_GRID",
    "EMBED_INFO_FILE",
    "EXACT_CHUNK_ROWS",
    "EXACT_IN_RAM_BYTES",
    "FLAT_MAX_VECTORS",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "IMAGE_EMB_FILE",
    "INDEX_FILE",
    "INDEX_INFO_FILE",
    "IVF_FLAT_MAX_VECTORS",
    "IVF_MAX_LISTS",
    "IVF_MIN_LISTS",
    "IndexDir",
    "IndexFileError",
    "META_FILE",
    "META_PARQUET_FILE",
    "MIN_CHUNK_ROWS",
    "MIN_POINTS_PER_LIST",
    "MIN_TRAIN_ROWS",
    "MappedRows",
    "OPQ_MIN_DIM",
    "PARTS_DIR",
    "PART_INFO_FILE",
    "PQ_MAX_SUBQUANTIZERS",
    "REPORT_FILE",
    "RERANK_BLOCK_ELEMENTS",
    "RERANK_FACTOR",
    "RERANK_FACTORS",
    "SINGLE_QUERY_SECONDS",
    "TAKE_WINDOW_ROWS",
    "TEXT_EMB_FILE",
    "TEXT_TO_IMAGE_FILE",
    "TRAIN_BUDGET_SHARE",
    "TRAIN_POINTS_PER_LIST",
    "build_index",
    "build_index_dir",
    "choose_factory",
    "count_meta_rows",
    "estimate_index_bytes",
    "evaluate_index",
    "single_query_qps",
    "exact_search",
    "get_search_params",
    "image_rows",
    "is_compressed",
    "is_parts_layout",
    "load_embeddings",
    "load_index",
    "open_index_dir",
    "peak_rss_bytes",
    "query_index_dir",
    "read_meta",
    "recall_at_k",
    "rerank",
    "save_index",
    "search",
    "set_search_params",
    "tune_search_params",
    "write_meta",
]
