"""SimCLR's two augmented views of an image (SLIP's image self-supervision), drawn from a private torch.Generator.

Every random draw (crop box, jitter order and factors, the coin flips) comes from the generator passed in, never
from torch's or Python's global RNG (open_clip's color jitter and gray scale draw from Python's `random`), so a
loader worker's views depend only on its stream's (seed, epoch, rank, worker) and an exact resume replays them.
The operations are torchvision's functional ones on uint8 tensors; the draws follow torchvision's
RandomResizedCrop, ColorJitter (a random order of the four adjustments), RandomGrayscale and RandomHorizontalFlip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as torchvision and SimCLR


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


@dataclass(frozen=True)
class SimCLRViews:
    """Two views per image: random resized crop, color jitter, gray scale, horizontal flip; then per-batch normalize.

    Attributes:
        size: output (height, width).
        scale: the crop's area range, as a share of the image.
        color_jitter: brightness, contrast, saturation, hue strengths.
        color_jitter_prob: probability of the jitter.
        gray_scale_prob: probability of gray scale.
        flip_prob: probability of a horizontal flip.
        interpolation: resize interpolation.
        mean: per-channel mean of the normalization (the model's).
        std: per-channel std of the normalization.
    """

    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    gray_scale_prob: float = 0.2
    flip_prob: float = 0.5
    interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def of(cls, augment, preprocess_cfg: dict) -> SimCLRViews:
        """Views for a recipe's train.slip.augment (SlipAugmentCfg) at the model's input size and normalization."""
        size = preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=size,
            scale=tuple(augment.scale),
            color_jitter=tuple(augment.color_jitter),
            color_jitter_prob=augment.color_jitter_prob,
            gray_scale_prob=augment.gray_scale_prob,
            flip_prob=augment.flip_prob,
            interpolation=T.InterpolationMode(preprocess_cfg.get("interpolation", "bicubic")),
            mean=tuple(float(m) for m in preprocess_cfg["mean"]),
            std=tuple(float(s) for s in preprocess_cfg["std"]),
        )

    def __call__(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 [3, H, W] -> two independent views, uint8 [2, 3, h, w]."""
        return torch.stack([self.view(image, g), self.view(image, g)])

    def crop_box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawn from `g`."""
        area = height * width
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        ratio = width / height  # fallback: a central crop within the ratio range
        if ratio < RATIO[0]:
            w, h = width, round(width / RATIO[0])
        elif ratio > RATIO[1]:
            h, w = height, round(height * RATIO[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def view(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One view of uint8 [3, H, W] -> uint8 [3, h, w]."""
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1], g)
        x = TF.resized_crop(image, top, left, h, w, list(self.size), self.interpolation, antialias=True)
        if torch.rand((), generator=g).item() < self.color_jitter_prob:
            x = self.jitter(x, g)
        if torch.rand((), generator=g).item() < self.gray_scale_prob:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if torch.rand((), generator=g).item() < self.flip_prob:
            x = TF.horizontal_flip(x)
        return x

    def jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision's ColorJitter: the four adjustments in a random order, each factor drawn from `g`."""
        b, c, s, hue = self.color_jitter
        order = torch.randperm(4, generator=g).tolist()
        factors = [_uniform(g, max(0.0, 1 - v), 1 + v) if v > 0 else None for v in (b, c, s)]
        hue_factor = _uniform(g, -hue, hue) if hue > 0 else None
        for i in order:
            if i == 0 and factors[0] is not None:
                x = TF.adjust_brightness(x, factors[0])
            elif i == 1 and factors[1] is not None:
                x = TF.adjust_contrast(x, factors[1])
            elif i == 2 and factors[2] is not None:
                x = TF.adjust_saturation(x, factors[2])
            elif i == 3 and hue_factor is not None:
                x = TF.adjust_hue(x, hue_factor)
        return x

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, h, w] -> float32 (x / 255 - mean) / std, on the batch's device."""
        mean = torch.tensor(self.mean, device=views.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=views.device).view(3, 1, 1)
        return (views.float() / 255 - mean) / std
