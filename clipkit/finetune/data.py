"""Labelled image sets for fine-tuning, read once from shards and checked before any training step.

A labelled shard set is what `clipkit data build` writes: each sample's json holds `label`, an index into
`classnames.txt`; prompts come from `templates.txt` (`{c}` is the class name). Fine-tuning revisits every image many
times, so a set is streamed once through the shard reader of `clipkit.data.pipeline`, put through the model's eval
transform, and held as uint8 (N x 3 x S x S bytes: 184 MB for Fashion-MNIST's 60,000 images at 32 px); batches are
normalized when drawn. There is no augmentation, as in WiSE-FT and FLYP (they fine-tune with the eval transform).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from tqdm.auto import tqdm

from clipkit.data.pipeline import iter_eval_samples
from clipkit.data.shards import expand_shards
from clipkit.evaluate.run import read_lines


class FinetuneDataError(ValueError):
    """Labelled data unusable for fine-tuning; the message names the sample, shard or file."""


@dataclass
class LabeledImages:
    """A labelled image set in memory.

    Attributes:
        pixels: [N, 3, S, S] uint8 (the eval transform before ToTensor/Normalize), or float when the transform
            cannot be split there.
        labels: [N] int64 class indices.
        keys: N sample keys.
        source: the shard spec it came from (for messages).
        skipped: unusable samples by reason.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    source: str
    skipped: dict

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, rows: np.ndarray, source: str) -> LabeledImages:
        """The rows `rows` as a new set named `source`."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return LabeledImages(self.pixels[idx], self.labels[idx], [self.keys[i] for i in rows], source, {})


class Pixels:
    """Splits an open_clip eval transform into a uint8 part (resize, crop, RGB) and a per-batch float part.

    `batch(uint8)` gives bitwise the tensors the whole transform would: ToTensor divides by 255 in float32 and
    Normalize subtracts the mean and divides by the std, the same operations in the same order.
    """

    def __init__(self, transform: Callable):
        steps = list(getattr(transform, "transforms", []))
        if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
            self.before = T.Compose(steps[:-2])
            norm = steps[-1]
            self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
            self.uint8 = True
        else:  # an unusual transform: keep float images (4x the memory)
            self.before, self.uint8 = transform, False

    def encode(self, image) -> torch.Tensor:
        """PIL image -> [3, S, S] uint8 (or the transform's float tensor)."""
        out = self.before(image)
        if not self.uint8:
            return out
        return torch.from_numpy(np.asarray(out.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)

    def batch(self, pixels: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, 3, S, S] stored pixels -> the model's float input on `device`."""
        x = pixels.to(device)
        if not self.uint8:
            return x.float()
        return (x.float().div(255) - self.mean.to(device)) / self.std.to(device)


def read_labeled(shards: str, pixels: Pixels, n_classes: int, what: str) -> LabeledImages:
    """Reads every usable sample of a labelled shard spec into memory, checking its label.

    Raises:
        FinetuneDataError: a sample without `label` in its json, or with a label outside [0, n_classes), naming the
            sample and its shard spec; or a set without a usable sample.
    """
    urls = expand_shards(shards)
    stats: Counter = Counter()
    images, labels, keys = [], [], []
    for sample in tqdm(iter_eval_samples(urls, stats), desc=f"reading {what}", unit="img", disable=None):
        label = sample["json"].get("label")
        if label is None:
            raise FinetuneDataError(f"{what} sample {sample['key']} in {shards}: no 'label' in its json")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_classes:
            raise FinetuneDataError(
                f"{what} sample {sample['key']} in {shards}: label {label!r} is outside the {n_classes} classnames "
                f"(expected an integer in [0, {n_classes}))"
            )
        images.append(pixels.encode(sample["image"]))
        labels.append(label)
        keys.append(sample["key"])
    if not keys:
        raise FinetuneDataError(f"{what} {shards}: no usable sample (skipped: {dict(stats)})")
    return LabeledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), keys, shards, dict(stats))


def hash_split(keys: Sequence[str], fraction: float) -> np.ndarray:
    """[N] bool, True for the validation rows: a sample is held out when the hash of its key falls below `fraction`.

    Depends on the key alone, so the split is the same whatever the seed, shard order or sample count.
    """
    h = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys]
    return np.asarray(h, dtype=np.float64) / 2.0**64 < fraction


def split_train_val(train: LabeledImages, fraction: float) -> tuple[LabeledImages, LabeledImages]:
    """(train, validation) by `hash_split`."""
    held = hash_split(train.keys, fraction)
    name = f"{train.source} (hash split {fraction:g})"
    return train.subset(np.nonzero(~held)[0], train.source), train.subset(np.nonzero(held)[0], name)


def check_every_class(data: LabeledImages, classnames: Sequence[str], what: str) -> None:
    """Raises FinetuneDataError naming the first class without a sample in `data` (validation must see them all)."""
    counts = np.bincount(data.labels.numpy(), minlength=len(classnames))
    missing = [classnames[c] for c in np.nonzero(counts == 0)[0]]
    if missing:
        raise FinetuneDataError(
            f"{what} {data.source}: class {missing[0]!r} has no sample ({len(missing)} classes without samples: "
            f"{missing[:5]}); every class needs validation samples"
        )


def read_classnames(path: Path) -> list[str]:
    """Class names, one per non-empty line; a missing, empty or duplicated file is refused naming it."""
    names = read_lines(path, "classnames")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise FinetuneDataError(f"classnames file {path}: class {dup[0]!r} appears more than once")
    return names


def read_templates(path: Path) -> list[str]:
    """Prompt templates, one per line, each with `{c}` where the class name goes; refused naming file and line."""
    lines = read_lines(path, "templates")
    for i, t in enumerate(lines, 1):
        if "{c}" not in t:
            raise FinetuneDataError(f"templates file {path} line {i}: {t!r} has no {{c}} where the class name goes")
    return lines
