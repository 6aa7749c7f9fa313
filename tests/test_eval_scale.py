"""Evaluation and retrieval at scale: sharded embed + resume, memory-capped index builds, query/serve, linear probe,
image-folder zero-shot, result tables, and refusal of mismatched index folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.data.shards import write_shards
from clipkit.evaluate.embed import embed_parts, embed_shards
from clipkit.index import (
    IndexFileError,
    MappedRows,
    build_index,
    build_index_dir,
    exact_search,
    load_embeddings,
    open_index_dir,
    query_index_dir,
    recall_at_k,
    search,
)
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny real open_clip CLIP (random weights) saved as a clipkit model folder."""
    import copy

    import torch

    from clipkit.config import ModelCfg
    from clipkit.models import bundle_from_config, save_model
    from clipkit.models.factory import resolve_config

    torch.manual_seed(0)
    config = resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL)))
    bundle = bundle_from_config(config)
    return save_model(tmp_path_factory.mktemp("model") / "model", bundle.model, bundle.config)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, digits_dir):
    """The real digits test split re-written as 4 shards of 90 samples (so an export has several parts)."""
    out = tmp_path_factory.mktemp("shards")
    samples = []
    with tarfile.open(digits_dir / "test-000000.tar") as tar:
        members = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key in sorted(members):
        samples.append({"__key__": key, **members[key]})
    write_shards(samples, out, "test", maxcount=90)
    return out


def _bundle(model_dir):
    from clipkit.models import load_model

    return load_model(model_dir)


# ------------------------------------------------------------------------------------ sharded embed + resume


def test_parts_embed_two_ranks_resume_and_load(small_shards, model_dir, tmp_path):
    bundle = _bundle(model_dir)
    urls = sorted(str(p) for p in small_shards.glob("test-*.tar"))
    assert len(urls) == 4
    args = (bundle.model, bundle.eval_transform, bundle.tokenizer, urls, tmp_path / "emb")
    kw = dict(batch_size=64, info={"model": str(model_dir)})
    # Two ranks of one export, one after the other: rank 0 takes parts 0 and 2, rank 1 parts 1 and 3.
    first = embed_parts(*args, rank=0, world_size=2, **kw)
    assert first["embedded"] == ["part-00000", "part-00002"] and not first["complete"]
    assert not (tmp_path / "emb/embed.json").exists()  # incomplete: no manifest yet
    with pytest.raises(FileNotFoundError, match="embed.json"):
        load_embeddings(tmp_path / "emb")
    second = embed_parts(*args, rank=1, world_size=2, **kw)
    assert second["embedded"] == ["part-00001", "part-00003"] and second["complete"]

    emb = load_embeddings(tmp_path / "emb")
    ref = embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, urls, batch_size=64)
    assert emb["layout"] == "parts" and isinstance(emb["image_emb"], MappedRows)
    assert emb["image_emb"].shape == ref.image.shape == (360, 32)
    np.testing.assert_allclose(np.asarray(emb["image_emb"]), ref.image, atol=1e-6)
    np.testing.assert_allclose(np.asarray(emb["text_emb"]), ref.text, atol=1e-6)
    np.testing.assert_array_equal(emb["text_to_image"], ref.text_to_image)  # global image rows across parts
    assert [m["key"] for m in emb["meta"]] == [m["key"] for m in ref.meta]
    assert emb["info"]["n_images"] == 360 and emb["info"]["parts"] == [f"part-0000{i}" for i in range(4)]

    # Resume: a part without its done-marker is redone, finished parts are skipped.
    (tmp_path / "emb/parts/part-00001/part.json").unlink()
    again = embed_parts(*args, rank=0, world_size=1, **kw)
    assert again["embedded"] == ["part-00001"] and again["skipped"] == ["part-00000", "part-00002", "part-00003"]
    assert again["complete"]
    # A rerun with other settings refuses to mix parts.
    with pytest.raises(ValueError, match="another run"):
        embed_parts(*args, rank=0, world_size=1, dtype="float16", **kw)


def test_cli_embed_parquet_index_query_file(small_shards, model_dir, tmp_path, capsys):
    emb = tmp_path / "emb"
    spec = str(small_shards / "test-*.tar")
    base = ["embed", "--checkpoint", str(model_dir), "--data", spec, "--out", str(emb), "--batch-size", "128"]
    assert main([*base, "--dtype", "float16", "--meta-format", "parquet"]) == 0
    assert "4 part(s)" in capsys.readouterr().out
    assert main([*base, "--dtype", "float16", "--meta-format", "parquet"]) == 0  # resumes: nothing to do
    assert "embedded 0 part(s)" in capsys.readouterr().out
    assert (emb / "parts/part-00003/meta.parquet").is_file()

    assert main(["index", "build", str(emb), "--queries", "40"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["factory"] == "Flat" and info["count"] == 360 and info["meta_file"] == "meta.parquet"
    report = info["report"]
    assert report["recall"] == 1.0 and report["n_queries"] == 20 and report["qps_batch"] > 0
    assert report["index_bytes"] > 360 * 32 * 4 and (emb / "index/report.json").is_file()

    queries = tmp_path / "queries.txt"
    queries.write_text("the number seven\na handwritten digit two\n")
    assert main(["index", "query", str(emb / "index"), "--file", str(queries), "-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in lines] == ["the number seven", "a handwritten digit two"]
    hit = lines[0]["hits"][0]
    assert hit["rank"] == 1 and hit["key"].startswith("digits_") and "label" in hit["meta"]

    vectors = np.asarray(load_embeddings(emb)["image_emb"][[5, 9]])
    np.save(tmp_path / "q.npy", vectors)
    assert main(["index", "query", str(emb / "index"), "--file", str(tmp_path / "q.npy"), "-k", "1"]) == 0
    ids = [json.loads(line)["hits"][0]["id"] for line in capsys.readouterr().out.splitlines()]
    assert ids == [5, 9]


# --------------------------------------------------------------------------------------- index at scale


def _clustered(rng: np.random.Generator, n: int, d: int, centers: int = 64) -> np.ndarray:
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_with_rerank_from_disk_reaches_recall(tmp_path):
    from clipkit.index.build import set_search_params
    from clipkit.index.measure import tune_search_params

    rng = np.random.default_rng(0)
    x = _clustered(rng, 20_000, 64)
    np.save(tmp_path / "x.npy", x)
    rows = MappedRows([tmp_path / "x.npy"])
    queries = _clustered(np.random.default_rng(1), 400, 64)  # held out: not in the index
    index = build_index(rows, "IVF64,PQ8x8", memory_budget_bytes=12 << 20)
    _, exact = exact_search(rows, queries, 10)
    np.testing.assert_array_equal(exact, np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :10])
    set_search_params(index, nprobe=16)
    plain = recall_at_k(search(index, queries, 10)[1], exact, 10)
    reranked = recall_at_k(search(index, queries, 10, rerank_vectors=rows, rerank_factor=4)[1], exact, 10)
    assert reranked > plain + 0.2, (plain, reranked)  # 8-byte codes alone rank poorly; exact re-scoring fixes it
    # Tuning nprobe and the candidate depth on half the queries reaches the target on the other half.
    tuning = tune_search_params(index, queries[:200], exact[:200], 10, 0.95, rerank_vectors=rows)
    assert tuning["recall"] >= 0.95 and tuning["rerank_factor"] in (4, 10, 20, 40, 80)
    ids = search(index, queries[200:], 10, rerank_vectors=rows, rerank_factor=tuning["rerank_factor"])[1]
    assert recall_at_k(ids, exact[200:], 10) >= 0.93
    scores, ids = search(index, queries[:3], 5, rerank_vectors=rows)
    np.testing.assert_allclose(scores, np.take_along_axis(queries[:3] @ x.T, ids, 1), rtol=1e-5)


def test_mapped_rows_reads_across_parts(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 8)).astype(np.float16) for n in (5, 0, 7, 3)]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", p if len(p) else np.zeros((0, 0), np.float16))
    rows = MappedRows([tmp_path / f"{i}.npy" for i in range(4)])
    full = np.concatenate(parts).astype(np.float32)
    assert rows.shape == (15, 8) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows.read(3, 14), full[3:14])
    pick = np.array([14, 0, 6, 6, 12])
    np.testing.assert_array_equal(rows.take(pick, window_rows=2), full[pick])
    np.testing.assert_array_equal(np.asarray(rows), full)
    np.save(tmp_path / "bad.npy", np.zeros((2, 4), np.float16))
    with pytest.raises(IndexFileError, match="bad.npy: dim 4"):
        MappedRows([tmp_path / "0.npy", tmp_path / "bad.npy"])
    data = (tmp_path / "2.npy").read_bytes()
    (tmp_path / "2.npy").write_bytes(data[:-10])
    with pytest.raises(IndexFileError, match="truncated"):
        MappedRows([tmp_path / "2.npy"])


_CAPPED_BUILD = """
import json, sys
import numpy as np
from clipkit.index import MappedRows, build_index, exact_search, recall_at_k, search
from clipkit.index.build import set_search_params
path, budget = sys.argv[1], int(sys.argv[2])
rows = MappedRows([path])
index = build_index(rows, "IVF256,PQ32x8", memory_budget_bytes=budget)
set_search_params(index, nprobe=32)
q = rows.read(0, 50)
_, exact = exact_search(rows, q, 10)
_, ids = search(index, q, 10, rerank_vectors=rows, rerank_factor=40)
# VmHWM: this process's peak resident set. Not ru_maxrss: exec carries the parent's peak into it (pytest's GB).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"count": index.ntotal, "peak_rss": peak, "recall": recall_at_k(ids, exact, 10)}))
"""


def test_index_build_from_memmap_under_a_ram_cap(tmp_path):
    """A 256 MiB vector file is indexed in a process whose resident memory never reaches half of it.

    The cap is the builder's explicit budget (window, training sample, index), checked against the child's
    peak resident set (VmHWM). RLIMIT_AS / RLIMIT_DATA would not measure RAM: they count address space (the file
    mapping itself) and the hundreds of MB that OpenBLAS/OpenMP reserve without touching (VmData is ~190 MB
    right after `import faiss` with 45 MB resident).
    """
    n, d = 262_144, 256
    path = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(256, d)).astype(np.float32)
    for start in range(0, n, 32_768):  # written in chunks: the test process does not hold the set either
        x = centers[rng.integers(0, 256, 32_768)] + rng.normal(size=(32_768, d)).astype(np.float32)
        out[start : start + 32_768] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    data_bytes = path.stat().st_size
    budget = 48 << 20
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _CAPPED_BUILD, str(path), str(budget)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == n
    assert result["peak_rss"] < data_bytes / 2, (result, data_bytes)
    assert result["recall"] >= 0.9


def test_budget_too_small_is_refused():
    x = np.random.default_rng(0).normal(size=(20_000, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="memory budget"):
        build_index(x, "IVF256,PQ8x8", memory_budget_bytes=1 << 20)


# ----------------------------------------------------------------------------- mismatched index folders


def test_mismatched_index_folders_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "image_emb.npy", _clustered(rng, 3000, 16))
    (emb / "meta.jsonl").write_text("".join(json.dumps({"key": f"k{i}"}) + "\n" for i in range(3000)))
    (emb / "embed.json").write_text(json.dumps({"dim": 16}))
    info = build_index_dir(emb, tmp_path / "ivf", factory="IVF16,PQ4x8", n_queries=100)
    assert info["rerank"] and info["report"]["tuning"]["param"] == "nprobe"
    assert 0 < info["report"]["recall"] <= 1
    index = open_index_dir(tmp_path / "ivf")
    assert index.rerank_vectors is not None
    with pytest.raises(ValueError, match="query dim 8 does not match index dim 16"):
        index.search(np.ones((1, 8), np.float32), 3)

    # An index.faiss of another dimension copied over this one (index.json still describes the old one).
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "image_emb.npy", _clustered(rng, 50, 32))
    (other / "meta.jsonl").write_text("".join(json.dumps({"key": f"o{i}"}) + "\n" for i in range(50)))
    (other / "embed.json").write_text("{}")
    build_index_dir(other, evaluate=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (tmp_path / "ivf").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "index.faiss").write_bytes((other / "index/index.faiss").read_bytes())
    with pytest.raises(IndexFileError, match="index.faiss"):
        open_index_dir(bad)
    info_json = json.loads((bad / "index.json").read_text())
    info_json["file_bytes"] = (bad / "index.faiss").stat().st_size
    (bad / "index.json").write_text(json.dumps(info_json))
    with pytest.raises(IndexFileError, match="dim is 32 but"):
        open_index_dir(bad)

    # Re-ranking vectors replaced by a file of another shape.
    np.save(emb / "image_emb.npy", _clustered(rng, 3000, 8))
    with pytest.raises(IndexFileError, match="re-ranking vectors have shape"):
        open_index_dir(tmp_path / "ivf")
    # Truncated index file.
    data = (tmp_path / "ivf/index.faiss").read_bytes()
    (tmp_path / "ivf/index.faiss").write_bytes(data[:100])
    with pytest.raises(IndexFileError, match="truncated"):
        query_index_dir(tmp_path / "ivf", np.ones((1, 16), np.float32), 3)


# ------------------------------------------------------------------------------------------------ serve


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_round_trip(small_shards, model_dir, tmp_path):
    from clipkit.serve import QueryEncoder, image_bytes_b64, make_server

    assert (
        main(["embed", "--checkpoint", str(model_dir), "--data", str(small_shards), "--out", str(tmp_path / "e")]) == 0
    )
    assert main(["index", "build", str(tmp_path / "e"), "--no-eval"]) == 0
    index = open_index_dir(tmp_path / "e/index")
    encoder = QueryEncoder(model_dir)
    server = make_server(index, encoder, port=0)
    host, port = server.server_address
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        status, health = _http(f"{base}/health")
        assert status == 200 and health["count"] == 360 and health["dim"] == 32

        status, got = _http(f"{base}/query?text=the%20number%20seven&k=4")
        assert status == 200 and got["k"] == 4 and got["results"][0]["query"] == "the number seven"
        expected = query_index_dir(tmp_path / "e/index", encoder.texts(["the number seven"]), 4)[0]
        assert [h["id"] for h in got["results"][0]["hits"]] == [h["id"] for h in expected]

        status, got = _http(f"{base}/query", {"text": ["a handwritten digit two", "the number one"], "k": 2})
        assert status == 200 and [len(r["hits"]) for r in got["results"]] == [2, 2]

        vectors = np.asarray(load_embeddings(tmp_path / "e")["image_emb"][[7, 11]])
        status, got = _http(f"{base}/query", {"vectors": vectors.tolist(), "k": 1})
        assert status == 200 and [r["hits"][0]["id"] for r in got["results"]] == [7, 11]

        with tarfile.open(small_shards / "test-000000.tar") as tar:
            png = tar.extractfile("digits_0000.png").read()
        (tmp_path / "q.png").write_bytes(png)
        status, got = _http(f"{base}/query", {"image_b64": image_bytes_b64(tmp_path / "q.png"), "k": 1})
        assert status == 200 and got["results"][0]["hits"][0]["key"] == "digits_0000"

        assert _http(f"{base}/query", {"vectors": [[1.0, 2.0]], "k": 1})[0] == 400  # wrong dim
        assert _http(f"{base}/query", {"k": 1})[0] == 400
        assert _http(f"{base}/query?text=x&k=zero")[0] == 400
        assert _http(f"{base}/nothing")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


# ------------------------------------------------------------------------------------------- eval tasks


def test_single_layout_records_each_rows_shard(small_shards, model_dir, tmp_path):
    # The single layout (train.py's end-of-run index) keeps the shard of every row, as the parts layout does.
    from clipkit.evaluate.embed import save_embeddings
    from clipkit.serve.thumbnails import ShardImages

    urls = sorted(str(p) for p in small_shards.glob("test-*.tar"))[:2]
    bundle = _bundle(model_dir)
    emb = embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, urls, batch_size=64)
    assert emb.shard_rows == [90, 90]
    save_embeddings(tmp_path / "e", emb, {"model": str(model_dir), "shards": urls})
    build_index_dir(tmp_path / "e", evaluate=False)
    index = open_index_dir(tmp_path / "e/index")
    images = ShardImages(index)
    for row in (0, 89, 90, 179):
        shard, key = index.source_of(row)
        assert shard == urls[row // 90] and key == index.meta[row]["key"]
        with tarfile.open(shard) as tar:
            assert images.get(row) == (tar.extractfile(f"{key}.png").read(), "image/png")


def test_linear_probe_on_digits_beats_chance(digits_dir, model_dir, tmp_path):
    out = tmp_path / "eval" / "linear_probe-digits.json"
    args = ["eval", "linear-probe", "--checkpoint", str(model_dir), "--train", str(digits_dir / "train-*.tar")]
    assert main([*args, "--test", str(digits_dir / "test-*.tar"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"dataset", "model", "task", "metrics"} and result["task"] == "linear_probe"
    m = result["metrics"]
    assert m["n_test"] == 360 and m["n_classes"] == 10 and m["C"] in [c for c, _ in m["val_acc1"]]
    assert m["acc1"] > 0.6, m  # chance is 0.1; frozen random-init features of a tiny ViT are still linear-separable
    assert m["acc5"] >= m["acc1"] and 0 < m["mean_per_class_recall"] <= 1


def test_linear_probe_picks_regularization_on_validation():
    from clipkit.evaluate.linear_probe import linear_probe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 3
    y = rng.integers(0, 3, 300)
    x = centers[y] + rng.normal(size=(300, 5))
    m = linear_probe(x[:200], y[:200], x[200:], y[200:], c_grid=(1e-4, 1.0))
    assert m["C"] == 1.0 and dict(m["val_acc1"])[1.0] > dict(m["val_acc1"])[1e-4] and m["acc1"] > 0.9
    assert m["n_val"] == 40 and "acc5" not in m


def test_zeroshot_from_image_folder_matches_shards(digits_dir, model_dir, tmp_path):
    from clipkit.evaluate.run import zeroshot, zeroshot_folder

    folder, samples = tmp_path / "folder", []
    names = ["zero", "one", "two"]
    with tarfile.open(digits_dir / "test-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                label = json.loads(tar.extractfile(m).read())["label"]
                key = m.name[:-5]
                if label < 3 and sum(s["label"] == label for s in samples) < 4:
                    png = tar.extractfile(f"{key}.png").read()
                    (folder / f"{label}_{names[label]}").mkdir(parents=True, exist_ok=True)
                    (folder / f"{label}_{names[label]}" / f"{key}.png").write_bytes(png)
                    samples.append({"__key__": key, "png": png, "txt": "x", "json": {"label": label}, "label": label})
    (folder / "2_two" / "notes.txt").write_text("not an image")
    write_shards([{k: v for k, v in s.items() if k != "label"} for s in samples], tmp_path / "shards", "t")
    bundle = _bundle(model_dir)
    templates = ["a photo of the digit {c}.", "the number {c}."]
    from_folder = zeroshot_folder(bundle, folder, names, templates)
    from_shards = zeroshot(bundle, str(tmp_path / "shards/t-*.tar"), names, templates)
    assert from_folder["n_samples"] == 12
    for k in ("acc1", "mean_per_class_recall"):
        assert from_folder[k] == from_shards[k]

    out = tmp_path / "zs.json"
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("\n".join(templates))
    args = ["eval", "zeroshot", "--checkpoint", str(model_dir), "--data", str(folder), "--out", str(out)]
    assert main([*args, "--templates", str(templates_file)]) == 0  # class names from the subfolders
    result = json.loads(out.read_text())
    assert result["dataset"] == "folder" and result["metrics"]["n_samples"] == 12
    (tmp_path / "names.txt").write_text("zero\none\n")
    assert main([*args, "--classnames", str(tmp_path / "names.txt")]) == 2  # 2 names for 3 subfolders


def test_eval_report_markdown_and_csv(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    rows = [
        ("zeroshot-fmnist.json", "fashion-mnist", "zeroshot", {"acc1": 0.5, "acc5": 0.9, "n_samples": 10}),
        ("retrieval-emoji.json", "emoji", "retrieval", {"image_retrieval_recall@1": 0.25, "skipped": {}}),
    ]
    for name, dataset, task, metrics in rows:
        body = {"dataset": dataset, "model": "m", "task": task, "metrics": metrics}
        (run / "eval" / name).write_text(json.dumps(body))
    assert main(["eval", "report", str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| dataset | task | acc1 | acc5 | image_retrieval_recall@1 | n_samples |"
    assert table[2] == "| emoji | retrieval |  |  | 0.2500 |  |"
    assert table[3] == "| fashion-mnist | zeroshot | 0.5000 | 0.9000 |  | 10 |"
    assert main(["eval", "report", str(run), "--format", "csv", "--out", str(tmp_path / "t.csv")]) == 0
    csv_text = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_text[0] == "dataset,task,acc1,acc5,image_retrieval_recall@1,n_samples"
    assert csv_text[2] == "fashion-mnist,zeroshot,0.5,0.9,,10"
    (run / "eval" / "bad.json").write_text("[1, 2]")
    assert main(["eval", "report", str(run)]) == 2


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_torchrun_two_process_embed(small_shards, model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clipkit.cli"]
    cmd += ["embed", "--checkpoint", str(model_dir), "--data", str(small_shards), "--out", str(tmp_path / "e")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(json.loads(p.read_text())["index"] for p in (tmp_path / "e/parts").glob("*/part.json"))
    assert parts == [0, 1, 2, 3] and load_embeddings(tmp_path / "e")["image_emb"].shape == (360, 32)


@pytest.mark.slow
def test_agrees_with_clip_benchmark(tmp_path):
    """tools/compare_clip_benchmark.py in its own venv (/tmp/cbenv): metrics within 1e-6 (or inside the tie range)."""
    cb_python = Path(os.environ.get("CLIPKIT_CB_PYTHON", "/tmp/cbenv/bin/python"))
    model = Path(os.environ.get("CLIPKIT_CB_MODEL", "runs/quickstart/model"))
    data = Path(os.environ.get("CLIPKIT_CB_DATA", "data"))
    if not cb_python.exists() or not model.is_dir() or not (data / "fashion-mnist").is_dir():
        pytest.skip("needs the CLIP_benchmark venv, a trained model folder and the built datasets")
    cmd = [sys.executable, str(REPO / "tools/compare_clip_benchmark.py"), "--cb-python", str(cb_python)]
    cmd += ["--checkpoint", str(model), "--data-root", str(data), "--out", str(tmp_path / "cmp.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert report["max_abs_diff_outside_ties"] <= 1e-6, report
    for task, result in report["tasks"].items():
        for key, m in result["metrics"].items():
            if m["tie_interval"][0] == m["tie_interval"][1]:  # no tied scores: the numbers themselves agree
                assert m["abs_diff"] <= 1e-6, (task, key, m)
