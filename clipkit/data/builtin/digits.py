"""scikit-learn's 8x8 handwritten digits as image-text shards: the fastest real smoke data (1,797 images).

Split: every 5th image (``index % 5 == 0``) is test, giving 1,437 train and 360 test. Train captions are every
template filled with the class name, one per line; test captions are the first template only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipkit.data.shards import encode_png, write_shards
from clipkit.files import write_json_atomic

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {c}.", "a handwritten digit {c}.", "the number {c}.")
TEST_EVERY = 5
# load_digits pixels are counts of set pixels in 4x4 blocks of the original 32x32 bitmaps: 0..16.
MAX_PIXEL = 16


def split_of(index: int) -> str:
    """The split of the image at ``index`` in ``load_digits`` order."""
    return "test" if index % TEST_EVERY == 0 else "train"


def to_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """Turns one 8x8 digit (values 0..16) into an RGB image, upsampled with NEAREST to keep the blocky strokes.

    Args:
        pixels: The 8x8 array.
        image_size: Side of the output image.

    Returns:
        The RGB image.
    """
    gray = np.rint(pixels * (255 / MAX_PIXEL)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((image_size, image_size), Image.Resampling.NEAREST).convert("RGB")


def _samples(split: str, images: np.ndarray, labels: np.ndarray, image_size: int) -> Iterator[dict]:
    templates = TEMPLATES if split == "train" else TEMPLATES[:1]
    captions = ["\n".join(t.replace("{c}", name) for t in templates) for name in CLASSNAMES]
    indices = [i for i in range(len(images)) if split_of(i) == split]
    for i in tqdm(indices, desc=f"digits {split}", unit="img", disable=None):
        label = int(labels[i])
        yield {
            "__key__": f"digits_{i:04d}",
            "png": encode_png(to_image(images[i], image_size)),
            "txt": captions[label],
            "json": {"label": label, "classname": CLASSNAMES[label], "split": split},
        }


def build_digits(out: Path, image_size: int = 32) -> dict:
    """Writes the digits as ``train-000000.tar`` and ``test-000000.tar``, plus ``classnames.txt``/``templates.txt``.

    Args:
        out: Output folder.
        image_size: Side of the square images in pixels.

    Returns:
        The summary also written to ``{out}/dataset.json``: samples and shards per split and the files written.
    """
    # Imported here: scikit-learn takes about a second to import and only this builder needs it.
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n", encoding="utf-8")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")

    shards = {}
    for split in ("train", "test"):
        samples = _samples(split, digits.images, digits.target, image_size)
        # One shard per split: maxcount above the dataset size.
        shards[split] = write_shards(samples, out, split, maxcount=len(digits.images))

    summary = {
        "name": "digits",
        "image_size": image_size,
        "splits": {split: sum(counts.values()) for split, counts in shards.items()},
        "shards": shards,
        "skipped": {},
        "classnames": list(CLASSNAMES),
        "templates": list(TEMPLATES),
        "split_rule": f"test if index % {TEST_EVERY} == 0, else train (index in sklearn load_digits order)",
        "sources": {"sklearn": "sklearn.datasets.load_digits"},
        "files": sorted(
            [*shards["train"], *shards["test"], "sizes.json", "dataset.json", "classnames.txt", "templates.txt"]
        ),
    }
    write_json_atomic(out / "dataset.json", summary)
    return summary
