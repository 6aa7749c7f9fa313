"""Querying an index folder by text, image or vector: one-shot (`clipkit index query`) or over HTTP on localhost.

The HTTP server (`clipkit index serve`) is the standard library's ThreadingHTTPServer bound to 127.0.0.1 only:

- `GET /health` -> {"status": "ok", "count", "dim", "factory", "model"}
- `GET /query?text=...&k=5` -> {"k", "results": [{"query": text, "hits": [...]}]}
- `POST /query` with JSON {"text": str | [str], "vectors": [[float]] , "image_b64": str | [str], "k": int}
  (one of the three query kinds) -> the same layout, one result per query, in order.

Hits are `IndexDir.query`'s: {"rank", "score", "id", "key", "captions", "meta"?}. Errors answer 400 (bad request),
404 (unknown path) or 413 (body too large) with {"error": message}. Text and image queries need a model (the
one named in embed.json, or --checkpoint); vector queries do not.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from clipkit.index import IndexDir

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 16 << 20
MAX_QUERIES = 1024
MAX_K = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


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
            raise ValueError(f"cannot decode the image: {e.detail}") from None
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


def answer(index: IndexDir, queries: Sequence[dict[str, Any]], k: int, encoder: QueryEncoder | None) -> dict:
    """{"k", "results": [{"query", "hits"}]} for a list of queries (see the module docstring)."""
    if not queries:
        raise ValueError("no query given")
    if len(queries) > MAX_QUERIES:
        raise ValueError(f"{len(queries)} queries in one request; at most {MAX_QUERIES}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    vectors = encode_queries(queries, encoder, index.dim)
    hits = index.query(vectors, k)
    shown = [q.get("text", q.get("image", "<vector>")) for q in queries]
    shown = [s if isinstance(s, str) else "<image>" for s in shown]
    return {"k": k, "results": [{"query": s, "hits": h} for s, h in zip(shown, hits, strict=True)]}


def make_server(index: IndexDir, encoder: QueryEncoder | None = None, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server answering queries on 127.0.0.1:port (0 = a free port: read `server.server_address`).

    Call `serve_forever()` (e.g. in a thread) to run it and `shutdown()` + `server_close()` to stop it.
    """
    handler = _handler_class(index, encoder)
    server = ThreadingHTTPServer((LOOPBACK, port), handler)
    server.daemon_threads = True
    return server


def _handler_class(index: IndexDir, encoder: QueryEncoder | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "clipkit-index"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path == "/health":
                info = index.info
                body = {
                    "status": "ok",
                    "count": int(index.index.ntotal),
                    "dim": index.dim,
                    "factory": info.get("factory"),
                    "model": encoder.checkpoint if encoder else index.model,
                }
                return self._send(200, body)
            if url.path != "/query":
                return self._send(404, {"error": f"unknown path {url.path}; use /query or /health"})
            params = parse_qs(url.query)
            texts = params.get("text", [])
            try:
                k = int(params.get("k", ["5"])[0])
            except ValueError:
                return self._send(400, {"error": f"k must be an integer, got {params['k'][0]!r}"})
            self._answer([{"text": t} for t in texts], k)

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/query":
                return self._send(404, {"error": f"unknown path {self.path}; POST to /query"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._send(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                queries = _body_queries(body)
                k = int(body.get("k", 5))
            except (ValueError, TypeError, binascii.Error) as e:
                return self._send(400, {"error": f"bad request body: {e}"})
            self._answer(queries, k)

        def _answer(self, queries: list[dict[str, Any]], k: int) -> None:
            try:
                self._send(200, answer(index, queries, k, encoder))
            except (ValueError, FileNotFoundError) as e:
                self._send(400, {"error": str(e)})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def _body_queries(body: dict[str, Any]) -> list[dict[str, Any]]:
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
        vectors = np.asarray(value, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2:
            raise ValueError(f"'vectors' must be [Q, D], got shape {vectors.shape}")
        return [{"vector": v} for v in vectors]
    images = [value] if isinstance(value, str) else value
    return [{"image": base64.b64decode(b, validate=True)} for b in images]


def serve(index: IndexDir, encoder: QueryEncoder | None, port: int, ready: Callable[[int], None] | None = None) -> None:
    """Runs the server until interrupted (Ctrl-C), on 127.0.0.1:port."""
    server = make_server(index, encoder, port)
    bound = server.server_address[1]
    if ready is not None:
        ready(bound)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def image_bytes_b64(path: Path) -> str:
    """A file's bytes as base64 text, for POST /query {"image_b64": ...}."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
