"""Queries by text, image or vector against an index folder: encoding, query files, the answer of one request.

Used by `clipkit index query` (one shot) and by the HTTP server (`clipkit.serve.http`).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.index import IndexDir

MAX_QUERIES = 1024
MAX_K = 1000
MAX_TEXT_CHARS = 1000  # a caption-length query; the tokenizer truncates far earlier
MODES = ("image", "caption")  # search the image index, or the caption index (`IndexDir.captions`)
DEDUP_OVERFETCH = 4  # with the near-duplicate filter, hits fetched per hit shown (a few get suppressed)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class NotAnImage(ValueError):
    """Query bytes that do not decode as an image."""


class QueryEncoder:
    """Turns text and images into L2-normalized query vectors with a model folder's towers.

    Args:
        checkpoint: model folder (open_clip_config.json + weights).
        device: torch device; default cuda if available, else cpu.
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None):
        import torch

        from clipkit.models import load_model

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.bundle = load_model(Path(checkpoint), self.device)
        self.checkpoint = str(checkpoint)
        self._lock = threading.Lock()  # one forward at a time: server threads share the model

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[Q, D] float32 embeddings of Q texts."""
        from clipkit.evaluate.embed import encode_texts

        with self._lock:
            return encode_texts(self.bundle.model, self.bundle.tokenizer, list(texts), device=self.device)

    def images(self, images: Sequence[Any]) -> np.ndarray:
        """[Q, D] float32 embeddings of Q images (PIL images, paths or encoded bytes)."""
        import torch

        from clipkit.evaluate.embed import encode_images

        pixels = torch.stack([self.bundle.eval_transform(_open_image(im)) for im in images]).to(self.device)
        with self._lock:
            return encode_images(self.bundle.model, pixels)


def _open_image(image: Any) -> Any:
    from clipkit.data.pipeline import SkipSample, decode_image

    name = "query image"
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path}: not found")
        image, name = path.read_bytes(), str(path)
    if isinstance(image, bytes):
        try:
            return decode_image({"__key__": name, "png": image})  # decode_image sniffs the real format
        except SkipSample as e:
            raise NotAnImage(
                f"{name}: not a PNG, JPEG, WebP, GIF or BMP image that Pillow can decode ({e.detail})"
            ) from None
    return image.convert("RGB")


def read_query_file(path: Path) -> list[dict[str, Any]]:
    """Queries from a file: .npy -> vectors; .jsonl -> {"text"} / {"image"} / {"vector"} per line; else one text per
    line, where a line naming an existing image file is an image query.

    Returns:
        [{"text": str} | {"image": path} | {"vector": [D] array}, ...] in file order.

    Raises:
        FileNotFoundError: if the file is missing; ValueError naming the file and line of a bad query.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query file {path}: not found")
    if path.suffix == ".npy":
        vectors = np.load(path)
        if vectors.ndim != 2:
            raise ValueError(f"query file {path}: expected a [Q, D] array, got shape {vectors.shape}")
        return [{"vector": v} for v in vectors.astype(np.float32)]
    queries = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from e
            kinds = [k for k in ("text", "image", "vector") if k in row] if isinstance(row, dict) else []
            if len(kinds) != 1:
                raise ValueError(f"{path}:{line_no}: expected an object with exactly one of text, image, vector")
            query = {kinds[0]: row[kinds[0]]}
            if "vector" in query:
                query["vector"] = np.asarray(query["vector"], np.float32)
            queries.append(query)
        elif line.lower().endswith(IMAGE_SUFFIXES) and (path.parent / line).is_file():
            queries.append({"image": str(path.parent / line)})
        elif line.lower().endswith(IMAGE_SUFFIXES) and Path(line).is_file():
            queries.append({"image": line})
        else:
            queries.append({"text": line})
    return queries


def encode_queries(queries: Sequence[dict[str, Any]], encoder: QueryEncoder | None, dim: int) -> np.ndarray:
    """[Q, D] float32 L2-normalized vectors for a mixed list of {"text"} / {"image"} / {"vector"} queries.

    Raises:
        ValueError: if a text/image query comes without an encoder, or a vector has the wrong dim or is zero.
    """
    out = np.zeros((len(queries), dim), np.float32)
    for kind, batch in (("text", "texts"), ("image", "images")):
        rows = [i for i, q in enumerate(queries) if kind in q]
        if not rows:
            continue
        if encoder is None:
            raise ValueError(f"{kind} queries need a model: pass --checkpoint or send vectors")
        vectors = getattr(encoder, batch)([queries[i][kind] for i in rows])  # [R, D']
        if vectors.shape[1] != dim:
            raise ValueError(f"the model's {vectors.shape[1]}-d embeddings do not match the {dim}-d index")
        out[rows] = vectors
    for i, q in enumerate(queries):
        if "vector" in q:
            v = np.asarray(q["vector"], np.float32).reshape(-1)
            if v.shape != (dim,):
                raise ValueError(f"query vector {i}: dim {v.size} does not match index dim {dim}")
            norm = float(np.linalg.norm(v))
            if not np.isfinite(norm) or norm == 0:
                raise ValueError(f"query vector {i}: zero or non-finite")
            out[i] = v / norm  # the index holds L2-normalized vectors: cosine similarity
    return out


def check_request(
    queries: Sequence[dict[str, Any]], k: int, mode: str = "image", index: IndexDir | None = None
) -> None:
    """Refuses what no search should run: no query, too many, an empty or overlong text, k out of [1, MAX_K], an
    unknown mode or caption mode on an index without captions.

    Raises:
        ValueError: naming what is wrong.
    """
    if not queries:
        raise ValueError("no query given")
    if len(queries) > MAX_QUERIES:
        raise ValueError(f"{len(queries)} queries in one request; at most {MAX_QUERIES}")
    for q in queries:
        text = q.get("text")
        if text is not None and not text.strip():
            raise ValueError("empty text query: give some words")
        if text is not None and len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text query of {len(text)} characters; at most {MAX_TEXT_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if mode == "caption" and index is not None and index.captions is None:
        raise ValueError(f"{index.path} has no caption index (build it with `clipkit index build --captions`)")


def search_vectors(index: IndexDir, vectors: np.ndarray, k: int, mode: str = "image", dedup: float | None = None):
    """Per query vector, its hits best first (`IndexDir.query`'s dicts plus "image_row") in the image or caption index.

    Args:
        index: the image index folder (its `captions` for mode "caption").
        vectors: [Q, D] L2-normalized queries.
        k: hits per query.
        mode: "image" or "caption". Caption mode shows each image once, with its best caption.
        dedup: cosine threshold of the near-duplicate filter: a hit whose stored vector has cosine >= dedup with a
            better hit already kept is dropped. None: off.
    With a filter (caption mode or dedup), DEDUP_OVERFETCH x k candidates are searched so that k usually remain.
    """
    target = index.captions if mode == "caption" else index
    fetch = k if dedup is None and mode == "image" else min(k * DEDUP_OVERFETCH, target.count)
    out = []
    for hits in target.query(vectors, fetch):
        for h in hits:
            h["image_row"] = int(h.pop("meta", {})["image_row"]) if mode == "caption" else h["id"]
        if mode == "caption":
            seen: set[int] = set()
            hits = [h for h in hits if not (h["image_row"] in seen or seen.add(h["image_row"]))]
        if dedup is not None and hits:
            stored = target.vectors([h["id"] for h in hits])  # [H, D]
            kept: list[int] = []
            for i in range(len(hits)):
                if not kept or float(np.max(stored[kept] @ stored[i])) < dedup:
                    kept.append(i)
            hits = [hits[i] for i in kept]
        hits = hits[:k]
        for rank, h in enumerate(hits, 1):
            h["rank"] = rank
        out.append(hits)
    return out


def answer(
    index: IndexDir,
    queries: Sequence[dict[str, Any]],
    k: int,
    encoder: QueryEncoder | None,
    mode: str = "image",
    dedup: float | None = None,
) -> dict:
    """{"k", "mode", "results": [{"query", "hits"}]} for a list of {"text"} / {"image"} / {"vector"} queries.

    Raises:
        ValueError: on a request `check_request` refuses, or a query that cannot be encoded.
    """
    check_request(queries, k, mode, index)
    vectors = encode_queries(queries, encoder, index.dim)
    hits = search_vectors(index, vectors, k, mode, dedup)
    shown = [q.get("text", q.get("image", "<vector>")) for q in queries]
    shown = [s if isinstance(s, str) else "<image>" for s in shown]
    return {"k": k, "mode": mode, "results": [{"query": s, "hits": h} for s, h in zip(shown, hits, strict=True)]}


def body_queries(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The queries of a JSON request body with exactly one of "text", "vectors", "image_b64".

    Raises:
        ValueError (binascii.Error for bad base64): naming what is wrong.
    """
    kinds = [k for k in ("text", "vectors", "image_b64") if k in body]
    if len(kinds) != 1:
        raise ValueError("give exactly one of 'text', 'vectors', 'image_b64'")
    value = body[kinds[0]]
    if kinds[0] == "text":
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("'text' must be a string or a list of strings")
        return [{"text": t} for t in texts]
    if kinds[0] == "vectors":
        if not isinstance(value, list) or not all(isinstance(v, (list, int, float)) for v in value):
            raise ValueError("'vectors' must be a list of lists of numbers")
        try:
            vectors = np.asarray(value, np.float32)  # [Q, D]
        except (OverflowError, TypeError) as e:
            raise ValueError(f"'vectors': not numbers that fit a float32 ({e})") from None
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2:
            raise ValueError(f"'vectors' must be [Q, D], got shape {vectors.shape}")
        return [{"vector": v} for v in vectors]
    images = [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not all(isinstance(b, str) for b in images):
        raise ValueError("'image_b64' must be a base64 string or a list of them")
    return [{"image": base64.b64decode(b, validate=True)} for b in images]


def image_bytes_b64(path: Path) -> str:
    """A file's bytes as base64 text, for POST /query {"image_b64": ...}."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
