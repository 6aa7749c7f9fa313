"""Evaluation tasks from shards to a CLIP_benchmark-style result: {"dataset", "model", "task", "metrics"}.

`run_task` is the one dispatcher (the CLI and training call it). A task reports only on complete data: when fewer
samples were usable than the data holds (`sizes.json`'s counts; skipped samples; unreadable or truncated shards) it
raises `DataError` naming the shards and the counts, unless `allow_missing`; then the metrics say what was missing.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from tqdm.auto import tqdm

from clipkit.data.pipeline import DataError, shard_damage
from clipkit.data.shards import expand_shards, read_sizes
from clipkit.evaluate.embed import Embeddings, embed_samples, embed_shards, encode_texts
from clipkit.evaluate.folder import folder_classes, folder_classnames, iter_folder_samples
from clipkit.evaluate.linear_probe import DEFAULT_C_GRID
from clipkit.evaluate.linear_probe import linear_probe as fit_linear_probe
from clipkit.evaluate.retrieval import retrieval_metrics
from clipkit.evaluate.zeroshot import class_embeddings, fill_templates, zeroshot_metrics
from clipkit.files import write_json_atomic
from clipkit.models import ModelBundle

log = logging.getLogger(__name__)
TASKS = ("zeroshot", "retrieval", "linear_probe")


def run_task(
    bundle: ModelBundle,
    task: str,
    shards: str,
    *,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    test_shards: str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    allow_missing: bool = False,
) -> dict:
    """Runs one evaluation task and returns its metrics.

    Args:
        bundle: the model (eval mode is the caller's business).
        task: "zeroshot", "retrieval" or "linear_probe".
        shards: a shard spec (a folder stands for its *.tar files); for zeroshot also an image folder
            `DIR/<class>/<image>`; for linear_probe the training shards.
        classnames: zeroshot class names in label order (required with shards; with an image folder the default
            is the subfolder names).
        templates: zeroshot prompt templates with `{c}` (default: open_clip's simple ImageNet ones).
        test_shards: linear_probe test shards.
        batch_size: images (and texts) per forward pass.
        device: where the model lives.
        workers: DataLoader processes reading and decoding the shards.
        allow_missing: report even when fewer samples were usable than the data holds.

    Raises:
        DataError: a shard is truncated or empty (checked before any work), or fewer samples were usable than the
            data holds, unless `allow_missing`.
        ValueError: an unknown task, a missing argument, repeated class names, labels out of range.
    """
    if task == "zeroshot" and is_image_folder(shards):
        return zeroshot_folder(bundle, shards, classnames, templates, batch_size, device, allow_missing)
    specs = {"zeroshot": [shards], "retrieval": [shards], "linear_probe": [shards, test_shards]}.get(task)
    if specs is None:
        raise ValueError(f"unknown eval task {task!r}: expected one of {', '.join(TASKS)}")
    if None in specs:
        raise ValueError("the linear probe needs test shards")
    if not allow_missing:
        refuse_damaged([u for spec in specs for u in expand_shards(spec)])
    if task == "zeroshot":
        if not classnames:
            raise ValueError(f"zero-shot on shards ({shards}) needs class names, one per label")
        return zeroshot(bundle, shards, classnames, templates, batch_size, device, workers, allow_missing)
    if task == "retrieval":
        return retrieval(bundle, shards, batch_size, device, workers, allow_missing)
    return linear_probe(bundle, shards, test_shards, batch_size, device, workers=workers, allow_missing=allow_missing)


def is_image_folder(data: str | Path) -> bool:
    """Whether `data` is an image folder (a folder with class subfolders) rather than shards."""
    path = Path(data)
    return path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def refuse_damaged(urls: list[str]) -> None:
    """Raises DataError naming every local shard known to be incomplete without reading it (empty, truncated)."""
    damaged = [f"{u}: {why}" for u in urls if (why := shard_damage(u)) is not None]
    if damaged:
        raise DataError(
            f"{len(damaged)} of {len(urls)} shard(s) incomplete, so the result would cover fewer samples than the "
            f"data holds: {'; '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''} (--allow-missing reports on "
            "what is readable)"
        )


def missing_samples(emb: Embeddings, source: str, allow_missing: bool) -> dict:
    """What `emb` lacks against the data: {} when complete, else {"n_expected", "missing": {shard: n}} (allowed).

    A shard misses samples when it yielded fewer usable rows than its `sizes.json` lists, or (without sizes.json)
    when any of its samples was skipped or the shard was unreadable. An image folder misses its skipped images.
    """
    if not emb.shards:  # an image folder: it holds what was read plus what was skipped
        lost = sum(emb.skipped.values())
        expected, short = len(emb.meta) + lost, ({source: lost} if lost else {})
    else:
        try:
            sizes = dict(zip(emb.shards, read_sizes(list(emb.shards)), strict=True))
        except (FileNotFoundError, KeyError, ValueError):
            sizes = {}
        short = {}
        for url, got in emb.shards.items():
            want = sizes.get(url)
            lost = want - got["rows"] if want is not None else sum(got["skipped"].values())
            if lost > 0 or got["skipped"].get("bad_shard"):
                short[url] = max(lost, 0) if want is not None else None  # None: how many is unknown
        expected = sum(sizes.values()) if len(sizes) == len(emb.shards) else None
    if short and not allow_missing:
        shown = "; ".join(_shortfall(url, n, emb) for url, n in list(short.items())[:5])
        more = f" and {len(short) - 5} more shard(s)" if len(short) > 5 else ""
        total = f"{len(emb.meta)} of {expected}" if expected is not None else f"{len(emb.meta)}"
        raise DataError(
            f"{source}: {total} samples usable: {shown}{more}; refusing to report on fewer samples than the data "
            "holds (--allow-missing reports anyway, with the missing counts)"
        )
    return {"n_expected": expected, "missing": short} if short else {}


def _shortfall(url: str, n: int | None, emb: Embeddings) -> str:
    got = emb.shards.get(url)
    if got is None:
        return f"{n} image(s) skipped ({emb.skipped})"
    lost = f"{n} missing" if n is not None else "some missing"
    return f"{url}: {got['rows']} usable, {lost} (skipped: {got['skipped'] or 'none'})"


def check_classnames(classnames: list[str], labels: np.ndarray, source: str) -> int:
    """Refuses repeated class names; warns about names no sample has; returns how many such names there are.

    Names are compared as the tokenizer sees them (CLIP's lowercases, whitespace collapsed): two such names get
    the same text embedding, so neither could ever be predicted over the other.
    """
    seen: dict[str, int] = {}
    for i, name in enumerate(classnames):
        norm = " ".join(name.casefold().split())
        if norm in seen:
            raise ValueError(
                f"class names {seen[norm] + 1} and {i + 1} are the same ({classnames[seen[norm]]!r}, {name!r}): "
                "each label needs its own name"
            )
        seen[norm] = i
    unused = sorted(set(range(len(classnames))) - set(labels.tolist()))
    if unused:
        log.warning(
            "%d of %d class names have no sample in %s (e.g. %s): they still compete in every prediction",
            len(unused),
            len(classnames),
            source,
            ", ".join(repr(classnames[i]) for i in unused[:3]),
        )
    return len(unused)


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
    allow_missing: bool = False,
) -> dict:
    """Zero-shot classification metrics (acc1, acc5, mean_per_class_recall) on labelled shards.

    Labels come from each sample's json "label" (an int index into `classnames`). `workers`: DataLoader worker
    processes that read, decode and transform the shards (see `clipkit.evaluate.embed.embed_shards`).
    `allow_missing`: see `missing_samples`.
    """
    emb = embed_images(bundle, shards, batch_size, device, "zero-shot images", workers)
    counts = missing_samples(emb, shards, allow_missing)
    return {**_zeroshot_metrics(bundle, emb, shards, classnames, templates, batch_size, device), **counts}


def zeroshot_folder(
    bundle: ModelBundle,
    folder: str | Path,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    allow_missing: bool = False,
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
    counts = missing_samples(emb, str(folder), allow_missing)
    return {**_zeroshot_metrics(bundle, emb, str(folder), classnames, templates, batch_size, device), **counts}


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
    unused = check_classnames(classnames, labels, source)
    prompts = fill_templates(classnames, templates)
    text = encode_texts(bundle.model, bundle.tokenizer, prompts, batch_size, device)
    classes = class_embeddings(text.reshape(len(classnames), len(templates), -1))
    metrics = {**zeroshot_metrics(emb.image, classes, labels), "n_samples": len(labels), "skipped": emb.skipped}
    return {**metrics, "classes_without_samples": unused} if unused else metrics


def linear_probe(
    bundle: ModelBundle,
    train_shards: str,
    test_shards: str,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    seed: int = 0,
    workers: int = 0,
    allow_missing: bool = False,
) -> dict:
    """Linear probe on frozen image features of labelled train/test shards (see clipkit.evaluate.linear_probe).

    `allow_missing`: see `missing_samples` (both splits are checked).
    """
    feats, counts = {}, {}
    for split, shards in (("train", train_shards), ("test", test_shards)):
        emb = embed_images(bundle, shards, batch_size, device, f"linear-probe {split} images", workers)
        counts[split] = missing_samples(emb, shards, allow_missing)
        feats[split] = (emb.image, _labels(emb, shards, "the linear probe"), emb.skipped)
    (train_x, train_y, train_skipped), (test_x, test_y, test_skipped) = feats["train"], feats["test"]
    metrics = fit_linear_probe(train_x, train_y, test_x, test_y, c_grid=c_grid, seed=seed)
    return {**metrics, "skipped": {"train": train_skipped, "test": test_skipped}, "data": counts}


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
    allow_missing: bool = False,
) -> dict:
    """Image->text and text->image recall@1/5/10; every caption line of an image is one of its texts.

    `allow_missing`: see `missing_samples`.
    """
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
    counts = missing_samples(emb, shards, allow_missing)
    metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
    return {**metrics, "n_images": len(emb.meta), "n_texts": len(emb.text), "skipped": emb.skipped, **counts}


def eval_result(dataset: str, model: str, task: str, metrics: dict) -> dict:
    """The result of one task as CLIP_benchmark writes it: {"dataset", "model", "task", "metrics"}."""
    return {"dataset": dataset, "model": model, "task": task, "metrics": metrics}


def write_result(path: Path, dataset: str, model: str, task: str, metrics: dict) -> dict:
    """Writes `eval_result(...)` atomically (creating the folder) and returns it."""
    result = eval_result(dataset, model, task, metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, sort_keys=False)
    return result
