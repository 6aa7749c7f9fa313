"""Evaluation tasks from shards to a CLIP_benchmark-style result: {"dataset", "model", "task", "metrics"}."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from tqdm.auto import tqdm

from clipkit.data.shards import expand_shards
from clipkit.evaluate.embed import Embeddings, embed_samples, embed_shards, encode_texts
from clipkit.evaluate.folder import folder_classes, folder_classnames, iter_folder_samples
from clipkit.evaluate.linear_probe import DEFAULT_C_GRID
from clipkit.evaluate.linear_probe import linear_probe as fit_linear_probe
from clipkit.evaluate.retrieval import retrieval_metrics
from clipkit.evaluate.zeroshot import class_embeddings, fill_templates, zeroshot_metrics
from clipkit.files import write_json_atomic
from clipkit.models import ModelBundle


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file; a missing or empty file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path}: not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path}: empty")
    return lines


def zeroshot(
    bundle: ModelBundle,
    shards: str,
    classnames: list[str],
    templates: list[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> dict:
    """Zero-shot classification metrics (acc1, acc5, mean_per_class_recall) on labelled shards.

    Labels come from each sample's json "label" (an int index into `classnames`). `workers`: DataLoader worker
    processes that read, decode and transform the shards (see `clipkit.evaluate.embed.embed_shards`).
    """
    emb = embed_images(bundle, shards, batch_size, device, "zero-shot images", workers)
    return _zeroshot_metrics(bundle, emb, shards, classnames, templates, batch_size, device)


def zeroshot_folder(
    bundle: ModelBundle,
    folder: str | Path,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """Zero-shot classification on an image folder (`folder/<class>/<image>`, ImageFolder labels).

    Args:
        classnames: one name per class subfolder, in sorted subfolder order; default the subfolder names
            with '_' and '-' as spaces.
        Others: as in `zeroshot`.

    Raises:
        ValueError: if classnames does not have one name per subfolder, or no image is readable.
    """
    folder = Path(folder)
    classes = folder_classes(folder)
    if classnames is None:
        classnames = folder_classnames(folder)
    elif len(classnames) != len(classes):
        raise ValueError(
            f"{len(classnames)} class names for the {len(classes)} subfolders of {folder} ({classes[:5]}...): "
            "give one name per subfolder, in sorted subfolder order"
        )
    stats: Counter = Counter()
    with tqdm(desc="zero-shot images", unit="sample", disable=None) as bar:
        emb = embed_samples(
            bundle.model,
            bundle.eval_transform,
            bundle.tokenizer,
            [],
            batch_size,
            device,
            texts=False,
            bar=bar,
            samples=iter_folder_samples(folder, stats),
        )
    emb.skipped = dict(stats)
    if not emb.meta:
        raise ValueError(f"image folder {folder}: no readable image (skipped: {dict(stats)})")
    return _zeroshot_metrics(bundle, emb, str(folder), classnames, templates, batch_size, device)


def _zeroshot_metrics(
    bundle: ModelBundle,
    emb: Embeddings,
    source: str,
    classnames: list[str],
    templates: list[str] | None,
    batch_size: int,
    device: str | torch.device,
) -> dict:
    templates = templates or [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]
    labels = _labels(emb, source, "zero-shot")
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise ValueError(
            f"{source}: labels span [{labels.min()}, {labels.max()}] but there are {len(classnames)} classes"
        )
    prompts = fill_templates(classnames, templates)
    text = encode_texts(bundle.model, bundle.tokenizer, prompts, batch_size, device)
    classes = class_embeddings(text.reshape(len(classnames), len(templates), -1))
    return {**zeroshot_metrics(emb.image, classes, labels), "n_samples": len(labels), "skipped": emb.skipped}


def linear_probe(
    bundle: ModelBundle,
    train_shards: str,
    test_shards: str,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    seed: int = 0,
    workers: int = 0,
) -> dict:
    """Linear probe on frozen image features of labelled train/test shards (see clipkit.evaluate.linear_probe)."""
    feats = {}
    for split, shards in (("train", train_shards), ("test", test_shards)):
        emb = embed_images(bundle, shards, batch_size, device, f"linear-probe {split} images", workers)
        feats[split] = (emb.image, _labels(emb, shards, "the linear probe"), emb.skipped)
    (train_x, train_y, train_skipped), (test_x, test_y, test_skipped) = feats["train"], feats["test"]
    metrics = fit_linear_probe(train_x, train_y, test_x, test_y, c_grid=c_grid, seed=seed)
    return {**metrics, "skipped": {"train": train_skipped, "test": test_skipped}}


def embed_images(bundle: ModelBundle, shards: str, batch_size: int, device, desc: str, workers: int = 0) -> Embeddings:
    """Image embeddings (no captions) of a shard spec, with the bundle's eval transform."""
    urls = expand_shards(shards)
    return embed_shards(
        bundle.model, bundle.eval_transform, bundle.tokenizer, urls, batch_size, device, False, desc, workers
    )


def _labels(emb: Embeddings, source: str, purpose: str) -> np.ndarray:
    try:
        return np.asarray([m["label"] for m in emb.meta], np.int64)
    except KeyError:
        bad = next(m["key"] for m in emb.meta if "label" not in m)
        raise ValueError(f"sample {bad} in {source}: no 'label' in its json, needed for {purpose}") from None


def retrieval(
    bundle: ModelBundle,
    shards: str,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> dict:
    """Image->text and text->image recall@1/5/10; every caption line of an image is one of its texts."""
    emb = embed_shards(
        bundle.model,
        bundle.eval_transform,
        bundle.tokenizer,
        expand_shards(shards),
        batch_size,
        device,
        texts=True,
        desc="retrieval",
        workers=workers,
    )
    metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
    return {**metrics, "n_images": len(emb.meta), "n_texts": len(emb.text), "skipped": emb.skipped}


def write_result(path: Path, dataset: str, model: str, task: str, metrics: dict) -> dict:
    """Writes {"dataset", "model", "task", "metrics"} atomically and returns it."""
    result = {"dataset": dataset, "model": model, "task": task, "metrics": metrics}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, sort_keys=False)
    return result
