"""The HTTP server of `clipkit index serve`: the search page and its JSON API (docs/serve.md).

The standard library's ThreadingHTTPServer, one thread per connection, HTTP/1.0 (one request per connection).
Safe defaults: binds 127.0.0.1 unless told otherwise (there is no authentication); a request body is read only
up to MAX_BODY_BYTES and only when its Content-Length is a valid number; idle or half-open connections close
after SOCKET_TIMEOUT_S; every malformed request gets a 4xx JSON answer ({"error": message}), an unexpected failure
a 500 JSON answer without a traceback (the traceback goes to the server's log); one `QueryEncoder` is shared by
all threads (it serializes forward passes); SIGTERM stops the server after the requests in flight.
"""

from __future__ import annotations

import binascii
import errno
import json
import logging
import math
import re
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from clipkit.index import IndexDir
from clipkit.serve.query import (
    MAX_K,
    MODES,
    NotAnImage,
    QueryEncoder,
    answer,
    body_queries,
    check_request,
    encode_queries,
    search_vectors,
)
from clipkit.serve.thumbnails import ImageUnavailable, ShardImages

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 16 << 20  # an uploaded image or a JSON body
SOCKET_TIMEOUT_S = 15.0  # a connection that sends nothing for this long is closed
MAX_URL_CHARS = 8192
DEFAULT_K = 20
# The page's files: a fixed table, so no request path ever reaches the file system.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'"
_ROW_PATH = re.compile(r"^/api/image/([^/]*)$")


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding what every handler thread shares: the index, the encoder, the image reader."""

    daemon_threads = False  # server_close waits for the requests in flight
    block_on_close = True

    def __init__(self, address: tuple[str, int], index: IndexDir, encoder: QueryEncoder | None):
        self.index, self.encoder, self.images = index, encoder, ShardImages(index)
        self.assets = {
            path: resources.files("clipkit.serve").joinpath("static", name).read_bytes()
            for path, (name, _) in STATIC.items()
        }
        super().__init__(address, Handler)


def make_server(
    index: IndexDir, encoder: QueryEncoder | None = None, port: int = 0, host: str = LOOPBACK
) -> SearchServer:
    """A server on host:port (port 0 = a free one: read `server.server_address`); call `serve_forever()` to run it
    and `shutdown()` + `server_close()` to stop it.

    Raises:
        ValueError: if the port is out of range, in use or not allowed, or the host cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: out of range; give 0 (any free port) to 65535")
    try:
        return SearchServer((host, port), index, encoder)
    except OSError as e:
        why = {errno.EADDRINUSE: "in use", errno.EACCES: "not allowed for this user"}.get(e.errno, e.strerror)
        raise ValueError(f"cannot listen on {host}:{port}: {why}; pick another --port (0: any free one)") from None


def serve(
    index: IndexDir,
    encoder: QueryEncoder | None,
    port: int,
    ready: Callable[[int], None] | None = None,
    host: str = LOOPBACK,
) -> None:
    """Runs the server until Ctrl-C or SIGTERM; requests in flight finish first."""
    server = make_server(index, encoder, port, host)
    stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for the loop
    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    if ready is not None:
        ready(server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Handler(BaseHTTPRequestHandler):
    server: SearchServer
    server_version = "clipkit-index"
    timeout = SOCKET_TIMEOUT_S  # socket timeout of each connection: idle and half-open clients are dropped

    # ------------------------------------------------------------------------------------------- dispatch
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._run(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._run(self._post)

    def do_HEAD(self) -> None:  # noqa: N802
        self._run(lambda url: self._fail(405, "HEAD is not supported; use GET"))

    def do_PUT(self) -> None:  # noqa: N802
        self._fail(405, "method not allowed; use GET or POST")

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT  # noqa: N815

    def _run(self, method: Callable[[Any], None]) -> None:
        try:
            if len(self.path) > MAX_URL_CHARS:
                raise RequestError(414, f"URL of {len(self.path)} characters; at most {MAX_URL_CHARS}")
            method(urlparse(self.path))
        except RequestError as e:
            self._fail(e.status, str(e))
        except NotAnImage as e:
            self._fail(415, str(e))
        except (ValueError, LookupError, RecursionError, OverflowError, TypeError, binascii.Error) as e:
            self._fail(400, str(e) or type(e).__name__)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client left: nothing to answer
        except Exception:  # a bug: the client gets a JSON 500, the log gets the traceback
            log.exception("%s %s failed", self.command, self.path)
            self._fail(500, "internal error (see the server's log)")

    def _get(self, url: Any) -> None:
        if url.path in STATIC:
            return self._send_bytes(200, self.server.assets[url.path], STATIC[url.path][1])
        if url.path in ("/api/health", "/health"):
            return self._send(200, {"status": "ok", **self._info()} if url.path == "/health" else {"status": "ok"})
        if url.path == "/api/info":
            return self._send(200, self._info())
        if url.path == "/api/search":
            return self._send(200, self._search(_params(url.query), None))
        match = _ROW_PATH.match(url.path)
        if match:
            return self._image(match.group(1))
        if url.path == "/query":  # the JSON API before the page: {"k", "results"} for text=... (repeatable)
            params = parse_qs(url.query)
            return self._send(
                200,
                answer(
                    self.server.index,
                    [{"text": t} for t in params.get("text", [])],
                    _k(params.get("k", ["5"])[0]),
                    self.server.encoder,
                ),
            )
        raise RequestError(404, f"unknown path {url.path}; the API is under /api/ (see /api/info)")

    def _post(self, url: Any) -> None:
        if url.path not in ("/api/search", "/query"):
            raise RequestError(
                404 if url.path not in STATIC and not url.path.startswith("/api/") else 405,
                f"cannot POST to {url.path}; POST an image to /api/search",
            )
        body = self._body()
        if url.path == "/api/search":
            return self._send(200, self._search(_params(url.query), body))
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not JSON ({e})") from None
        if not isinstance(request, dict):
            raise RequestError(400, "expected a JSON object")
        k = request.get("k", 5)
        self._send(200, answer(self.server.index, body_queries(request), k, self.server.encoder))

    # ------------------------------------------------------------------------------------------- endpoints
    def _info(self) -> dict[str, Any]:
        index, encoder = self.server.index, self.server.encoder
        return {
            "model": encoder.checkpoint if encoder else index.model,
            "count": index.count,
            "dim": index.dim,
            "factory": index.info.get("factory"),
            "modes": ["image", "caption"] if index.captions is not None else ["image"],
            "caption_count": index.captions.count if index.captions is not None else None,
            "thumbnails": self.server.images.available,
            "encoder": encoder is not None,
            "max_k": MAX_K,
            "max_body_bytes": MAX_BODY_BYTES,
        }

    def _search(self, params: dict[str, str], image: bytes | None) -> dict[str, Any]:
        """One search: text (GET text=), a row's image (GET row=) or an uploaded image (POST body)."""
        index, encoder = self.server.index, self.server.encoder
        k, mode, dedup = _k(params.get("k", str(DEFAULT_K))), params.get("mode", "image"), _dedup(params.get("dedup"))
        if image is not None:
            query, shown = {"image": image}, "<image>"
        elif "row" in params:
            query, shown = {"vector": index.vectors([_row(params["row"], index.count)])[0]}, f"row {params['row']}"
        elif "text" in params:
            query, shown = {"text": params["text"]}, params["text"]
        else:
            raise RequestError(400, "missing query: give text=..., row=... or POST an image")
        check_request([query], k, mode, index)
        if "vector" not in query and encoder is None:
            raise RequestError(400, "this server has no model to encode text or images (start it with --checkpoint)")
        vectors = encode_queries([query], encoder, index.dim)
        hits = search_vectors(index, vectors, k, mode, dedup)[0]
        for h in hits:
            h["image"] = f"/api/image/{h['image_row']}"
        return {"query": shown, "k": k, "mode": mode, "dedup": dedup, "hits": hits}

    def _image(self, text: str) -> None:
        row = _row(text, self.server.index.count)
        try:
            data, content_type = self.server.images.get(row)
        except ImageUnavailable as e:
            raise RequestError(404, str(e)) from None
        self._send_bytes(200, data, content_type, cache=True)

    # ------------------------------------------------------------------------------------------- I/O
    def _body(self) -> bytes:
        """The request body, read only when Content-Length is a number in [0, MAX_BODY_BYTES]."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise RequestError(411, "Content-Length is required")
        if not text.strip().isdigit() or len(text.strip()) > 12:
            raise RequestError(400, f"Content-Length must be a non-negative integer, got {text[:40]!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"body of {length} bytes; at most {MAX_BODY_BYTES}")
        if length == 0:
            raise RequestError(400, "empty body: POST an image (or a JSON query to /query)")
        data = self.rfile.read(length)
        if len(data) != length:
            raise RequestError(400, f"body ended after {len(data)} of {length} bytes")
        return data

    def _fail(self, status: int, message: str) -> None:
        self.close_connection = True  # an unread body must not be taken for the next request
        try:
            self._send(status, {"error": message, "status": status})
        except (ConnectionError, TimeoutError):
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, header too long, unsupported method) as JSON too.
        self.request_version = "HTTP/1.0"  # an unparsed request line reads as HTTP/0.9, which gets no headers
        self._fail(code, message or self.responses.get(code, ("error",))[0])

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send_bytes(status, data, "application/json; charset=utf-8")

    def _send_bytes(self, status: int, data: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)


def _params(query: str) -> dict[str, str]:
    """A query string's parameters, the last value of each."""
    return {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True, max_num_fields=32).items()}


def _k(text: Any) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and text.strip().lstrip("+").isdigit() and len(text.strip()) <= 9:
        value = int(text)
    else:
        raise RequestError(400, f"k must be an integer in [1, {MAX_K}], got {str(text)[:40]!r}")
    if not 1 <= value <= MAX_K:
        raise RequestError(400, f"k must be an integer in [1, {MAX_K}], got {value}")
    return value


def _row(text: str, count: int) -> int:
    if not text.isdigit() or len(text) > 18:
        raise RequestError(400, f"a row is a non-negative integer, got {text[:40]!r}")
    row = int(text)
    if row >= count:
        raise RequestError(404, f"row {row} is not in the index (rows 0 to {count - 1})")
    return row


def _dedup(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise RequestError(400, f"dedup is a cosine threshold in (0, 1], got {text[:40]!r}")
    return value


__all__ = ["LOOPBACK", "MAX_BODY_BYTES", "MODES", "SearchServer", "make_server", "serve"]
