"""Parameter groups, AdamW, the warmup + cosine learning-rate schedule, and the step that skips non-finite ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay

from clipkit.stopping import TrainingStopped


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: timm's split, no decay on gains, biases (any tensor under 2-d)
    and the logit scale/bias (0-d, named as well in case a tower makes them 1-d), as in CLIP and open_clip."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=("logit_scale", "logit_bias"))


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    extra: Sequence[torch.nn.Module] = (),
    groups: list[dict] | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups` of the model and of `extra` modules (auxiliary heads): fused on CPU and CUDA,
    foreach elsewhere.

    `groups` replaces those groups (e.g. `clipkit.finetune.layer_decay.layer_decay_groups`); a group's "lr_scale"
    becomes its own learning rate, `lr * lr_scale`, which the warmup + cosine schedule then scales like the others.

    The fused kernel makes one pass over each parameter's memory (param, grad, two moments) where foreach makes
    about ten: on the quickstart's 8.1M parameters, one CPU core, 11.5 ms a step against 35.5 ms (foreach) and
    55.5 ms (torch's CPU default, a per-parameter loop, which open_clip_train gets; tools/bench/bench_optim.py). It
    also takes `found_inf`, which skips a step on the device without a host sync (see train.NonFiniteGuard).
    """
    modules = [model, *extra]
    params = [p for m in modules for p in m.parameters()]
    fused = all(p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for p in params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    if groups is None:
        groups = [g for m in modules for g in param_groups(m, weight_decay)]
    else:
        groups = [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


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


class NonFiniteGuard:
    """Skips optimizer steps whose gradient norm is not finite and counts them, with no host sync per step.

    With a fused AdamW (clipkit's optimizer on CPU and CUDA) the skip happens on the device: the optimizer's
    `found_inf` tensor (the protocol GradScaler uses) makes the kernel leave parameters, moments and step counts
    untouched, and the counts accumulate in device tensors that the host reads only in `sync` (log steps,
    checkpoints, the end). Any other optimizer falls back to reading the flag every step. Every process decides
    alike with no collective: DDP and FSDP leave identical gradients, hence identical norms, on all of them.

    Args:
        optimizer: the (possibly Accelerate-wrapped) optimizer.
        device: where the gradients live.
        max_in_a_row: this many skipped steps in a row stop the run (checked in `sync`).
        skipped: steps skipped before (a resumed run's count).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, max_in_a_row: int, skipped: int = 0):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        self.on_device = bool(self.inner.defaults.get("fused")) and getattr(
            self.inner, "_step_supports_amp_scaling", False
        )
        self.max_in_a_row, self.total = max_in_a_row, skipped
        # [new skips since the last sync, current streak, longest streak since the last sync]
        self.counts = torch.zeros(3, device=device)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Steps the optimizer unless `grad_norm` is not finite; clears the gradients either way."""
        bad = (~torch.isfinite(grad_norm.detach().float())).float()  # [] 0. or 1., on the device
        if self.on_device:
            self.inner.found_inf = bad
            optimizer.step()
            self.inner.found_inf = None
        elif bad.item():  # a host sync: the fallback for optimizers without found_inf
            pass
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        new, run, worst = self.counts.unbind()
        new.add_(bad)
        run.add_(bad).mul_(bad)  # +1 on a skip, back to 0 on a good step
        torch.maximum(worst, run, out=worst)

    def sync(self, step: int, where: Path) -> int:
        """Reads the counts (one host sync); returns all skipped steps so far.

        Raises:
            TrainingStopped: when `max_in_a_row` steps in a row were skipped since the last sync.
        """
        new, run, worst = self.counts.tolist()
        self.total += int(new)
        self.counts[0] = 0
        self.counts[2] = run
        if worst >= self.max_in_a_row:
            raise TrainingStopped(
                f"step {step}: {int(worst)} steps in a row had a non-finite loss or gradient; stopping. The last "
                f"good checkpoint is kept under {where} (lower train.lr, check the data)"
            )
        return self.total
