"""Zero-shot evaluation throughput benchmark (tools/bench/bench_zeroshot.py): a tiny smoke of the whole script, and
the property it leans on: clipkit's eval loader gives the same rows, embeddings and metrics at any worker count.

The smoke runs both sides on a tiny real model and the real digits test split. Without CLIP_benchmark's venv (CI) the
CLIP_benchmark side is the worker's line-for-line copy of CLIP_benchmark 1.6.2's loop over its WebDataset loader, so
the metric equality checked here is against CLIP_benchmark's arithmetic (float32 torch, topk, sklearn's balanced
accuracy), not against clipkit's own. With the venv (CLIPKIT_CB_PYTHON or /tmp/cbenv/bin/python), the slow test runs
the real package in separate processes, as the benchmark does.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clipkit.data.shards import write_shards
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    from tools.bench import bench_zeroshot

    return bench_zeroshot


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny real open_clip CLIP (random weights, seed 0) saved as a clipkit model folder."""
    import copy

    import torch

    from clipkit.config import ModelCfg
    from clipkit.models import bundle_from_config, save_model
    from clipkit.models.factory import resolve_config

    torch.manual_seed(0)
    bundle = bundle_from_config(resolve_config(ModelCfg(config=copy.deepcopy(TINY_MODEL))))
    return save_model(tmp_path_factory.mktemp("model") / "model", bundle.model, bundle.config)


def _digits_samples(digits_dir: Path) -> list[dict]:
    members: dict[str, dict] = {}
    with tarfile.open(digits_dir / "test-000000.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [{"__key__": k, **members[k]} for k in sorted(members)]


def _write(samples: list[dict], out: Path, digits_dir: Path) -> Path:
    write_shards(samples, out, "test", maxcount=130)
    for name in ("classnames.txt", "templates.txt"):
        (out / name).write_text((digits_dir / name).read_text())
    return out


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory, digits_dir):
    """The real digits test split (360 images) in 3 shards of <= 130, with its class names and templates."""
    return _write(_digits_samples(digits_dir), tmp_path_factory.mktemp("digits3"), digits_dir)


@pytest.fixture(scope="module")
def three_shards_broken(tmp_path_factory, digits_dir):
    """As `three_shards` plus 2 undecodable images: one in shard 0, one as the very last sample (its skip count
    comes after shard 2's last batch). CLIP_benchmark's WebDataset loader raises on them, clipkit skips them."""
    samples = _digits_samples(digits_dir)
    broken = {"png": b"not a png", "txt": b"a broken image", "json": b'{"label": 0}'}
    samples.insert(50, {"__key__": "broken_a", **broken})
    samples.append({"__key__": "broken_z", **broken})
    return _write(samples, tmp_path_factory.mktemp("digits3-broken"), digits_dir)


def _urls(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("test-*.tar"))


def _keys_in_shard_order(urls: list[str]) -> list[str]:
    """Sample keys as stored, shard after shard, without the broken samples."""
    keys = []
    for url in urls:
        with tarfile.open(url) as tar:
            for name in tar.getnames():
                key = name.split(".", 1)[0]
                if not key.startswith("broken") and (not keys or keys[-1] != key):
                    keys.append(key)
    return keys


# ------------------------------------------------------------------------------ clipkit's loader with workers


def test_eval_rows_embeddings_and_metrics_do_not_depend_on_workers(model_dir, three_shards_broken, tmp_path):
    from clipkit.evaluate import run as evals
    from clipkit.evaluate.embed import embed_parts, embed_shards
    from clipkit.index import load_embeddings
    from clipkit.models import load_model

    bundle = load_model(model_dir)
    urls = _urls(three_shards_broken)
    assert len(urls) == 3
    runs = {
        w: embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, urls, 64, texts=True, workers=w)
        for w in (0, 2, 5)  # 5 > 3 shards: capped at one worker per shard
    }
    ref = runs[0]
    assert len(ref.meta) == 360 and ref.skipped == {"bad_image": 2}
    assert [m["key"] for m in ref.meta] == _keys_in_shard_order(urls)
    for w, emb in runs.items():
        assert [m["key"] for m in emb.meta] == [m["key"] for m in ref.meta], w  # shard order at any count
        assert emb.skipped == ref.skipped, w  # skip counts travel back from the workers
        # Same batches; the model runs on cores - workers threads (clipkit/threads.py), so only summation order differs.
        np.testing.assert_allclose(emb.image, ref.image, rtol=0, atol=1e-6, err_msg=f"workers={w}")
        np.testing.assert_array_equal(emb.text_to_image, ref.text_to_image)

    # A parts export (one shard per part) with a worker per part gives the same rows.
    report = embed_parts(
        bundle.model, bundle.eval_transform, bundle.tokenizer, urls, tmp_path / "emb", batch_size=64, workers=1
    )
    assert report["complete"]
    exported = load_embeddings(tmp_path / "emb")
    np.testing.assert_allclose(np.asarray(exported["image_emb"]), ref.image, rtol=0, atol=1e-6)
    assert [m["key"] for m in exported["meta"]] == [m["key"] for m in ref.meta]

    classnames = evals.read_lines(three_shards_broken / "classnames.txt", "classnames")
    templates = evals.read_lines(three_shards_broken / "templates.txt", "templates")
    spec = "::".join(urls)
    # Two samples are broken: report on the other 360 (allow_missing), the same at any worker count.
    metrics = [evals.zeroshot(bundle, spec, classnames, templates, 64, "cpu", w, allow_missing=True) for w in (0, 2)]
    assert metrics[0] == metrics[1] and metrics[0]["n_samples"] == 360


def test_model_threads_restored_after_eval_with_workers(model_dir, three_shards):
    import torch

    from clipkit.evaluate.embed import embed_shards
    from clipkit.models import load_model
    from clipkit.threads import available_cores, threads_for, using_threads

    bundle = load_model(model_dir)
    before = torch.get_num_threads()
    with using_threads(threads_for(1)):  # the one policy (clipkit/threads.py): a core for the worker
        assert torch.get_num_threads() == max(1, available_cores() - 1)
    assert torch.get_num_threads() == before
    embed_shards(bundle.model, bundle.eval_transform, bundle.tokenizer, _urls(three_shards), 64, workers=2)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------- the benchmark


def _bench_args(model_dir: Path, shards: Path, workers: int, runs: int, out: Path) -> list[str]:
    return [
        "--checkpoint",
        str(model_dir),
        "--data",
        str(shards / "test-*.tar"),
        "--classnames",
        str(shards / "classnames.txt"),
        "--templates",
        str(shards / "templates.txt"),
        "--batch-size",
        "64",
        "--workers",
        str(workers),
        "--runs",
        str(runs),
        "--json",
        str(out),
    ]


def _check_report(report: dict, runs: int) -> None:
    assert len(report["runs"]) == len(report["ratios"]) == runs
    assert [p["order"][0] for p in report["runs"]] == ["clipkit", "clip_benchmark"][:runs]  # alternating order
    for pair in report["runs"]:
        ck, cb = pair["clipkit"], pair["clip_benchmark"]
        assert ck["n_images"] == cb["n_images"] == 360
        assert ck["seconds"] > 0 and cb["seconds"] > 0
        assert math.isclose(pair["ratio"], cb["seconds"] / ck["seconds"])
        assert ck["metrics"] == cb["metrics"] and pair["metrics_equal"]
        assert ck["torch_threads"] == cb["torch_threads"] == [report["settings"]["threads"]] and pair["threads_equal"]
    assert (
        report["metrics_equal"]
        and report["threads_equal"]
        and math.isfinite(report["median_ratio"])
        and report["median_ratio"] > 0
    )


def test_bench_smoke_prints_ratio_and_equal_metrics(model_dir, three_shards, tmp_path, capsys, workers=2):
    """The whole script, both sides in this process: CLIP_benchmark's loop is the worker's reference copy here."""
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rc = bench.main([*_bench_args(model_dir, three_shards, workers, 2, out), "--in-process", "--reference"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "throughput ratio clipkit / CLIP_benchmark: median" in printed
    assert "metrics identical in every run: True" in printed
    assert "reference copy of clip_benchmark 1.6.2's loop" in printed
    report = json.loads(out.read_text())
    _check_report(report, 2)
    assert report["settings"]["workers"] == workers and report["settings"]["batch_size"] == 64
    assert 0 <= report["metrics"]["acc1"] <= 1 and 0 <= report["metrics"]["mean_per_class_recall"] <= 1


def test_bench_fails_on_a_ratio_floor_it_misses(model_dir, three_shards, tmp_path, capsys):
    bench = _load_bench()
    args = [*_bench_args(model_dir, three_shards, 0, 1, tmp_path / "b.json"), "--in-process", "--reference"]
    assert bench.main([*args, "--min-ratio", "1e9"]) == 1
    assert "median" in capsys.readouterr().out


def _cb_python() -> str | None:
    """The python of a venv with clip-benchmark: $CLIPKIT_CB_PYTHON, else /tmp/cbenv/bin/python if it exists."""
    path = os.environ.get("CLIPKIT_CB_PYTHON") or "/tmp/cbenv/bin/python"
    if not Path(path).is_file():
        return None
    probe = subprocess.run(
        [path, "-c", "import clip_benchmark"], capture_output=True, env=dict(os.environ, PYTHONPATH="")
    )
    return path if probe.returncode == 0 else None


@pytest.mark.slow
def test_bench_against_real_clip_benchmark_in_separate_processes(model_dir, three_shards, tmp_path):
    """As the benchmark runs: fresh processes per side, CLIP_benchmark 1.6.2 itself from its venv."""
    cb_python = _cb_python()
    if cb_python is None:
        pytest.skip("no CLIP_benchmark venv (set CLIPKIT_CB_PYTHON; see tools/compare_clip_benchmark.py to make one)")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "tools.bench.bench_zeroshot", *_bench_args(model_dir, three_shards, 1, 2, out),
           "--cb-python", cb_python]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    _check_report(report, 2)
    assert report["implementations"]["clip_benchmark"].startswith("clip_benchmark 1.6")
