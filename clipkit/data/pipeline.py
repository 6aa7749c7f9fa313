"""Streaming loaders over WebDataset shards: decode, transform, tokenize, batch; split by process and worker.

Training streams are deterministic functions of (seed, epoch, rank, worker), with two modes:

- resampled (default): each worker draws shards with replacement from every source, and draws samples from the
  sources by weight. Infinite; nothing to hang on; reproducible.
- epoch: the shard list is shuffled with (seed, epoch) BEFORE it is split by process and then by worker, so every
  process sees different shards each epoch. Every worker yields the same number of full batches
  (total samples // (processes * workers * batch)), wrapping around its own shards if they run short, so
  uneven shard sizes never leave one process waiting in a collective. When the shards divide evenly, every
  sample is seen exactly once per epoch across all processes and workers.

Bad samples (undecodable images, missing captions, broken tars) are skipped and counted by reason; the counts
since the previous batch ride along with each batch (`batch["skipped"]`) so they reach the main process from
DataLoader workers.

Do not pass these loaders to `accelerator.prepare`: it would re-dispatch or re-split already split data.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image

from clipkit.data.shards import read_sizes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 64_000_000  # an "absurd" image: larger than ~8k x 8k is skipped, not decoded


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Source:
    """One shard set of a training mix: shard paths and the share of samples drawn from it."""

    urls: tuple[str, ...]
    weight: float = 1.0


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as an RGB PIL image (transparent pixels over white); raises SkipSample."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SkipSample("no_image", sample.get("__key__", "?"))
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise SkipSample("image_too_large", f"{img.width}x{img.height}")
        img.load()
    except SkipSample:
        raise
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("bad_image", f"{type(e).__name__}: {e}") from None
    if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_captions(sample: dict) -> list[str]:
    """The sample's non-empty caption lines; raises SkipSample."""
    raw = sample.get("txt")
    if raw is None:
        raise SkipSample("no_caption", sample.get("__key__", "?"))
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise SkipSample("bad_text", sample.get("__key__", "?")) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SkipSample("no_caption", sample.get("__key__", "?"))
    return lines


def decode_json(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_json", sample.get("__key__", "?")) from None


def read_tar_samples(urls: Iterator[str], stats: Counter, shard_stats: Counter | None = None) -> Iterator[dict]:
    """Samples of the given tar files in order; a broken or missing tar is counted once (`bad_shard`) and skipped.

    webdataset calls the handler for each failing read of a broken tar (the member, then the stream's end), so
    errors are counted per shard opening, not per call.
    """
    current = {"url": "?", "counted": False}

    def handler(exn: Exception) -> bool:
        if not current["counted"]:
            current["counted"] = True
            stats["bad_shard"] += 1
            if shard_stats is not None:
                shard_stats[current["url"]] += 1
        return True  # keep going with the next shard

    def tracked(us: Iterator[str]) -> Iterator[dict]:
        for u in us:
            current.update(url=u, counted=False)
            yield {"url": u}

    yield from wds.tarfile_to_samples(handler=handler)(tracked(urls))


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Within-stream shuffle with a buffer of `size` items (0 = no shuffling)."""
    if size <= 1:
        yield from samples
        return
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


def worker_info_is_worker() -> bool:
    """True inside a DataLoader worker process (which owns its RNG)."""
    return torch.utils.data.get_worker_info() is not None


def _with_rng(generator: torch.Generator, fn: Callable, *args):
    """Calls fn with torch's global RNG temporarily set to `generator`'s state, then advances `generator`."""
    saved = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        return fn(*args)
    finally:
        generator.set_state(torch.get_rng_state())
        torch.set_rng_state(saved)


def worker_info() -> tuple[int, int]:
    """(worker id, worker count) of the DataLoader worker running this code, (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A seed for one worker's stream; distinct and stable for each (seed, epoch, rank, worker)."""
    return random.Random(f"clipkit:{seed}:{epoch}:{rank}:{worker}").getrandbits(63)


class TrainStream(torch.utils.data.IterableDataset):
    """Batches {"image": [B, 3, H, W] float, "text": [B, L] int64, "key": list, "skipped": dict} for one process.

    Args:
        sources: shard sets and their weights.
        batch_size: samples per batch.
        transform: PIL image -> [3, H, W] tensor.
        tokenizer: list of captions -> [B, L] token ids.
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed of every random choice (shards, shuffle, captions, mixing).
        resampled: True for the infinite resampled stream, False for exact epochs.
        shuffle_size: per-worker shuffle buffer (samples).
        caption: "random" (one caption line at random per sample) or "first".
        epoch: a shared counter; set `stream.epoch.value` before iterating a new epoch.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        batch_size: int,
        transform: Callable,
        tokenizer: Callable,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resampled: bool = True,
        shuffle_size: int = 1000,
        caption: str = "random",
    ):
        super().__init__()
        if not sources or any(not s.urls for s in sources):
            raise ValueError("TrainStream needs at least one source with at least one shard")
        self.sources, self.batch_size = list(sources), batch_size
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_size, self.caption = resampled, shuffle_size, caption
        # Shared memory, so the value set by the training process reaches already-started loader workers.
        self.epoch = torch.multiprocessing.Value("i", 0)
        if not resampled:
            self.urls = [u for s in self.sources for u in s.urls]
            self.total = sum(read_sizes(self.urls))

    def batches_per_worker(self, num_workers: int) -> int:
        """Full batches each worker yields per epoch (epoch mode): total // (processes * workers * batch)."""
        n = self.total // (self.world_size * max(num_workers, 1) * self.batch_size)
        if n == 0:
            raise ValueError(
                f"{self.total} samples cannot fill one batch of {self.batch_size} for each of "
                f"{self.world_size} processes x {max(num_workers, 1)} workers"
            )
        return n

    # -------------------------------------------------------------------------------------- sample streams
    def _resampled_samples(self, rng: random.Random, stats: Counter, shard_stats: Counter) -> Iterator[dict]:
        def source_stream(src: Source, srng: random.Random) -> Iterator[dict]:
            urls = (srng.choice(src.urls) for _ in iter(int, 1))  # shards drawn with replacement, forever
            return shuffle_buffer(read_tar_samples(urls, stats, shard_stats), self.shuffle_size, srng)

        streams = [source_stream(s, random.Random(rng.getrandbits(63))) for s in self.sources]
        weights = [s.weight for s in self.sources]
        while True:
            yield next(rng.choices(streams, weights)[0])

    def _epoch_samples(
        self, rng: random.Random, epoch: int, worker: int, workers: int, stats: Counter, shard_stats: Counter
    ):
        urls = list(self.urls)
        random.Random(stream_seed(self.seed, epoch, -1, -1)).shuffle(urls)  # same order on every process
        mine = urls[self.rank :: self.world_size][worker::workers]
        if not mine:
            raise ValueError(
                f"{len(urls)} shards are too few for {self.world_size} processes x {workers} workers in epoch "
                "mode: use resampled mode or more shards"
            )
        while True:  # wrap around: the caller stops after a fixed number of batches
            yield from shuffle_buffer(read_tar_samples(iter(mine), stats, shard_stats), self.shuffle_size, rng)

    # -------------------------------------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_info()
        epoch = self.epoch.value
        seed = stream_seed(self.seed, epoch, self.rank, worker)
        rng = random.Random(seed)
        # Random augmentations draw from torch's global RNG. Seed it from the stream so a batch depends only on
        # (seed, epoch, rank, worker): a worker process owns its RNG; in the main process (workers=0) the
        # transforms run under a private RNG state, so loading never shifts the training RNG (exact resume).
        transform_rng = torch.Generator().manual_seed(seed)
        own_rng = worker_info_is_worker()
        if own_rng:
            torch.manual_seed(seed)
        stats: Counter = Counter()
        shard_stats: Counter = Counter()
        if self.resampled:
            samples, limit = self._resampled_samples(rng, stats, shard_stats), None
        else:
            samples = self._epoch_samples(rng, epoch, worker, workers, stats, shard_stats)
            limit = self.batches_per_worker(workers)
        produced = 0
        images, captions, keys = [], [], []
        for sample in samples:
            try:
                img = decode_image(sample)
                lines = decode_captions(sample)
                tensor = self.transform(img) if own_rng else _with_rng(transform_rng, self.transform, img)
            except SkipSample as e:
                stats[e.reason] += 1
                shard_stats[sample.get("__url__", "?")] += 1
                continue
            images.append(tensor)
            captions.append(lines[0] if self.caption == "first" else rng.choice(lines))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(captions),
                    "key": keys,
                    "skipped": dict(stats),
                    "skipped_shards": dict(shard_stats),
                }
                stats.clear()
                shard_stats.clear()
                images, captions, keys = [], [], []
                produced += 1
                if limit is not None and produced == limit:
                    return


def train_loader(stream: TrainStream, workers: int, prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader over a TrainStream (batches are built in the workers: batch_size=None).

    The loader gets its own generator: starting an iterator then draws its base seed from it, not from torch's
    global RNG, so restarting or fast-forwarding the data never shifts the training RNG.
    """
    kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=False) if workers > 0 else {}
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(stream.seed),
        **kwargs,
    )


def _worker_init(_: int) -> None:
    # Each worker decodes and transforms single images: more intra-op threads only oversubscribe the cores.
    torch.set_num_threads(1)


def iter_eval_samples(urls: Sequence[str], stats: Counter | None = None) -> Iterator[dict]:
    """Every usable sample of the shards in order: {"key", "image" (PIL), "captions", "json"}; bad ones counted."""
    stats = stats if stats is not None else Counter()
    for sample in read_tar_samples(iter(urls), stats):
        try:
            yield {
                "key": sample["__key__"],
                "image": decode_image(sample),
                "captions": decode_captions(sample),
                "json": decode_json(sample),
            }
        except SkipSample as e:
            stats[e.reason] += 1
