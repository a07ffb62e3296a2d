"""Unit tests for :mod:`trioserve.responses`, the response rules both protocols share.

Plain function calls: the rules themselves. How each layer applies them is
tested in tests/test_http1.py and tests/test_http2.py (against real h11 and h2
peers), tests/test_wsgi.py (start_response, in a real app thread) and
tests/test_interop.py (curl, nghttp, httpx, http.client on a real socket).
"""

from __future__ import annotations

import pytest

from trioserve.events import UNCHECKED, InvalidResponse
from trioserve.responses import (
    ASKS_CLOSE,
    HAS_DATE,
    HAS_FRAMING,
    HAS_SERVER,
    check_status,
    declared_length,
    error_body,
    field_traits,
    in_words,
    reason_phrase,
)


@pytest.mark.parametrize("status", [200, 204, 299, 304, 404, 500, 599])
def test_final_statuses_pass(status: int) -> None:
    check_status(status, b"Any Words\tand obs-text \xe9")


@pytest.mark.parametrize("status", [0, 99, 100, 101, 103, 199, 600, 999, 1000])
def test_other_statuses_are_refused(status: int) -> None:
    with pytest.raises(InvalidResponse, match=f"status {status} is not a final status"):
        check_status(status)


@pytest.mark.parametrize(
    "reason",
    [b"OK\r\nX-Injected: 1", b"OK\n", b"O\rK", b"OK\x00", b"OK\x7f", b"\x1b[31mred"],
    ids=["crlf", "lf", "cr", "nul", "del", "escape"],
)
def test_reason_phrase_with_a_control_character_is_refused(reason: bytes) -> None:
    with pytest.raises(InvalidResponse, match="control character in the reason phrase"):
        check_status(200, reason)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"Content-Type", b"text/plain")], None),
        ([(b"Content-Length", b"0")], 0),
        ([(b"content-length", b" 138 ")], 138),
        ([(b"CONTENT-LENGTH", b"9" * 18)], 10**18 - 1),
        ([(b"Transfer-Encoding", b"chunked")], None),
        ([(b"Transfer-Encoding", b"Chunked ")], None),
    ],
)
def test_declared_length(headers: list[tuple[bytes, bytes]], expected: int | None) -> None:
    assert declared_length(headers) == expected


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
            "more than one Content-Length header: '5' and '6'",
        ),
        (
            [(b"Content-Length", b"5"), (b"content-length", b"5")],
            "more than one Content-Length header: '5' and '5'",
        ),
        ([(b"Content-Length", b"5, 5")], "invalid Content-Length '5, 5'"),
        ([(b"Content-Length", b"-1")], "invalid Content-Length '-1'"),
        ([(b"Content-Length", b"+5")], "invalid Content-Length '+5'"),
        ([(b"Content-Length", b"")], "invalid Content-Length ''"),
        ([(b"Content-Length", b"0x10")], "invalid Content-Length '0x10'"),
        ([(b"Content-Length", b"9" * 19)], "invalid Content-Length '9999999999999999999'"),
        ([(b"Transfer-Encoding", b"gzip")], "Transfer-Encoding 'gzip' is not chunked"),
        (
            [(b"Transfer-Encoding", b"gzip, chunked")],
            "Transfer-Encoding 'gzip, chunked' is not chunked",
        ),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            "more than one Transfer-Encoding header",
        ),
        (
            [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
            "both Content-Length and Transfer-Encoding",
        ),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
            "both Content-Length and Transfer-Encoding",
        ),
    ],
)
def test_framing_headers_that_break_the_rules_are_refused(
    headers: list[tuple[bytes, bytes]], message: str
) -> None:
    with pytest.raises(InvalidResponse) as caught:
        declared_length(headers)
    assert str(caught.value) == message


def test_error_body_is_status_reason_and_detail() -> None:
    assert reason_phrase(404) == b"Not Found"
    assert reason_phrase(599) == b""
    assert error_body(404) == b"404 Not Found\n"
    assert error_body(400, "malformed request line") == b"400 Bad Request: malformed request line\n"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("illegal request line: bytearray(b'INVALID CONNECTION PREFACE')", "illegal request line"),
        ("Illegal header value b' x'", "Illegal header value"),
        ('malformed chunk footer: b"xy" (expected b"\\r\\n")', "malformed chunk footer"),
        (
            "Received duplicate pseudo-header field b':path'",
            "Received duplicate pseudo-header field",
        ),
        ("bytearray(b'only data')", "malformed request"),
        (
            "Error decoding header block: Unable to decode HPACK integer representation"
            " from <memory at 0x7f46efd83940>",
            "Error decoding header block: Unable to decode HPACK integer representation",
        ),
        ("no data quoted here", "no data quoted here"),
        ("about bytes and b-trees", "about bytes and b-trees"),
    ],
)
def test_in_words_drops_quoted_data(message: str, expected: str) -> None:
    assert in_words(message) == expected


@pytest.mark.parametrize(
    ("headers", "traits"),
    [
        ([], 0),
        ([(b"Content-Type", b"text/plain")], 0),
        ([(b"DATE", b"x"), (b"server", b"y")], HAS_DATE | HAS_SERVER),
        ([(b"Content-Length", b"3")], HAS_FRAMING),
        ([(b"transfer-encoding", b"chunked")], HAS_FRAMING),
        ([(b"Connection", b"Keep-Alive, CLOSE")], ASKS_CLOSE),
        ([(b"Connection", b"keep-alive")], 0),
        ([(b"X-Date", b"x"), (b"Servers", b"y")], 0),
    ],
)
def test_field_traits_name_what_the_server_looks_for(
    headers: list[tuple[bytes, bytes]], traits: int
) -> None:
    assert field_traits(headers) == traits
    assert field_traits(headers, UNCHECKED) == traits
    assert field_traits(headers, HAS_DATE) == HAS_DATE  # known: not looked up again
