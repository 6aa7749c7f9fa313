"""FAISS index module: exact search, save/load validation, factory choice, IVF recall, index folders."""

import json

import numpy as np
import pytest

from clipkit.index import (
    IndexFileError,
    build_index,
    build_index_dir,
    exact_search,
    load_embeddings,
    query_index_dir,
    recall_at_k,
    search,
)
from clipkit.index.build import FLAT_MAX_VECTORS, choose_factory, set_search_params
from clipkit.index.store import load_index, save_index


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return _unit(rng, 2000, 32), _unit(rng, 50, 32)


@pytest.fixture
def saved(tmp_path, data):
    vectors, _ = data
    index = build_index(vectors)
    save_index(tmp_path, index, {"factory": "Flat"})
    return tmp_path


def test_flat_search_matches_brute_force(data):
    vectors, queries = data
    scores, ids = search(build_index(vectors), queries, 10)
    assert scores.shape == ids.shape == (50, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    exact = queries @ vectors.T  # [Q, N]
    np.testing.assert_array_equal(ids, np.argsort(-exact, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=1e-5, atol=1e-6)


def test_float16_vectors_are_cast(data):
    vectors, queries = data
    _, ids = search(build_index(vectors.astype(np.float16)), queries[:1], 1)
    assert ids.shape == (1, 1)


def test_save_load_round_trip(saved, data):
    vectors, queries = data
    index, info = load_index(saved)
    assert info["factory"] == "Flat" and info["metric"] == "ip"
    assert info["dim"] == 32 and info["count"] == 2000 and "faiss_version" in info
    fresh = search(build_index(vectors), queries, 5)
    loaded = search(index, queries, 5)
    np.testing.assert_array_equal(fresh[1], loaded[1])
    np.testing.assert_array_equal(fresh[0], loaded[0])


def test_truncated_index_file_raises(saved):
    path = saved / "index.faiss"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="index.faiss"):
        load_index(saved)
    # Without the recorded size, faiss's own read error is wrapped too.
    info = json.loads((saved / "index.json").read_text())
    del info["file_bytes"]
    (saved / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexFileError, match="index.faiss"):
        load_index(saved)


def test_garbage_index_file_raises(saved):
    (saved / "index.faiss").write_bytes(b"not a faiss index" * 10)
    info = json.loads((saved / "index.json").read_text())
    info["file_bytes"] = 170
    (saved / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexFileError, match="faiss cannot read"):
        load_index(saved)


def test_index_json_wrong_dim_raises(saved):
    info = json.loads((saved / "index.json").read_text())
    info["dim"] = 64
    (saved / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexFileError, match="dim"):
        load_index(saved)


def test_missing_file_is_named(saved):
    (saved / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_index(saved)


def test_query_dim_mismatch_raises(data):
    vectors, _ = data
    with pytest.raises(ValueError, match="query dim 16 does not match index dim 32"):
        search(build_index(vectors), np.zeros((2, 16), dtype=np.float32), 3)


def test_choose_factory():
    assert choose_factory(FLAT_MAX_VECTORS, 512) == "Flat"
    assert choose_factory(FLAT_MAX_VECTORS + 1, 128) == "IVF1024,Flat"
    assert choose_factory(500_000, 512) == "IVF2048,Flat"  # 4 sqrt(n) = 2828 -> the nearest power of two
    # Beyond IVF-Flat's range: PQ codes (re-ranked from disk), with an OPQ rotation at d >= 64.
    assert choose_factory(5_000_000, 512) == "OPQ64,IVF8192,PQ64x8"
    assert choose_factory(5_000_000, 32) == "IVF8192,PQ8x8"
    # A tight budget forces compressed codes, and fewer lists: half the budget must hold 39 training rows per list.
    assert choose_factory(500_000, 512, memory_budget_bytes=100_000_000) == "OPQ64,IVF512,PQ64x8"
    assert choose_factory(500_000, 512, memory_budget_bytes=42_000_000) == "OPQ64,IVF256,PQ64x8"
    assert choose_factory(500_000, 512, memory_budget_bytes=45_000_000).startswith("OPQ64,IVF256,")
    with pytest.raises(ValueError, match="training rows"):  # PQ codebooks need 9984 rows: 20 MB at d=512
        choose_factory(500_000, 512, memory_budget_bytes=30_000_000)
    with pytest.raises(ValueError, match="memory_budget"):
        choose_factory(5_000_000, 512, memory_budget_bytes=1_000)


def test_ivf_recall_against_exact():
    rng = np.random.default_rng(1)
    vectors, queries = _unit(rng, 5000, 32), _unit(rng, 100, 32)
    index = build_index(vectors, "IVF16,Flat")
    set_search_params(index, nprobe=4)
    _, ids = search(index, queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist(), strict=True)])
    assert recall > 0.5
    with pytest.raises(ValueError, match="HNSW"):
        set_search_params(index, ef_search=32)


def _write_embedding_dir(path, rng):
    path.mkdir()
    image_emb = _unit(rng, 6, 8)
    t2i = np.array([0, 0, 1, 2, 3, 4, 5, 5], dtype=np.int64)
    text_emb = image_emb[t2i] + 0.01
    np.save(path / "image_emb.npy", image_emb)
    np.save(path / "text_emb.npy", text_emb.astype(np.float32))
    np.save(path / "text_to_image.npy", t2i)
    rows = [{"key": f"img{i:03d}", "captions": [f"caption {j}" for j in np.nonzero(t2i == i)[0]]} for i in range(6)]
    (path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "embed.json").write_text(json.dumps({"model": "tiny", "dim": 8, "images": 6, "texts": 8}))
    return image_emb


def test_build_and_query_index_dir(tmp_path):
    image_emb = _write_embedding_dir(tmp_path / "emb", np.random.default_rng(2))
    info = build_index_dir(tmp_path / "emb")
    assert info["count"] == 6 and info["dim"] == 8 and info["factory"] == "Flat"
    assert info["embed"]["model"] == "tiny"
    index_dir = tmp_path / "emb" / "index"
    assert (index_dir / "meta.jsonl").is_file() and (index_dir / "embed.json").is_file()

    hits = query_index_dir(index_dir, image_emb[[3, 5]], k=2)
    assert len(hits) == 2 and len(hits[0]) == 2
    assert hits[0][0]["rank"] == 1 and hits[0][0]["id"] == 3 and hits[0][0]["key"] == "img003"
    assert hits[0][0]["captions"] == ["caption 4"]  # caption rows of image 3
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[1][0]["key"] == "img005" and hits[1][0]["captions"] == ["caption 6", "caption 7"]
    assert hits[0][1]["rank"] == 2 and hits[0][1]["score"] <= hits[0][0]["score"]
    assert len(query_index_dir(index_dir, image_emb[0], k=100)[0]) == 6  # k clamped to the index size


def test_load_embeddings_names_missing_file(tmp_path):
    _write_embedding_dir(tmp_path / "emb", np.random.default_rng(3))
    emb = load_embeddings(tmp_path / "emb")
    assert isinstance(emb["image_emb"], np.memmap) and emb["image_emb"].shape == (6, 8)
    assert emb["text_to_image"].tolist() == [0, 0, 1, 2, 3, 4, 5, 5] and len(emb["meta"]) == 6
    # An image-only export: empty text arrays are accepted.
    np.save(tmp_path / "emb" / "text_emb.npy", np.zeros((0, 0), np.float32))
    np.save(tmp_path / "emb" / "text_to_image.npy", np.zeros(0, np.int64))
    assert load_embeddings(tmp_path / "emb")["text_emb"].shape == (0, 0)
    (tmp_path / "emb" / "text_to_image.npy").unlink()
    with pytest.raises(FileNotFoundError, match="text_to_image.npy"):
        load_embeddings(tmp_path / "emb")
    (tmp_path / "emb" / "meta.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="meta.jsonl"):
        load_embeddings(tmp_path / "emb")


def test_exact_search_gives_faiss_knn_ids(data):
    # Ours scans windows from disk; faiss.knn needs the vectors in RAM. Same ids and scores on the same data.
    import faiss

    vectors, queries = data
    for metric, code in (("ip", faiss.METRIC_INNER_PRODUCT), ("l2", faiss.METRIC_L2)):
        ref_scores, ref_ids = faiss.knn(queries, vectors, 10, metric=code)
        scores, ids = exact_search(vectors, queries, 10, metric, chunk_rows=300)  # several chunks merged
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_recall_at_k_against_an_independent_count():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    approx = np.array([[3, 0, 9, -1], [7, 7, 5, 4], [-1, -1, -1, -1]])  # -1: fewer hits; a repeated id counts once
    # By hand at k=3: query 0 {3, 0, 9} & {0, 1, 2} = {0}; query 1 {7, 5} & {4, 5, 6} = {5}; query 2: none.
    assert recall_at_k(approx, exact, 3) == pytest.approx(2 / 9)
    # A plain set count at every k, on random ids.
    rng = np.random.default_rng(1)
    exact = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    approx = np.where(rng.random((30, 10)) < 0.1, -1, rng.integers(0, 50, (30, 10)))
    for k in (1, 5, 10, 20):
        kk = min(k, 10)
        count = sum(len(set(a[:kk]) & set(e[:kk])) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
        assert recall_at_k(approx, exact, k) == pytest.approx(count / (kk * 30))
    assert np.isnan(recall_at_k(np.zeros((0, 5), int), np.zeros((0, 5), int), 5))
