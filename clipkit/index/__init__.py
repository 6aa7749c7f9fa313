"""FAISS indexes over exported embeddings: choose, build, tune, measure, save/load with validation, search, query.

Never imports torch: building and querying an index needs only numpy arrays (queries are encoded by the
caller). An index folder holds:

- `index.faiss`: the FAISS index (faiss.write_index);
- `index.json`: {"factory", "metric", "dim", "count", "faiss_version", "file_bytes", "rerank", "report", ...},
  written last and checked against the index on load;
- `meta.jsonl` (or `meta.parquet`) and `embed.json`: the row-aligned metadata of the indexed vectors, so the
  index folder answers queries on its own;
- `report.json`: recall@k against exact search on held-out queries, queries/s, bytes (see `evaluate_index`).
- `captions/` (optional, `build_index_dir(captions=True)`): the same files for an index of the caption vectors.

index.json's "sources" records the shard of each row (runs of rows per shard, see `shard_sources`): with a row's
key it locates the row's image in its tar, which the search page shows.

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

The package exports the names most users need; everything else is imported from its module:

- `errors`: `IndexFileError`, raised for damaged index and embedding folders;
- `rows`: memory-mapped rows (`MappedRows`);
- `build`: factory choice and index build (`choose_factory`, `estimate_index_bytes`, `build_index`, search knobs);
- `store`: `save_index` / `load_index` and the folder file names;
- `search`: `search` (with exact re-ranking), `rerank`, `exact_search`, `recall_at_k`;
- `measure`: `tune_search_params`, `evaluate_index`, `peak_rss_bytes`;
- `embeddings`: embedding folders (`write_single`, `write_part`, `load_embeddings`, `shard_sources`) and
  metadata files (`read_meta`, `write_meta`);
- `folder`: index folders (`build_index_dir`, `IndexDir`, `open_index_dir`, `query_index_dir`).
"""

from __future__ import annotations

from clipkit.index.build import build_index
from clipkit.index.embeddings import load_embeddings
from clipkit.index.errors import IndexFileError
from clipkit.index.folder import IndexDir, build_index_dir, open_index_dir, query_index_dir
from clipkit.index.rows import MappedRows
from clipkit.index.search import exact_search, recall_at_k, search

__all__ = [
    "IndexDir",
    "IndexFileError",
    "MappedRows",
    "build_index",
    "build_index_dir",
    "exact_search",
    "load_embeddings",
    "open_index_dir",
    "query_index_dir",
    "recall_at_k",
    "search",
]
