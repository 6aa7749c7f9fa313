"""Parameter groups, AdamW and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases (any 1-d tensor) and the logit scale/bias get no weight decay, as in CLIP and open_clip."""
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: with and without weight decay."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW over `param_groups`: fused on CPU and CUDA, foreach elsewhere.

    The fused kernel makes one pass over each parameter's memory (param, grad, two moments) where foreach makes
    about ten: on the quickstart's 8.1M parameters, one CPU core, 11.5 ms a step against 35.5 ms (foreach) and
    55.5 ms (torch's CPU default, a per-parameter loop, which open_clip_train gets; tools/bench/bench_optim.py). It
    also takes `found_inf`, which skips a step on the device without a host sync (see train.NonFiniteGuard).
    """
    fused = all(p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for p in model.parameters())
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kwargs)


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at `step`: linear warmup from 1/warmup to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int, lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state travels in checkpoints) following `lr_factor`."""
    ratio = min_lr / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, ratio))
