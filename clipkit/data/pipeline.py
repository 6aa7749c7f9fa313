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
since the previous batch ride along with each batch (`batch["skipped"]`, `batch["skipped_shards"]`) so they reach
the main process from DataLoader workers. A shard that cannot be read to its end (unreadable, empty, or truncated:
no end-of-archive marker, which tarfile itself does not notice when the cut falls between members) is counted once
per opening as `bad_shard`, named in a warning, and its readable samples are used. A stream that finds nothing to
train on raises `DataError` naming the shards instead of spinning: no sample at all after every shard was opened
twice (or `NO_SAMPLE_READS` shard openings), or no usable sample among the first `NO_USABLE_SAMPLES` read.

Images take a fast path when the transform is open_clip's training transform (RandomResizedCrop -> RGB ->
tensor -> Normalize; see `FastCrop`): the crop is drawn on the image size read from the header, a JPEG is decoded
at 1/2, 1/4 or 1/8 size (DCT scaling, `Image.draft`) when the crop still covers the output there and straight into a
tensor otherwise, crop and resize run on uint8 tensors, and normalization runs once per batch: in the worker for CPU
training, or (`normalize_on_device`) on the GPU, so that worker queues and host-to-device copies carry uint8, a
quarter of the bytes; `TrainStream.finish_images` completes such batches.

Do not pass these loaders to `accelerator.prepare`: it would re-dispatch or re-split already split data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clipkit.data.shards import has_end_marker, read_sizes
from clipkit.data.views import SimCLRViews

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 64_000_000  # an "absurd" image: larger than ~8k x 8k is skipped, not decoded
NO_SAMPLE_READS = 1000  # shard openings without a single sample after which a training stream gives up
NO_USABLE_SAMPLES = 1000  # samples read without a usable one after which a training stream gives up

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data that cannot be trained or evaluated on as asked; the message names the shards and the counts."""


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Source:
    """One shard set of a training mix: shard paths and the share of samples drawn from it."""

    urls: tuple[str, ...]
    weight: float = 1.0


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a sample (the first of IMAGE_EXTS it has); raises SkipSample."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SkipSample("no_image", sample.get("__key__", "?"))
    return sample[ext]


def sample_name(sample: dict) -> str:
    """Where a sample comes from, for messages: "shard.tar:key", or the key alone (a file path for a folder)."""
    key = sample.get("__key__", "?")
    return f"{sample['__url__']}:{key}" if "__url__" in sample else str(key)


class _NamedBytes(io.BytesIO):
    """Encoded bytes that PIL's errors name by the sample they came from (PIL puts `repr(fp)` in its messages)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.sample = name

    def __repr__(self) -> str:
        return self.sample


def open_image(sample: dict) -> Image.Image:
    """The sample's image, opened lazily: only the header is read (size, mode, format); raises SkipSample."""
    data = image_bytes(sample)
    try:
        img = Image.open(_NamedBytes(data, sample_name(sample)))
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("bad_image", _image_error(sample_name(sample), e)) from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise SkipSample("image_too_large", f"{sample_name(sample)}: {img.width}x{img.height}")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes an opened image into RGB (transparent pixels over white); raises SkipSample."""
    try:
        img.load()
    except Exception as e:
        name = getattr(getattr(img, "fp", None), "sample", None) or getattr(img, "filename", "") or "image"
        raise SkipSample("bad_image", _image_error(name, e)) from None
    if img.mode in ("RGBA", "LA", "P") and ("transparency" in img.info or img.mode != "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # a JPEG decodes to RGB: no copy


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as an RGB PIL image (transparent pixels over white); raises SkipSample."""
    return load_rgb(open_image(sample))


def image_tensor(sample: dict, img: Image.Image | None = None) -> torch.Tensor:
    """The sample's whole image as uint8 [3, H, W] (from `img`, its decoded RGB image, if given); raises SkipSample."""
    if img is None:
        opened = open_image(sample)
        if opened.format == "JPEG":
            return decode_jpeg_tensor(image_bytes(sample), sample_name(sample))
        img = load_rgb(opened)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def decode_jpeg_tensor(data: bytes, name: str = "JPEG") -> torch.Tensor:
    """A JPEG as uint8 [3, H, W] (grey and CMYK converted to RGB, as PIL would); raises SkipSample.

    torchvision's libjpeg-turbo decoder writes straight into the tensor, with the same pixels as PIL's decode and
    without its copy out of PIL's image memory (faster: docs/benchmarks.md, per-stage costs).
    """
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:  # truncated or corrupt data
        raise SkipSample("bad_image", _image_error(name, e)) from None


def _image_error(name: str, e: Exception) -> str:
    """A decoding error as "<sample>: what went wrong" (PIL's own message sometimes names the sample already)."""
    text = str(e) or type(e).__name__
    return text if name in text else f"{name}: {text}"


PIL_FILTERS = {
    T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    T.InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    T.InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class FastCrop:
    """open_clip's training transform (RandomResizedCrop -> RGB -> tensor -> Normalize), at a fraction of its cost.

    The same random draws as torchvision (`RandomResizedCrop.get_params` on the image size read from the header)
    pick the same crop region; the output has the same size and interpolation (antialiased). What differs:

    - a JPEG is decoded at 1/k size (k = 2, 4 or 8, libjpeg's DCT scaling via PIL's `Image.draft`) when the crop is
      at least k times the output in both sides (a 1024 px photo cropped to 224 px decodes 1/16 of its pixels), then
      cropped and resized by PIL from there;
    - other JPEGs are decoded by torchvision straight into a tensor (`decode_jpeg_tensor`), and crop and resize run
      on the uint8 tensor (torch's vectorized antialiased kernels, faster than PIL's: docs/benchmarks.md, per-stage
      costs), with values within a fraction of a level of PIL's on average;
    - normalization runs once per batch (`normalize`), in the loader worker or on the training device.

    Attributes:
        size: output (height, width).
        scale: RandomResizedCrop's area range.
        ratio: RandomResizedCrop's aspect-ratio range.
        interpolation: torchvision interpolation mode.
        mean: per-channel mean of the Normalize step.
        std: per-channel std of the Normalize step.
    """

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: T.InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, transform: Callable) -> FastCrop | None:
        """The fast equivalent of `transform` when it is open_clip's plain training transform, else None.

        Recognized: Compose([RandomResizedCrop(antialias), convert to RGB, to tensor, Normalize]); anything else
        (extra augmentations, custom callables) keeps the transform as it is.
        """
        steps = getattr(transform, "transforms", None)
        if not isinstance(steps, list) or len(steps) != 4:
            return None
        crop, convert, to_tensor, norm = steps
        names = {type(convert).__name__, getattr(convert, "__name__", "")}
        if not (
            type(crop) is T.RandomResizedCrop
            and crop.antialias is not False
            and crop.interpolation in PIL_FILTERS
            and names & {"MaybeConvertMode", "_convert_to_rgb"}
            and getattr(convert, "mode", "RGB") == "RGB"
            and isinstance(to_tensor, T.ToTensor)
            and type(norm) is T.Normalize
            and len(norm.mean) == 3
        ):
            return None
        return cls(
            tuple(crop.size),
            tuple(crop.scale),
            tuple(crop.ratio),
            crop.interpolation,
            tuple(float(m) for m in norm.mean),
            tuple(float(x) for x in norm.std),
        )

    def __call__(self, sample: dict) -> torch.Tensor:
        """A sample's image -> uint8 [3, H, W], cropped and resized; raises SkipSample."""
        img = open_image(sample)  # the header only: size and format
        full_w, full_h = img.size
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        k = next((k for k in (8, 4, 2) if h >= k * self.size[0] and w >= k * self.size[1]), 1)
        if img.format == "JPEG" and k > 1:
            # Decoded at 1/k; the crop box maps to fractional coordinates there, which PIL's resize takes as they
            # are (torch's takes whole pixels: rounding would shift the crop by up to k/2 source pixels).
            img.draft("RGB", (full_w // k, full_h // k))  # PIL picks exactly 1/k for this request
            img = load_rgb(img)
            sx, sy = img.width / full_w, img.height / full_h  # ~1/k (sizes round up)
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            small = img.resize(self.size[::-1], PIL_FILTERS[self.interpolation], box=box)
            return torch.from_numpy(np.array(small)).permute(2, 0, 1)
        if img.format == "JPEG":
            chw = decode_jpeg_tensor(image_bytes(sample), sample_name(sample))
        else:
            chw = torch.from_numpy(np.array(load_rgb(img))).permute(2, 0, 1)  # [3, H, W] view of a writable copy
        return TF.resized_crop(chw, top, left, h, w, list(self.size), self.interpolation, antialias=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 (x / 255 - mean) / std, on the batch's device.

        Channel by channel with scalar operands, torch's fastest elementwise loops: on a CPU several times faster
        than one broadcast multiply-add over the batch, and than torchvision's per-image ToTensor + Normalize.
        """
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        for c, (m, s) in enumerate(zip(self.mean, self.std, strict=True)):
            out[:, c].copy_(images[:, c]).mul_(1 / (255 * s)).add_(-m / s)
        return out


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


CAPTION_MODES = ("random", "first", "all", "keywords")
ALL_LINES_SEPARATOR = "; "  # how caption="all" joins a sample's lines into one text


def keyword_line(lines: Sequence[str]) -> tuple[int, list[str]] | None:
    """Where a sample's keyword line is and its keywords: (line index, keywords), or None when it has none.

    A keyword line is a comma-separated list of at least two non-empty items ("curl, document, page"), as the
    emoji and OpenClipart builders write after the name or title; when several lines are, the last one counts.
    Items are stripped; a repeated item is kept once (first place).
    """
    for i in range(len(lines) - 1, -1, -1):
        items = list(dict.fromkeys(item.strip() for item in lines[i].split(",") if item.strip()))
        if len(items) >= 2:
            return i, items
    return None


def choose_caption(lines: Sequence[str], mode: str, rng: random.Random, max_keywords: int = 0) -> str:
    """The text a sample trains on this time, from its caption lines; every draw comes from `rng`.

    Modes:
        first: the first line.
        random: one line drawn uniformly (`rng.choice`).
        all: every line, in order, joined by "; " (ALL_LINES_SEPARATOR); the tokenizer truncates the text to its
            context length, so late lines of a long caption may be cut.
        keywords: a line is drawn as in "random" (the same draw); when it is the keyword line (`keyword_line`) it
            becomes a random non-empty subset of its n keywords in random order, joined by ", ": a size k uniform in
            [1, min(n, max_keywords)] (max_keywords 0: [1, n]), then k distinct keywords (`rng.sample`, which also
            orders them). Any other line (the name or title line) is used as it is. A sample without a keyword line
            therefore trains exactly as in "random", and on a 2-line emoji caption the name comes half the time.
            Each visit of a sample draws anew.

    Args:
        lines: the sample's non-empty caption lines (`decode_captions`).
        mode: one of CAPTION_MODES.
        rng: the stream's private RNG, so that a caption depends only on the stream's (seed, epoch, rank, worker).
        max_keywords: the largest keyword subset in "keywords" mode (0: no limit).
    """
    if mode == "first":
        return lines[0]
    if mode == "all":
        return ALL_LINES_SEPARATOR.join(lines)
    if mode == "random":
        return rng.choice(lines)
    if mode != "keywords":
        raise ValueError(f"caption mode {mode!r}: expected one of {', '.join(CAPTION_MODES)}")
    i = rng.choice(range(len(lines)))  # consumes rng exactly as rng.choice(lines)
    found = keyword_line(lines)
    if found is None or found[0] != i:
        return lines[i]
    keywords = found[1]
    k = rng.randint(1, min(len(keywords), max_keywords or len(keywords)))
    return ", ".join(rng.sample(keywords, k))


def decode_json(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_json", sample.get("__key__", "?")) from None


def group_id(sample: dict, caption: str, positives: str) -> int:
    """A stable int64 id of what makes pairs positives: the caption text, or the value of a json key.

    A sample without the key gets an id of its own (its shard and key), so it is nobody's positive. Ids are
    8-byte BLAKE2b hashes: equal across processes and runs; a collision among 2^64 values is negligible.
    """
    if positives == "caption":
        what = "caption:" + caption
    else:
        value = decode_json(sample).get(positives)
        what = f"sample:{sample.get('__url__')}/{sample['__key__']}" if value is None else f"value:{value!r}"
    return int.from_bytes(hashlib.blake2b(what.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


_warned_shards: set[str] = set()  # shards this process has already warned about (resampled streams reread them)


def _count_bad_shard(url: str, why: str, stats: Counter, shard_stats: Counter | None) -> None:
    stats["bad_shard"] += 1
    if shard_stats is not None:
        shard_stats[url] += 1
    if url not in _warned_shards:
        _warned_shards.add(url)
        log.warning("shard %s: %s; its readable samples are used, the shard is counted as bad_shard", url, why)


def shard_damage(url: str) -> str | None:
    """Why a local .tar is incomplete, told without reading it ("empty (0 bytes)", "truncated ..."); else None.

    A tar without its end-of-archive marker is cut: tarfile reads such a file quietly up to the cut when it falls
    between members. Remote shards and other formats are not checked (None).
    """
    if not (url.endswith(".tar") and os.path.isfile(url)) or has_end_marker(Path(url)):
        return None
    return "empty (0 bytes)" if os.path.getsize(url) == 0 else "truncated (no end-of-archive marker)"


class ShardWatch:
    """Stops a shard reader that finds no sample at all, which would otherwise spin forever on an endless stream.

    Raises `DataError` at the opening of a shard when no sample came out of any earlier opening and either every
    shard was opened at least twice or `NO_SAMPLE_READS` shards were opened. Twice, because webdataset hands out a
    shard's last sample only when the next file arrives if the shard ended in a read error.

    Args:
        urls: the shards the reader may open.
        what: the stream's name in the message.
    """

    def __init__(self, urls: Sequence[str], what: str = "training stream"):
        self.urls, self.what = set(urls), what
        self.opens: Counter = Counter()
        self.errors: dict[str, str] = {}  # url -> the last read error
        self.found = False

    def opening(self, url: str) -> None:
        if self.found:
            return
        reads = sum(self.opens.values())
        if reads >= NO_SAMPLE_READS or (self.urls and all(self.opens[u] >= 2 for u in self.urls)):
            names = sorted(self.urls)
            listed = ", ".join(f"{u} ({self.errors.get(u, 'no sample')})" for u in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise DataError(
                f"{self.what}: no sample in {reads} shard reads of {len(names)} shard(s): {listed}{more}; "
                "each is empty, not a tar, or holds no file named <key>.<ext>"
            )
        self.opens[url] += 1


def read_tar_samples(
    urls: Iterator[str], stats: Counter, shard_stats: Counter | None = None, watch: ShardWatch | None = None
) -> Iterator[dict]:
    """Samples of the given tar files in order; a broken, missing or truncated tar is counted once per opening
    (`bad_shard`, and by url in `shard_stats`), warned about once per process, and its readable samples are used.

    webdataset calls the handler for each failing read of a broken tar (the member, then the stream's end), so
    errors are counted per shard opening, not per call. `watch` (endless streams): raises `DataError` when the
    shards yield no sample at all.
    """
    current = {"url": "?", "counted": False}

    def handler(exn: Exception) -> bool:
        detail = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args[0] if exn.args else exn)
        why = f"{type(exn).__name__}: {detail}"  # webdataset appends the stream and url to the args
        if watch is not None:
            watch.errors[current["url"]] = why
        if not current["counted"]:
            current["counted"] = True
            _count_bad_shard(current["url"], f"unreadable ({why})", stats, shard_stats)
        return True  # keep going with the next shard

    def tracked(us: Iterator[str]) -> Iterator[dict]:
        for u in us:
            if watch is not None:
                watch.opening(u)
            current.update(url=u, counted=False)
            damage = shard_damage(u)
            if damage is not None:
                current["counted"] = True
                _count_bad_shard(u, damage, stats, shard_stats)
            yield {"url": u}

    for sample in wds.tarfile_to_samples(handler=handler)(tracked(urls)):
        if watch is not None:
            watch.found = True
        yield sample


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Within-stream shuffle with a buffer of `size` items (0 = no shuffling).

    Ours, not webdataset's `shuffle` (which also takes an rng but fills and draws differently): the sample order of
    every existing run, and so its exact resume, stays as it was.
    """
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


def stream_seed(seed: int, epoch: int, rank: int, worker: int, purpose: str = "") -> int:
    """A seed for one worker's stream; distinct and stable for each (seed, epoch, rank, worker[, purpose])."""
    tag = f"clipkit:{seed}:{epoch}:{rank}:{worker}" + (f":{purpose}" if purpose else "")
    return random.Random(tag).getrandbits(63)


class TrainStream(torch.utils.data.IterableDataset):
    """Batches {"image": [B, 3, H, W], "text": [B, L] int64, "key": list, "skipped": dict} for one process.

    The batching is ours, not webdataset's `batched`: each batch carries the skip counts since the previous one (how
    they reach the training process from loader workers) and stops at an exact count per worker in epoch mode.

    "image" is float: the transform's output, or on the fast path (`fast` and open_clip's training transform; see
    `FastCrop`) the batch normalized at once. With `normalize_on_device` fast-path batches stay uint8 and
    `finish_images` normalizes them where they are (the GPU): a quarter of the bytes through queues and copies.

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
        caption: which text of a sample's caption lines to train on each time it is seen: "random", "first",
            "all" or "keywords" (`choose_caption`).
        fast: take the fast image path when the transform allows it (False: the transform as it is, on full-size
            decoded images, as open_clip_train does).
        normalize_on_device: leave fast-path batches uint8 for `finish_images` (for GPU training; on a CPU it
            would only move the normalization from the loader workers into the training process).
        positives: what makes two pairs of a batch positives of each other (multiple positives): "caption" (the
            same caption text) or a key of the samples' json (e.g. "label"); batches then carry "group", [B] int64
            ids. None: no group ids.
        max_keywords: the largest keyword subset of caption="keywords" (0: no limit).
        views: SLIP's two augmented views of each whole decoded image; batches then carry "views", [B, 2, 3, h, w]
            (uint8 with `normalize_on_device`, for `finish_views`). Drawn from their own generator, seeded by
            (seed, epoch, rank, worker, "views"): the other draws, and so the rest of the batch, stay as without.

    Attributes:
        epoch: a shared counter; set `stream.epoch.value` before iterating a new epoch.
        fast_crop: the FastCrop in use, or None.
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
        fast: bool = True,
        normalize_on_device: bool = False,
        positives: str | None = None,
        max_keywords: int = 0,
        views: SimCLRViews | None = None,
    ):
        super().__init__()
        if not sources or any(not s.urls for s in sources):
            raise ValueError("TrainStream needs at least one source with at least one shard")
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption mode {caption!r}: expected one of {', '.join(CAPTION_MODES)}")
        if max_keywords < 0:
            raise ValueError(f"max_keywords {max_keywords}: must be >= 0 (0 = no limit)")
        self.sources, self.batch_size = list(sources), batch_size
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_size, self.caption = resampled, shuffle_size, caption
        self.fast_crop = FastCrop.of(transform) if fast else None
        self.normalize_on_device, self.positives, self.max_keywords = normalize_on_device, positives, max_keywords
        self.views = views
        # Shared memory, so the value set by the training process reaches already-started loader workers.
        self.epoch = torch.multiprocessing.Value("i", 0)
        if not resampled:
            self.urls = [u for s in self.sources for u in s.urls]
            try:
                self.total = sum(read_sizes(self.urls))
            except KeyError as e:  # epoch mode sizes its epochs from sizes.json
                raise DataError(f"epoch mode (data.resampled false): {e.args[0]}") from None

    def batches_per_worker(self, num_workers: int) -> int:
        """Full batches each worker yields per epoch (epoch mode): total // (processes * workers * batch)."""
        n = self.total // (self.world_size * max(num_workers, 1) * self.batch_size)
        if n == 0:
            raise ValueError(
                f"{self.total} samples cannot fill one batch of {self.batch_size} for each of "
                f"{self.world_size} processes x {max(num_workers, 1)} workers"
            )
        return n

    def finish_images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's "image" as the model takes it: uint8 batches (`normalize_on_device`) are normalized here."""
        if self.fast_crop is not None and images.dtype == torch.uint8:
            return self.fast_crop.normalize(images)
        return images

    def finish_views(self, views: torch.Tensor) -> torch.Tensor:
        """A batch's "views" as the model takes them: uint8 batches (`normalize_on_device`) are normalized here."""
        return self.views.normalize(views) if views.dtype == torch.uint8 else views

    # -------------------------------------------------------------------------------------- sample streams
    def _resampled_samples(self, rng: random.Random, stats: Counter, shard_stats: Counter) -> Iterator[dict]:
        def source_stream(i: int, src: Source, srng: random.Random) -> Iterator[dict]:
            urls = (srng.choice(src.urls) for _ in iter(int, 1))  # shards drawn with replacement, forever
            watch = ShardWatch(src.urls, f"data source {i}")
            return shuffle_buffer(read_tar_samples(urls, stats, shard_stats, watch), self.shuffle_size, srng)

        streams = [source_stream(i, s, random.Random(rng.getrandbits(63))) for i, s in enumerate(self.sources)]
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
        watch = ShardWatch(mine, f"process {self.rank} worker {worker}")
        while True:  # wrap around: the caller stops after a fixed number of batches
            reader = read_tar_samples(iter(mine), stats, shard_stats, watch)
            yield from shuffle_buffer(reader, self.shuffle_size, rng)

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
        view_rng = torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.rank, worker, "views"))
        if own_rng:
            torch.manual_seed(seed)
        stats: Counter = Counter()
        shard_stats: Counter = Counter()
        if self.resampled:
            samples, limit = self._resampled_samples(rng, stats, shard_stats), None
        else:
            samples = self._epoch_samples(rng, epoch, worker, workers, stats, shard_stats)
            limit = self.batches_per_worker(workers)
        produced, usable = 0, False
        images, captions, keys, groups, views = [], [], [], [], []
        fast = self.fast_crop
        for sample in samples:
            if not usable and sum(stats.values()) - stats["bad_shard"] >= NO_USABLE_SAMPLES:
                raise DataError(
                    f"no usable sample among the first {NO_USABLE_SAMPLES} read ({dict(stats)}); "
                    f"shards: {', '.join(f'{u} ({n})' for u, n in shard_stats.most_common(3))}"
                    f"{f' and {len(shard_stats) - 3} more' if len(shard_stats) > 3 else ''}"
                )
            try:
                if fast is not None:  # the crop is drawn from the header's size, then decoded (maybe at 1/k size)
                    tensor = fast(sample) if own_rng else _with_rng(transform_rng, fast, sample)
                    lines = decode_captions(sample)
                    img = None
                else:
                    img = decode_image(sample)
                    lines = decode_captions(sample)
                    tensor = self.transform(img) if own_rng else _with_rng(transform_rng, self.transform, img)
                if self.views is not None:  # [2, 3, h, w] uint8, from the whole image (decoded again on the fast path)
                    views.append(self.views(image_tensor(sample, img), view_rng))
            except SkipSample as e:
                stats[e.reason] += 1
                shard_stats[sample.get("__url__", "?")] += 1
                continue
            usable = True
            images.append(tensor)
            captions.append(choose_caption(lines, self.caption, rng, self.max_keywords))
            keys.append(sample["__key__"])
            if self.positives is not None:
                groups.append(group_id(sample, captions[-1], self.positives))
            if len(images) == self.batch_size:
                batch = torch.stack(images)  # [B, 3, H, W]: uint8 on the fast path
                if fast is not None and not self.normalize_on_device:
                    batch = fast.normalize(batch)
                out = {
                    "image": batch,
                    "text": self.tokenizer(captions),
                    "key": keys,
                    "skipped": dict(stats),
                    "skipped_shards": dict(shard_stats),
                    **({"group": torch.tensor(groups, dtype=torch.int64)} if self.positives is not None else {}),
                }
                if self.views is not None:
                    pairs = torch.stack(views)  # [B, 2, 3, h, w] uint8
                    out["views"] = pairs if self.normalize_on_device else self.views.normalize(pairs)
                yield out
                stats.clear()
                shard_stats.clear()
                images, captions, keys, groups, views = [], [], [], [], []
                produced += 1
                if limit is not None and produced == limit:
                    return


def train_loader(
    stream: TrainStream, workers: int, prefetch_factor: int = 2, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over a TrainStream (batches are built in the workers: batch_size=None).

    The loader gets its own generator: starting an iterator then draws its base seed from it, not from torch's
    global RNG, so restarting or fast-forwarding the data never shifts the training RNG.

    Args:
        stream: the batches.
        workers: loader processes (0: load in the calling process).
        prefetch_factor: batches each worker keeps ready.
        pin_memory: copy batches into page-locked memory (a loader thread), so `.to(cuda, non_blocking=True)`
            overlaps the copy with compute; only useful with a GPU.
    """
    kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=False) if workers > 0 else {}
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
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
