"""data.augment: open_clip's aug_cfg as recipe keys (defaults: open_clip's plain transform, on the fast path)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.cli import main
from clipkit.config import AugmentCfg, RecipeError, load_recipe
from clipkit.data.pipeline import FastCrop
from clipkit.models.factory import build_transforms
from tests.test_resilience import write_recipe

PRE = {
    "size": 32,
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.3, 0.4),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def test_default_augment_is_open_clips_plain_transform_on_the_fast_path():
    default, _ = build_transforms(PRE, dataclasses.asdict(AugmentCfg()))
    plain, _ = build_transforms(PRE)
    assert FastCrop.of(default) == FastCrop.of(plain) is not None
    assert FastCrop.of(build_transforms(PRE, {"scale": (0.5, 1.0)})[0]).scale == (0.5, 1.0)


def test_gray_scale_and_color_jitter_apply():
    train, _ = build_transforms(PRE, {"scale": (1.0, 1.0), "gray_scale_prob": 1.0})
    assert FastCrop.of(train) is None  # extra steps: the plain path
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    x = train(img) * torch.tensor(PRE["std"])[:, None, None] + torch.tensor(PRE["mean"])[:, None, None]
    assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)  # gray: R = G = B


def test_color_jitter_without_its_probability_is_refused(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir)
    with pytest.raises(RecipeError, match="data.augment.color_jitter"):
        load_recipe(recipe, ["data.augment.color_jitter=[0.4, 0.4, 0.4, 0.1]"])
    with pytest.raises(RecipeError, match="data.augment.scale"):
        load_recipe(recipe, ["data.augment.scale=[0.9, 1.5]"])


def test_training_with_augmentation_through_the_cli(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=2, warmup=1, checkpoint_every=0, log_every=1)
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "data.workers=0", "data.augment.scale=[0.5, 1.0]",
            "data.augment.color_jitter=[0.4, 0.4, 0.4, 0.1]", "data.augment.color_jitter_prob=0.8",
            "data.augment.gray_scale_prob=0.2"]  # fmt: skip
    assert main(args) == 0
    saved = (tmp_path / "run/recipe.yaml").read_text()
    assert "gray_scale_prob: 0.2" in saved
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == 2
