"""h2spec, the HTTP/2 conformance tester, against a real server: h2c and TLS.

Opt-in: h2spec is not packaged by Debian, so CI cannot install it. The tests run when
``h2spec`` is on PATH or ``TRIOSERVE_H2SPEC`` names the program, and are skipped
otherwise. DEVELOPERS.md says how to build it. Each run takes well under a second.

Every one of h2spec's 146 tests must pass, with a single exception over cleartext:
http2/3.5/2 sends ``INVALID CONNECTION PREFACE`` and wants a GOAWAY or a silent close.
trioserve serves HTTP/1.1 and h2c on the same port, so those bytes, which are not the
HTTP/2 preface, are read as an HTTP/1.1 request, and the answer is
``400 Bad Request`` (RFC 9112 §3). h2spec reads that answer as a frame and reports an
unexpected EOF. The last test here checks that answer. Over TLS, ALPN has chosen h2
before any byte is read, and the same h2spec test passes.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from tests import apps
from tests.helpers import receive_until
from trioserve.server import serve_wsgi

H2SPEC = os.environ.get("TRIOSERVE_H2SPEC") or shutil.which("h2spec")
needs_h2spec = pytest.mark.skipif(
    H2SPEC is None,
    reason="h2spec not installed (opt-in: put it on PATH or set TRIOSERVE_H2SPEC; "
    "DEVELOPERS.md says how to build it)",
)

# What h2spec reports failed on the shared HTTP/1.1 + h2c port, and why (module docstring).
CLEARTEXT_ONLY_FAILURE = "http2/3.5/2"


def failed_tests(junit: Path) -> dict[str, str]:
    """h2spec's failed tests from its JUnit report: ``"http2/3.5/2"`` -> what it said."""
    failed = {}
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for position, case in enumerate(suite.iter("testcase"), start=1):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                failed[f"{suite.get('package')}/{position}"] = (
                    f"{case.get('classname')}: {problem.text}"
                )
    return failed


def junit_totals(junit: Path) -> int:
    return sum(int(suite.get("tests", "0")) for suite in ET.parse(junit).getroot())


@pytest.mark.external
@needs_h2spec
@pytest.mark.parametrize("mode", ["h2c", "tls"])
async def test_h2spec_passes(
    nursery: trio.Nursery, tls_cert_files: tuple[str, str, str], tmp_path: Path, mode: str
) -> None:
    assert H2SPEC is not None
    options = {}
    if mode == "tls":
        certfile, keyfile, _ = tls_cert_files
        options = {"certfile": certfile, "keyfile": keyfile}
    # A response with a body: h2spec's stream-state tests wait for its DATA frame.
    server = await serve_wsgi(apps.hello, nursery, bind="127.0.0.1:0", **options)
    port = server.port
    junit = tmp_path / "h2spec.xml"
    command = [H2SPEC, "-h", "127.0.0.1", "-p", str(port), "-o", "3", "-j", str(junit)]
    if mode == "tls":
        command += ["-t", "-k"]
    with trio.fail_after(120):
        done = await trio.run_process(command, capture_stdout=True, check=False)
    assert junit.exists(), done.stdout.decode(errors="replace")[-2000:]
    assert junit_totals(junit) >= 146  # the whole suite ran
    expected = {CLEARTEXT_ONLY_FAILURE} if mode == "h2c" else set()
    failed = failed_tests(junit)
    assert set(failed) == expected, failed


async def test_an_invalid_preface_on_the_cleartext_port_is_an_http1_400(
    nursery: trio.Nursery,
) -> None:
    """What h2spec's http2/3.5/2 gets on the shared port: an HTTP/1.1 400, then the close."""
    server = await serve_wsgi(apps.echo, nursery, bind="127.0.0.1:0")
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"INVALID CONNECTION PREFACE\r\n\r\n")
        buffer = bytearray()
        head = await receive_until(stream, buffer, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"\r\nConnection: close\r\n" in head
        while data := await stream.receive_some(1024):  # the body, then the close
            buffer += data
        assert buffer == b"400 Bad Request: malformed request line\n"
