"""Loss: hand-computed values, open_clip's losses as reference, and feature-cached accumulation vs a big batch."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipkit.loss import ContrastiveLoss, clip_loss_rows, siglip_loss_rows
from clipkit.models.factory import build_model
from clipkit.step import forward_backward


def _features(n: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def test_clip_loss_hand_computed():
    # Two orthogonal pairs, perfectly aligned: logits [[s, 0], [0, s]]; CE = log(1 + e^-s) in both directions.
    img = torch.eye(2, dtype=torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64)
    loss = clip_loss_rows(img, img, img, img, s)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-12)


def test_siglip_loss_hand_computed():
    # Same features, scale 2, bias -1: positives have logit 1, negatives -1; each pair costs log(1 + e^-1).
    img = torch.eye(2, dtype=torch.float64)
    loss = siglip_loss_rows(img, img, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(4 * math.log(1 + math.exp(-1.0)) / 2, abs=1e-12)


def test_clip_loss_row_offset_selects_diagonal_block():
    img, txt = _features(6, 8, 0)
    s = torch.tensor(10.0, dtype=torch.float64)
    full = clip_loss_rows(img, txt, img, txt, s)
    parts = [clip_loss_rows(img[i : i + 2], txt[i : i + 2], img, txt, s, row_offset=i) for i in (0, 2, 4)]
    assert torch.allclose(full, sum(parts) / 3, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_clip_loss_equals_open_clip(n):
    img, txt = _features(n, 16, n)
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = ContrastiveLoss("clip")(img, txt, scale)
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_siglip_loss_equals_open_clip():
    img, txt = _features(12, 16, 3)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = ContrastiveLoss("siglip")(img, txt, scale, bias)
    ref = open_clip.loss.SigLipLoss()(img, txt, scale, bias)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)


def test_siglip_without_bias_is_a_clear_error():
    img, txt = _features(4, 8, 1)
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")(img, txt, torch.tensor(1.0, dtype=torch.float64))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_cached_accumulation_equals_big_batch(tiny_model_cfg, kind):
    """K=4 micro-batches of 4 with feature caching give the gradient of one batch of 16, logit scale included."""
    torch.manual_seed(0)
    cfg = dict(tiny_model_cfg, init_logit_bias=-5.0) if kind == "siglip" else tiny_model_cfg
    cfg["vision_cfg"]["patch_dropout"] = 0.0
    model = build_model(cfg).double().train()  # no dropout: the big batch would draw other masks
    images = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    texts = open_clip.SimpleTokenizer(context_length=16)([f"a photo number {i}" for i in range(16)])
    loss_fn = ContrastiveLoss(kind)

    def run(micro):
        model.zero_grad()
        torch.manual_seed(123)
        loss = forward_backward(model, micro, loss_fn)
        return loss, _grads(model)

    big_loss, big = run([(images, texts)])
    small_loss, small = run([(images[i : i + 4], texts[i : i + 4]) for i in range(0, 16, 4)])
    assert torch.allclose(big_loss, small_loss, atol=1e-12)
    assert big.keys() == small.keys() and "logit_scale" in big
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-10, rtol=0), name


class _PullObjective:
    """A toy auxiliary loss: w * (sum over samples of image_feature . c) / (samples in the whole step)."""

    name = "pull"

    def __init__(self, weight: float, dim: int):
        self.weight, self.c = weight, torch.linspace(-1, 1, dim, dtype=torch.float64)

    def begin(self, micro_batches):
        self.total = sum(mb.images.shape[0] for mb in micro_batches)
        self.last = torch.zeros((), dtype=torch.float64)

    def __call__(self, model, output, mb):
        loss = self.weight * (output["image_features"] @ self.c).sum() / self.total
        self.last = self.last + loss.detach()
        return loss


def test_objective_adds_to_the_loss_and_accumulates_to_the_big_batch(tiny_model_cfg):
    """An auxiliary objective's gradient adds to the contrastive one, and K micro-batches give the big batch's."""
    torch.manual_seed(0)
    tiny_model_cfg["vision_cfg"]["patch_dropout"] = 0.0
    model = build_model(tiny_model_cfg).double().train()
    images = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    texts = open_clip.SimpleTokenizer(context_length=16)([f"photo {i}" for i in range(8)])
    loss_fn = ContrastiveLoss("clip")
    dim = model.text_projection.shape[1]

    def run(micro, objectives=()):
        model.zero_grad()
        loss = forward_backward(model, micro, loss_fn, objectives=objectives)
        return loss, _grads(model)

    plain_loss, plain = run([(images, texts)])
    obj = _PullObjective(0.5, dim)
    big_loss, big = run([(images, texts)], [obj])
    big_last = obj.last
    assert torch.equal(plain_loss, big_loss)  # the returned loss is the contrastive one
    with torch.no_grad():
        expected = 0.5 * (model(image=images, text=texts)[0] @ obj.c).mean()
    assert torch.allclose(big_last, expected, atol=1e-12)
    assert not torch.allclose(plain["visual.conv1.weight"], big["visual.conv1.weight"])

    small_loss, small = run([(images[:4], texts[:4]), (images[4:], texts[4:])], [obj])
    assert torch.allclose(obj.last, big_last, atol=1e-12)
    assert torch.allclose(small_loss, big_loss, atol=1e-12)
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-10, rtol=0), name


def _recompute_losses(model, loss_fn, micro, monkeypatch=None):
    seen = []
    orig = loss_fn.from_global

    def spy(*args):
        out = orig(*args)
        seen.append(out.detach())
        return out

    loss_fn.from_global = spy
    forward_backward(model, micro, loss_fn)
    return seen


def test_cached_accumulation_replays_patch_dropout(tiny_model_cfg, monkeypatch):
    """With patch dropout active, each recompute must draw the cached pass's masks again.

    Every recompute step rebuilds the same big-batch loss only if the masks were replayed; the negative control
    (RNG replay switched off) shows the check can fail.
    """
    import clipkit.step

    torch.manual_seed(0)
    tiny_model_cfg["vision_cfg"]["patch_dropout"] = 0.5
    model = build_model(tiny_model_cfg).double().train()
    images = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    texts = open_clip.SimpleTokenizer(context_length=16)([f"photo {i}" for i in range(8)])
    micro = [(images[:4], texts[:4]), (images[4:], texts[4:])]
    seen = _recompute_losses(model, ContrastiveLoss("clip"), micro)
    assert len(seen) == 2 and torch.allclose(seen[0], seen[1], atol=1e-12)

    monkeypatch.setattr(clipkit.step, "_set_rng_state", lambda state, device: None)
    seen = _recompute_losses(model, ContrastiveLoss("clip"), micro)
    assert not torch.allclose(seen[0], seen[1], atol=1e-6)


# Multiple positives: pairs of a batch in one group (same caption, same label) are positives of each other.


def test_multi_positive_clip_loss_hand_computed():
    # Features one-hot, scale 1: logits = I (3x3); groups [0, 0, 1]. Rows 0 and 1 spread their target over columns
    # 0 and 1: CE = L - (1 + 0)/2 with L = log(e + 2); row 2 is alone: CE = L - 1. Both directions alike.
    x = torch.eye(3, dtype=torch.float64)
    groups = torch.tensor([5, 5, 9])
    loss = clip_loss_rows(x, x, x, x, torch.tensor(1.0, dtype=torch.float64), 0, groups, groups)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 2 / 3, abs=1e-12)


def test_multi_positive_siglip_loss_hand_computed():
    # Same features, scale 2, bias -1: groups [0, 0]: all four pairs positive; logits 1 on the diagonal, -1 off it.
    x = torch.eye(2, dtype=torch.float64)
    groups = torch.tensor([0, 0])
    loss = siglip_loss_rows(x, x, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64),
                            0, groups, groups)  # fmt: skip
    expected = (2 * math.log(1 + math.exp(-1.0)) + 2 * math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_distinct_groups_give_exactly_the_plain_loss(kind):
    img, txt = _features(6, 8, 3)
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    loss = ContrastiveLoss(kind)
    assert torch.equal(loss(img, txt, s, b, torch.arange(6) * 11), loss(img, txt, s, b))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multi_positive_cached_accumulation_equals_big_batch(tiny_model_cfg, kind):
    """K=4 micro-batches of 4 with repeated groups across micro-batches == one batch of 16, logit scale included."""
    torch.manual_seed(0)
    cfg = dict(tiny_model_cfg, init_logit_bias=-5.0) if kind == "siglip" else tiny_model_cfg
    model = build_model(cfg).double().train()
    images = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    texts = open_clip.SimpleTokenizer(context_length=16)([f"a photo number {i}" for i in range(16)])
    groups = torch.arange(16) % 5  # label-like groups over distinct captions, each spanning several micro-batches
    loss_fn = ContrastiveLoss(kind)

    def run(micro):
        model.zero_grad()
        loss = forward_backward(model, micro, loss_fn)
        return loss, _grads(model)

    big_loss, big = run([(images, texts, groups)])
    plain_loss, _ = run([(images, texts)])
    small_loss, small = run([(images[i : i + 4], texts[i : i + 4], groups[i : i + 4]) for i in range(0, 16, 4)])
    assert (big_loss - plain_loss).abs() > 1e-6  # the groups change the objective...
    assert torch.allclose(big_loss, small_loss, atol=1e-12)  # ...and accumulation keeps it exact
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-10, rtol=0), name


def test_identical_captions_already_share_their_target_in_infonce_but_not_in_siglip():
    """Pairs with the same caption have identical text features: InfoNCE's plain loss then equals the multi-positive
    loss (the group's equal logits split any target alike), while SigLIP's plain loss asks +1 and -1 of one logit."""
    img, _ = _features(4, 8, 5)
    txt = F.normalize(torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=-1)
    txt = txt[torch.tensor([0, 0, 1, 1])]  # two captions, each twice
    groups = torch.tensor([0, 0, 1, 1])
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    assert clip_loss_rows(img, txt, img, txt, s, 0, groups, groups).item() == pytest.approx(
        clip_loss_rows(img, txt, img, txt, s).item(), abs=1e-12
    )
    assert siglip_loss_rows(img, txt, s, b, 0, groups, groups) != siglip_loss_rows(img, txt, s, b)


def test_group_ids_follow_caption_or_json_key():
    from clipkit.data.pipeline import group_id

    a = {"__key__": "a", "__url__": "s.tar", "json": b'{"label": 3}'}
    b = {"__key__": "b", "__url__": "s.tar", "json": b'{"label": 3}'}
    c = {"__key__": "c", "__url__": "s.tar", "json": b"{}"}
    assert group_id(a, "x", "caption") == group_id(b, "x", "caption") != group_id(a, "y", "caption")
    assert group_id(a, "x", "label") == group_id(b, "y", "label")
    assert group_id(c, "x", "label") != group_id({**c, "__key__": "d"}, "x", "label")  # no label: alone


def test_training_with_label_positives_through_the_cli(tmp_path, digits_dir):
    """`train.positives=label` on the real digits (10 classes, batch 8: shared labels in every batch) trains."""
    import json

    from clipkit.cli import main
    from tests.test_resilience import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", digits_dir, steps=3, warmup=1, checkpoint_every=0, log_every=1)
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "data.workers=0", "train.positives=label"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
