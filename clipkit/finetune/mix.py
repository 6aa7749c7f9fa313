"""Batch-level mixup and CutMix for `ce` fine-tuning (timm's `Mixup` with mode="batch", switch_prob 0.5).

Each image is mixed with the image at the mirrored batch position (row i with row B-1-i), with one mixing weight lam
per batch drawn from Beta(alpha, alpha): mixup blends the whole images, CutMix pastes a box of area about (1 - lam)
from the partner (lam is then corrected to the box's clipped area). The loss is lam * CE(label) + (1 - lam) *
CE(partner's label), which equals cross-entropy against the mixed one-hot target. Unlike timm's, the draws come from a
torch generator, so a fine-tuning run stays a function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch


def mix_batch(
    images: torch.Tensor, mixup: float, cutmix: float, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Mixes a batch with its mirror.

    Args:
        images: [B, 3, H, W] model input.
        mixup: Beta alpha of mixup (0 = off).
        cutmix: Beta alpha of CutMix (0 = off); with both on, each batch picks one with probability 1/2.
        generator: draws the choice, lam and the box.

    Returns:
        ([B, 3, H, W] mixed images, lam: the share of each image's own label in its target).
    """
    seed = int(torch.randint(2**62, (), generator=generator))
    rng = np.random.default_rng(seed)  # Beta draws: torch.distributions takes no generator
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = images.flip(0)
    if not use_cutmix:
        return lam * images + (1 - lam) * partner, lam
    h, w = images.shape[-2:]
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    return out, 1 - (y1 - y0) * (x1 - x0) / (h * w)
