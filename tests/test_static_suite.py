"""``trioserve --root`` against the expectations of the course lab's grading suite.

The lab grades static file servers with http-test-suite (a Python ``httptest.py``
run against a document root holding its ``httptest/`` directory). This module
checks the same things in our own words and with our own files, so CI needs no
download: statuses (200, 403 for a directory without an index, 404, 405), exact
``Content-Length`` and bodies, whole ``Content-Type`` headers compared as
strings (which is why the types go out without a charset by default), path
decoding, a HEAD over HTTP/1.0, and malformed requests that must not upset the
server. The client is ``http.client``, as in the suite, plus raw sockets for the
requests no library sends.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.test_cli import TIMEOUT, serving

# name under httptest/ -> its bytes (our own content, sized like the suite's files)
FILES: dict[str, bytes] = {
    "dir2/index.html": b"<html>the index of dir2</html>\n",
    "dir2/page.html": b"<html><body>a page in dir2</body></html>\n",
    "dir1/dir12/dir123/deep.txt": b"three directories down\n",
    "space in name.txt": b"spaces in the name\n",
    "text..txt": b"hello",
    "splash.css": b"body { color: #333; }\n" * 4000,
    "jquery-1.9.1.js": b"/* a script */ var x = 1;\n" * 10000,
    "wikipedia_russia.html": b"<p>" + b"large page " * 86800 + b"Wikimedia Foundation, Inc.</p>\n",
    "160313.jpg": b"\xff\xd8\xff\xe0" + os.urandom(267_000),
    "ef35c.jpeg": b"\xff\xd8\xff\xe0" + os.urandom(160_000),
    "logo.v2.png": b"\x89PNG\r\n\x1a\n" + os.urandom(1_746),
    "pic_ask.gif": b"GIF89a" + os.urandom(1_741),
    "b16261023.swf": b"FWS" + os.urandom(35_341),
}


@pytest.fixture(scope="module")
def document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docroot")
    for name, data in FILES.items():
        path = root / "httptest" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
async def url(document_root: Path) -> AsyncIterator[str]:
    async with serving("--root", str(document_root), "-b", "127.0.0.1:0") as cli:
        yield cli.url


def fetch(url: str, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


async def get(url: str, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(fetch, url, target, method)


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("/httptest/dir2/", "dir2/index.html"),  # a directory's index
        ("/httptest/dir1/dir12/dir123/deep.txt", "dir1/dir12/dir123/deep.txt"),
        ("/httptest/dir2/page.html?arg1=value&arg2=value", "dir2/page.html"),
        ("/httptest/space%20in%20name.txt", "space in name.txt"),
        ("/httptest/dir2/%70%61%67%65%2e%68%74%6d%6c", "dir2/page.html"),
        ("/httptest/text..txt", "text..txt"),
        ("/httptest/wikipedia_russia.html", "wikipedia_russia.html"),
    ],
)
async def test_files(url: str, target: str, name: str) -> None:
    status, headers, body = await get(url, target)
    assert status == 200
    assert int(headers["Content-Length"]) == len(FILES[name])
    assert body == FILES[name]
    assert headers["Server"]


@pytest.mark.parametrize(
    ("name", "content_types"),
    [
        ("dir2/page.html", {"text/html"}),
        ("splash.css", {"text/css"}),
        ("jquery-1.9.1.js", {"application/javascript", "text/javascript"}),
        ("160313.jpg", {"image/jpeg"}),
        ("ef35c.jpeg", {"image/jpeg"}),
        ("logo.v2.png", {"image/png"}),
        ("pic_ask.gif", {"image/gif"}),
        ("b16261023.swf", {"application/x-shockwave-flash"}),
    ],
)  # fmt: skip
async def test_content_type_header_whole(url: str, name: str, content_types: set[str]) -> None:
    status, headers, body = await get(url, "/httptest/" + name)
    assert status == 200
    assert headers["Content-Type"] in content_types  # compared whole: no "; charset=..."
    assert body == FILES[name]


@pytest.mark.parametrize(
    ("target", "method", "statuses"),
    [
        ("/httptest/dir1/", "GET", {403}),  # a directory without an index
        ("/httptest/no-such-file.html", "GET", {404}),
        ("/httptest/dir2/page.html/", "GET", {404}),  # a file is not a directory
        ("/httptest/../../../../../../../../etc/passwd", "GET", {400, 403, 404}),
        ("/httptest/dir2/page.html", "POST", {400, 405}),
    ],
)
async def test_refusals(url: str, target: str, method: str, statuses: set[int]) -> None:
    status, _, body = await get(url, target, method)
    assert status in statuses
    assert b"root:" not in body


def raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def test_head_over_http_1_0(url: str) -> None:
    raw = await trio.to_thread.run_sync(
        raw_exchange, url, b"HEAD /httptest/dir2/page.html HTTP/1.0\r\n\r\n"
    )
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator
    status_line, *fields = head.decode().split("\r\n")
    assert status_line.split(" ")[1] == "200"
    headers = {name.lower(): value for name, _, value in (f.partition(": ") for f in fields)}
    assert int(headers["content-length"]) == len(FILES["dir2/page.html"])
    assert body == b""


def send_and_close(url: str, data: bytes) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(data)


@pytest.mark.parametrize("data", [b"\n", b"GET / HTTP/1.1\n"], ids=["empty-line", "no-blank-line"])
async def test_malformed_request_then_close_leaves_the_server_serving(
    url: str, data: bytes
) -> None:
    await trio.to_thread.run_sync(send_and_close, url, data)
    status, _, body = await get(url, "/httptest/dir2/page.html")
    assert status == 200
    assert body == FILES["dir2/page.html"]


async def test_static_charset_option(document_root: Path) -> None:
    async with serving(
        "--root", str(document_root), "-b", "127.0.0.1:0", "--static-charset", "utf-8"
    ) as cli:
        _, html, _ = await get(cli.url, "/httptest/dir2/page.html")
        _, png, _ = await get(cli.url, "/httptest/logo.v2.png")
    assert html["Content-Type"] == "text/html; charset=utf-8"
    assert png["Content-Type"] == "image/png"
