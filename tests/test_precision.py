"""`clipkit.precision`: which dtype `auto` picks, and what the bf16 context runs (unit + reference against fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from clipkit import precision
from clipkit.finetune.head import ImageClassifier
from clipkit.models import create_model


def test_resolve_keeps_explicit_choices_and_auto_follows_amx(monkeypatch):
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    assert precision.resolve("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    assert precision.resolve("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="'fp16'"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="resolve 'auto' first"), precision.autocast("auto", "cpu"):
        pass


def _attention_kernels(run) -> set[str]:
    """Names of the attention ops `run()` calls (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages() if "attention" in e.key or e.key in ("aten::bmm", "aten::_softmax")}


def test_bf16_on_cpu_runs_matmuls_in_bf16_and_attention_on_the_math_backend():
    q, k, v = (torch.randn(4, 2, 5, 8, requires_grad=True) for _ in range(3))

    def step(p: str):
        def run():
            with precision.autocast(p, "cpu"):
                out = F.scaled_dot_product_attention(q, k, v)
            out.float().sum().backward()

        return run

    fp32, bf16 = _attention_kernels(step("fp32")), _attention_kernels(step("bf16"))
    assert any("flash_attention" in name for name in fp32)  # the default CPU kernel: the check can fail
    assert not any("flash_attention" in name for name in bf16) and "aten::bmm" in bf16
    with precision.autocast("bf16", "cpu"):
        assert torch.nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert torch.nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.float32


def test_bf16_step_is_close_to_fp32():
    """A cross-entropy step of a real open_clip ViT under bf16 autocast against fp32: loss and gradients agree to
    bf16's ~3 significant digits, and the weights stay fp32."""
    from clipkit.config import ModelCfg
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = create_model(ModelCfg(config=TINY_MODEL)).model
    clf = ImageClassifier(model, torch.nn.Linear(model.visual.output_dim, 10))
    size = model.visual.image_size[0]
    images, labels = torch.randn(16, 3, size, size), torch.randint(0, 10, (16,))
    grads, losses = {}, {}
    for p in ("fp32", "bf16"):
        clf.zero_grad(set_to_none=True)
        with precision.autocast(p, "cpu"):
            loss = F.cross_entropy(clf(images), labels)
        loss.backward()
        losses[p] = float(loss.detach())
        grads[p] = torch.cat([q.grad.flatten() for q in clf.parameters() if q.grad is not None])
    assert all(q.dtype == torch.float32 for q in clf.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 did run
    cosine = F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize(("train_precision", "flash"), [("fp32", True), ("bf16", False)])
def test_training_autocast_takes_the_math_attention_under_bf16(train_precision, flash):
    """`clipkit train`'s forward context (`Run.autocast`): Accelerate's autocast, plus math attention under bf16."""
    from types import SimpleNamespace

    from clipkit.train import Run

    dtype = torch.bfloat16 if train_precision == "bf16" else torch.float32
    accelerator = SimpleNamespace(  # what Accelerate's `autocast()` gives on a CPU for each mixed_precision
        device=torch.device("cpu"),
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
    )
    run = SimpleNamespace(
        accelerator=accelerator, recipe=SimpleNamespace(train=SimpleNamespace(precision=train_precision))
    )
    q, k, v = (torch.randn(4, 2, 5, 8, requires_grad=True) for _ in range(3))

    def step():
        with Run.autocast(run):
            out = F.scaled_dot_product_attention(q, k, v)
        assert out.dtype == dtype
        out.float().sum().backward()

    assert any("flash_attention" in name for name in _attention_kernels(step)) == flash
