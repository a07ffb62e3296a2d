"""End-to-end interoperability: a real server on a loopback socket, independent clients.

Every test starts trioserve in-process (``serve_wsgi`` in the pytest-trio ``nursery``
fixture, port 0) and talks to it with a client that shares no code with it: Python's
``http.client`` and raw sockets, httpx (h2), and the external programs curl, nghttp,
h2load and wrk. Tests needing a program are decorated with ``needs(...)``, which marks
them ``@pytest.mark.external`` and skips them, naming the program, when it is missing.
Every test runs under an absolute ``trio.fail_after`` so a hang fails instead of
blocking CI; no test sleeps for timing.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from wsgiref.validate import validator

import httpx
import pytest
import trio
import trio.testing

from tests import apps
from tests.apps import Gate, whoami
from tests.helpers import has_ipv6_loopback, receive_until
from trioserve.server import Server, serve_wsgi

Environ = dict[str, Any]
Serve = Callable[..., Awaitable[Server]]
TestFunction = TypeVar("TestFunction", bound=Callable[..., Any])

# Per-test absolute limits (seconds): generous for a loaded CI machine, short enough
# that a hang is reported quickly.
QUICK = 15
SLOW = 60

# ---- small local apps (each used through wsgiref.validate.validator) ----------------


class Rendezvous:
    """``/meet`` requests each wait until ``parties`` of them are in the app at once.

    If the client does not really run them concurrently, the barrier times out and
    every one of them fails with a 500. Other paths answer like ``whoami``.
    """

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=QUICK)

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/meet":
            self.barrier.wait()
        return whoami(environ, start_response)


def stream_body(count: int, size: int) -> bytes:
    """What ``apps.stream`` sends for ``?n=count&size=size``."""
    return b"".join(bytes([65 + i % 26]) * size for i in range(count))


# ---- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def serve(nursery: trio.Nursery, tls_cert_files: tuple[str, str, str]) -> Serve:
    """``server = await serve(app, tls=False, bind="127.0.0.1:0", **options)``.

    The server runs in the test's nursery fixture, which cancels it after the test.
    """

    async def start(
        app: Any, *, tls: bool = False, bind: str = "127.0.0.1:0", **options: Any
    ) -> Server:
        if tls:
            certfile, keyfile, _ = tls_cert_files
            options.update(certfile=certfile, keyfile=keyfile)
        return await serve_wsgi(app, nursery, bind=bind, **options)

    return start


@pytest.fixture
def cafile(tls_cert_files: tuple[str, str, str]) -> str:
    return tls_cert_files[2]


def needs(*programs: str) -> Callable[[TestFunction], TestFunction]:
    """Mark a test ``external``; skip it, naming what is missing, if a program is absent.

    The check runs at collection time (``shutil.which``), so a skipped test starts nothing.
    """
    missing = [program for program in programs if shutil.which(program) is None]
    reason = f"{', '.join(missing)} not installed; this interop test needs it"

    def decorate(test: TestFunction) -> TestFunction:
        test = pytest.mark.external(test)
        return pytest.mark.skipif(bool(missing), reason=reason)(test)

    return decorate


async def run(*command: str) -> subprocess.CompletedProcess[bytes]:
    """Run an external client to completion (the server keeps serving meanwhile).

    If the test's deadline passes first, trio terminates the process.
    """
    return await trio.run_process(
        list(command), stdin=b"", capture_stdout=True, capture_stderr=True, check=False
    )


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking client in a thread; a test timeout abandons it instead of hanging."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@dataclass
class CurlResult:
    returncode: int
    status: int
    http_version: str
    headers: str  # the -D dump: every response head received, interim ones included
    body: bytes  # what curl wrote with -o (with -I: the response head)
    size_download: int  # body bytes received (%{size_download})
    stderr: str

    def check(self, status: int = 200, http_version: str | None = None) -> None:
        assert self.returncode == 0, f"curl exited {self.returncode}: {self.stderr}"
        assert self.status == status, self.headers
        if http_version is not None:
            assert self.http_version == http_version, self.headers


_curl_ids = itertools.count()


async def curl(workdir: Path, *args: str) -> CurlResult:
    """Run curl with ``args``; the body, header dump and -w summary are collected."""
    run_id = next(_curl_ids)
    body_file = workdir / f"curl-{run_id}.body"
    head_file = workdir / f"curl-{run_id}.head"
    result = await run(
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-o",
        str(body_file),
        "-D",
        str(head_file),
        "-w",
        "%{http_code} %{http_version} %{size_download}",
        *args,
    )
    # "000 0 0" when curl got no response; pad in case it printed nothing at all.
    status, version, size = [*result.stdout.decode().split(), "0", "", "0"][:3]
    return CurlResult(
        returncode=result.returncode,
        status=int(status),
        http_version=version,
        headers=head_file.read_text("latin-1") if head_file.exists() else "",
        body=body_file.read_bytes() if body_file.exists() else b"",
        size_download=int(size),
        stderr=result.stderr.decode(errors="replace"),
    )


def header_values(head_dump: str, name: str) -> list[str]:
    """Values of header ``name`` in the *last* response head of a curl -D dump."""
    last = head_dump.strip().split("\r\n\r\n")[-1]
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in last.splitlines()
        if line.lower().startswith(prefix)
    ]


async def receive_to_eof(stream: trio.abc.Stream, buffer: bytearray) -> bytes:
    while data := await stream.receive_some(65536):
        buffer += data
    return bytes(buffer)


@dataclass
class RawResponse:
    status_line: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


async def read_response(stream: trio.abc.Stream, buffer: bytearray) -> RawResponse:
    """Read one Content-Length framed HTTP/1.x response from a raw stream."""
    head = (await receive_until(stream, buffer, b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(buffer) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"EOF inside the body; got {bytes(buffer)!r}")
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return RawResponse(status_line, headers, body)


@contextlib.contextmanager
def short_unix_path(tmp_path: Path) -> Iterator[str]:
    """A unix socket path under tmp_path, or under a short temp dir if that is too long."""
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="ts-") as directory:
        yield os.path.join(directory, "s.sock")


# ---- Python's http.client and raw sockets ----------------------------------------------


async def test_http_client_keep_alive(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(whoami)

        def client() -> list[tuple[int, dict[str, Any], bool]]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=QUICK)
            results, sockets = [], []
            try:
                for path in ("/first", "/second"):
                    conn.request("GET", path)
                    response = conn.getresponse()
                    body = json.loads(response.read())
                    results.append((response.status, body, response.will_close))
                    sockets.append(conn.sock)
            finally:
                conn.close()
            assert sockets[0] is not None
            assert sockets[0] is sockets[1], "http.client had to reconnect"
            return results

        (status1, first, close1), (status2, second, close2) = await in_thread(client)
    assert (status1, status2) == (200, 200)
    assert (first["PATH_INFO"], second["PATH_INFO"]) == ("/first", "/second")
    assert not close1
    assert not close2
    assert first["SERVER_PROTOCOL"] == "HTTP/1.1"
    # The server saw both requests on one connection.
    assert first["REMOTE_PORT"] == second["REMOTE_PORT"]


async def test_http_client_post_content_length(serve: Serve) -> None:
    payload = os.urandom(1_000_000)
    with trio.fail_after(QUICK):
        server = await serve(apps.echo)

        def client() -> tuple[int, str | None, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=QUICK)
            try:
                conn.request("POST", "/", body=payload)
                response = conn.getresponse()
                return response.status, response.getheader("Content-Length"), response.read()
            finally:
                conn.close()

        status, length, body = await in_thread(client)
    assert status == 200
    assert length == str(len(payload))
    assert body == payload


async def test_http_client_chunked_upload(serve: Serve) -> None:
    chunks = [os.urandom(size) for size in (1, 1000, 70_000, 300_000, 5)]
    with trio.fail_after(QUICK):
        server = await serve(apps.echo)

        def client() -> tuple[int, bytes, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=QUICK)
            try:
                conn.request("POST", "/", body=iter(chunks), encode_chunked=True)
                response = conn.getresponse()
                first = response.read()
                # The connection stays usable after a chunked request.
                conn.request("POST", "/", body=b"again")
                return response.status, first, conn.getresponse().read()
            finally:
                conn.close()

        status, body, again = await in_thread(client)
    assert status == 200
    assert body == b"".join(chunks)
    assert again == b"again"


async def test_http_client_head(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.hello)

        def client() -> list[tuple[int, str | None, bytes]]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=QUICK)
            results = []
            try:
                for method in ("HEAD", "GET", "HEAD"):
                    conn.request(method, "/")
                    response = conn.getresponse()
                    results.append(
                        (response.status, response.getheader("Content-Length"), response.read())
                    )
            finally:
                conn.close()
            return results

        head, get, head_again = await in_thread(client)
    assert get == (200, "14", b"Hello, world!\n")
    assert head == (200, "14", b"")
    assert head_again == head


async def test_http10_request_then_close(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.hello)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            buffer = bytearray()
            response = await read_response(stream, buffer)
            rest = await receive_to_eof(stream, buffer)  # the server closes the connection
    assert response.status_line.startswith("HTTP/1.1 200 ")
    assert response.body == b"Hello, world!\n"
    assert response.headers.get("connection", "").lower() == "close"
    assert rest == b""


async def test_http10_streamed_response_is_close_delimited(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.stream)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /?n=30&size=1000 HTTP/1.0\r\n\r\n")
            buffer = bytearray()
            head = await receive_until(stream, buffer, b"\r\n\r\n")
            body = await receive_to_eof(stream, buffer)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()  # an HTTP/1.0 client cannot read chunked
    assert body == stream_body(30, 1000)


async def test_pipelined_requests_answered_in_order(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(whoami)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(
                b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            buffer = bytearray()
            responses = [await read_response(stream, buffer) for _ in range(3)]
            rest = await receive_to_eof(stream, buffer)
    assert [r.status_line.split(" ")[1] for r in responses] == ["200"] * 3
    assert [json.loads(r.body)["PATH_INFO"] for r in responses] == ["/one", "/two", "/three"]
    assert rest == b""


async def test_expect_100_continue_sent_when_app_reads(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.echo)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
            )
            buffer = bytearray()
            # Nothing but the interim response may arrive before we send the body.
            interim = await receive_until(stream, buffer, b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            assert buffer == b""
            await stream.send_all(b"hello world")
            response = await read_response(stream, buffer)
    assert response.status_line.startswith("HTTP/1.1 200 ")
    assert response.body == b"hello world"


async def test_expect_100_continue_not_sent_when_app_ignores_body(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.hello)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            # The first (and only) head is the final response: no "100 Continue", and the
            # body was never sent.
            response = await read_response(stream, bytearray())
    assert response.status_line.startswith("HTTP/1.1 200 ")
    assert response.body == b"Hello, world!\n"


# ---- curl ----------------------------------------------------------------------------

# name -> (curl flags, TLS?, expected %{http_version})
CURL_MODES = {
    "h1": (["--http1.1"], False, "1.1"),
    "h2c-prior-knowledge": (["--http2-prior-knowledge"], False, "2"),
    "h2c-upgrade": (["--http2"], False, "2"),
    "h2-tls-alpn": (["--http2"], True, "2"),
    "h1-tls-alpn": (["--http1.1"], True, "1.1"),
}


def curl_mode(name: str, cafile: str) -> tuple[list[str], bool, str]:
    flags, tls, version = CURL_MODES[name]
    return ([*flags, "--cacert", cafile] if tls else list(flags)), tls, version


@needs("curl")
@pytest.mark.parametrize("mode", list(CURL_MODES))
async def test_curl_get(serve: Serve, tmp_path: Path, cafile: str, mode: str) -> None:
    flags, tls, version = curl_mode(mode, cafile)
    with trio.fail_after(QUICK):
        server = await serve(whoami, tls=tls)
        result = await curl(tmp_path, *flags, server.url + "/path")
    result.check(200, version)
    info = json.loads(result.body)
    if mode == "h2c-upgrade":
        # The request itself travelled as HTTP/1.1 (RFC 9113 §3.2); only the response is h2.
        assert info["SERVER_PROTOCOL"] in ("HTTP/1.1", "HTTP/2")
    else:
        assert info["SERVER_PROTOCOL"] == ("HTTP/2" if version == "2" else "HTTP/1.1")
    assert info["wsgi.url_scheme"] == ("https" if tls else "http")
    assert info["PATH_INFO"] == "/path"
    assert info["HTTP_HOST"] == f"127.0.0.1:{server.port}"
    if mode == "h2c-upgrade":
        assert result.headers.startswith("HTTP/1.1 101 "), result.headers


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h2c-prior-knowledge", "h2-tls-alpn"])
async def test_curl_upload_echo(serve: Serve, tmp_path: Path, cafile: str, mode: str) -> None:
    flags, tls, version = curl_mode(mode, cafile)
    payload = os.urandom(4 * 1024 * 1024 + 123)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    with trio.fail_after(SLOW):
        server = await serve(apps.echo, tls=tls)
        result = await curl(
            tmp_path,
            *flags,
            "--data-binary",
            f"@{upload}",
            "-H",
            "Content-Type: application/octet-stream",
            server.url + "/",
        )
    result.check(200, version)
    assert header_values(result.headers, "content-length") == [str(len(payload))]
    assert len(result.body) == len(payload)
    assert result.body == payload


@needs("curl")
async def test_curl_upgrade_with_small_body(serve: Serve, tmp_path: Path) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.echo)
        result = await curl(tmp_path, "--http2", "--data-binary", "small body", server.url + "/")
    # A small body travels with the HTTP/1.1 upgrade request; the response comes over h2.
    result.check(200, "2")
    assert result.headers.startswith("HTTP/1.1 101 "), result.headers
    assert result.body == b"small body"


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h2c-prior-knowledge", "h2-tls-alpn", "h1-tls-alpn"])
async def test_curl_streamed_response(serve: Serve, tmp_path: Path, cafile: str, mode: str) -> None:
    flags, tls, version = curl_mode(mode, cafile)
    count, size = 100, 50_000  # 5 MB as a generator, no Content-Length
    with trio.fail_after(SLOW):
        server = await serve(apps.stream, tls=tls)
        result = await curl(tmp_path, *flags, f"{server.url}/?n={count}&size={size}")
    result.check(200, version)
    assert header_values(result.headers, "content-length") == []
    if version == "1.1":
        assert header_values(result.headers, "transfer-encoding") == ["chunked"]
    assert len(result.body) == count * size
    assert result.body == stream_body(count, size)


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h2c-prior-knowledge", "h2-tls-alpn"])
async def test_curl_head(serve: Serve, tmp_path: Path, cafile: str, mode: str) -> None:
    flags, tls, version = curl_mode(mode, cafile)
    with trio.fail_after(QUICK):
        server = await serve(apps.hello, tls=tls)
        result = await curl(tmp_path, *flags, "-I", server.url + "/")
    result.check(200, version)
    assert header_values(result.headers, "content-length") == ["14"]
    assert result.size_download == 0


# ---- nghttp ----------------------------------------------------------------------------

# name -> (nghttp flags, TLS?)
NGHTTP_MODES = {
    "h2c-prior-knowledge": ([], False),  # plain http:// URI: nghttp sends the preface directly
    "h2c-upgrade": (["-u"], False),
    "h2-tls-alpn": ([], True),  # nghttp does not verify certificates (it only warns)
}


@needs("nghttp")
@pytest.mark.parametrize("mode", list(NGHTTP_MODES))
async def test_nghttp_get(serve: Serve, mode: str) -> None:
    flags, tls = NGHTTP_MODES[mode]
    with trio.fail_after(QUICK):
        server = await serve(apps.hello, tls=tls)
        url = server.url + "/"
        plain = await run("nghttp", "--timeout=10", *flags, url)
        verbose = await run("nghttp", "--timeout=10", "-v", *flags, url)
    assert plain.returncode == 0, plain.stderr.decode()
    assert plain.stdout == b"Hello, world!\n"
    assert verbose.returncode == 0, verbose.stderr.decode()
    log = verbose.stdout.decode(errors="replace")
    # The server's own SETTINGS (not just its ACK of ours) arrived.
    assert re.search(r"recv SETTINGS frame <length=[1-9]\d*, flags=0x00, stream_id=0>", log), log
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", log), log
    assert re.search(r"recv DATA frame <length=14, flags=0x0[01], stream_id=\d+>", log), log
    assert "; END_STREAM" in log
    assert "Hello, world!" in log
    assert "RST_STREAM" not in log
    if mode == "h2c-upgrade":
        assert "HTTP Upgrade success" in log, log


@needs("nghttp")
@pytest.mark.parametrize("mode", list(NGHTTP_MODES))
async def test_nghttp_upload_echo(serve: Serve, tmp_path: Path, mode: str) -> None:
    flags, tls = NGHTTP_MODES[mode]
    payload = os.urandom(2 * 1024 * 1024 + 7)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    with trio.fail_after(SLOW):
        server = await serve(apps.echo, tls=tls)
        # With -u and -d, nghttp upgrades with an OPTIONS request, then POSTs over h2.
        result = await run("nghttp", "--timeout=30", *flags, "-d", str(upload), server.url + "/")
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout) == len(payload)
    assert result.stdout == payload


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_streams_within_a_small_window(serve: Serve, mode: str) -> None:
    """Three concurrent 3 MB streamed downloads into 16 KiB stream windows (a 32 KiB
    connection window): nghttp checks every DATA frame against its windows (a frame
    beyond them is a FLOW_CONTROL_ERROR), and each body arrives whole and in order."""
    flags, tls = NGHTTP_MODES[mode]
    count, size = 60, 50_000
    with trio.fail_after(SLOW):
        server = await serve(apps.stream, tls=tls)
        urls = [f"{server.url}/{i}?n={count}&size={size}" for i in range(3)]
        result = await run("nghttp", "--timeout=30", "-w", "14", "-W", "15", *flags, *urls)
    assert result.returncode == 0, result.stderr.decode()
    expected = stream_body(count, size)
    # nghttp writes each stream's data as it comes; the streams interleave, but each
    # letter run belongs to one chunk, so counting per letter checks nothing was lost.
    assert len(result.stdout) == 3 * len(expected)
    for letter in set(expected):
        assert result.stdout.count(letter) == 3 * expected.count(letter)


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_early_response_to_unread_upload(
    serve: Serve, tmp_path: Path, mode: str
) -> None:
    """An app that answers without reading: complete response, then RST_STREAM(NO_ERROR).

    RFC 9113 §8.1 lets a server stop the rest of the upload this way. (curl 7.88 reports
    such an exchange as error 92, a client-side quirk, so nghttp is the client here.)
    """
    flags, tls = NGHTTP_MODES[mode]
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(3 * 1024 * 1024))
    with trio.fail_after(SLOW):
        server = await serve(apps.hello, tls=tls)
        result = await run(
            "nghttp", "--timeout=30", "-v", *flags, "-d", str(upload), server.url + "/"
        )
    assert result.returncode == 0, result.stderr.decode()
    log = result.stdout.decode(errors="replace")
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", log), log
    assert "Hello, world!" in log
    end = log.index("; END_STREAM", log.index("recv DATA frame"))
    reset = log.find("recv RST_STREAM frame")
    if reset != -1:  # only if the upload was still going when the response ended
        assert reset > end, log
        assert "(error_code=NO_ERROR(0x00))" in log[reset:], log
    assert set(re.findall(r"error_code=(\w+)", log)) <= {"NO_ERROR"}, log


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_bodies_that_break_their_content_length_reset_only_their_streams(
    serve: Serve, tmp_path: Path, mode: str
) -> None:
    """Two uploads on one connection, each declaring 10 bytes and sending 3: each
    is malformed (RFC 9113 §8.1.1), a stream error. Both streams get
    RST_STREAM(PROTOCOL_ERROR) and the server sends no GOAWAY: the connection, and
    whatever else it carries, goes on (h2 alone would have ended it at the first)."""
    flags, tls = NGHTTP_MODES[mode]
    upload = tmp_path / "short.bin"
    upload.write_bytes(b"abc")
    with trio.fail_after(QUICK):
        server = await serve(apps.echo, tls=tls)
        result = await run(
            "nghttp",
            "--timeout=10",
            "-nv",
            *flags,
            "-d",
            str(upload),
            "-H",
            "content-length: 10",
            server.url + "/a",
            server.url + "/b",
        )
    log = result.stdout.decode(errors="replace")
    resets = re.findall(r"recv RST_STREAM frame <[^>]*stream_id=(\d+)>\s+\(error_code=(\w+)", log)
    assert len(resets) == 2, log
    assert {code for _, code in resets} == {"PROTOCOL_ERROR"}, log
    assert "recv GOAWAY" not in log, log
    assert ":status" not in log, log  # neither reached an app that answered


def _shaped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """A response head per path: /0 plain, /1 JSON with an extra field, /2 a 404."""
    shape = environ["PATH_INFO"].lstrip("/")
    body = f"shape {shape}".encode()
    status, headers = {
        "0": ("200 OK", [("Content-Type", "text/plain")]),
        "1": ("200 OK", [("Content-Type", "application/json"), ("X-Shape", "one" * 20)]),
        "2": ("404 Not Found", [("Content-Type", "text/plain"), ("X-Shape", "two")]),
    }[shape]
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_decodes_repeated_and_interleaved_response_heads(
    serve: Serve, mode: str
) -> None:
    """Three response shapes, each asked for four times on one connection, one after
    another: nghttp2's own HPACK decoder (not h2's) must read every head as sent,
    whether it was encoded afresh or replayed (trioserve.hpack_memo), and the
    repeated request blocks it sends are read right too (the paths come back)."""
    flags, tls = NGHTTP_MODES[mode]
    order = [str(i % 3) for i in range(12)]
    with trio.fail_after(SLOW):
        server = await serve(validator(_shaped), tls=tls)
        # nghttp fetches each distinct URL once, all over one connection.
        urls = [f"{server.url}/{shape}?n={index}" for index, shape in enumerate(order)]
        result = await run("nghttp", "--timeout=30", "-v", "--no-dep", *flags, *urls)
    assert result.returncode == 0, result.stderr.decode()
    log = result.stdout.decode(errors="replace")
    heads: dict[int, dict[str, str]] = {}
    fields = re.findall(r"recv \(stream_id=(\d+)\) ([^:\s][^:]*|:status): (.*)", log)
    for stream_id, name, value in fields:
        heads.setdefault(int(stream_id), {})[name] = value.strip()
    # Client streams are 1, 3, 5, ... in the order of the URLs.
    assert sorted(heads) == [2 * i + 1 for i in range(len(order))], log
    for index, shape in enumerate(order):
        head = heads[2 * index + 1]
        assert head[":status"] == ("404" if shape == "2" else "200"), head
        assert head["content-type"] == ("application/json" if shape == "1" else "text/plain")
        assert head.get("x-shape") == {"0": None, "1": "one" * 20, "2": "two"}[shape]
        assert head["content-length"] == "7"
        assert head["server"] == "trioserve"
    for shape in "012":
        assert log.count(f"shape {shape}") == order.count(shape), log


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
@pytest.mark.parametrize(
    "sizes", [["0"], ["256"], ["0", "4096"], ["0", "0"], ["100", "50", "4096"]], ids="-c ".join
)
async def test_nghttp_reads_heads_after_its_table_size_changes(
    serve: Serve, mode: str, sizes: list[str]
) -> None:
    """nghttp's decoder table set with -c (several values: changed within one
    SETTINGS frame). nghttp2 insists on a size update for the smallest size, and
    fails the connection with COMPRESSION_ERROR without one."""
    flags, tls = NGHTTP_MODES[mode]
    table_sizes = [flag for size in sizes for flag in ("-c", size)]
    with trio.fail_after(QUICK):
        server = await serve(validator(_shaped), tls=tls)
        # (nghttp fetches each distinct URL once: the query tells them apart)
        urls = [f"{server.url}/{shape}?n={index}" for index, shape in enumerate("0120")]
        result = await run("nghttp", "--timeout=10", "-v", "--no-dep", *table_sizes, *flags, *urls)
    log = result.stdout.decode(errors="replace")
    assert result.returncode == 0, log
    assert "COMPRESSION_ERROR" not in log
    assert len(re.findall(r"recv \(stream_id=\d+\) :status: (?:200|404)", log)) == 4, log
    for shape in "012":
        assert f"shape {shape}" in log, log


def _fields(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The request fields trioserve.http2_fields has a say in, as JSON."""
    keys = ("HTTP_COOKIE", "HTTP_TE", "HTTP_X_SPACED", "HTTP_HOST", "REQUEST_METHOD")
    body = json.dumps({key: environ.get(key) for key in keys}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_request_fields_reach_the_app(serve: Serve, mode: str) -> None:
    """Fields as nghttp2 sends them pass trioserve's own inbound checks: cookie
    crumbs (nghttp2 splits a cookie at each "; ", RFC 9113 §8.2.3) come back as one
    HTTP_COOKIE, "te: trailers" is allowed, inner spaces in a value are kept."""
    flags, tls = NGHTTP_MODES[mode]
    with trio.fail_after(QUICK):
        server = await serve(validator(_fields), tls=tls)
        result = await run(
            "nghttp",
            "--timeout=10",
            *flags,
            "-H",
            "cookie: a=1; b=2",
            "-H",
            "cookie: c=3",
            "-H",
            "te: trailers",
            "-H",
            "x-spaced: in side",
            server.url + "/",
        )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["HTTP_COOKIE"] == "a=1; b=2; c=3"
    assert seen["HTTP_TE"] == "trailers"
    assert seen["HTTP_X_SPACED"] == "in side"
    assert seen["HTTP_HOST"] == server.url.split("://")[1]
    assert seen["REQUEST_METHOD"] == "GET"


def _streamed_with_length(environ: Environ, start_response: Any) -> Iterable[bytes]:
    body = b"0123456789" * 10
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    return (body[i : i + 25] for i in range(0, 100, 25))


_DATA_FRAME = re.compile(r"recv DATA frame <length=(\d+), flags=0x([0-9a-f]+), stream_id=\d+>")


@needs("nghttp")
@pytest.mark.parametrize("mode", ["h2c-prior-knowledge", "h2-tls-alpn"])
async def test_nghttp_sees_a_streamed_response_end_on_its_last_data_frame(
    serve: Serve, mode: str
) -> None:
    """A generator with a Content-Length: END_STREAM rides on the DATA frame that
    completes the length, with no empty DATA frame after it (nghttp -v)."""
    flags, tls = NGHTTP_MODES[mode]
    with trio.fail_after(QUICK):
        server = await serve(validator(_streamed_with_length), tls=tls)
        result = await run("nghttp", "--timeout=10", "-nv", *flags, server.url + "/")
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode()
    data = [(int(length), int(flags, 16)) for length, flags in _DATA_FRAME.findall(output)]
    assert sum(length for length, _ in data) == 100, output
    assert all(length for length, _ in data), output  # no empty DATA frame
    assert data[-1][1] & 0x1, output  # END_STREAM on the last one
    assert not any(flags & 0x1 for _, flags in data[:-1]), output


@needs("nghttp")
async def test_nghttp_streams_over_the_limit_are_refused_not_the_connection(
    serve: Serve,
) -> None:
    """With prior knowledge nghttp sends all its requests in its first flight,
    before our SETTINGS can reach it (the server speaks only once it has seen
    the preface). With a limit of 4, four /meet requests hold their streams
    open (each waits in the app until all four are there), and the two requests
    after them get RST_STREAM(REFUSED_STREAM): the connection and the four go
    on. (Over TLS the server's SETTINGS follow the handshake at once, and
    nghttp may or may not have them before it sends: no fixed outcome there.)"""
    flags, tls = NGHTTP_MODES["h2c-prior-knowledge"]
    with trio.fail_after(QUICK):
        server = await serve(validator(Rendezvous(4)), tls=tls, h2_max_concurrent_streams=4)
        # (Distinct URLs: nghttp fetches a repeated one once.)
        urls = [f"{server.url}/meet?{i}" for i in range(4)]
        urls += [f"{server.url}/other?{i}" for i in range(2)]
        result = await run("nghttp", "--timeout=10", "-nv", *flags, *urls)
    log = result.stdout.decode(errors="replace")
    refused = re.findall(
        r"recv RST_STREAM frame <length=4, flags=0x00, stream_id=(\d+)>\n"
        r"\s+\(error_code=REFUSED_STREAM\(0x07\)\)",
        log,
    )
    assert len(refused) == 2, log
    assert len(re.findall(r"recv \(stream_id=\d+\) :status: 200", log)) == 4, log
    assert "recv GOAWAY" not in log, log


# ---- h2load ----------------------------------------------------------------------------

_H2LOAD_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)
_H2LOAD_STATUS = re.compile(
    r"status codes: (?P<s2xx>\d+) 2xx, (?P<s3xx>\d+) 3xx, (?P<s4xx>\d+) 4xx, (?P<s5xx>\d+) 5xx"
)


@needs("h2load")
@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2-tls"])
@pytest.mark.parametrize(("clients", "streams"), [(1, 100), (4, 25)], ids=["c1-m100", "c4-m25"])
async def test_h2load_smoke(serve: Serve, tls: bool, clients: int, streams: int) -> None:
    total = 10_000
    with trio.fail_after(SLOW):
        server = await serve(apps.hello, tls=tls)
        result = await run(
            "h2load",
            "-n",
            str(total),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-T",
            "30",
            server.url + "/",
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert "Application protocol: h2" in output, output
    requests = _H2LOAD_REQUESTS.search(output)
    statuses = _H2LOAD_STATUS.search(output)
    assert requests is not None, output
    assert statuses is not None, output
    assert f"{total} succeeded, 0 failed, 0 errored, 0 timeout" in requests.group(0), output
    assert {key: int(value) for key, value in statuses.groupdict().items()} == {
        "s2xx": total,
        "s3xx": 0,
        "s4xx": 0,
        "s5xx": 0,
    }, output
    # Every response carried the whole body ("Hello, world!\n").
    assert f"({14 * total}) data" in output, output


@needs("h2load")
async def test_h2load_http1_pipelined(serve: Serve) -> None:
    total = 2000
    with trio.fail_after(SLOW):
        server = await serve(apps.hello)
        result = await run(
            "h2load", "--h1", "-n", str(total), "-c", "4", "-m", "10", "-T", "30", server.url + "/"
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output
    assert "Application protocol: http/1.1" in output, output
    requests = _H2LOAD_REQUESTS.search(output)
    assert requests is not None, output
    assert f"{total} succeeded, 0 failed, 0 errored, 0 timeout" in requests.group(0), output
    assert f"status codes: {total} 2xx, 0 3xx, 0 4xx, 0 5xx" in output, output


# ---- httpx (HTTP/2) ----------------------------------------------------------------------


async def test_httpx_h2_get_and_post_over_tls(
    serve: Serve, client_ssl_context: ssl.SSLContext
) -> None:
    payload = os.urandom(700_000)
    with trio.fail_after(QUICK):
        hello_server = await serve(apps.hello, tls=True)
        echo_server = await serve(apps.echo, tls=True)

        def client() -> tuple[httpx.Response, httpx.Response]:
            with httpx.Client(http2=True, verify=client_ssl_context, timeout=QUICK) as http:
                get = http.get(hello_server.url + "/")
                post = http.post(echo_server.url + "/", content=payload)
                return get, post

        get, post = await in_thread(client)
    assert get.http_version == "HTTP/2"
    assert get.status_code == 200
    assert get.content == b"Hello, world!\n"
    assert post.http_version == "HTTP/2"
    assert post.status_code == 200
    assert post.headers["content-length"] == str(len(payload))
    assert post.content == payload


async def test_httpx_h2c_prior_knowledge(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.echo)

        def client() -> httpx.Response:
            with httpx.Client(http1=False, http2=True, timeout=QUICK) as http:
                return http.post(server.url + "/", content=b"over h2c")

        response = await in_thread(client)
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert response.content == b"over h2c"


async def test_httpx_h2_concurrent_requests_share_one_connection(
    serve: Serve, client_ssl_context: ssl.SSLContext
) -> None:
    # httpx's async client, on this trio loop: its sync client shared between
    # threads can put a later stream's HEADERS on the wire before an earlier
    # one's (it takes the stream id outside its write lock), which the server
    # must answer with a PROTOCOL_ERROR GOAWAY (RFC 9113 section 5.1.1).
    parties = 8
    app = Rendezvous(parties)
    try:
        with trio.fail_after(QUICK * 2):
            server = await serve(validator(app), tls=True)
            async with httpx.AsyncClient(
                http2=True, verify=client_ssl_context, timeout=QUICK
            ) as http:
                # One request first, so the pool has its (single) h2 connection.
                warmup = await http.get(server.url + "/warmup")
                responses: list[httpx.Response] = []

                async def one() -> None:
                    responses.append(await http.get(server.url + "/meet"))

                async with trio.open_nursery() as nursery:
                    for _ in range(parties):
                        nursery.start_soon(one)
    finally:
        app.barrier.abort()
    assert warmup.status_code == 200
    assert warmup.http_version == "HTTP/2"
    assert [r.status_code for r in responses] == [200] * parties, [r.text for r in responses]
    assert {r.http_version for r in responses} == {"HTTP/2"}
    ports = {json.loads(r.content)["REMOTE_PORT"] for r in responses}
    assert ports == {json.loads(warmup.content)["REMOTE_PORT"]}


# ---- wrk ---------------------------------------------------------------------------------


@needs("wrk")
async def test_wrk_http1(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.hello)
        result = await run("wrk", "-d2s", "-c10", "-t1", "--timeout", "5s", server.url + "/")
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    done = re.search(r"(\d+) requests in ", output)
    assert done is not None, output
    assert int(done.group(1)) > 0, output
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors is not None:
        assert [int(n) for n in errors.groups()] == [0, 0, 0, 0], output
    assert "Non-2xx or 3xx responses" not in output, output


# ---- responses held to their own framing; chunk sizes; error bodies -----------------------


def misbehaving(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Answers each path with a response that breaks its own framing; others with "fine".

    Deliberately not wrapped in validator(): these responses break PEP 3333 (a
    status with CR LF in it, a body that contradicts its Content-Length), and
    the validator would refuse them before trioserve's own checks are seen.
    """
    path = environ["PATH_INFO"]
    if path == "/split":
        start_response("200 OK\r\nX-Injected: 1", [("Content-Type", "text/plain")])
        return [b"injected"]
    if path == "/two-lengths":
        start_response("200 OK", [("Content-Length", "5"), ("Content-Length", "6")])
        return [b"12345"]
    if path == "/101":
        start_response("101 Switching Protocols", [])
        return [b"data after a 101"]
    if path == "/099":
        start_response("099 Low", [])
        return [b"x"]
    if path == "/over":  # content-length 5, then 138 bytes
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return (b"y" for _ in range(138))
    if path == "/short":  # content-length 100, then 5 bytes and the end
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return (chunk for chunk in [b"12345"])
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"fine\n"]


REFUSED_HEADS = ["/split", "/two-lengths", "/101", "/099"]
INTERNAL_ERROR_500 = b"500 Internal Server Error\n"


async def curl_transfers(
    workdir: Path, flags: list[str], url: str, paths: list[str]
) -> tuple[list[tuple[int, int, int, int]], list[bytes], str, str]:
    """One curl run fetching ``paths`` in turn (reusing its connection when it can).

    Returns per transfer (status, new connections made, bytes received, curl's
    exit code), the bodies, the header dump and curl's stderr.
    """
    outputs = [workdir / f"transfer-{i}" for i in range(len(paths))]
    head_file = workdir / "heads"
    result = await run(
        "curl",
        "-sS",
        "--max-time",
        "30",
        *flags,
        "-D",
        str(head_file),
        "-w",
        "%{http_code} %{num_connects} %{size_download} %{exitcode}\\n",
        *[
            arg
            for out, path in zip(outputs, paths, strict=True)
            for arg in ("-o", str(out), url + path)
        ],
    )
    numbers = [int(word) for word in result.stdout.decode().split()]
    transfers = [(a, b, c, d) for a, b, c, d in zip(*[iter(numbers)] * 4, strict=True)]
    bodies = [output.read_bytes() if output.exists() else b"" for output in outputs]
    heads = head_file.read_text("latin-1") if head_file.exists() else ""
    return transfers, bodies, heads, result.stderr.decode(errors="replace")


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h1-tls-alpn", "h2-tls-alpn"])
async def test_curl_gets_a_500_for_a_refused_head_and_the_connection_goes_on(
    serve: Serve, tmp_path: Path, cafile: str, mode: str
) -> None:
    """A status with CR LF (response splitting), two Content-Lengths, a 101 or a 099
    from the app: each a 500 before anything of it is sent, on one connection that
    then serves the next request. (Not h2c with prior knowledge: curl 7.88.1 cannot
    reuse such a connection at all, curl/curl#10634; nghttp covers h2c below.)"""
    flags, tls, _ = curl_mode(mode, cafile)
    with trio.fail_after(QUICK):
        server = await serve(misbehaving, tls=tls)
        paths = [*REFUSED_HEADS, "/ok"]
        transfers, bodies, heads, stderr = await curl_transfers(tmp_path, flags, server.url, paths)
    assert [status for status, *_ in transfers] == [500, 500, 500, 500, 200], stderr
    assert [connects for _, connects, *_ in transfers] == [1, 0, 0, 0, 0], heads
    assert bodies == [INTERNAL_ERROR_500] * 4 + [b"fine\n"]
    assert "x-injected" not in heads.lower()


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h1-tls-alpn", "h2-tls-alpn"])
async def test_curl_never_gets_a_clean_end_of_a_body_that_breaks_its_content_length(
    serve: Serve, tmp_path: Path, cafile: str, mode: str
) -> None:
    """content-length 5 then 138 bytes; content-length 100 then 5 bytes. Nothing past
    the fifth byte ever arrives, and neither response ends cleanly: over HTTP/1.1 the
    connection closes (the first response's 5 bytes are all curl can see), over HTTP/2
    the stream is reset with INTERNAL_ERROR and the connection serves on."""
    flags, tls, version = curl_mode(mode, cafile)
    with trio.fail_after(QUICK):
        server = await serve(misbehaving, tls=tls)
        paths = ["/over", "/short", "/ok"]
        transfers, bodies, _, stderr = await curl_transfers(tmp_path, flags, server.url, paths)
    (_, _, over_size, over_exit), (_, _, short_size, short_exit), ok = transfers
    assert over_size <= 5
    assert short_size <= 5
    assert bodies[0] == b"yyyyy"[:over_size]
    assert bodies[1] == b"12345"[:short_size]
    assert ok[0] == 200
    assert bodies[2] == b"fine\n"
    if version == "2":
        assert (over_exit, short_exit) == (92, 92), stderr  # stream not closed cleanly
        assert stderr.count("INTERNAL_ERROR") == 2, stderr
        assert ok[1] == 0  # the connection survived both resets
    else:
        assert over_exit == 0  # exactly the 5 declared bytes: a complete response
        assert short_exit == 18  # "transfer closed with 95 bytes remaining to read"
        assert [connects for _, connects, *_ in transfers] == [1, 1, 1]  # closed each time


@needs("nghttp")
@pytest.mark.parametrize("mode", list(NGHTTP_MODES))
async def test_nghttp_sees_500s_and_internal_error_resets(serve: Serve, mode: str) -> None:
    """All on one connection: 500 for each refused head; for the two bodies that
    break their content-length, RST_STREAM(INTERNAL_ERROR), at most the 5 declared
    bytes and never END_STREAM; the last request answered; no GOAWAY from us."""
    flags, tls = NGHTTP_MODES[mode]
    with trio.fail_after(QUICK):
        server = await serve(misbehaving, tls=tls)
        paths = [*REFUSED_HEADS, "/over", "/short", "/ok"]
        result = await run(
            "nghttp", "--timeout=10", "-v", *flags, *[server.url + path for path in paths]
        )
    log = result.stdout.decode(errors="replace")
    assert len(re.findall(r"recv \(stream_id=\d+\) :status: 500", log)) == 4, log
    assert "x-injected" not in log.lower()
    assert "recv GOAWAY" not in log, log
    resets = re.findall(r"recv RST_STREAM frame <[^>]*stream_id=(\d+)>\s*\(error_code=(\w+)", log)
    assert [code for _, code in resets] == ["INTERNAL_ERROR", "INTERNAL_ERROR"], log
    data = re.findall(r"recv DATA frame <length=(\d+), flags=0x(\w\w), stream_id=(\d+)>", log)
    for reset_stream, _ in resets:
        frames = [
            (int(length), int(flags, 16)) for length, flags, sid in data if sid == reset_stream
        ]
        assert sum(length for length, _ in frames) <= 5, log
        assert not any(flags & 0x1 for _, flags in frames), log  # no END_STREAM
    assert "fine" in log


async def test_http_client_gets_a_500_for_response_splitting_and_keeps_its_connection(
    serve: Serve,
) -> None:
    with trio.fail_after(QUICK):
        server = await serve(misbehaving)

        def client() -> list[tuple[int, bytes, bool, str | None]]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=QUICK)
            results, sockets = [], []
            try:
                for path in ("/split", "/ok"):
                    conn.request("GET", path)
                    response = conn.getresponse()
                    body = response.read()
                    injected = response.getheader("X-Injected")
                    results.append((response.status, body, response.will_close, injected))
                    sockets.append(conn.sock)
            finally:
                conn.close()
            assert sockets[0] is not None
            assert sockets[0] is sockets[1], "http.client had to reconnect"
            return results

        results = await in_thread(client)
    assert results == [(500, INTERNAL_ERROR_500, False, None), (200, b"fine\n", False, None)]


async def test_httpx_h2_sees_a_500_and_a_reset_and_keeps_its_connection(
    serve: Serve, client_ssl_context: ssl.SSLContext
) -> None:
    with trio.fail_after(QUICK):
        server = await serve(misbehaving, tls=True)

        def client() -> tuple[httpx.Response, Exception | None, httpx.Response, int]:
            with httpx.Client(http2=True, verify=client_ssl_context, timeout=QUICK) as http:
                split = http.get(server.url + "/split")
                try:
                    http.get(server.url + "/over")
                except httpx.RemoteProtocolError as exc:
                    reset: Exception | None = exc
                else:
                    reset = None
                ok = http.get(server.url + "/ok")
                return split, reset, ok, ok.extensions["stream_id"]

        split, reset, ok, stream_id = await in_thread(client)
    assert (split.http_version, split.status_code) == ("HTTP/2", 500)
    assert split.content == INTERNAL_ERROR_500
    assert "x-injected" not in split.headers
    assert reset is not None, "a body past its content-length was accepted"
    assert (ok.status_code, ok.content) == (200, b"fine\n")
    assert stream_id == 5  # the third stream of the same connection


def body_reader(environ: Environ, start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read(5)
    out = b"read " + body
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("size", "status", "reason"),
    [
        (b"ffffffffffffffffff", 400, b"chunk size of more than 16 hex digits"),
        (b"10000000000000005", 400, b"chunk size of more than 16 hex digits"),
        (b"fffffffff", 413, b"chunk size beyond the request body limit"),
    ],
    ids=["18-digits", "2^64+5", "over-1GiB"],
)
async def test_chunk_size_refused_on_a_real_socket(
    serve: Serve, size: bytes, status: int, reason: bytes
) -> None:
    """Sent with nothing after the size line: the answer comes at once, then the close."""
    with trio.fail_after(QUICK):
        server = await serve(validator(body_reader))  # the default 1 GiB body limit
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(CHUNKED_HEAD + size + b"\r\n")
            data = await receive_to_eof(stream, bytearray())
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b": " + reason + b"\n")


async def test_sixteen_hex_digit_chunk_size_is_read_without_a_body_limit(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(validator(body_reader), max_request_body_size=0)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(CHUNKED_HEAD + b"ffffffffffffffff\r\nhello")
            response = await read_response(stream, bytearray())
    assert response.status_line.startswith("HTTP/1.1 200 ")
    assert response.body == b"read hello"


async def test_error_body_for_something_that_is_not_http_says_so_in_words(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        server = await serve(apps.hello)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"INVALID CONNECTION PREFACE\r\n\r\n")
            data = await receive_to_eof(stream, bytearray())
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert data.endswith(b"\r\n\r\n400 Bad Request: malformed request line\n")


# ---- other listeners: IPv6 and unix sockets --------------------------------------------


@needs("curl")
@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("tls", [False, True], ids=["cleartext", "tls"])
async def test_ipv6_loopback(serve: Serve, tmp_path: Path, cafile: str, tls: bool) -> None:
    tls_flags = ["--cacert", cafile] if tls else []
    with trio.fail_after(QUICK):
        server = await serve(whoami, bind="[::1]:0", tls=tls)
        url = f"{'https' if tls else 'http'}://[::1]:{server.port}"
        assert server.url == url
        h1 = await curl(tmp_path, "-g", "--http1.1", *tls_flags, url + "/v6")
        h2_flag = "--http2" if tls else "--http2-prior-knowledge"
        h2 = await curl(tmp_path, "-g", h2_flag, *tls_flags, url + "/v6")
    h1.check(200, "1.1")
    h2.check(200, "2")
    for result in (h1, h2):
        info = json.loads(result.body)
        assert info["REMOTE_ADDR"] == "::1"
        assert info["PATH_INFO"] == "/v6"
        assert info["wsgi.url_scheme"] == ("https" if tls else "http")


@needs("curl")
@pytest.mark.parametrize("mode", ["h1", "h2c-prior-knowledge"])
async def test_unix_socket(serve: Serve, tmp_path: Path, mode: str) -> None:
    flags, _, version = CURL_MODES[mode]
    with short_unix_path(tmp_path) as path, trio.fail_after(QUICK):
        server = await serve(whoami, bind=f"unix:{path}")
        assert server.addresses == [f"unix:{path}"]
        result = await curl(tmp_path, *flags, "--unix-socket", path, "http://localhost/unix")
    result.check(200, version)
    info = json.loads(result.body)
    assert info["PATH_INFO"] == "/unix"
    assert info["REMOTE_ADDR"] is None


# ---- graceful stop ----------------------------------------------------------------------

GRACEFUL_MODES = [
    "h1",
    "h2c-prior-knowledge",
    "h2-tls-alpn",
]


async def assert_refused(port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock, pytest.raises(ConnectionRefusedError):
        await sock.connect(("127.0.0.1", port))


async def stop_during_request(
    server: Server,
    started: threading.Event,
    release: threading.Event,
    send_request: Callable[[], Awaitable[None]],
) -> None:
    """Start a request, stop the server while the app holds it, then let the app finish.

    Checks along the way that the stop waits for the request and that the listener is
    closed (a new connection is refused) before the request has finished.
    """
    port = server.port
    stopped = trio.Event()

    async def stop() -> None:
        await server.stop(graceful_timeout=QUICK)
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_request)
        assert await in_thread(lambda: started.wait(QUICK)), "the request never reached the app"
        nursery.start_soon(stop)
        # Let the stop get as far as it can while the request is in flight.
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set(), "stop() did not wait for the in-flight request"
        await assert_refused(port)
        release.set()
    assert stopped.is_set()


@needs("curl")
@pytest.mark.parametrize("mode", GRACEFUL_MODES)
async def test_graceful_stop_finishes_in_flight_request(
    serve: Serve, tmp_path: Path, cafile: str, mode: str
) -> None:
    flags, tls, version = curl_mode(mode, cafile)
    gate = Gate(SLOW)
    results: list[CurlResult] = []
    try:
        with trio.fail_after(QUICK):
            server = await serve(validator(gate), tls=tls)

            async def request() -> None:
                results.append(await curl(tmp_path, *flags, server.url + "/slow"))

            await stop_during_request(server, gate.started, gate.release, request)
    finally:
        gate.release.set()
    [result] = results
    result.check(200, version)
    assert result.body == b"finished after the stop began\n"
    if version == "1.1":
        # The head was not sent yet when the stop began: it announces the close.
        assert header_values(result.headers, "connection") == ["close"]


@needs("curl")
@pytest.mark.parametrize("mode", GRACEFUL_MODES)
async def test_graceful_stop_finishes_streaming_response(
    serve: Serve, tmp_path: Path, cafile: str, mode: str
) -> None:
    """The stop begins after the response head and some of the body went out."""
    flags, tls, version = curl_mode(mode, cafile)
    blocker = apps.Blocker(chunk=b"0123456789" * 100)
    results: list[CurlResult] = []
    try:
        with trio.fail_after(QUICK):
            server = await serve(validator(blocker), tls=tls)

            async def request() -> None:
                results.append(await curl(tmp_path, *flags, server.url + "/stream"))

            await stop_during_request(server, blocker.started, blocker.release, request)
    finally:
        blocker.release.set()
    [result] = results
    result.check(200, version)
    assert result.size_download > 0
    assert result.size_download % 1000 == 0
    assert result.body == b"0123456789" * (result.size_download // 10)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_graceful_stop_closes_connection_that_sent_nothing(serve: Serve, tls: bool) -> None:
    with trio.fail_after(QUICK):
        # Long idle and handshake timeouts: only the stop itself may close the connection.
        server = await serve(
            apps.hello, tls=tls, keep_alive_timeout=10 * SLOW, tls_handshake_timeout=10 * SLOW
        )
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await trio.testing.wait_all_tasks_blocked()  # accepted, waiting for bytes
            with trio.fail_after(3):  # nothing is in flight: the stop should be immediate
                await server.stop(graceful_timeout=10 * SLOW)
            assert await receive_to_eof(stream, bytearray()) == b""


async def test_graceful_stop_closes_idle_keep_alive_connection(serve: Serve) -> None:
    with trio.fail_after(QUICK):
        # Idle connections would otherwise stay open far longer than this test may run.
        server = await serve(apps.hello, keep_alive_timeout=10 * SLOW)
        port = server.port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            buffer = bytearray()
            response = await read_response(stream, buffer)
            assert response.status_line.startswith("HTTP/1.1 200 ")
            assert "connection" not in response.headers  # kept alive
            with trio.fail_after(3):  # nothing is in flight: the stop should be immediate
                await server.stop(graceful_timeout=10 * SLOW)
            assert await receive_to_eof(stream, buffer) == b""
        await assert_refused(port)
