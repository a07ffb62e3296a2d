"""examples/flask_app.py served for real (serve_wsgi on a loopback port) to httpx.

Each test runs over every protocol trioserve speaks: HTTP/1.1 in cleartext and
over TLS, HTTP/2 with prior knowledge (h2c) and HTTP/2 negotiated by ALPN.
httpx's client is synchronous here, so every request runs in a worker thread
while trio serves.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from examples.flask_app import SAMPLE_FILE, THIS_FILE, app
from tests.helpers import PROTOCOLS, Protocol, run_example
from tests.test_static import SendfileSpy
from trioserve import serve_wsgi

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30


@dataclass
class Served:
    url: str
    client: httpx.Client
    protocol: Protocol

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, made in a worker thread."""
        request = partial(self.client.request, method, self.url + path, **kwargs)
        response = await trio.to_thread.run_sync(request)
        assert response.http_version == self.protocol.server_protocol
        return response

    async def in_thread(self, function: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(function)


@pytest.fixture(params=list(PROTOCOLS))
def protocol(request: pytest.FixtureRequest) -> Protocol:
    return PROTOCOLS[request.param]


def client_options(protocol: Protocol, client_ssl_context: ssl.SSLContext) -> dict[str, Any]:
    """httpx client settings that speak ``protocol``."""
    if protocol.tls:
        # Offer h2 and http/1.1 (httpx does, when http2=True) and let ALPN decide.
        return {"http2": protocol.http2, "verify": client_ssl_context, "timeout": 10}
    # http1=False, http2=True: HTTP/2 with prior knowledge over cleartext (h2c).
    return {"http1": not protocol.http2, "http2": protocol.http2, "timeout": 10}


@asynccontextmanager
async def serve_flask(
    protocol: Protocol,
    tls_cert_files: tuple[str, str, str],
    client_ssl_context: ssl.SSLContext,
) -> AsyncIterator[Served]:
    options: dict[str, Any] = {"bind": "127.0.0.1:0"}
    if protocol.tls:
        options["certfile"], options["keyfile"], _ = tls_cert_files
    client = httpx.Client(**client_options(protocol, client_ssl_context))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await serve_wsgi(app, nursery, **options)
            assert server.url.startswith("https://" if protocol.tls else "http://")
            try:
                yield Served(server.url, client, protocol)
            finally:
                await trio.to_thread.run_sync(client.close)
                await server.stop(graceful_timeout=5)


@pytest.fixture
def served(
    protocol: Protocol,
    tls_cert_files: tuple[str, str, str],
    client_ssl_context: ssl.SSLContext,
) -> Callable[[], Any]:
    return partial(serve_flask, protocol, tls_cert_files, client_ssl_context)


async def test_index_page(served: Callable[[], Any]) -> None:
    async with served() as server:
        response = await server.call("GET", "/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Flask on trioserve</h1>" in response.text
    assert response.headers["server"] == "trioserve"


async def test_not_found(served: Callable[[], Any]) -> None:
    async with served() as server:
        response = await server.call("GET", "/no/such/page")
    assert response.status_code == 404


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_info_json(served: Callable[[], Any], protocol: Protocol, method: str) -> None:
    async with served() as server:
        response = await server.call(method, "/api/info")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "method": method,
        "path": "/api/info",
        "protocol": protocol.server_protocol,
    }


async def test_stream(served: Callable[[], Any], protocol: Protocol) -> None:
    count = 2000
    async with served() as server:

        def stream_lines() -> tuple[httpx.Response, list[str]]:
            with server.client.stream("GET", f"{server.url}/stream?n={count}") as response:
                return response, list(response.iter_lines())

        response, lines = await server.in_thread(stream_lines)
    assert response.status_code == 200
    assert response.http_version == protocol.server_protocol
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    # A generator response has no length: chunked over HTTP/1.1, DATA frames over HTTP/2.
    assert "content-length" not in response.headers
    if not protocol.http2:
        assert response.headers["transfer-encoding"] == "chunked"
    assert lines == [f"line {i} of {count}" for i in range(count)]


async def test_concurrent_streams(
    served: Callable[[], Any], protocol: Protocol, client_ssl_context: ssl.SSLContext
) -> None:
    """Several streams at once (multiplexed on one connection over HTTP/2).

    With httpx's async client, in trio: its sync client, shared by threads, is not
    safe for concurrent HTTP/2 streams (on Python 3.13 over TLS a thread's read
    failed with EAGAIN inside httpcore).
    """
    results: dict[int, str] = {}
    async with (
        served() as server,
        httpx.AsyncClient(**client_options(protocol, client_ssl_context)) as client,
    ):

        async def one(n: int) -> None:
            response = await client.get(f"{server.url}/stream?n={n}")
            assert response.status_code == 200
            assert response.http_version == protocol.server_protocol
            results[n] = response.text

        async with trio.open_nursery() as nursery:
            for n in range(1, 9):
                nursery.start_soon(one, n * 100)
    assert sorted(results) == [n * 100 for n in range(1, 9)]
    for n, text in results.items():
        assert text == "".join(f"line {i} of {n}\n" for i in range(n))


async def test_upload_form(served: Callable[[], Any]) -> None:
    async with served() as server:
        response = await server.call("GET", "/upload")
    assert response.status_code == 200
    assert 'enctype="multipart/form-data"' in response.text
    assert 'name="file"' in response.text


async def test_upload(served: Callable[[], Any]) -> None:
    data = os.urandom(1024 * 1024 + 123)  # a little over 1 MiB: many frames / reads
    async with served() as server:
        response = await server.call(
            "POST", "/upload", files={"file": ("blob.bin", data, "application/octet-stream")}
        )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "filename": "blob.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


async def test_upload_without_file_field(served: Callable[[], Any]) -> None:
    async with served() as server:
        response = await server.call("POST", "/upload", files={"other": ("x.txt", b"x")})
    assert response.status_code == 400
    assert "file" in response.json()["error"]


async def test_send_file(
    served: Callable[[], Any], protocol: Protocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SendfileSpy()
    monkeypatch.setattr(os, "sendfile", spy)
    async with served() as server:
        response = await server.call("GET", "/send-file")
    assert spy.bytes == 0  # an in-memory file has no descriptor: sent block by block
    assert response.status_code == 200
    assert response.content == SAMPLE_FILE
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == str(len(SAMPLE_FILE))
    assert "hello.txt" in response.headers["content-disposition"]


async def test_send_file_from_disk(
    served: Callable[[], Any], protocol: Protocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    """werkzeug hands a file on disk to wsgi.file_wrapper: plain HTTP/1.1 sends it by
    os.sendfile, TLS and HTTP/2 block by block; the bytes are the same."""
    spy = SendfileSpy()
    monkeypatch.setattr(os, "sendfile", spy)
    expected = THIS_FILE.read_bytes()
    async with served() as server:
        response = await server.call("GET", "/send-file/disk")
    assert response.status_code == 200
    assert response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    assert spy.bytes == (0 if protocol.tls or protocol.http2 else len(expected))


async def test_send_file_range(served: Callable[[], Any]) -> None:
    async with served() as server:
        response = await server.call("GET", "/send-file", headers={"Range": "bytes=6-9"})
    assert response.status_code == 206
    assert response.content == SAMPLE_FILE[6:10]
    assert response.headers["content-range"] == f"bytes 6-9/{len(SAMPLE_FILE)}"


# ---------------------------------------------------------------------------
# examples/embedded.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["examples/embedded.py"], ["-m", "examples.embedded"]],
    ids=["script", "module"],
)
async def test_embedded_example_runs_to_completion(command: list[str]) -> None:
    lines = await run_example(command, TIMEOUT)
    output = "\n".join(lines)
    assert lines[0].startswith("server: listening on http://127.0.0.1:")
    assert not lines[0].endswith(":0")
    answers = [line for line in lines if line.startswith("client: /")]
    assert len(answers) == 3, lines
    assert all(" -> 200 " in line for line in answers), answers
    assert "POST /form over HTTP/1.1" in output
    assert "client: server stopped" in lines
    assert any(line.startswith("heartbeat: stopped after") for line in lines)
    assert lines[-1] == "main: every task has finished; exiting"
