"""Shared fixtures: offline hub, tiny real models built from configs, real shards built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# A tiny but real open_clip CLIP (ViT image tower, transformer text tower, CLIP BPE tokenizer).
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


@pytest.fixture
def tiny_model_cfg() -> dict:
    import copy

    return copy.deepcopy(TINY_MODEL)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The real scikit-learn digits as shards (built once per test session, ~2 s)."""
    from clipkit.data.builtin import build

    out = tmp_path_factory.mktemp("digits")
    build("digits", out)
    return out


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory):
    """The quickstart's real shard sets (emoji + Fashion-MNIST), built once per test session (~20 s)."""
    from clipkit.data.builtin import build

    root = tmp_path_factory.mktemp("quickstart-data")
    for name in ("emoji", "fashion-mnist"):
        build(name, root / name)
    return root


def train_until_preempted(recipe, run, step: int, monkeypatch) -> None:
    """`clipkit train RECIPE --out RUN` with a SIGTERM during `step`: it checkpoints and exits 75 (resumable)."""
    from clipkit import faults
    from clipkit.cli import main
    from clipkit.stopping import EXIT_PREEMPTED

    monkeypatch.setitem(faults._FAULTS, "sigterm", {step})
    assert main(["train", str(recipe), "--out", str(run)]) == EXIT_PREEMPTED
    monkeypatch.setitem(faults._FAULTS, "sigterm", set())
