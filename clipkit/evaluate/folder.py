"""Image folders as evaluation data: one subfolder per class (torchvision ImageFolder convention).

`root/<class>/<image>`: classes are the subfolder names in sorted order and label i is the i-th of them, as
torchvision's ImageFolder assigns them; images are the files with an image suffix, in sorted order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from clipkit.data.pipeline import MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def folder_classes(root: Path) -> list[str]:
    """The class subfolder names of an image folder, sorted (label i = the i-th).

    Raises:
        FileNotFoundError: if root is not a folder or has no subfolder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {root}: no class subfolder (expected {root}/<class>/<image>)")
    return classes


def folder_classnames(root: Path) -> list[str]:
    """Prompt-ready class names from the subfolder names: '_' and '-' become spaces ("golden_retriever")."""
    return [name.replace("_", " ").replace("-", " ") for name in folder_classes(root)]


def iter_folder_samples(root: Path, stats: Counter | None = None) -> Iterator[dict]:
    """Every readable image of an image folder: {"key", "image" (RGB PIL), "captions": [], "json": {"label"}}.

    Images that cannot be decoded are skipped and counted under "bad_image". Transparent pixels are laid over
    white, as the shard reader does, so a folder and its shards give the same pixels.
    """
    from clipkit.data.pipeline import SkipSample, decode_image

    stats = stats if stats is not None else Counter()
    root = Path(root)
    for label, name in enumerate(folder_classes(root)):
        for path in sorted((root / name).iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as probe:
                    too_large = probe.width * probe.height > MAX_IMAGE_PIXELS
                if too_large:
                    stats["image_too_large"] += 1
                    continue
                image = decode_image({"__key__": str(path), "png": path.read_bytes()})
            except SkipSample as e:
                stats[e.reason] += 1
                continue
            except OSError:
                stats["bad_image"] += 1
                continue
            yield {"key": f"{name}/{path.stem}", "image": image, "captions": [], "json": {"label": label}}
