"""Fashion-MNIST as image-text shards: the standard small zero-shot benchmark (10 classes, 28x28 grayscale).

Source: the Debian package ``dataset-fashion-mnist`` (the original gzip idx files). The official 60k/10k train/test
split is kept. Train captions are every template filled with the class name, one per line, so the loader can pick
one per visit; test captions are the first template only.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipkit.data.shards import encode_png_array, write_shards
from clipkit.files import write_json_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSNAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = (
    "a photo of a {c}.",
    "a photo of the {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a grayscale photo of a {c}.",
    "a product photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
)
SHARD_MAXCOUNT = {"train": 10_000, "test": 5_000}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Reads an unsigned-byte idx file (gzip-compressed when its name ends in ``.gz``).

    The idx header is a big-endian uint32 magic (``0x0000`` + dtype code ``0x08`` + number of dimensions), then one
    big-endian uint32 per dimension.

    Args:
        path: The idx file.
        magic: The expected magic number: 2051 for images, 2049 for labels.

    Returns:
        A uint8 array with the dimensions of the header.

    Raises:
        ValueError: The magic number or the data length does not match.
    """
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic {found}, expected {magic}")
    ndim = magic & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data, header says {dims}")
    return body.reshape(dims)


def fill(template: str, classname: str) -> str:
    """Puts a class name into a template's ``{c}`` (plain replace: templates may hold other braces)."""
    return template.replace("{c}", classname)


def _require(path: Path, package: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install it with `apt-get install -y {package}`")


def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = SOURCE_FILES[split]
    images = read_idx(FASHION_MNIST_DIR / images_name, IDX_IMAGES_MAGIC)
    labels = read_idx(FASHION_MNIST_DIR / labels_name, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _samples(split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    # txt and json depend only on the class: encode them once per class, not 70,000 times.
    templates = TEMPLATES if split == "train" else TEMPLATES[:1]
    txts = ["\n".join(fill(t, name) for t in templates).encode() for name in CLASSNAMES]
    metas = [json.dumps({"label": c, "classname": name, "split": split}).encode() for c, name in enumerate(CLASSNAMES)]
    for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", unit="img", disable=None):
        label = int(labels[i])
        png = encode_png_array(np.repeat(images[i][:, :, None], 3, axis=2))  # RGB, as the model input is
        yield {"__key__": f"fmnist_{split}_{i:05d}", "png": png, "txt": txts[label], "json": metas[label]}


def build_fashion_mnist(out: Path) -> dict:
    """Writes Fashion-MNIST as ``train-*.tar`` (6 x 10,000) and ``test-*.tar`` (2 x 5,000) shards.

    Also writes ``classnames.txt`` and ``templates.txt`` (one per line, ``{c}`` is the class name) for zero-shot
    evaluation.

    Args:
        out: Output folder.

    Returns:
        The summary also written to ``{out}/dataset.json``: samples and shards per split and the files written.

    Raises:
        FileNotFoundError: A source file is missing; the message names the Debian package that provides it.
    """
    out = Path(out)
    for names in SOURCE_FILES.values():
        for name in names:
            _require(FASHION_MNIST_DIR / name, "dataset-fashion-mnist")
    out.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n", encoding="utf-8")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")

    shards = {}
    for split in ("train", "test"):
        images, labels = _load_split(split)
        shards[split] = write_shards(_samples(split, images, labels), out, split, maxcount=SHARD_MAXCOUNT[split])

    summary = {
        "name": "fashion-mnist",
        "image_size": 28,
        "splits": {split: sum(counts.values()) for split, counts in shards.items()},
        "shards": shards,
        "skipped": {},
        "classnames": list(CLASSNAMES),
        "templates": list(TEMPLATES),
        "sources": {split: [str(FASHION_MNIST_DIR / n) for n in names] for split, names in SOURCE_FILES.items()},
        "files": sorted(
            [*shards["train"], *shards["test"], "sizes.json", "dataset.json", "classnames.txt", "templates.txt"]
        ),
    }
    write_json_atomic(out / "dataset.json", summary)
    return summary
