"""Encoding images and texts to L2-normalized float32 numpy arrays, and exporting them (single folder or parts).

The only torch code of evaluation. Folder layouts are described in `clipkit.index`; `clipkit.index.embeddings`
writes and reads them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipkit.data.pipeline import iter_eval_samples, worker_info
from clipkit.data.shards import read_sizes
from clipkit.index.embeddings import (
    ARRAY_DTYPES,
    META_FORMATS,
    part_matches,
    part_name,
    write_manifest_if_complete,
    write_part,
    write_single,
)
from clipkit.index.store import IMAGE_EMB_FILE, PARTS_DIR
from clipkit.threads import threads_for, using_threads

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Row-aligned embeddings of a shard set.

    Attributes:
        image: [N, D] float32, L2-normalized, one row per image.
        text: [M, D] float32, L2-normalized, one row per caption (M >= N when images have several captions).
        text_to_image: [M] int64, the image row of each caption.
        meta: one dict per image row: {"key", "captions", **the sample's json}.
        skipped: bad samples (and `bad_shard`: unreadable or truncated shards) by reason.
        shards: per shard url read, in shard order: {"rows": usable samples, "skipped": {reason: count}} (empty
            for other sources).
    """

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    meta: list[dict]
    skipped: dict = field(default_factory=dict)
    shards: dict = field(default_factory=dict)

    @property
    def shard_rows(self) -> list[int]:
        """Image rows per input shard, in shard order: with the urls, the shard of every row (for thumbnails)."""
        return [c["rows"] for c in self.shards.values()]


def _batched(items: Iterable, size: int) -> Iterable[list]:
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def encode_images(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] -> [B, D] float32 normalized."""
    return model.encode_image(images, normalize=True).float().cpu().numpy()


@torch.inference_mode()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Captions -> [M, D] float32 normalized, in batches."""
    dim = model.text_projection.shape[-1] if hasattr(model, "text_projection") else None
    out = [
        model.encode_text(tokenizer(list(b)).to(device), normalize=True).float().cpu().numpy()
        for b in _batched(texts, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, dim or 0), np.float32)


@torch.inference_mode()
def embed_shards(
    model: torch.nn.Module,
    transform: Callable,
    tokenizer: Callable,
    urls: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    texts: bool = True,
    desc: str = "embed",
    workers: int = 0,
) -> Embeddings:
    """Embeds every usable sample of the shards, in shard order.

    Args:
        model: the dual encoder, in eval mode.
        transform: the eval image transform.
        tokenizer: the model's tokenizer.
        urls: shard paths.
        batch_size: images (and captions) per forward pass.
        device: where the model lives.
        texts: also embed every caption line (False for zero-shot, where class prompts are the texts).
        desc: progress bar label.
        workers: DataLoader worker processes reading, decoding and transforming shards (0: this process); the
            model gets that many fewer torch threads meanwhile (clipkit/threads.py). Rows keep shard order at any
            count.

    Raises:
        ValueError: if no sample of the shards is usable.
    """
    with tqdm(desc=desc, unit="sample", disable=None) as bar:
        emb = embed_samples(model, transform, tokenizer, urls, batch_size, device, texts, bar, workers=workers)
    if not emb.meta:
        raise ValueError(f"no usable sample in {len(urls)} shard(s) starting {urls[:1]} (skipped: {emb.skipped})")
    return emb


@torch.inference_mode()
def embed_samples(
    model: torch.nn.Module,
    transform: Callable,
    tokenizer: Callable,
    urls: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    texts: bool = True,
    bar: tqdm | None = None,
    samples: Iterable[dict] | None = None,
    workers: int = 0,
) -> Embeddings:
    """`embed_shards` without the emptiness check: shards without usable samples give [0, D] arrays.

    Args:
        samples: {"key", "image" (PIL), "captions", "json"} dicts to embed instead of the shards' (e.g. an
            image folder's); `urls` and `workers` are then ignored.
        workers: DataLoader worker processes that read, decode and transform the shards (0: this process).
            Rows come out in shard order whatever the count; see `iter_shard_batches`.
        Others: as in `embed_shards`; `bar` is a progress bar to advance by samples.
    """
    stats: Counter = Counter()
    shards = {url: {"rows": 0, "skipped": Counter()} for url in (urls if samples is None else ())}
    done = []  # (order, [B, D] image embeddings, rows) per batch, in arrival order
    if samples is not None:
        workers = 0
        batches = (
            {**_transform_batch(chunk, transform), "order": (0, j)}
            for j, chunk in enumerate(_batched(samples, batch_size))
        )
    else:
        workers = min(workers, len(urls))  # one process per shard at most: the model yields only the cores in use
        batches = iter_shard_batches(urls, transform, batch_size, workers)
    with using_threads(threads_for(workers)):  # clipkit/threads.py: one policy for training and evaluation
        for batch in batches:
            stats.update(batch["skipped"])
            if shards:
                shard = shards[urls[batch["order"][0]]]
                shard["rows"] += len(batch["rows"])
                shard["skipped"].update(batch["skipped"])
            if batch["rows"]:  # a batch without rows only carries skip counts
                done.append((tuple(batch["order"]), encode_images(model, batch["pixels"].to(device)), batch["rows"]))
                if bar is not None:
                    bar.update(len(batch["rows"]))
    done.sort(key=lambda item: item[0])  # workers deliver shards interleaved; rows follow the shard order
    meta, captions, owners = [], [], []
    for _, _, rows in done:
        for row in rows:
            if texts:
                owners.extend([len(meta)] * len(row["captions"]))
                captions.extend(row["captions"])
            meta.append({"key": row["key"], "captions": row["captions"], **row["json"]})
    if texts:
        text = encode_texts(model, tokenizer, captions, batch_size, device)
        if not captions:
            text = np.zeros((0, embed_dim(model, tokenizer, device)), np.float32)
    else:
        text = np.zeros((0, 0), np.float32)
    if done:
        image = np.concatenate([emb for _, emb, _ in done])
    else:
        image = np.zeros((0, embed_dim(model, tokenizer, device)), np.float32)
    shards = {url: {"rows": c["rows"], "skipped": dict(c["skipped"])} for url, c in shards.items()}
    return Embeddings(image, text, np.asarray(owners, np.int64), meta, dict(stats), shards)


def _transform_batch(chunk: list[dict], transform: Callable, skipped: dict | None = None) -> dict:
    """Decoded samples -> {"pixels": [B, 3, H, W] float (None if empty), "rows": [{"key", "captions", "json"}],
    "skipped": {reason: count}}."""
    return {
        "pixels": torch.stack([transform(s["image"]) for s in chunk]) if chunk else None,
        "rows": [{"key": s["key"], "captions": s["captions"], "json": s["json"]} for s in chunk],
        "skipped": skipped or {},
    }


class ShardBatches(torch.utils.data.IterableDataset):
    """Transformed batches of every usable sample of some shards; shard i is read by DataLoader worker i % W.

    Batches never span two shards, so what a batch holds does not depend on the number of workers. Each batch is
    `_transform_batch`'s dict plus "order": (shard index, batch index within the shard). Skip counts ride on the
    batch that follows them (a shard's last ones on an empty batch), so they reach the main process from workers.
    """

    def __init__(self, urls: Sequence[str], transform: Callable, batch_size: int):
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = worker_info()
        for i in range(worker, len(self.urls), n_workers):
            stats: Counter = Counter()
            j = -1
            for j, chunk in enumerate(_batched(iter_eval_samples([self.urls[i]], stats), self.batch_size)):
                yield {**_transform_batch(chunk, self.transform, dict(stats)), "order": (i, j)}
                stats.clear()
            if stats:  # skips after the shard's last batch, or a shard without a usable sample
                yield {**_transform_batch([], self.transform, dict(stats)), "order": (i, j + 1)}


def iter_shard_batches(urls: Sequence[str], transform: Callable, batch_size: int, workers: int = 0) -> Iterator[dict]:
    """`ShardBatches` read in this process (workers=0) or by DataLoader worker processes.

    With W workers the shards are dealt round-robin to them and their batches arrive interleaved (shard 0's first
    batch, shard 1's first, ...): sort by "order" to get the order of `urls`, as `embed_samples` does with the
    embeddings (not the pixels: holding pixels back would hold a shard's worth of images). Fewer shards than
    workers leave the extra workers out (each shard is read by one process).
    """
    dataset = ShardBatches(urls, transform, batch_size)
    workers = min(workers, len(dataset.urls))
    if workers <= 0:
        yield from dataset
        return
    # batch_size=None: the dataset yields whole batches. Workers run with one torch thread (DataLoader's default).
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


@torch.inference_mode()
def embed_dim(model: torch.nn.Module, tokenizer: Callable, device: str | torch.device = "cpu") -> int:
    """The joint embedding dim (encodes one word: towers differ in where they keep it)."""
    return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])


def save_embeddings(out_dir: Path, emb: Embeddings, info: dict, dtype: str = "float32") -> None:
    """Writes `emb` as a single-layout embedding folder (`clipkit.index.embeddings.write_single`).

    Args:
        out_dir: the folder (created).
        emb: the embeddings.
        info: facts stored in embed.json (model, shards: the urls `emb` was embedded from, in order).
        dtype: "float32" or "float16" for the stored vectors.
    """
    facts = {**info, "skipped": emb.skipped}
    if emb.shard_rows and len(emb.shard_rows) == len(info.get("shards", [])):
        facts["shard_rows"] = emb.shard_rows  # with "shards": the shard of every row, for thumbnails
    write_single(Path(out_dir), emb.image, emb.text, emb.text_to_image, emb.meta, facts, dtype)


def embed_parts(
    model: torch.nn.Module,
    transform: Callable,
    tokenizer: Callable,
    urls: Sequence[str],
    out_dir: Path,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    meta_format: str = "jsonl",
    texts: bool = True,
    rank: int = 0,
    world_size: int = 1,
    info: dict | None = None,
    workers: int = 0,
) -> dict:
    """Embeds shards into a parts-layout embedding folder; this process does parts rank::world_size.

    Part i holds shard urls[i]: `out_dir/parts/part-0000i/` gets image_emb.npy, text_emb.npy, text_to_image.npy,
    meta.jsonl (or meta.parquet) and, last, part.json (the done-marker: shard, counts, dtype, model). A part whose
    part.json exists and matches this run is skipped, so a rerun resumes. The process that finds every part
    done writes `out_dir/embed.json` ({"layout": "parts", "parts", "dim", "n_images", "n_texts", ...}); each
    process writes only its own parts, so any number of processes (torchrun, separate machines with a shared
    folder) can work on one export.

    Args:
        model: the dual encoder, in eval mode.
        transform: the eval image transform.
        tokenizer: the model's tokenizer.
        urls: shard paths; their order fixes the part numbers (keep it across reruns).
        out_dir: the embedding folder.
        batch_size: images (and captions) per forward pass.
        device: where the model lives.
        dtype: "float32" or "float16" for the stored vectors.
        meta_format: "jsonl" or "parquet".
        texts: also embed every caption line.
        rank: this process's rank.
        world_size: number of processes.
        info: facts stored in embed.json and part.json (model, ...).
        workers: DataLoader worker processes per part (a part is one shard, so 1 is the useful value: it
            decodes while the model encodes).

    Returns:
        {"embedded": parts done now, "skipped": parts found done, "complete": whether embed.json was written,
        "samples_per_second"}.

    Raises:
        ValueError: on a bad dtype/meta_format/rank, or a part made by another run (other shard, model or dtype);
            or if out_dir holds a single-layout export.
    """
    if dtype not in ARRAY_DTYPES:
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if meta_format not in META_FORMATS:
        raise ValueError(f"meta_format must be jsonl or parquet, got {meta_format!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    out_dir = Path(out_dir)
    if (out_dir / IMAGE_EMB_FILE).exists():
        raise ValueError(f"{out_dir / IMAGE_EMB_FILE}: {out_dir} holds a single-folder export; use a new --out")
    info = dict(info or {})
    recipe = {"model": info.get("model"), "dtype": dtype, "meta_format": meta_format, "texts": texts}
    mine = list(range(rank, len(urls), world_size))
    todo, found = [], []
    for i in mine:
        if part_matches(out_dir / PARTS_DIR / part_name(i), urls[i], recipe):
            found.append(part_name(i))
        else:
            todo.append(i)
    total = _known_samples([urls[i] for i in todo])
    t0, n_done = time.perf_counter(), 0
    with tqdm(total=total, desc=f"embed rank {rank}/{world_size}", unit="sample", disable=None) as bar:
        for i in todo:
            part_dir = out_dir / PARTS_DIR / part_name(i)
            t_part = time.perf_counter()
            emb = embed_samples(model, transform, tokenizer, [urls[i]], batch_size, device, texts, bar, workers=workers)
            text = (emb.text, emb.text_to_image) if texts else (None, None)
            facts = {**recipe, "shard": urls[i], "index": i, "skipped": emb.skipped}
            write_part(part_dir, emb.image, *text, emb.meta, facts, dtype, meta_format)
            n_done += len(emb.meta)
            log.info(
                "%s: %d samples from %s, %.1f samples/s",
                part_name(i),
                len(emb.meta),
                urls[i],
                len(emb.meta) / max(time.perf_counter() - t_part, 1e-9),
            )
    speed = n_done / max(time.perf_counter() - t0, 1e-9)
    complete = write_manifest_if_complete(out_dir, urls, {**info, **recipe})
    return {
        "embedded": [part_name(i) for i in todo],
        "skipped": found,
        "complete": complete,
        "samples_per_second": speed,
    }


def _known_samples(urls: Sequence[str]) -> int | None:
    """Total samples of the shards from their sizes.json, or None when unknown (the bar then has no total)."""
    try:
        return sum(read_sizes(list(urls)))
    except (FileNotFoundError, KeyError, ValueError):
        return None
