"""Querying an index folder by text, image or vector: one-shot (`clipkit index query`) or served over HTTP with a
search page (`clipkit index serve`, docs/serve.md).

- `query`: the query encoder (one shared model), query files, the answer of one request;
- `http`: the server, its JSON API and the page's files (`static/`: plain HTML, CSS and JavaScript);
- `thumbnails`: a row's image bytes read from its shard at a cached tar offset.
"""

from __future__ import annotations

from clipkit.serve.http import LOOPBACK, make_server, serve
from clipkit.serve.query import QueryEncoder, answer, image_bytes_b64, read_query_file

__all__ = ["LOOPBACK", "QueryEncoder", "answer", "image_bytes_b64", "make_server", "read_query_file", "serve"]
