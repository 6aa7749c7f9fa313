"""End to end on real shards in a temp folder: train a few steps, evaluate, export, index, query, via the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipkit.cli import main
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, digits_dir):
    recipe = {
        "name": "smoke",
        "data_root": str(digits_dir),
        "model": {"config": TINY_MODEL},
        "data": {"sources": [{"shards": "train-*.tar"}], "batch_size": 16, "workers": 1},
        "train": {"steps": 6, "warmup": 2, "lr": 1e-3, "log_every": 2, "checkpoint_every": 3},
        "eval": {
            "tasks": [
                {
                    "task": "zeroshot",
                    "dataset": "digits",
                    "shards": "test-*.tar",
                    "classnames": "classnames.txt",
                    "templates": "templates.txt",
                },
                {"task": "retrieval", "dataset": "digits", "shards": "test-*.tar"},
            ]
        },
        "index": {"shards": "test-*.tar"},
    }
    path = tmp_path_factory.mktemp("recipe") / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, recipe_file):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(recipe_file), "--out", str(out)]) == 0
    return out


def test_run_folder_has_everything(run_dir):
    for f in [
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "model/open_clip_config.json",
        "model/open_clip_model.safetensors",
        "eval/zeroshot-digits.json",
        "eval/retrieval-digits.json",
        "index/index.faiss",
        "checkpoints/step-00000003/COMPLETE",
        "checkpoints/step-00000006/COMPLETE",
    ]:
        assert (run_dir / f).exists(), f
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert "eval/digits/acc1" in rows[-1] and (run_dir / "metrics.png").is_file()
    result = json.loads((run_dir / "eval/zeroshot-digits.json").read_text())
    assert set(result) == {"dataset", "model", "task", "metrics"}
    assert result["metrics"]["n_samples"] == 360 and 0 <= result["metrics"]["acc1"] <= 1


def test_cli_eval_reproduces_the_training_eval(run_dir, digits_dir, tmp_path):
    out = tmp_path / "zs.json"
    args = [
        "eval",
        "zeroshot",
        "--checkpoint",
        str(run_dir / "model"),
        "--data",
        str(digits_dir / "test-*.tar"),
        "--classnames",
        str(digits_dir / "classnames.txt"),
        "--templates",
        str(digits_dir / "templates.txt"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    ours = json.loads(out.read_text())["metrics"]
    during = json.loads((run_dir / "eval/zeroshot-digits.json").read_text())["metrics"]
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[k] == pytest.approx(during[k], abs=1e-9), k


def test_cli_retrieval_embed_index_query(run_dir, digits_dir, tmp_path, capsys):
    out = tmp_path / "ret.json"
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--checkpoint",
                str(run_dir / "model"),
                "--data",
                str(digits_dir / "test-*.tar"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "image_retrieval_recall@5" in json.loads(out.read_text())["metrics"]
    emb = tmp_path / "emb"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run_dir / "model"),
                "--data",
                str(digits_dir / "test-*.tar"),
                "--out",
                str(emb),
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    assert main(["index", "build", str(emb)]) == 0
    capsys.readouterr()
    assert main(["index", "query", str(emb / "index"), "--text", "the number seven", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["key"].startswith("digits") for h in hits)


def test_resume_latest_continues_from_the_last_checkpoint(run_dir, recipe_file):
    assert main(["train", str(recipe_file), "--out", str(run_dir), "--resume", "latest", "train.steps=8"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Continued from step 6 (the run's last checkpoint), not restarted: the loss rows go on 2, 4, 6, then 8.
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]
    assert (run_dir / "checkpoints/step-00000008/COMPLETE").exists()


def test_bad_override_fails_fast_with_the_key(recipe_file, capsys):
    assert main(["train", str(recipe_file), "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err


def test_two_process_quickstart_runs(tmp_path, quickstart_data):
    """The quickstart recipe itself, a few steps on 2 real processes (torchrun, gloo): both step together."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clipkit.cli", "train", str(recipe), "--out", str(tmp_path / "run2"), f"data_root={quickstart_data}",
           "train.steps=4", "train.warmup=1", "train.log_every=2", "data.batch_size=16", "eval.tasks=[]",
           "index.shards="]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run2/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    summary = json.loads((tmp_path / "run2/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32


def test_fsdp_on_cpu_is_refused_before_work(recipe_file, capsys):
    assert main(["train", str(recipe_file), "train.fsdp=true"]) == 2
    assert "train.fsdp" in capsys.readouterr().err


def test_model_folder_loads_in_open_clip_unchanged(run_dir):
    """A clipkit model folder is an open_clip `local-dir:` folder: same embeddings, no converter."""
    import open_clip
    import torch

    from clipkit.models import load_model

    ours = load_model(run_dir / "model")
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'model'}")
    theirs.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir / 'model'}")
    images = torch.randn(4, 3, 16, 16)
    texts = ["the number one", "a handwritten digit two", "three", "the digit nine"]
    with torch.no_grad():
        assert torch.equal(ours.tokenizer(texts), tokenizer(texts))
        for a, b in [
            (ours.model.encode_image(images), theirs.encode_image(images)),
            (ours.model.encode_text(ours.tokenizer(texts)), theirs.encode_text(tokenizer(texts))),
        ]:
            assert (a - b).abs().max().item() < 1e-6
