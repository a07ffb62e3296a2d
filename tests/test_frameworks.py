"""Real frameworks served for real: Django, Falcon and httpbin on a loopback port.

Each app is served in-process by ``serve_wsgi`` on 127.0.0.1:0, and every test
runs over every protocol trioserve speaks: HTTP/1.1 in cleartext and over TLS,
HTTP/2 with prior knowledge (h2c) and HTTP/2 negotiated by ALPN (trustme
certificates, see conftest.py). The client is httpx (sync, in a worker thread
while trio serves), and curl where it adds something: a request body sent
without Content-Length (``Transfer-Encoding: chunked`` over HTTP/1.1, DATA
frames without ``content-length`` over HTTP/2).

The Flask example has its own module, tests/test_flask.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from examples import django_app, falcon_app, httpbin_app
from tests.helpers import PROTOCOLS, Protocol
from tests.test_static import SendfileSpy
from trioserve import serve_wsgi

TIMEOUT = 30  # seconds, per test: a hang fails instead of blocking the suite


@dataclass
class Served:
    url: str
    client: httpx.Client
    protocol: Protocol
    cafile: str

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with httpx, made in a worker thread."""
        request = partial(self.client.request, method, self.url + path, **kwargs)
        response = await trio.to_thread.run_sync(request)
        assert response.http_version == self.protocol.server_protocol
        return response

    async def stream_lines(self, path: str) -> tuple[httpx.Response, list[str]]:
        """GET ``path`` and read the response line by line as it streams in."""

        def read() -> tuple[httpx.Response, list[str]]:
            with self.client.stream("GET", self.url + path) as response:
                return response, list(response.iter_lines())

        response, lines = await trio.to_thread.run_sync(read)
        assert response.http_version == self.protocol.server_protocol
        return response, lines

    def curl_args(self) -> list[str]:
        """curl options that select this protocol."""
        if not self.protocol.tls:
            return ["--http2-prior-knowledge"] if self.protocol.http2 else ["--http1.1"]
        # Over TLS, curl offers h2 and http/1.1 with --http2 and ALPN decides.
        return ["--cacert", self.cafile, "--http2" if self.protocol.http2 else "--http1.1"]


@pytest.fixture(params=list(PROTOCOLS))
def protocol(request: pytest.FixtureRequest) -> Protocol:
    return PROTOCOLS[request.param]


ServeFn = Callable[[Any], AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(
    protocol: Protocol,
    tls_cert_files: tuple[str, str, str],
    client_ssl_context: ssl.SSLContext,
) -> ServeFn:
    """``async with serve(app) as server``: ``app`` on a loopback port, with a client."""

    @asynccontextmanager
    async def serve_app(app: Any) -> AsyncIterator[Served]:
        options: dict[str, Any] = {"bind": "127.0.0.1:0"}
        certfile, keyfile, cafile = tls_cert_files
        if protocol.tls:
            options["certfile"], options["keyfile"] = certfile, keyfile
            # Offer h2 and http/1.1 (as httpx does with http2=True); ALPN decides.
            client = httpx.Client(http2=protocol.http2, verify=client_ssl_context, timeout=10)
        else:
            # http1=False, http2=True: HTTP/2 with prior knowledge over cleartext (h2c).
            client = httpx.Client(http1=not protocol.http2, http2=protocol.http2, timeout=10)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                server = await serve_wsgi(app, nursery, **options)
                assert server.url.startswith("https://" if protocol.tls else "http://")
                try:
                    yield Served(server.url, client, protocol, cafile)
                finally:
                    await trio.to_thread.run_sync(client.close)
                    await server.stop(graceful_timeout=5)

    return serve_app


CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


async def run_curl(*args: str) -> str:
    assert CURL is not None
    result = await trio.run_process(
        [CURL, "--silent", "--show-error", "--max-time", "20", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """A body of unknown length: httpx sends it chunked (HTTP/1.1) or without content-length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# ---------------------------------------------------------------------------
# Django: examples/django_app.py
# ---------------------------------------------------------------------------

DJANGO = django_app.application
CSRF_TOKEN_RE = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


async def test_django_page(serve: ServeFn, protocol: Protocol) -> None:
    async with serve(DJANGO) as server:
        response = await server.call("GET", "/")
        missing = await server.call("GET", "/no/such/page/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Django on trioserve</h1>" in response.text
    assert f"Served over {protocol.server_protocol}." in response.text
    assert response.headers["server"] == "trioserve"
    assert missing.status_code == 404


async def test_django_csrf_form(serve: ServeFn) -> None:
    async with serve(DJANGO) as server:
        # Browsers send Origin with a form POST; over HTTPS Django insists on it (or Referer).
        origin = {"Origin": server.url}

        no_cookie = await server.call("POST", "/form/", data={"name": "mallory"}, headers=origin)
        assert no_cookie.status_code == 403
        assert "CSRF" in no_cookie.text

        page = await server.call("GET", "/form/")
        assert page.status_code == 200
        match = CSRF_TOKEN_RE.search(page.text)
        assert match is not None, page.text
        token = match.group(1)
        assert "csrftoken" in server.client.cookies  # set by the GET, sent back from now on

        ok = await server.call(
            "POST", "/form/", data={"csrfmiddlewaretoken": token, "name": "trio"}, headers=origin
        )
        assert ok.status_code == 200, ok.text
        assert ok.text == "Hello, trio!\n"

        # The token may come in a header instead (what JavaScript clients do).
        ajax = await server.call(
            "POST", "/form/", data={"name": "ajax"}, headers={**origin, "X-CSRFToken": token}
        )
        assert ajax.status_code == 200, ajax.text
        assert ajax.text == "Hello, ajax!\n"

        # The cookie alone is not enough: the token must come with the POST.
        no_token = await server.call("POST", "/form/", data={"name": "eve"}, headers=origin)
        assert no_token.status_code == 403
        wrong_token = await server.call(
            "POST", "/form/", data={"csrfmiddlewaretoken": "x" * 64}, headers=origin
        )
        assert wrong_token.status_code == 403


@pytest.mark.parametrize(
    ("path", "expected", "content_type", "filename"),
    [
        (
            "/file/",
            django_app.THIS_FILE.read_bytes(),
            "text/x-python; charset=utf-8",
            "django_app.py",
        ),
        ("/file/memory/", django_app.MEMORY_FILE, "text/plain; charset=utf-8", "hello.txt"),
    ],
    ids=["on-disk", "in-memory"],
)
async def test_django_file_response(
    serve: ServeFn,
    protocol: Protocol,
    path: str,
    expected: bytes,
    content_type: str,
    filename: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = SendfileSpy()
    monkeypatch.setattr(os, "sendfile", spy)
    async with serve(DJANGO) as server:
        response = await server.call("GET", path)
    # Django hands a FileResponse's file to wsgi.file_wrapper: a file on disk goes by
    # sendfile over plain HTTP/1.1; an in-memory one (no descriptor) block by block.
    on_disk_plain = path == "/file/" and not (protocol.tls or protocol.http2)
    assert spy.bytes == (len(expected) if on_disk_plain else 0)
    assert response.status_code == 200
    assert response.content == expected
    assert response.headers["content-type"] == content_type
    assert response.headers["content-length"] == str(len(expected))
    assert f'filename="{filename}"' in response.headers["content-disposition"]


async def test_django_streaming_response(serve: ServeFn, protocol: Protocol) -> None:
    count = 500
    async with serve(DJANGO) as server:
        response, lines = await server.stream_lines(f"/stream/?n={count}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert "content-length" not in response.headers
    if not protocol.http2:
        assert response.headers["transfer-encoding"] == "chunked"
    assert lines == [f"chunk {i} of {count}" for i in range(count)]


@pytest.mark.parametrize("sized", [False, True], ids=["no-content-length", "content-length"])
async def test_django_upload(serve: ServeFn, protocol: Protocol, sized: bool) -> None:
    data = os.urandom(1024 * 1024 + 77)  # a little over 1 MiB: many chunks, frames and reads
    body = data if sized else pieces(data, 50_000)
    async with serve(DJANGO) as server:
        response = await server.call("POST", "/upload/", content=body)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_length": str(len(data)) if sized else None,
        "protocol": protocol.server_protocol,
    }


@needs_curl
async def test_django_upload_with_curl_without_content_length(
    serve: ServeFn, protocol: Protocol, tmp_path: Path
) -> None:
    """curl streams the file chunked over HTTP/1.1; over HTTP/2 it sends no content-length."""
    data = os.urandom(300_000)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    async with serve(DJANGO) as server:
        output = await run_curl(
            *server.curl_args(),
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{upload}",
            server.url + "/upload/",
        )
    assert json.loads(output) == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_length": None,
        "protocol": protocol.server_protocol,
    }


# ---------------------------------------------------------------------------
# Falcon: examples/falcon_app.py
# ---------------------------------------------------------------------------


async def test_falcon_get_quote(serve: ServeFn) -> None:
    async with serve(falcon_app.create_app()) as server:
        response = await server.call("GET", "/quote")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == falcon_app.DEFAULT_QUOTE


async def test_falcon_post_quote(serve: ServeFn) -> None:
    quote = {"quote": "Structured concurrency: every task has a parent.", "author": "trio"}
    async with serve(falcon_app.create_app()) as server:
        created = await server.call("POST", "/quote", json=quote)
        latest = await server.call("GET", "/quote")
    assert created.status_code == 201, created.text
    assert created.json() == quote
    assert latest.json() == quote


@pytest.mark.parametrize(
    ("body", "title"),
    [
        (b'{"quote": "unterminated', "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b'["a list"]', "Invalid quote"),
        (b'{"quote": "no author"}', "Invalid quote"),
    ],
    ids=["malformed", "empty", "not-an-object", "missing-field"],
)
async def test_falcon_bad_quote(serve: ServeFn, body: bytes, title: str) -> None:
    async with serve(falcon_app.create_app()) as server:
        response = await server.call(
            "POST", "/quote", content=body, headers={"Content-Type": "application/json"}
        )
        unchanged = await server.call("GET", "/quote")
    assert response.status_code == 400
    assert response.json()["title"] == title
    assert unchanged.json() == falcon_app.DEFAULT_QUOTE


# ---------------------------------------------------------------------------
# httpbin: examples/httpbin_app.py
# ---------------------------------------------------------------------------

HTTPBIN = httpbin_app.app


async def test_httpbin_get(serve: ServeFn) -> None:
    path = "/get?a=1&b=two&b=three"
    async with serve(HTTPBIN) as server:
        response = await server.call("GET", path, headers={"X-Trio": "yes"})
    assert response.status_code == 200
    body = response.json()
    assert body["args"] == {"a": "1", "b": ["two", "three"]}
    assert body["headers"]["X-Trio"] == "yes"
    assert body["headers"]["Host"] == server.url.split("://")[1]
    assert body["url"] == server.url + path  # scheme (https over TLS), host and port
    assert body["origin"] == "127.0.0.1"


async def test_httpbin_post_json_and_form(serve: ServeFn) -> None:
    async with serve(HTTPBIN) as server:
        as_json = await server.call("POST", "/post", json={"n": 1, "s": "ü"})
        as_form = await server.call("POST", "/post", data={"name": "trio", "x": "1"})
    assert as_json.status_code == 200
    assert as_json.json()["json"] == {"n": 1, "s": "ü"}
    assert as_form.status_code == 200
    assert as_form.json()["form"] == {"name": "trio", "x": "1"}


async def test_httpbin_stream(serve: ServeFn, protocol: Protocol) -> None:
    count = 20
    async with serve(HTTPBIN) as server:
        response, lines = await server.stream_lines(f"/stream/{count}")
    assert response.status_code == 200
    if not protocol.http2:
        assert response.headers["transfer-encoding"] == "chunked"
    assert [json.loads(line)["id"] for line in lines] == list(range(count))


async def test_httpbin_drip(serve: ServeFn) -> None:
    async with serve(HTTPBIN) as server:
        response = await server.call("GET", "/drip?numbytes=10&duration=0.2&delay=0&code=200")
    assert response.status_code == 200
    assert response.content == b"*" * 10


async def test_httpbin_range(serve: ServeFn) -> None:
    async with serve(HTTPBIN) as server:
        whole = await server.call("GET", "/range/100")
        part = await server.call("GET", "/range/100", headers={"Range": "bytes=10-19"})
    assert whole.status_code == 200
    assert len(whole.content) == 100
    assert part.status_code == 206
    assert part.headers["content-range"] == "bytes 10-19/100"
    assert part.content == whole.content[10:20]


async def test_httpbin_bytes(serve: ServeFn) -> None:
    size = 100_000
    async with serve(HTTPBIN) as server:
        first = await server.call("GET", f"/bytes/{size}?seed=7")
        again = await server.call("GET", f"/bytes/{size}?seed=7")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/octet-stream"
    # httpbin caps /bytes at 100 KiB; 100_000 is under it.
    assert len(first.content) == size
    assert first.content == again.content  # the same seed gives the same bytes


async def test_httpbin_cookies(serve: ServeFn) -> None:
    async with serve(HTTPBIN) as server:
        one = await server.call("GET", "/cookies", headers={"Cookie": "a=1; b=2"})
        # Two Cookie fields: HTTP/2 clients may split cookies into separate
        # fields (RFC 9113 §8.2.3), which a server must join with "; " (PEP 3333:
        # one environ key; RFC 6265 syntax), never with ", " as other headers.
        split = [("Cookie", "a=1"), ("Cookie", "b=2")]
        two = await server.call("GET", "/cookies", headers=split)
        echoed = await server.call("GET", "/headers", headers=split)
    assert one.json() == {"cookies": {"a": "1", "b": "2"}}
    assert two.json() == {"cookies": {"a": "1", "b": "2"}}
    assert echoed.json()["headers"]["Cookie"] == "a=1; b=2"


async def test_httpbin_teapot(serve: ServeFn) -> None:
    async with serve(HTTPBIN) as server:
        response = await server.call("GET", "/status/418")
    assert response.status_code == 418
    assert "teapot" in response.text


@needs_curl
async def test_httpbin_post_with_curl_without_content_length(
    serve: ServeFn, protocol: Protocol
) -> None:
    """A body without Content-Length reaches httpbin over HTTP/2; over HTTP/1.1 httpbin balks.

    httpbin refuses any request with ``Transfer-Encoding: chunked`` (501) unless
    SERVER_SOFTWARE says gunicorn: its own allow-list, not a server limit (the
    Django upload tests read chunked bodies fine). Over HTTP/2 there is no
    Transfer-Encoding, and Werkzeug reads to the end of ``wsgi.input`` because
    trioserve sets ``wsgi.input_terminated``.
    """
    async with serve(HTTPBIN) as server:
        output = await run_curl(
            *server.curl_args(),
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            '{"streamed": true}',
            "--write-out",
            "\n%{http_code}",
            server.url + "/post",
        )
    text, _, status = output.rpartition("\n")
    if not protocol.http2:
        assert status == "501"
        assert "Chunked requests are not supported for server trioserve" in text
        return
    assert status == "200"
    body = json.loads(text)
    assert body["json"] == {"streamed": True}
    assert "Content-Length" not in body["headers"]
