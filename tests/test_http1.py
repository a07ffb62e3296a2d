"""Sans-IO tests for :class:`trioserve.http1.HTTP1Connection`.

Requests come from a real h11 client (``h11.Connection(h11.CLIENT)``) or, for
input h11 would refuse to produce, from hand-written bytes. Each test feeds
them to the server object, then checks the exact events from ``next_events()``
and the exact bytes from ``data_to_send()``. Responses are compared as bytes
where that reads well, or parsed back with an h11 client. No trio, no mocks,
no sockets.
"""

from __future__ import annotations

import base64
from http import HTTPStatus

import h11
import pytest

from trioserve.events import (
    UNCHECKED,
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    FileSegment,
    InvalidResponse,
    RequestReceived,
    StreamReset,
    UpgradeToH2,
)
from trioserve.http1 import (
    COALESCE_LIMIT,
    MAX_BUFFERS,
    MAX_DRAIN,
    MAX_UPGRADE_BODY,
    MAX_WRITE,
    HTTP1Connection,
    describe,
)
from trioserve.responses import ASKS_CLOSE

OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

# ---- helpers -------------------------------------------------------------------


def client_request(
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: list[bytes] | None = None,
) -> bytes:
    """The bytes a fresh h11 client sends for one complete HTTP/1.1 request.

    ``body`` is a list of pieces; give ``Content-Length`` or
    ``Transfer-Encoding: chunked`` in ``headers`` to say how it is framed.
    """
    client = h11.Connection(h11.CLIENT)
    if headers is None:
        headers = [("Host", "example.com")]
    data = client.send(h11.Request(method=method, target=target, headers=headers))
    for piece in body or []:
        data += client.send(h11.Data(data=piece))
    data += client.send(h11.EndOfMessage())
    return data


# h11 only sends HTTP/1.1, so HTTP/1.0 requests are written by hand.
HTTP10_GET = b"GET / HTTP/1.0\r\n\r\n"


def get(target: str) -> bytes:
    return client_request("GET", target)


def feed(server: HTTP1Connection, data: bytes = b"", *, eof: bool = False) -> list[object]:
    """Give ``server`` some bytes (and optionally EOF) and return the events it reports."""
    if data:
        server.receive_data(data)
    if eof:
        server.receive_data(b"")
    return list(server.next_events())


def respond(server: HTTP1Connection, stream_id: int, body: bytes = b"") -> bytes:
    """Answer ``stream_id`` with 200 and a Content-Length body; return the bytes queued."""
    server.send_response(stream_id, 200, [(b"Content-Length", str(len(body)).encode())])
    server.send_body(stream_id, body)
    server.end_stream(stream_id)
    return server.data_to_send()


def request_event(
    stream_id: int = 1,
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    **fields: object,
) -> RequestReceived:
    """The RequestReceived expected for a request sent by :func:`client_request`."""
    if headers is None:
        headers = [(b"host", b"example.com")]
    fields.setdefault("http_version", "1.1")
    fields.setdefault("end_stream", True)
    return RequestReceived(
        stream_id=stream_id,
        method=method,
        target=target,
        headers=headers,
        **fields,  # type: ignore[arg-type]
    )


def error_response(status: int, detail: str) -> bytes:
    """The exact bytes of trioserve's own plain-text error response."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n".encode() if detail else f"{status} {phrase}\n".encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_response(data: bytes, method: str = "GET") -> list[object]:
    """Parse response bytes with an h11 client that sent one ``method`` request."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "example.com")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events: list[object] = []
    while True:
        event = client.next_event()
        if event in (h11.NEED_DATA, h11.PAUSED):
            return events
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


# ---- requests and responses ----------------------------------------------------


def test_simple_get() -> None:
    server = HTTP1Connection()
    request = client_request(
        "GET", "/a/b?c=d", [("Host", "example.com"), ("X-Custom", "Value"), ("ACCEPT", "*/*")]
    )
    assert feed(server, request) == [
        RequestReceived(
            stream_id=1,
            method=b"GET",
            target=b"/a/b?c=d",
            headers=[(b"host", b"example.com"), (b"x-custom", b"Value"), (b"accept", b"*/*")],
            http_version="1.1",
            scheme=None,
            authority=None,
            end_stream=True,
            expects_continue=False,
            content_length=None,
        ),
    ]
    assert server.data_to_send() == b""
    assert respond(server, 1, b"hello") == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert not server.closing


def test_post_with_content_length() -> None:
    server = HTTP1Connection()
    request = client_request(
        "POST", "/upload", [("Host", "example.com"), ("Content-Length", "11")], [b"hello world"]
    )
    assert feed(server, request) == [
        request_event(
            method=b"POST",
            target=b"/upload",
            headers=[(b"host", b"example.com"), (b"content-length", b"11")],
            end_stream=False,
            content_length=11,
        ),
        BodyReceived(1, b"hello world"),
        BodyEnded(1),
    ]


def test_keep_alive_serves_requests_in_sequence() -> None:
    server = HTTP1Connection()
    assert feed(server, get("/one")) == [request_event(1, target=b"/one")]
    # The next request arrives before the first response has ended: it waits.
    assert feed(server, get("/two")) == []
    assert server.buffered_input == len(get("/two"))
    server.send_response(1, 200, [(b"Content-Length", b"3")])
    server.send_body(1, b"one")
    assert feed(server) == []
    server.end_stream(1)
    assert server.data_to_send() == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    assert not server.closing
    assert feed(server) == [request_event(2, target=b"/two")]
    assert respond(server, 2, b"two") == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo"
    assert feed(server, get("/three")) == [request_event(3, target=b"/three")]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize(
    "field",
    [b"Proxy-Connection: close", b"Upgrade: websocket\r\nConnection: upgrade"],
    ids=["proxy-connection-close", "declined-upgrade"],
)
def test_a_request_with_fields_a_parser_may_take_as_the_last_keeps_the_connection(
    parser: str, field: bytes
) -> None:
    """The same answers from both parsers: HTTP/1.1 knows no Proxy-Connection and
    trioserve upgrades only to h2c, so the connection stays open and the request
    after it (here pipelined behind it) is served. llhttp, reused for that next
    head, takes Proxy-Connection: close as the connection's end and refused the
    next head ("Data after `Connection: close`") before it was asked in time."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    server = HTTP1Connection(parser=parser)
    first = b"GET /one HTTP/1.1\r\nHost: example.com\r\n" + field + b"\r\n\r\n"
    events = feed(server, first + get("/two"))
    assert len(events) == 1
    assert isinstance(events[0], RequestReceived)
    assert events[0].target == b"/one"
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing
    assert feed(server) == [request_event(2, target=b"/two")]
    assert respond(server, 2) == OK_EMPTY
    assert feed(server, get("/three")) == [request_event(3, target=b"/three")]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # Any token is a method (RFC 9110 §9.1): llhttp knows a fixed list.
        (b"FOO /x HTTP/1.1\r\nHost: a\r\n\r\n", b"FOO"),
        (b"get /x HTTP/1.1\r\nHost: a\r\n\r\n", b"get"),
        (b"! /x HTTP/1.1\r\nHost: a\r\n\r\n", b"!"),
        # ...and llhttp takes PRI for an HTTP/2 preface.
        (b"PRI /x HTTP/1.1\r\nHost: a\r\n\r\n", b"PRI"),
        # The version is told before either parser sees it: llhttp says 400.
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
        (b"! ! HTTP/0.0\r\n\r\n", 505),
        # So is the number of fields: h11 would first miss the Host.
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431),
    ],
    ids=["custom", "lower-case", "one-character", "PRI", "1.2", "0.9", "0.0", "fields-no-host"],
)
def test_both_parsers_answer_alike(parser: str, head: bytes, expected: bytes | int) -> None:
    """Heads on which the two parsers once differed (tests/test_fuzz.py compares them
    on random input): the app gets the request, or the client the status, either way."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    server = HTTP1Connection(parser=parser)
    events = feed(server, head)
    if isinstance(expected, bytes):
        assert len(events) == 1
        assert isinstance(events[0], RequestReceived)
        assert events[0].method == expected
        assert respond(server, 1) == OK_EMPTY
    else:
        assert len(events) == 1
        assert isinstance(events[0], BadRequest)
        assert events[0].status == expected
        assert server.data_to_send().startswith(b"HTTP/1.1 %d " % expected)
        assert server.closing


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED"])
def test_both_parsers_hand_over_transfer_encoding_in_lower_case(parser: str, coding: bytes) -> None:
    """h11 lower-cases the value; llhttp passed it on as sent, so the app's
    HTTP_TRANSFER_ENCODING depended on the parser."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    server = HTTP1Connection(parser=parser)
    events = feed(
        server, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
    )
    assert len(events) == 1
    assert isinstance(events[0], RequestReceived)
    assert events[0].headers == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]


def test_pipelined_request_waits_for_the_first_response_to_end() -> None:
    server = HTTP1Connection()
    assert feed(server, get("/one") + get("/two")) == [
        request_event(1, target=b"/one"),
    ]
    assert server.buffered_input == len(get("/two"))
    assert feed(server) == []
    server.send_response(1, 200, [(b"Content-Length", b"0")])
    assert feed(server) == []  # response started but not ended: still nothing
    server.end_stream(1)
    assert server.data_to_send() == OK_EMPTY
    assert feed(server) == [request_event(2, target=b"/two")]
    assert server.buffered_input == 0
    assert respond(server, 2) == OK_EMPTY
    assert not server.closing


def wants_sender_as_spelled_out(server: HTTP1Connection) -> bool:
    return bool(server.output_size) or server.has_queued_streams or server.closing


def test_wants_sender_follows_output_and_closing() -> None:
    """The driver's one look (wants_sender) says what the three properties say."""
    server = HTTP1Connection()
    seen = []

    def look() -> bool:
        assert server.wants_sender == wants_sender_as_spelled_out(server)
        seen.append(server.wants_sender)
        return server.wants_sender

    assert not look()  # fresh
    feed(server, get("/one"))
    assert not look()  # a request in progress, nothing queued
    server.send_response(1, 200, [(b"Content-Length", b"3")])
    assert look()  # a head queued
    server.send_body(1, b"one")
    server.end_stream(1)
    server.data_to_send()
    assert not look()  # all taken, keep-alive
    feed(server, client_request(headers=[("Host", "a"), ("Connection", "close")]))
    server.send_response(2, 200, [(b"Content-Length", b"0")])
    server.end_stream(2)
    server.data_to_send()
    assert look()  # nothing queued, but the connection is to close
    assert seen == [False, False, True, False, True]


def test_chunked_request_body() -> None:
    server = HTTP1Connection()
    request = client_request(
        "POST",
        "/",
        [("Host", "example.com"), ("Transfer-Encoding", "chunked")],
        [b"hello ", b"world"],
    )
    expected_head = request_event(
        method=b"POST",
        headers=[(b"host", b"example.com"), (b"transfer-encoding", b"chunked")],
        end_stream=False,
        content_length=None,
    )
    assert feed(server, request) == [
        expected_head,
        BodyReceived(1, b"hello "),
        BodyReceived(1, b"world"),
        BodyEnded(1),
    ]


def test_chunked_request_body_arriving_in_small_pieces() -> None:
    server = HTTP1Connection()
    request = client_request(
        "POST", "/", [("Host", "example.com"), ("Transfer-Encoding", "chunked")], [b"abcdefgh"]
    )
    head_end = request.index(b"\r\n\r\n") + 4
    events = feed(server, request[:head_end])
    assert [type(e) for e in events] == [RequestReceived]
    body: list[object] = []
    for i in range(head_end, len(request), 3):
        body += feed(server, request[i : i + 3])
    assert body[-1] == BodyEnded(1)
    assert all(isinstance(e, BodyReceived) and e.stream_id == 1 for e in body[:-1])
    assert b"".join(e.data for e in body[:-1]) == b"abcdefgh"  # type: ignore[attr-defined]


def test_response_without_content_length_is_chunked() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 200, [(b"Content-Type", b"text/plain")])
    server.send_body(1, b"hello")
    server.send_body(1, b"")  # empty pieces produce no empty chunk (that would end the body)
    server.send_body(1, b", world")
    server.end_stream(1)
    assert server.data_to_send() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    )
    assert not server.closing


def test_custom_reason_phrase() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 299, [(b"Content-Length", b"0")], reason=b"Fine Enough")
    server.end_stream(1)
    assert server.data_to_send() == b"HTTP/1.1 299 Fine Enough\r\nContent-Length: 0\r\n\r\n"


def test_head_response_drops_body_bytes() -> None:
    server = HTTP1Connection()
    assert feed(server, client_request("HEAD", "/")) == [
        request_event(method=b"HEAD"),
    ]
    assert respond(server, 1, b"hello") == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert not server.closing
    assert feed(server, get("/next")) == [request_event(2, target=b"/next")]


def test_http10_request_closes_after_the_response() -> None:
    server = HTTP1Connection()
    assert feed(server, HTTP10_GET) == [request_event(headers=[], http_version="1.0")]
    assert not server.closing
    assert respond(server, 1, b"bye") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye"
    )
    assert server.closing
    assert feed(server) == []


def test_connection_close_request() -> None:
    server = HTTP1Connection()
    request = client_request("GET", "/", [("Host", "example.com"), ("Connection", "close")])
    assert feed(server, request) == [
        request_event(headers=[(b"host", b"example.com"), (b"connection", b"close")]),
    ]
    assert not server.closing
    assert (
        respond(server, 1) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert server.closing


@pytest.mark.parametrize(
    "first",
    [
        client_request("GET", "/", [("Host", "example.com"), ("Connection", "close")]),
        HTTP10_GET,
    ],
    ids=["connection-close", "http1.0"],
)
def test_request_after_connection_close_is_ignored(first: bytes) -> None:
    # RFC 9112 §9.6: answer the request carrying "close", process nothing after it.
    server = HTTP1Connection()
    events = feed(server, first + get("/ignored"))
    assert [type(e) for e in events] == [RequestReceived]
    server.send_response(1, 200, [(b"Content-Length", b"0")])
    server.end_stream(1)
    assert server.data_to_send() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert server.closing
    assert feed(server) == []


def test_peer_half_close_after_request_still_gets_the_response() -> None:
    server = HTTP1Connection()
    assert feed(server, get("/"), eof=True) == [
        request_event(),
        ConnectionClosed(abort=False),
    ]
    assert not server.closing  # the response has yet to go out
    assert respond(server, 1, b"ok") == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert server.closing
    assert feed(server) == []


def test_start_shutdown_mid_request_adds_connection_close() -> None:
    server = HTTP1Connection()
    feed(server, get("/") + get("/never"))
    server.start_shutdown()
    assert not server.closing  # the request in hand is answered first
    assert (
        respond(server, 1) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert server.closing
    assert feed(server) == []


# ---- Expect: 100-continue --------------------------------------------------------

EXPECT_HEADERS = [("Host", "example.com"), ("Content-Length", "5"), ("Expect", "100-continue")]


def expect_request_head() -> bytes:
    request = client_request("POST", "/", EXPECT_HEADERS, [b"hello"])
    return request[: -len(b"hello")]


def test_expect_100_continue() -> None:
    server = HTTP1Connection()
    assert feed(server, expect_request_head()) == [
        request_event(
            method=b"POST",
            headers=[
                (b"host", b"example.com"),
                (b"content-length", b"5"),
                (b"expect", b"100-continue"),
            ],
            end_stream=False,
            expects_continue=True,
            content_length=5,
        )
    ]
    server.send_continue(1)
    server.send_continue(1)  # a second call sends nothing more
    assert server.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert feed(server, b"hello") == [BodyReceived(1, b"hello"), BodyEnded(1)]
    server.send_continue(1)  # too late: the body is here
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing
    assert feed(server, get("/next")) == [request_event(2, target=b"/next")]


def test_expect_100_continue_without_a_body_is_not_waited_on() -> None:
    server = HTTP1Connection()
    headers = [("Host", "example.com"), ("Content-Length", "0"), ("Expect", "100-continue")]
    events = feed(server, client_request("POST", "/", headers))
    assert isinstance(events[0], RequestReceived)
    assert events[0].expects_continue is False
    assert events[0].end_stream is True
    assert events[1:] == []  # (no BodyEnded: end_stream said it)


def test_send_continue_after_response_started_sends_nothing() -> None:
    server = HTTP1Connection()
    feed(server, expect_request_head())
    server.send_response(1, 200, [(b"Content-Length", b"0")])
    server.send_continue(1)
    # No 100 was sent and the body has not arrived: it may never come, so
    # this connection cannot be reused.
    assert (
        server.data_to_send()
        == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


def test_final_response_without_continue_closes() -> None:
    server = HTTP1Connection()
    feed(server, expect_request_head())
    server.send_response(1, 417, [(b"Content-Length", b"0")])
    server.end_stream(1)
    # Status line only: RFC 9110 §10.1.1 says this response SHOULD also announce
    # the close, which is not pinned here either way.
    assert server.data_to_send().startswith(b"HTTP/1.1 417 Expectation Failed\r\n")
    # The client never got "100 Continue", so it may never send the body: waiting
    # to drain it would hang the connection.
    assert server.closing
    assert feed(server, get("/next")) == []


# ---- responses that leave the request body unread -----------------------------------


def test_small_unread_body_is_drained_and_the_next_request_served() -> None:
    server = HTTP1Connection()
    request = client_request(
        "POST", "/", [("Host", "example.com"), ("Content-Length", "10")], [b"0123456789"]
    )
    head, body = request[:-10], request[-10:]
    assert [type(e) for e in feed(server, head)] == [RequestReceived]
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing
    # The body shows up after the response: discarded, no events for it.
    assert feed(server, body[:4]) == []
    assert feed(server, body[4:] + get("/next")) == [
        request_event(2, target=b"/next"),
    ]
    assert not server.closing


def test_large_unread_body_closes_the_connection() -> None:
    server = HTTP1Connection()
    size = MAX_DRAIN + 1024
    headers = [("Host", "example.com"), ("Content-Length", str(size))]
    request = client_request("POST", "/", headers, [b"x" * size])
    head, body = request[:-size], request[-size:]
    assert [type(e) for e in feed(server, head)] == [RequestReceived]
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing
    assert feed(server, body + get("/next")) == []
    assert server.closing
    assert feed(server) == []


# ---- bad input --------------------------------------------------------------------

LONG = b"a" * 200

BAD_REQUESTS = [
    # id, HTTP1Connection kwargs, bytes, status, reason
    ("malformed-request-line", {}, b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (
        "bad-header-line",
        {},
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        400,
        "malformed header line",
    ),
    (
        "header-block-too-large",
        {"max_header_size": 1024},
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000,
        431,
        "request header fields too large",
    ),
    (
        "request-line-too-long-no-newline-yet",
        {"max_request_line_size": 100},
        b"GET /" + LONG,
        414,
        "request line too long",
    ),
    (
        "request-line-too-long-complete",
        {"max_request_line_size": 100},
        b"GET /" + LONG + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "request target too long",
    ),
    (
        "too-many-headers",
        {"max_header_count": 3},
        b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
        431,
        "too many header fields",
    ),
    (
        "content-length-over-max-body-size",
        {"max_body_size": 10},
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n",
        413,
        "request body too large",
    ),
    (
        # h11 took this one (20 digits), llhttp refused it (over 2**64 - 1).
        "content-length-of-20-digits",
        {},
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n",
        400,
        "Content-Length of more than 18 digits",
    ),
    (
        # The fuzzers' find: h11 answered 413 (over the body limit), llhttp 400.
        "content-length-of-20-digits-over-max-body-size",
        {"max_body_size": 50},
        b"GET / HTTP/1.0\r\n!:\r\nContent-Length:20000000000000000000\r\n\r\n",
        400,
        "Content-Length of more than 18 digits",
    ),
    (
        # llhttp took this one (it is 1), h11 refused it (over 20 characters).
        "content-length-of-1-in-22-digits",
        {},
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0000000000000000000001\r\n\r\n",
        400,
        "Content-Length of more than 18 digits",
    ),
    (
        "content-length-and-transfer-encoding",
        {},
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    (
        "transfer-encoding-gzip",
        {},
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "unsupported Transfer-Encoding",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "data", "status", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_is_answered_by_the_layer(
    kwargs: dict[str, int], data: bytes, status: int, reason: str
) -> None:
    server = HTTP1Connection(**kwargs)
    events = feed(server, data)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, BadRequest)
    assert event.status == status
    assert event.stream_id is None  # answered here: the driver only logs it
    assert event.reason == reason
    assert server.data_to_send() == error_response(status, reason)
    assert server.closing
    assert feed(server) == []
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("value", "length"),
    [(b"999999999999999999", 999_999_999_999_999_999), (b"000000000000000005", 5)],
    ids=["largest", "leading-zeros"],
)
def test_a_content_length_of_18_digits_is_read(value: bytes, length: int) -> None:
    """18 digits is the bound (trioserve.responses.CONTENT_LENGTH_DIGITS), and
    both parsers read every value within it as the same length."""
    server = HTTP1Connection()
    (request,) = feed(
        server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
    )
    assert isinstance(request, RequestReceived)
    assert request.content_length == length
    assert not request.end_stream


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"INVALID CONNECTION PREFACE\r\n\r\n", 400, "malformed request line"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "malformed request line"),
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400, "malformed header line"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: five\r\n\r\n",
            400,
            "invalid Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            501,
            "more than one Transfer-Encoding header",
        ),
    ],
    ids=[
        "text-instead-of-http",
        "tls-on-cleartext",
        "space-in-target",
        "space-in-header-name",
        "no-host",
        "content-length-not-digits",
        "two-transfer-encodings",
    ],
)
def test_errors_h11_finds_are_told_in_words(data: bytes, status: int, reason: str) -> None:
    """Error bodies and BadRequest reasons say what was wrong, never quoting the
    offending bytes as a Python repr (h11's messages do: ``bytearray(b'...')``)."""
    server = HTTP1Connection()
    assert feed(server, data) == [BadRequest(status, reason, answered=True)]
    response = server.data_to_send()
    assert response == error_response(status, reason)
    assert b"bytearray" not in response
    assert b"b'" not in response


def test_an_h11_message_trioserve_does_not_know_still_loses_its_repr() -> None:
    assert describe(h11.RemoteProtocolError("new words: bytearray(b'x')")) == "new words"
    assert describe(h11.RemoteProtocolError("illegal request line: b'x'")) == (
        "malformed request line"
    )


def test_bad_request_response_parses_as_http() -> None:
    server = HTTP1Connection(max_header_count=1)
    feed(server, b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\n\r\n")
    response, data, end = parse_response(server.data_to_send())
    assert isinstance(response, h11.Response)
    assert response.status_code == 431
    assert (b"connection", b"close") in response.headers
    assert isinstance(data, h11.Data)
    assert bytes(data.data) == b"431 Request Header Fields Too Large: too many header fields\n"
    assert isinstance(end, h11.EndOfMessage)


@pytest.mark.parametrize(
    "split",
    [
        pytest.param(False, id="whole"),
        pytest.param(True, id="split-before-newline"),
    ],
)
def test_request_line_limit_is_on_the_line_not_just_the_target(split: bool) -> None:
    """A 104-byte request line with a 91-byte target, limit 100: 414 however it arrives."""
    line = b"GET /" + b"a" * 90 + b" HTTP/1.1"
    assert len(line) == 104
    server = HTTP1Connection(max_request_line_size=100)
    rest = b"\r\nHost: x\r\n\r\n"
    events = feed(server, line) + feed(server, rest) if split else feed(server, line + rest)
    assert [(type(e), getattr(e, "status", None)) for e in events] == [(BadRequest, 414)]


def test_content_length_at_max_body_size_is_accepted() -> None:
    server = HTTP1Connection(max_body_size=10)
    headers = [("Host", "example.com"), ("Content-Length", "10")]
    events = feed(server, client_request("POST", "/", headers, [b"0123456789"]))
    assert events[1:] == [BodyReceived(1, b"0123456789"), BodyEnded(1)]


def test_content_length_over_max_body_size_is_refused_before_any_body() -> None:
    server = HTTP1Connection(max_body_size=10)
    headers = [("Host", "example.com"), ("Content-Length", "11")]
    request = client_request("POST", "/", headers, [b"x" * 11])
    assert feed(server, request) == [BadRequest(413, "request body too large", None, answered=True)]
    assert server.data_to_send() == error_response(413, "request body too large")
    assert server.closing


CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_REQUEST = request_event(
    method=b"POST",
    headers=[(b"host", b"example.com"), (b"transfer-encoding", b"chunked")],
    end_stream=False,
)


def test_chunked_body_over_max_body_size_is_refused_at_the_chunk_size() -> None:
    server = HTTP1Connection(max_body_size=10)
    assert feed(server, CHUNKED_POST) == [CHUNKED_REQUEST]
    assert feed(server, b"6\r\naaaaaa\r\n") == [BodyReceived(1, b"aaaaaa")]
    # The next size announces 6 bytes more than the 4 the limit still allows:
    # refused before any of its data has come.
    too_large = BadRequest(413, "chunk size beyond the request body limit", stream_id=1)
    assert feed(server, b"6\r\n") == [too_large]
    # The stream is live, so the driver answers it.
    assert server.data_to_send() == b""
    assert server.closing
    server.send_error_response(1, 413)
    assert server.data_to_send() == error_response(413, "")
    assert feed(server, b"bbbbbb\r\n0\r\n\r\n" + get("/next")) == []


def test_chunked_body_over_max_body_size_sent_with_its_head_never_reaches_the_app() -> None:
    server = HTTP1Connection(max_body_size=10)
    request = client_request(
        "POST",
        "/",
        [("Host", "example.com"), ("Transfer-Encoding", "chunked")],
        [b"a" * 6, b"b" * 6, b"c" * 6],
    )
    reason = "chunk size beyond the request body limit"
    assert feed(server, request + get("/next")) == [BadRequest(413, reason, answered=True)]
    assert server.data_to_send() == error_response(413, reason)
    assert server.closing


CHUNK_SIZE_REFUSALS = [
    pytest.param(
        b"ffffffffffffffffff", 400, "chunk size of more than 16 hex digits", id="18-digits"
    ),
    pytest.param(b"10000000000000005", 400, "chunk size of more than 16 hex digits", id="2^64+5"),
    pytest.param(b"fffffffff", 413, "chunk size beyond the request body limit", id="64-GiB"),
]


@pytest.mark.parametrize(("size", "status", "reason"), CHUNK_SIZE_REFUSALS)
def test_chunk_size_that_came_with_the_head_is_refused_before_the_app(
    size: bytes, status: int, reason: str
) -> None:
    """h11 would accept these sizes (up to 20 hex digits) and wait for the data; the
    refusal comes at once, with no data sent after the size line."""
    server = HTTP1Connection(max_body_size=1024**3)
    assert feed(server, CHUNKED_POST + size + b"\r\n") == [
        BadRequest(status, reason, answered=True)
    ]
    assert server.data_to_send() == error_response(status, reason)
    assert server.closing
    assert feed(server, b"x" * 10 + b"\r\n0\r\n\r\n" + get("/next")) == []


@pytest.mark.parametrize(("size", "status", "reason"), CHUNK_SIZE_REFUSALS)
def test_chunk_size_refused_mid_body_is_reported_on_the_live_stream(
    size: bytes, status: int, reason: str
) -> None:
    server = HTTP1Connection(max_body_size=1024**3)
    assert feed(server, CHUNKED_POST + b"5\r\nhello\r\n") == [
        CHUNKED_REQUEST,
        BodyReceived(1, b"hello"),
    ]
    # Before the size line's LF: its digits are complete at the CR.
    assert feed(server, size + b"\r") == [BadRequest(status, reason, stream_id=1)]
    assert server.closing
    server.send_error_response(1, status, close=True)  # what the driver does
    assert server.data_to_send() == error_response(status, "")
    assert feed(server, b"\n" + get("/next")) == []


def test_sixteen_hex_digit_chunk_size_is_allowed_without_a_body_limit() -> None:
    server = HTTP1Connection(max_body_size=0)
    assert feed(server, CHUNKED_POST + b"ffffffffffffffff\r\nhello") == [
        CHUNKED_REQUEST,
        BodyReceived(1, b"hello"),
    ]
    assert not server.closing


def test_chunked_body_with_trailers_then_a_pipelined_request() -> None:
    """The scan stops where the body ends: the next request is parsed as its own."""
    server = HTTP1Connection(max_body_size=10)
    body = b"5;ext=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
    assert feed(server, CHUNKED_POST + body + get("/next")) == [
        CHUNKED_REQUEST,
        BodyReceived(1, b"hello"),
        BodyEnded(1),
    ]
    assert respond(server, 1) == OK_EMPTY
    assert feed(server) == [request_event(2, target=b"/next")]


def test_bad_chunk_size_in_a_body_being_drained_closes_the_connection() -> None:
    server = HTTP1Connection()
    assert feed(server, CHUNKED_POST + b"5\r\nhello\r\n")[0] == CHUNKED_REQUEST
    assert respond(server, 1) == OK_EMPTY  # answered without reading the body: drained
    reason = "chunk size of more than 16 hex digits"
    assert feed(server, b"ffffffffffffffffff\r\n") == [BadRequest(400, reason, answered=False)]
    assert server.data_to_send() == b""  # the response went out already: only close
    assert server.closing


@pytest.mark.parametrize(
    "bad",
    [
        b"GARBAGE\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
    ],
    ids=["malformed", "cl-and-te", "gzip", "too-many-headers"],
)
def test_request_pipelined_after_a_bad_request_is_never_parsed(bad: bytes) -> None:
    server = HTTP1Connection(max_header_count=3)
    events = feed(server, bad + get("/next"))
    assert [type(e) for e in events] == [BadRequest]
    events += feed(server, get("/later"))
    events += feed(server, eof=True)
    assert not any(isinstance(e, RequestReceived) for e in events)
    assert server.closing


def test_bad_request_after_a_good_one_is_answered_after_it() -> None:
    server = HTTP1Connection()
    assert feed(server, get("/") + b"GARBAGE\r\n\r\n") == [request_event()]
    assert respond(server, 1) == OK_EMPTY
    events = feed(server)
    assert [(type(e), e.status, e.stream_id) for e in events] == [(BadRequest, 400, None)]  # type: ignore[attr-defined]
    assert server.data_to_send() == error_response(400, events[0].reason)  # type: ignore[attr-defined]
    assert server.closing


# ---- the peer going away ------------------------------------------------------------


def test_eof_in_the_middle_of_a_body_resets_the_stream() -> None:
    server = HTTP1Connection()
    request = client_request(
        "POST", "/", [("Host", "example.com"), ("Content-Length", "10")], [b"0123456789"]
    )
    events = feed(server, request[:-7], eof=True)
    assert events[1:] == [BodyReceived(1, b"012"), StreamReset(1, 0)]
    assert server.closing
    assert server.data_to_send() == b""


def test_eof_on_a_fresh_connection() -> None:
    server = HTTP1Connection()
    assert feed(server, eof=True) == [ConnectionClosed(abort=False)]
    assert server.closing
    assert server.data_to_send() == b""


def test_eof_between_requests() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing
    assert feed(server, eof=True) == [ConnectionClosed(abort=False)]
    assert server.closing


def test_eof_in_the_middle_of_a_request_head() -> None:
    server = HTTP1Connection()
    events = feed(server, b"GET / HTTP/1.1\r\nHo", eof=True)
    assert [(type(e), e.stream_id) for e in events] == [(BadRequest, None)]  # type: ignore[attr-defined]
    assert server.closing


# ---- h2c upgrade ------------------------------------------------------------------------

# A SETTINGS payload (SETTINGS_MAX_CONCURRENT_STREAMS = 100) as a client encodes it.
SETTINGS = base64.urlsafe_b64encode(b"\x00\x03\x00\x00\x00\x64").rstrip(b"=")
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def upgrade_headers(
    settings: bytes = SETTINGS, connection: str | None = "Upgrade, HTTP2-Settings"
) -> list[tuple[str, str]]:
    headers = [("Host", "example.com"), ("Upgrade", "h2c"), ("HTTP2-Settings", settings.decode())]
    if connection is not None:
        headers.append(("Connection", connection))
    return headers


def lower(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers]


def test_h2c_upgrade() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = upgrade_headers()
    events = feed(server, client_request("GET", "/up", headers) + PREFACE)
    assert events == [
        UpgradeToH2(
            request=request_event(target=b"/up", headers=lower(headers)),
            settings=SETTINGS,
            body=b"",
            trailing=PREFACE,
        )
    ]
    assert server.data_to_send() == SWITCHING
    assert server.closing  # the socket now belongs to HTTP/2
    assert feed(server, b"more bytes") == []
    assert server.data_to_send() == b""


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "body-later"])
def test_h2c_upgrade_with_a_small_body(split: bool) -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = [*upgrade_headers(), ("Content-Length", "4")]
    request = client_request("POST", "/", headers, [b"body"])
    if split:
        assert feed(server, request[:-4]) == []
        events = feed(server, request[-4:] + PREFACE[:5])
    else:
        events = feed(server, request + PREFACE[:5])
    assert events == [
        UpgradeToH2(
            request=request_event(
                method=b"POST", headers=lower(headers), end_stream=False, content_length=4
            ),
            settings=SETTINGS,
            body=b"body",
            trailing=PREFACE[:5],
        )
    ]
    assert server.data_to_send() == SWITCHING


def test_h2c_upgrade_with_a_chunked_body() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = [*upgrade_headers(), ("Transfer-Encoding", "chunked")]
    events = feed(server, client_request("POST", "/", headers, [b"ab", b"cd"]))
    assert len(events) == 1
    assert isinstance(events[0], UpgradeToH2)
    assert events[0].body == b"abcd"
    assert events[0].trailing == b""
    assert server.data_to_send() == SWITCHING


def test_h2c_upgrade_settings_value_is_passed_on() -> None:
    # base64url of a SETTINGS payload never needs padding (6-byte entries), so
    # the value comes through unchanged...
    assert len(SETTINGS) % 4 == 0
    # ...and an empty SETTINGS payload is a valid (empty) value.
    server = HTTP1Connection(allow_h2c_upgrade=True)
    events = feed(server, client_request("GET", "/", upgrade_headers(settings=b"")))
    assert [(type(e), e.settings) for e in events] == [(UpgradeToH2, b"")]  # type: ignore[attr-defined]


def assert_served_as_http11(
    server: HTTP1Connection, events: list[object], headers: list[tuple[str, str]]
) -> None:
    """The upgrade was ignored: an ordinary request, answerable over HTTP/1.1."""
    assert events == [request_event(headers=lower(headers))]
    assert server.data_to_send() == b""
    assert respond(server, 1, b"ok") == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert not server.closing
    assert feed(server, get("/next")) == [request_event(2, target=b"/next")]


def test_h2c_upgrade_ignored_when_not_allowed() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=False)
    headers = upgrade_headers()
    assert_served_as_http11(server, feed(server, client_request("GET", "/", headers)), headers)


@pytest.mark.parametrize(
    "settings",
    [
        b"A",  # no base64 string has this length
        b"AAAA",  # decodes to 3 bytes: not whole 6-byte settings
        b"!!!!",
        b"AAMA*AABk",
    ],
    ids=["impossible-length", "not-whole-settings", "not-base64url", "stray-character"],
)
def test_h2c_upgrade_ignored_when_settings_are_not_valid_base64url(settings: bytes) -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = upgrade_headers(settings=settings)
    assert_served_as_http11(server, feed(server, client_request("GET", "/", headers)), headers)


def test_h2c_upgrade_ignored_without_connection_upgrade() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = upgrade_headers(connection=None)
    assert_served_as_http11(server, feed(server, client_request("GET", "/", headers)), headers)


def test_h2c_upgrade_ignored_on_http10() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    request = (
        b"GET / HTTP/1.0\r\nUpgrade: h2c\r\nHTTP2-Settings: " + SETTINGS + b"\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\n\r\n"
    )
    headers = [(b"upgrade", b"h2c"), (b"http2-settings", SETTINGS)]
    headers.append((b"connection", b"Upgrade, HTTP2-Settings"))
    events = feed(server, request)
    assert events == [request_event(headers=headers, http_version="1.0")]
    assert server.data_to_send() == b""


def test_h2c_upgrade_ignored_without_http2_settings() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = [("Host", "example.com"), ("Upgrade", "h2c"), ("Connection", "Upgrade")]
    assert_served_as_http11(server, feed(server, client_request("GET", "/", headers)), headers)


def test_h2c_upgrade_with_a_large_body_is_served_over_http11() -> None:
    server = HTTP1Connection(allow_h2c_upgrade=True)
    headers = [*upgrade_headers(), ("Transfer-Encoding", "chunked")]
    piece = b"x" * (MAX_UPGRADE_BODY // 2 + 1)
    events = feed(server, client_request("POST", "/", headers, [piece, piece]))
    assert events == [
        request_event(method=b"POST", headers=lower(headers), end_stream=False),
        BodyReceived(1, piece),
        BodyReceived(1, piece),
        BodyEnded(1),
    ]
    assert server.data_to_send() == b""
    assert respond(server, 1) == OK_EMPTY
    assert not server.closing


# ---- responses held to their own framing (trioserve.responses) ---------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (101, b"Switching Protocols"),
        (100, b"Continue"),
        (99, b""),
        (600, b""),
        (200, b"OK\r\nX-Injected: 1"),
        (200, b"OK\nX-Injected: 1"),
        (200, b"OK\x00"),
    ],
    ids=["101", "100", "99", "600", "crlf-in-reason", "lf-in-reason", "nul-in-reason"],
)
def test_response_status_that_breaks_the_rules_queues_nothing(status: int, reason: bytes) -> None:
    server = HTTP1Connection()
    feed(server, get("/") + get("/next"))
    with pytest.raises(InvalidResponse):
        server.send_response(1, status, [(b"Content-Length", b"0")], reason=reason)
    assert server.data_to_send() == b""
    server.reset_stream(1)  # what stream.py does with an InvalidResponse
    assert server.closing


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"5"), (b"Content-Length", b"5")],
        [(b"Content-Length", b"5, 5")],
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"gzip")],
    ],
    ids=["two-lengths", "same-length-twice", "list", "length-and-chunked", "gzip"],
)
def test_response_framing_headers_that_break_the_rules_queue_nothing(
    headers: list[tuple[bytes, bytes]],
) -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    with pytest.raises(InvalidResponse):
        server.send_response(1, 200, headers)
    assert server.data_to_send() == b""


def test_body_past_its_content_length_is_not_queued() -> None:
    server = HTTP1Connection()
    feed(server, get("/") + get("/next"))
    server.send_response(1, 200, [(b"Content-Length", b"5")])
    server.send_body(1, b"hel")
    with pytest.raises(InvalidResponse, match="longer than its Content-Length of 5"):
        server.send_body(1, b"lo, world")
    server.reset_stream(1)
    # Nothing of the chunk that would pass the length; then the connection closes.
    assert server.data_to_send() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"
    assert server.closing
    assert feed(server) == []


def test_file_past_its_content_length_is_not_queued() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 200, [(b"Content-Length", b"5")])
    segment = FileSegment(fd=-1, offset=0, length=6)  # never opened: refused by its length
    with pytest.raises(InvalidResponse, match="longer than its Content-Length of 5"):
        server.send_file(1, segment)
    assert server.data_to_send() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert server.file_to_send() is None


def test_body_short_of_its_content_length_never_ends_cleanly() -> None:
    server = HTTP1Connection()
    feed(server, get("/") + get("/next"))
    server.send_response(1, 200, [(b"Content-Length", b"100")])
    server.send_body(1, b"12345")
    with pytest.raises(InvalidResponse, match="ended after 5 of the 100 bytes"):
        server.end_stream(1)
    server.reset_stream(1)
    data = server.data_to_send()
    assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12345"
    # A real client sees a response that has not ended; the connection then closes.
    events = parse_response(data)
    assert [type(event) for event in events] == [h11.Response, h11.Data]
    assert server.closing


@pytest.mark.parametrize(
    ("status", "headers", "head"),
    [
        (204, [], b"HTTP/1.1 204 No Content\r\n\r\n"),
        (
            304,
            [(b"Content-Length", b"5")],
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        ),
    ],
)
def test_no_body_statuses_drop_body_bytes_and_keep_the_connection(
    status: int, headers: list[tuple[bytes, bytes]], head: bytes
) -> None:
    """As for HEAD: no body bytes go out, none are counted against a Content-Length
    (a 304's describes the full representation), and the connection is reused."""
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, status, headers)
    server.send_body(1, b"hello")
    server.end_stream(1)
    assert server.data_to_send() == head
    assert not server.closing
    assert feed(server, get("/next")) == [request_event(2, target=b"/next")]


def test_head_response_may_declare_the_length_a_get_would_have_had() -> None:
    server = HTTP1Connection()
    feed(server, client_request("HEAD", "/"))
    server.send_response(1, 200, [(b"Content-Length", b"1000")])
    server.end_stream(1)  # no body at all: not short, since HEAD has none
    assert server.data_to_send() == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    assert not server.closing


# ---- responses the driver asks for -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "detail", "body"),
    [
        ("GET", "busy", b"503 Service Unavailable: busy\n"),
        ("GET", "", b"503 Service Unavailable\n"),
        ("HEAD", "busy", b""),
    ],
    ids=["with-detail", "no-detail", "head"],
)
def test_send_error_response_keeps_a_healthy_connection(
    method: str, detail: str, body: bytes
) -> None:
    server = HTTP1Connection()
    feed(server, client_request(method, "/") + get("/next"))
    server.send_error_response(1, 503, detail)
    length = len(b"503 Service Unavailable: busy\n" if method == "HEAD" else body)
    assert server.data_to_send() == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n" % length + body
    )
    assert not server.closing
    assert feed(server) == [request_event(2, target=b"/next")]


def test_send_error_response_after_a_protocol_error_closes() -> None:
    server = HTTP1Connection(max_body_size=4)
    assert feed(server, CHUNKED_POST) == [CHUNKED_REQUEST]
    events = feed(server, b"5\r\n12345\r\n0\r\n\r\n" + get("/next"))
    assert events == [BadRequest(413, "chunk size beyond the request body limit", stream_id=1)]
    server.send_error_response(1, 413, "too big")
    assert server.data_to_send() == error_response(413, "too big")
    assert server.closing
    assert feed(server) == []


def test_reset_stream_closes_the_connection() -> None:
    server = HTTP1Connection()
    feed(server, get("/") + get("/next"))
    server.send_response(1, 200, [(b"Content-Length", b"10")])
    server.send_body(1, b"01234")
    server.reset_stream(1)
    assert server.closing
    # What was queued still goes out; then the connection closes mid-body.
    assert server.data_to_send() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
    assert feed(server) == []
    assert server.data_to_send() == b""


def test_output_size_tracks_queued_bytes() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 200, [(b"Content-Length", b"5")])
    server.send_body(1, b"hello")
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert server.output_size == len(expected)
    assert server.stream_output_size(1) == len(expected)
    assert server.data_to_send() == expected
    assert server.output_size == 0


@pytest.mark.parametrize(
    ("target", "path", "authority"),
    [
        (b"http://example.com/a/b?c=d", b"/a/b?c=d", b"example.com"),
        (b"HTTPS://example.com:8443", b"/", b"example.com:8443"),
        (b"http://example.com?q=1", b"/?q=1", b"example.com"),
    ],
)
def test_absolute_form_target_gives_the_path_and_replaces_host(
    target: bytes, path: bytes, authority: bytes
) -> None:
    """RFC 9112 §3.2.2: the app sees the path; the target's host wins over Host."""
    server = HTTP1Connection()
    events = feed(server, b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\n\r\n")
    request = events[0]
    assert isinstance(request, RequestReceived)
    assert (request.target, request.authority) == (path, authority)


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"!", 400),
        (b"GET", b"*", 400),  # asterisk-form is for OPTIONS only
        (b"GET", b"example.com/a", 400),
        (b"GET", b"ftp://example.com/a", 400),
        (b"GET", b"http:///a", 400),  # no host
        (b"GET", b"http://user@example.com/", 400),  # userinfo: deprecated, and a spoofing aid
        (b"CONNECT", b"example.com:443", 501),
    ],
)
def test_request_target_without_a_path_is_refused(
    method: bytes, target: bytes, status: int
) -> None:
    server = HTTP1Connection()
    events = feed(server, method + b" " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert [(type(e), getattr(e, "status", None)) for e in events] == [(BadRequest, status)]
    assert server.data_to_send().startswith(b"HTTP/1.1 %d " % status)
    assert server.closing


def test_options_asterisk_is_accepted() -> None:
    server = HTTP1Connection()
    events = feed(server, b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert isinstance(events[0], RequestReceived)
    assert events[0].target == b"*"


def test_data_to_send_hands_over_at_most_max_write_at_a_time() -> None:
    """A client that stops reading holds what the sender has taken (one write's worth)
    plus the queue, not the whole response: writes are cut at MAX_WRITE, in order."""
    server = HTTP1Connection()
    feed(server, get("/"))
    body = bytes(range(256)) * (5 * 1024)  # 1.25 MiB in one chunk
    server.send_response(1, 200, [(b"Content-Length", str(len(body)).encode())])
    server.send_body(1, b"")
    server.send_body(1, body[:1000])
    server.send_body(1, body[1000:])
    server.end_stream(1)
    pieces = []
    while data := server.data_to_send():
        pieces.append(data)
        assert len(data) <= MAX_WRITE
    assert len(pieces) > 1
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"".join(pieces))
    assert isinstance(client.next_event(), h11.Response)
    received = b""
    while isinstance(event := client.next_event(), h11.Data):
        received += event.data
    assert received == body
    assert isinstance(event, h11.EndOfMessage)
    assert server.output_size == 0


def test_buffers_to_send_hands_over_the_app_s_own_chunks_uncopied_and_in_order() -> None:
    """A streamed response goes to the socket as the app's chunks themselves (a
    gathering write), at most MAX_WRITE bytes in at most MAX_BUFFERS pieces a
    time; a chunk cut at MAX_WRITE is a view of it, not a copy."""
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 200, [])  # no Content-Length: chunked
    big = bytes(range(256)) * (MAX_WRITE * 3 // 4 // 256)  # two of them exceed one write
    small = [bytes([65 + n % 26]) * 10 for n in range(MAX_BUFFERS)]
    chunks = [big, big, *small]
    for chunk in chunks:
        server.send_body(1, chunk)
    server.end_stream(1)
    takes = []
    while parts := server.buffers_to_send():
        assert sum(map(len, parts)) <= MAX_WRITE
        assert len(parts) <= MAX_BUFFERS
        takes.append(parts)
    assert server.output_size == 0
    first = takes[0]
    assert any(part is big for part in first)
    assert isinstance(first[-1], memoryview)  # the second big chunk, cut at MAX_WRITE
    assert first[-1].obj is big
    assert sum(map(len, first)) == MAX_WRITE
    assert any(part is small[0] for part in takes[1])
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"".join(b"".join(parts) for parts in takes))
    assert isinstance(client.next_event(), h11.Response)
    received = b""
    while isinstance(event := client.next_event(), h11.Data):
        received += event.data
    assert received == b"".join(chunks)
    assert isinstance(event, h11.EndOfMessage)


def test_buffers_to_send_stops_at_a_queued_file() -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    server.send_response(1, 200, [(b"Content-Length", b"9")])
    server.send_body(1, b"abc")
    server.send_file(1, FileSegment(fd=-1, offset=0, length=6))
    parts = server.buffers_to_send()
    assert parts[-1] == b"abc"
    assert server.buffers_to_send() == []  # the file is next: file_to_send's
    assert server.file_to_send() is not None


def whole(server: HTTP1Connection, headers: list[tuple[bytes, bytes]], body: list[bytes]) -> bytes:
    """send_whole_response on a fresh GET; the bytes it queued, in one list."""
    feed(server, get("/"))
    server.send_whole_response(1, 200, headers, body)
    return server.buffers_to_send()


def test_send_whole_response_queues_head_and_a_small_body_as_one_piece() -> None:
    """One write for the whole response, and the connection is ready for the next request."""
    server = HTTP1Connection()
    parts = whole(server, [(b"Content-Length", b"5")], [b"hel", b"lo"])
    assert parts == [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"]
    assert feed(server, get("/next"))[0].target == b"/next"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([(b"Content-Length", str(COALESCE_LIMIT + 1).encode())], [b"x" * (COALESCE_LIMIT + 1)]),
        ([], [b"hel", b"lo"]),  # no Content-Length: chunked, chunk by chunk
    ],
    ids=["larger than COALESCE_LIMIT", "chunked"],
)
def test_send_whole_response_otherwise_sends_what_the_three_calls_would(
    headers: list[tuple[bytes, bytes]], body: list[bytes]
) -> None:
    three = HTTP1Connection()
    feed(three, get("/"))
    three.send_response(1, 200, list(headers))
    for chunk in body:
        three.send_body(1, chunk)
    three.end_stream(1)
    expected = three.buffers_to_send()
    parts = whole(HTTP1Connection(), list(headers), body)
    assert parts == expected
    assert len(parts) > 1
    assert any(part is body[0] for part in parts)  # the app's chunk itself, not a copy


@pytest.mark.parametrize(
    ("declared", "error", "sent"),
    [(b"6", "ended after 5 of the 6 bytes", b"hello"), (b"4", "longer than", b"")],
    ids=["too short", "too long"],
)
def test_send_whole_response_refuses_a_body_that_is_not_its_content_length(
    declared: bytes, error: str, sent: bytes
) -> None:
    """As send_body and end_stream would: InvalidResponse, and nothing past the
    declared length queued."""
    server = HTTP1Connection()
    feed(server, get("/"))
    with pytest.raises(InvalidResponse, match=error):
        server.send_whole_response(1, 200, [(b"Content-Length", declared)], [b"hello"])
    head = b"HTTP/1.1 200 OK\r\nContent-Length: " + declared + b"\r\n\r\n"
    assert b"".join(server.buffers_to_send()) == head + sent


def test_send_whole_response_to_head_sends_the_head_alone() -> None:
    server = HTTP1Connection()
    feed(server, client_request("HEAD", "/"))
    server.send_whole_response(1, 200, [(b"Content-Length", b"5")], [b"hello"])
    assert server.buffers_to_send() == [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]


@pytest.mark.parametrize("traits", [UNCHECKED, ASKS_CLOSE], ids=["looked up", "given"])
def test_an_app_s_connection_close_ends_the_connection_whether_traits_are_given(
    traits: int,
) -> None:
    server = HTTP1Connection()
    feed(server, get("/"))
    headers = [(b"Content-Length", b"0"), (b"Connection", b"close")]
    server.send_whole_response(1, 200, headers, [], traits=traits)
    assert server.buffers_to_send() == [b"HTTP/1.1 200 OK\r\n" + _fields_of(headers)]
    assert server.closing


def _fields_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def test_the_run_reads_heads_with_the_parser_it_was_asked_for(http1_parser: str) -> None:
    """nox runs the suite once with httptools and once with h11 (--http1-parser): this
    shows which one the run's servers really use."""
    expected = {"auto": "httptools", "h11": "h11", "httptools": "httptools"}[http1_parser]
    assert HTTP1Connection().parser_name == expected
    assert HTTP1Connection(parser="h11").parser_name == "h11"
