"""Evaluation tasks from shards to a CLIP_benchmark-style result: {"dataset", "model", "task", "metrics"}."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES

from clipkit.data.shards import expand_shards
from clipkit.evaluate.embed import embed_shards, encode_texts
from clipkit.evaluate.retrieval import retrieval_metrics
from clipkit.evaluate.zeroshot import class_embeddings, fill_templates, zeroshot_metrics
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
) -> dict:
    """Zero-shot classification metrics (acc1, acc5, mean_per_class_recall) on labelled shards.

    Labels come from each sample's json "label" (an int index into `classnames`).
    """
    templates = templates or [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]
    emb = embed_shards(
        bundle.model,
        bundle.eval_transform,
        bundle.tokenizer,
        expand_shards(shards),
        batch_size,
        device,
        texts=False,
        desc="zero-shot images",
    )
    try:
        labels = np.asarray([m["label"] for m in emb.meta], np.int64)
    except KeyError:
        bad = next(m["key"] for m in emb.meta if "label" not in m)
        raise ValueError(f"sample {bad} in {shards}: no 'label' in its json, needed for zero-shot") from None
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise ValueError(
            f"{shards}: labels span [{labels.min()}, {labels.max()}] but there are {len(classnames)} classes"
        )
    prompts = fill_templates(classnames, templates)
    text = encode_texts(bundle.model, bundle.tokenizer, prompts, batch_size, device)
    classes = class_embeddings(text.reshape(len(classnames), len(templates), -1))
    return {**zeroshot_metrics(emb.image, classes, labels), "n_samples": len(labels), "skipped": emb.skipped}


def retrieval(bundle: ModelBundle, shards: str, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
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
    )
    metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
    return {**metrics, "n_images": len(emb.meta), "n_texts": len(emb.text), "skipped": emb.skipped}


def write_result(path: Path, dataset: str, model: str, task: str, metrics: dict) -> dict:
    """Writes {"dataset", "model", "task", "metrics"} atomically and returns it."""
    result = {"dataset": dataset, "model": model, "task": task, "metrics": metrics}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result
