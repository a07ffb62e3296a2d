"""Small WSGI apps for the tests, each wrapped in wsgiref.validate.validator (PEP 3333 checks)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

Environ = dict[str, Any]


def _hello(environ: Environ, start_response: Any) -> Iterable[bytes]:
    body = b"Hello, world!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _echo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Echo the request body back, streaming it through wsgi.input.read(n)."""
    chunks = []
    while True:
        chunk = environ["wsgi.input"].read(65536)
        if not chunk:
            break
        chunks.append(chunk)
    body = b"".join(chunks)
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _stream(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """A generator response: ?n=chunks&size=bytes per chunk (no Content-Length)."""
    query = dict(part.split("=") for part in environ["QUERY_STRING"].split("&") if "=" in part)
    count, size = int(query.get("n", "3")), int(query.get("size", "5"))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def generate() -> Iterator[bytes]:
        for i in range(count):
            yield bytes([65 + i % 26]) * size

    return generate()


def _whoami(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Answer with the environ keys a test most often checks, as JSON."""
    keys = (
        "REQUEST_METHOD",
        "PATH_INFO",
        "SERVER_PROTOCOL",
        "REMOTE_ADDR",
        "REMOTE_PORT",
        "HTTP_HOST",
        "wsgi.url_scheme",
    )
    body = json.dumps({key: environ.get(key) for key in keys}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


hello = validator(_hello)
echo = validator(_echo)
stream = validator(_stream)
whoami = validator(_whoami)


class Gate:
    """Signals ``started`` from the app thread; answers 200 only once ``release`` is set.

    Gives up with a 500 after ``timeout`` seconds, so a test that forgets to
    release it fails instead of hanging.
    """

    def __init__(self, timeout: float = 60) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.timeout = timeout

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        self.started.set()
        if not self.release.wait(self.timeout):
            raise RuntimeError("the test never released the gate")
        body = b"finished after the stop began\n"
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]


class Blocker:
    """An app that signals it started, then streams until told to stop or cancelled.

    ``started`` is set (from the app thread) when the app begins; the app then
    yields ``chunk`` repeatedly until ``release`` is set.
    """

    def __init__(self, chunk: bytes = b"x" * 1024) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.chunk = chunk

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return self._body()

    def _body(self) -> Iterator[bytes]:
        self.started.set()
        while not self.release.is_set():
            yield self.chunk
