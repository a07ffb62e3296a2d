"""Sans-IO tests for :class:`trioserve.chunked.ChunkedScan`, the chunked-framing scan.

Bodies are hand-written bytes (the point is input a client library would not
produce) or come from a real h11 client. Each is fed whole and, where it
matters, one byte at a time, since a scan's verdict must not depend on how the
bytes were cut into reads. No trio, no sockets.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve.chunked import MAX_CHUNK_LINE, ChunkedScan, Refusal

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def scan(body: bytes, *, max_body_size: int = 0, bytewise: bool = False) -> ChunkedScan:
    """A scan fed ``body``; it must have found nothing wrong."""
    scanner = ChunkedScan(max_body_size=max_body_size)
    pieces = [body[i : i + 1] for i in range(len(body))] if bytewise else [body]
    for piece in pieces:
        assert scanner.feed(piece) is None
    return scanner


def refusal(body: bytes, *, max_body_size: int = 0, bytewise: bool = False) -> Refusal | None:
    """The refusal the scan reports for ``body``, after checking it reports it only once."""
    scanner = ChunkedScan(max_body_size=max_body_size)
    pieces = [body[i : i + 1] for i in range(len(body))] if bytewise else [body]
    found = [result for piece in pieces if (result := scanner.feed(piece)) is not None]
    assert len(found) <= 1, found
    if found:
        assert scanner.feed(b"0\r\n\r\n") is None  # nothing more after a refusal
    return found[0] if found else None


def h11_chunked_body(*pieces: bytes, trailers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The body bytes a real h11 client sends for ``pieces`` with chunked framing."""
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="POST",
            target="/",
            headers=[("Host", "x"), ("Transfer-Encoding", "chunked")],
        )
    )
    body = b"".join(client.send(h11.Data(data=piece)) or b"" for piece in pieces)
    return body + (client.send(h11.EndOfMessage(headers=trailers or [])) or b"")


# ---- well-formed bodies ----------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    "body",
    [
        h11_chunked_body(b"hello", b", ", b"world"),
        h11_chunked_body(),
        h11_chunked_body(b"x" * 70_000, trailers=[(b"X-Checksum", b"abc")]),
        b"5;name\r\nhello\r\n0\r\n\r\n",
        b'5 ; a = b ; c="d \\" e"\r\nhello\r\n000;last\r\n\r\n',
        b"5  \r\nhello\r\n0\r\n\r\n",  # trailing whitespace, as h11 accepts
        b"A\r\n0123456789\r\n0\r\nT: v\r\nU: w\r\n\r\n",
    ],
    ids=["pieces", "empty", "large-with-trailer", "extension", "extensions", "ows", "hex"],
)
def test_well_formed_body_ends_where_it_ends(body: bytes, bytewise: bool) -> None:
    scanner = scan(body + NEXT_REQUEST, bytewise=bytewise)
    assert scanner.done
    # The bytes after the body belong to the next request: never looked at.
    assert scanner.feed(b"\x00garbage\n") is None


def test_body_not_yet_ended_is_not_done() -> None:
    body = h11_chunked_body(b"hello")
    assert not scan(body[:-2]).done
    assert scan(body).done


# ---- chunk sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("size_line", "expected"),
    [
        (b"ffffffffffffffffff", Refusal(400, "chunk size of more than 16 hex digits")),
        # 2**64 + 5: a proxy keeping 64 bits reads 5
        (b"10000000000000005", Refusal(400, "chunk size of more than 16 hex digits")),
        (b"00000000000000005", Refusal(400, "chunk size of more than 16 hex digits")),
        (b"-1", Refusal(400, "chunk size missing or not hex digits")),
        (b"", Refusal(400, "chunk size missing or not hex digits")),
        (b" 5", Refusal(400, "chunk size missing or not hex digits")),
        (b"0x5", Refusal(400, "malformed chunk size line")),
        (b"5;", Refusal(400, "malformed chunk size line")),
        (b"5;a=", Refusal(400, "malformed chunk size line")),
        (b'5;a="b', Refusal(400, "malformed chunk size line")),
        (b"5;a\x00", Refusal(400, "malformed chunk size line")),
        (b"5;" + b"a" * MAX_CHUNK_LINE, Refusal(400, "chunk extension too long")),
    ],
    ids=[
        "18-digits",
        "2^64+5",
        "17-digits-leading-zeros",
        "negative",
        "missing",
        "leading-space",
        "0x-prefix",
        "empty-extension",
        "extension-without-value",
        "unterminated-quote",
        "nul-in-extension",
        "extension-too-long",
    ],
)
def test_chunk_size_line_that_is_not_1_to_16_hex_digits_is_refused(
    size_line: bytes, expected: Refusal, bytewise: bool
) -> None:
    assert refusal(size_line + b"\r\nhello\r\n0\r\n\r\n", bytewise=bytewise) == expected


def test_too_many_digits_are_refused_before_the_line_ends() -> None:
    """No need to wait for the CRLF (or for a body that will never come)."""
    assert refusal(b"f" * 17) == Refusal(400, "chunk size of more than 16 hex digits")
    assert refusal(b"f" * 16) is None


def test_sixteen_digits_are_accepted_without_a_body_limit() -> None:
    scanner = scan(b"ffffffffffffffff\r\n" + b"x" * 1000)
    assert not scanner.done


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_chunk_size_beyond_the_body_limit_is_refused_before_its_data(bytewise: bool) -> None:
    too_large = Refusal(413, "chunk size beyond the request body limit")
    limit = 1024**3
    # 4 GiB announced: refused as soon as the digits are complete, before the LF.
    assert refusal(b"ffffffff", max_body_size=limit, bytewise=bytewise) is None  # more may come
    assert refusal(b"ffffffff\r", max_body_size=limit, bytewise=bytewise) == too_large
    assert refusal(b"ffffffff;", max_body_size=limit, bytewise=bytewise) == too_large
    # Too many digits is a 400 even though the limit is passed long before.
    assert refusal(b"f" * 17, max_body_size=limit) == Refusal(
        400, "chunk size of more than 16 hex digits"
    )
    assert refusal(b"40000000\r\n", max_body_size=limit) is None  # exactly 1 GiB
    assert refusal(b"40000001\r\n", max_body_size=limit) == too_large
    # What earlier chunks announced counts: 6 + 6 > 10 as soon as the second size is read.
    assert refusal(b"6\r\naaaaaa\r\n6\r\n", max_body_size=10, bytewise=bytewise) == too_large
    assert refusal(b"6\r\naaaaaa\r\n4\r\nbbbb\r\n0\r\n\r\n", max_body_size=10) is None


# ---- line endings, data, trailers --------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"5\nhello\r\n0\r\n\r\n", Refusal(400, "bare CR or LF in the chunked body framing")),
        (b"5\r\r\nhello\r\n0\r\n\r\n", Refusal(400, "bare CR or LF in the chunked body framing")),
        (b"5\r\nhelloXY0\r\n\r\n", Refusal(400, "chunk data not followed by CRLF")),
        (b"5\r\nhello\n0\r\n\r\n", Refusal(400, "chunk data not followed by CRLF")),
        (
            b"5\r\nhello\r\n0\r\nT: v\n\r\n",
            Refusal(400, "bare CR or LF in the chunked body framing"),
        ),
        (b"5\r\nhello\r\n0\r\n\n", Refusal(400, "bare CR or LF in the chunked body framing")),
        (
            b"5\r\nhello\r\n0\r\nT: v\r\n w\r\n\r\n",
            Refusal(400, "obsolete line folding in the trailer section"),
        ),
        (
            b"5\r\nhello\r\n0\r\nT: a\x01b\r\n\r\n",
            Refusal(400, "control character in the trailer section"),
        ),
    ],
    ids=[
        "bare-lf-size-line",
        "bare-cr-size-line",
        "data-longer-than-size",
        "data-then-bare-lf",
        "bare-lf-trailer",
        "bare-lf-end",
        "trailer-obs-fold",
        "trailer-control-character",
    ],
)
def test_framing_a_peer_could_read_differently_is_refused(
    body: bytes, expected: Refusal, bytewise: bool
) -> None:
    assert refusal(body, bytewise=bytewise) == expected


def test_trailer_section_is_bounded() -> None:
    scanner = ChunkedScan(max_trailer_size=100)
    assert scanner.feed(b"0\r\nT: " + b"v" * 80 + b"\r\n") is None
    assert scanner.feed(b"U: " + b"w" * 20) == Refusal(431, "trailer section too large")


# ---- the verdict does not depend on how the bytes were cut -------------------------------

FRAGMENTS = [
    b"5",
    b"ffffffffffffffff",
    b"0",
    b"f",
    b"ffffffff",
    b";a=b",
    b"\r\n",
    b"\n",
    b"\r",
    b"hello",
    b"x",
    b"T: v",
    b" ",
]


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.sampled_from(FRAGMENTS), max_size=20).map(b"".join),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    limit=st.sampled_from([0, 10, 1000]),
)
def test_verdict_is_the_same_however_the_bytes_are_cut(
    body: bytes, cuts: list[int], limit: int
) -> None:
    """Whether a body is refused, and with which status, does not depend on the reads.
    (The reason may: a line with two faults names the one its bytes so far show.)"""
    whole = ChunkedScan(max_body_size=limit, max_trailer_size=20)
    expected = whole.feed(body)
    pieces, last = [], 0
    for point in sorted(cut for cut in cuts if cut <= len(body)):
        pieces.append(body[last:point])
        last = point
    pieces.append(body[last:])
    split = ChunkedScan(max_body_size=limit, max_trailer_size=20)
    found = [result for piece in pieces if (result := split.feed(piece)) is not None]
    assert [refusal.status for refusal in found] == ([expected.status] if expected else [])
    assert split.done == whole.done


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"ffffffffffffffff5\r\n", 400),  # too many digits, whatever the limit
        (b"fff;a\r\n", 413),
        (b"fff\r\n", 413),
        (b"0\r\nT: a\rb" + b"c" * 30 + b"\r\n", 431),  # too long before its bare CR shows
    ],
)
def test_the_status_does_not_depend_on_where_the_bytes_are_cut(body: bytes, status: int) -> None:
    for cut in range(len(body) + 1):
        scanner = ChunkedScan(max_body_size=10, max_trailer_size=20)
        found = [r for r in (scanner.feed(body[:cut]), scanner.feed(body[cut:])) if r]
        assert [refusal.status for refusal in found] == [status], cut
