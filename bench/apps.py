"""The WSGI apps every server in the benchmark runs (``bench.apps:hello`` and friends).

The same plain WSGI callables are handed to every server; none needs a shim:
hypercorn 0.18 wraps a WSGI callable itself (``hypercorn.utils.wrap_app`` picks
``WSGIWrapper`` for a non-ASGI callable, under both ``-k trio`` and ``-k asyncio``),
granian runs them with ``--interface wsgi``.

- ``hello``: a fixed 13-byte body, returned as a list with ``Content-Length``.
- ``stream``: 200 MiB (by default) in 64 KiB chunks from a generator, no
  ``Content-Length``. The size comes from the query string (``?size=BYTES`` or
  ``?BYTES``), else from ``$BENCH_STREAM_BYTES``.
- ``echo``: reads ``wsgi.input`` to the end with ``read(65536)`` calls, returns it.
- ``sink``: reads ``wsgi.input`` in 64 KiB pieces, discards them, returns the byte count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

HELLO_BODY = b"Hello, world!"  # 13 bytes
CHUNK_SIZE = 64 * 1024
DEFAULT_STREAM_BYTES = 200 * 1024 * 1024
_CHUNK = b"x" * CHUNK_SIZE


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO_BODY)))],
    )
    return [HELLO_BODY]


def _stream_size(environ: Environ) -> int:
    query = environ.get("QUERY_STRING", "")
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if value and key == "size":
            return int(value)
        if not value and key.isdigit():
            return int(key)
    return int(os.environ.get("BENCH_STREAM_BYTES", DEFAULT_STREAM_BYTES))


def _chunks(size: int) -> Iterator[bytes]:
    full, rest = divmod(size, CHUNK_SIZE)
    chunk = _CHUNK
    for _ in range(full):
        yield chunk
    if rest:
        yield chunk[:rest]


def stream(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    size = _stream_size(environ)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return _chunks(size)


def echo(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    read = environ["wsgi.input"].read
    parts = []
    while True:
        data = read(65536)
        if not data:
            break
        parts.append(data)
    body = b"".join(parts)
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
    )
    return [body]


def sink(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    read = environ["wsgi.input"].read
    total = 0
    while True:
        data = read(CHUNK_SIZE)
        if not data:
            break
        total += len(data)
    body = str(total).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
