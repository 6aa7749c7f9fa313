"""Where clipkit calls a dependency's function instead of its own, the result is what clipkit's own rule gave."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image

from clipkit.models.factory import build_transforms
from clipkit.optim import param_groups


def test_param_groups_put_gains_biases_and_logit_scale_bias_out_of_weight_decay(tiny_model_cfg):
    model = open_clip.CLIP(**tiny_model_cfg, init_logit_bias=-10.0)
    model.visual.conv1.requires_grad_(False)  # frozen parameters are in no group
    groups = param_groups(model, 0.2)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # clipkit's rule: no decay on any tensor under 2-d and on the logit scale and bias
    plain = {id(p) for n, p in trainable.items() if p.ndim < 2 or n in ("logit_scale", "logit_bias")}
    assert by_decay[0.0] == plain and "logit_bias" in trainable
    assert by_decay[0.2] == {id(p) for p in trainable.values()} - plain


def test_transforms_equal_open_clips_explicit_ones():
    cfg = {
        "size": 32,
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.3, 0.4),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    train, val = build_transforms(cfg)
    ref_val = open_clip.image_transform(32, is_train=False, mean=cfg["mean"], std=cfg["std"], interpolation="bicubic")
    ref_train = open_clip.image_transform(32, is_train=True, mean=cfg["mean"], std=cfg["std"], interpolation="bicubic")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    assert torch.equal(val(img), ref_val(img))
    torch.manual_seed(3)
    a = train(img)
    torch.manual_seed(3)
    assert torch.equal(a, ref_train(img))
