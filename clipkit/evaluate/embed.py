"""Encoding images and texts to L2-normalized float32 numpy arrays: the only torch code of evaluation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from clipkit.data.pipeline import iter_eval_samples


@dataclass
class Embeddings:
    """Row-aligned embeddings of a shard set.

    Attributes:
        image: [N, D] float32, L2-normalized, one row per image.
        text: [M, D] float32, L2-normalized, one row per caption (M >= N when images have several captions).
        text_to_image: [M] int64, the image row of each caption.
        meta: one dict per image row: {"key", "captions", **the sample's json}.
        skipped: bad samples by reason.
    """

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    meta: list[dict]
    skipped: dict = field(default_factory=dict)


def _batched(items: Iterable, size: int) -> Iterable[list]:
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] -> [B, D] float32 normalized."""
    return model.encode_image(images, normalize=True).float().cpu().numpy()


@torch.no_grad()
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


@torch.no_grad()
def embed_shards(
    model: torch.nn.Module,
    transform: Callable,
    tokenizer: Callable,
    urls: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    texts: bool = True,
    desc: str = "embed",
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
    """
    stats: Counter = Counter()
    image_rows, meta, captions, owners = [], [], [], []
    bar = tqdm(desc=desc, unit="img", disable=None)
    for chunk in _batched(iter_eval_samples(urls, stats), batch_size):
        pixels = torch.stack([transform(s["image"]) for s in chunk]).to(device)
        image_rows.append(encode_images(model, pixels))
        for s in chunk:
            if texts:
                owners.extend([len(meta)] * len(s["captions"]))
                captions.extend(s["captions"])
            meta.append({"key": s["key"], "captions": s["captions"], **s["json"]})
        bar.update(len(chunk))
    bar.close()
    if not meta:
        raise ValueError(f"no usable sample in {len(urls)} shard(s) starting {urls[:1]} (skipped: {dict(stats)})")
    text = encode_texts(model, tokenizer, captions, batch_size, device) if texts else np.zeros((0, 0), np.float32)
    return Embeddings(np.concatenate(image_rows), text, np.asarray(owners, np.int64), meta, dict(stats))


def save_embeddings(out_dir, emb: Embeddings, info: dict, dtype: str = "float32") -> None:
    """Writes an embedding folder: image_emb.npy, text_emb.npy, text_to_image.npy, meta.jsonl, embed.json.

    Args:
        out_dir: the folder (created).
        emb: the embeddings.
        info: facts stored in embed.json (model, shards).
        dtype: "float32" or "float16" for the stored vectors.
    """
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image_emb.npy", emb.image.astype(dtype))
    np.save(out / "text_emb.npy", emb.text.astype(dtype))
    np.save(out / "text_to_image.npy", emb.text_to_image)
    with open(out / "meta.jsonl", "w", encoding="utf-8") as f:
        for row in emb.meta:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    facts = {"dim": int(emb.image.shape[1]), "n_images": len(emb.meta), "n_texts": len(emb.text), "dtype": dtype}
    (out / "embed.json").write_text(json.dumps({**info, **facts, "skipped": emb.skipped}, indent=2))
