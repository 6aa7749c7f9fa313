"""Forward and backward of one optimizer step: plain, or feature-cached accumulation (GradCache).

Naive accumulation averages K small-batch losses (fewer negatives: a different objective). Here K micro-batches
give exactly the gradient of one K-times-larger batch:

1. no-grad pass: features of all K micro-batches, with the RNG state saved before each one;
2. for each micro-batch j: restore its RNG state (dropout / patch dropout replay identically), recompute its
   features with grad, splice them into the cached global features, backward the full-batch loss.

Only micro-batch j's encoders get gradient in step j, so the encoder grads sum to the big-batch grads. The
logit scale and bias appear in every step's loss; they are kept live only in the last step (detached before), so
their gradient is the big-batch one too (open_clip's accum_freq gives them K times it). It must be the last step:
that is the one DDP synchronizes, and a parameter without gradient there would stall its all-reduce bucket.

Cost: one extra forward per micro-batch (about +33% compute); memory of one micro-batch's activations plus the
cached features of the whole global batch, [W*K*n, D] per modality on every process.

Auxiliary objectives (SLIP's image self-supervision, CoCa's captioning) add their own weighted loss to the
contrastive loss of each micro-batch's with-grad forward, before the same backward: L = L_contrastive + sum_o L_o.
An objective sees the model's raw output and the micro-batch; `begin` runs once per step before any forward, so
an objective can normalize by step-wide counts (caption tokens of every micro-batch and process) and the K
micro-steps sum to its big-batch loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from clipkit.loss import ContrastiveLoss, gather_no_grad, world


@dataclass
class MicroBatch:
    """One micro-batch on the device.

    Attributes:
        images: [n, 3, H, W].
        texts: tokens [n, L].
        groups: group ids [n] int64 (multiple positives), or None.
        extras: what auxiliary objectives need besides (e.g. "views": [n, 2, 3, H, W] for SLIP).
    """

    images: torch.Tensor
    texts: torch.Tensor
    groups: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, mb: MicroBatch | tuple) -> MicroBatch:
        """A MicroBatch from itself or a tuple (images, texts[, groups])."""
        return mb if isinstance(mb, MicroBatch) else cls(*mb)


class Objective(Protocol):
    """An auxiliary loss added to the contrastive loss of every micro-batch.

    Attributes:
        name: logged as `loss/<name>` (metrics.jsonl).
        last: the weighted loss of the last step, summed over its micro-batches (detached), for logging.
    """

    name: str
    last: torch.Tensor

    def begin(self, micro_batches: Sequence[MicroBatch]) -> None:
        """Called once per step before any forward (step-wide normalizers; resets `last`)."""

    def __call__(self, model: torch.nn.Module, output, mb: MicroBatch) -> torch.Tensor:
        """The weighted loss of micro-batch `mb` (a scalar with grad), from the model's output dict (`_forward`)."""


def _forward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor):
    """(image_features [n, D], text_features [n, D], logit_scale, logit_bias or None, output dict), normalized.

    The output dict holds those four under open_clip's names plus whatever else a dict-returning model gives (CoCa in
    training: `labels`, `caption_states`, `caption_projection`; clipkit/models/coca.py); it is what objectives see.
    """
    out = model(image=images, text=texts)
    if not isinstance(out, dict):
        keys = ("image_features", "text_features", "logit_scale", "logit_bias")
        out = dict(zip(keys, out, strict=False))
    return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"), out


def _auxiliary(objectives: Sequence[Objective], model: torch.nn.Module, out, mb: MicroBatch, loss: torch.Tensor):
    for obj in objectives:
        loss = loss + obj(model, out, mb)
    return loss


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch | tuple[torch.Tensor, ...]],
    loss_fn: ContrastiveLoss,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    objectives: Sequence[Objective] = (),
) -> torch.Tensor:
    """Runs forward and backward for one optimizer step; gradients are left in `.grad`.

    Args:
        model: the (possibly DDP-wrapped) dual encoder; called as model(image=..., text=...).
        micro_batches: K MicroBatch (or tuples (images [n, 3, H, W], tokens [n, L][, group ids [n] int64])); every
            process passes the same K and n.
        loss_fn: the contrastive loss.
        backward: how to backpropagate (accelerator.backward under Accelerate).
        no_sync: context manager that suspends DDP's gradient all-reduce (all micro-steps but the last).
        autocast: mixed-precision context for the forward passes.
        objectives: auxiliary losses added to each micro-batch's contrastive loss (their values: `obj.last`).

    Returns:
        The contrastive loss of the whole step (a detached scalar): the big-batch loss when K > 1.
    """
    micro_batches = [MicroBatch.of(mb) for mb in micro_batches]
    groups = [mb.groups for mb in micro_batches]
    for obj in objectives:
        obj.begin(micro_batches)
    if len(micro_batches) == 1:
        mb = micro_batches[0]
        with autocast():
            img, txt, scale, bias, out = _forward(model, mb.images, mb.texts)
            loss = loss_fn(img, txt, scale, bias, groups[0])
            total = _auxiliary(objectives, model, out, mb, loss)
        backward(total)
        return loss.detach()

    device = micro_batches[0].images.device
    rank, w = world()
    n = micro_batches[0].images.shape[0]
    k = len(micro_batches)
    states, cache_img, cache_txt = [], [], []
    with torch.no_grad(), autocast():
        for mb in micro_batches:
            if mb.images.shape[0] != n:
                raise ValueError(f"accumulation needs equal micro-batches: got {mb.images.shape[0]} and {n} samples")
            states.append(_rng_state(device))
            img, txt, *_ = _forward(model, mb.images, mb.texts)
            cache_img.append(img)
            cache_txt.append(txt)
    # Global column order: (rank, micro-batch, row); this process's rows start at rank * K * n.
    local_img, local_txt = torch.cat(cache_img), torch.cat(cache_txt)  # [K*n, D]
    all_img = gather_no_grad(local_img).view(w, k, n, -1)  # [W, K, n, D]
    all_txt = gather_no_grad(local_txt).view(w, k, n, -1)
    # Group ids in the same column order: [W*K*n] int64, this process's rows at rank * K * n.
    all_groups = gather_no_grad(torch.cat(groups)) if groups[0] is not None else None
    row_groups = all_groups.view(w, k * n)[rank] if all_groups is not None else None
    after_first_pass = _rng_state(device)

    total = torch.zeros((), device=device)
    for j, mb in enumerate(micro_batches):
        _set_rng_state(states[j], device)
        sync = contextlib.nullcontext() if j == k - 1 else no_sync()
        with sync:
            with autocast():
                img, txt, scale, bias, out = _forward(model, mb.images, mb.texts)
                if j < k - 1:  # scale and bias take their gradient once, in the last (DDP-synchronized) step
                    scale = scale.detach()
                    bias = bias.detach() if bias is not None else None
                img_g = loss_fn.gather(img).view(w, 1, n, -1)  # live micro-batch j of every process
                txt_g = loss_fn.gather(txt).view(w, 1, n, -1)
                cols_img = torch.cat([all_img[:, :j], img_g, all_img[:, j + 1 :]], dim=1).flatten(0, 2)
                cols_txt = torch.cat([all_txt[:, :j], txt_g, all_txt[:, j + 1 :]], dim=1).flatten(0, 2)
                rows_img = cols_img.view(w, k * n, -1)[rank]
                rows_txt = cols_txt.view(w, k * n, -1)[rank]
                loss = loss_fn.from_global(rows_img, rows_txt, cols_img, cols_txt, scale, bias, row_groups, all_groups)
                aux = _auxiliary(objectives, model, out, mb, loss)
            backward(aux)
        total = loss.detach()  # every micro-step computes the same big-batch loss value
    _set_rng_state(after_first_pass, device)
    return total
