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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from clipkit.loss import ContrastiveLoss, gather_no_grad, world


def _forward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor):
    """(image_features [n, D], text_features [n, D], logit_scale, logit_bias or None), normalized features."""
    out = model(image=images, text=texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, ...]],
    loss_fn: ContrastiveLoss,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Runs forward and backward for one optimizer step; gradients are left in `.grad`.

    Args:
        model: the (possibly DDP-wrapped) dual encoder; called as model(image=..., text=...).
        micro_batches: K tuples (images [n, 3, H, W], tokens [n, L]) or (images, tokens, group ids [n] int64 for
            multiple positives); every process passes the same K and n.
        loss_fn: the contrastive loss.
        backward: how to backpropagate (accelerator.backward under Accelerate).
        no_sync: context manager that suspends DDP's gradient all-reduce (all micro-steps but the last).
        autocast: mixed-precision context for the forward passes.

    Returns:
        The loss of the whole step (a detached scalar): the big-batch loss when K > 1.
    """
    groups = [mb[2] if len(mb) > 2 else None for mb in micro_batches]
    if len(micro_batches) == 1:
        images, texts = micro_batches[0][:2]
        with autocast():
            img, txt, scale, bias = _forward(model, images, texts)
            loss = loss_fn(img, txt, scale, bias, groups[0])
        backward(loss)
        return loss.detach()

    device = micro_batches[0][0].device
    rank, w = world()
    n = micro_batches[0][0].shape[0]
    k = len(micro_batches)
    states, cache_img, cache_txt = [], [], []
    with torch.no_grad(), autocast():
        for images, texts, *_ in micro_batches:
            if images.shape[0] != n:
                raise ValueError(f"accumulation needs equal micro-batches: got {images.shape[0]} and {n} samples")
            states.append(_rng_state(device))
            img, txt, _, _ = _forward(model, images, texts)
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
    for j, (images, texts, *_) in enumerate(micro_batches):
        _set_rng_state(states[j], device)
        sync = contextlib.nullcontext() if j == k - 1 else no_sync()
        with sync:
            with autocast():
                img, txt, scale, bias = _forward(model, images, texts)
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
            backward(loss)
        total = loss.detach()  # every micro-step computes the same big-batch loss value
    _set_rng_state(after_first_pass, device)
    return total
