"""One connection's behaviour, in memory: HTTP/1.1 framing, bad input, disconnects, timeouts.

The raw tests write request bytes straight into the in-memory socket
(``client.stream``) and parse what comes back with an h11 client, so framing
is checked exactly as a real client would see it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from wsgiref.validate import validator

import h11
import pytest
import trio
import trio.testing

from tests import apps
from trioserve.testing import AppProbe, TestClient, open_test_client


async def read_until_closed(client: TestClient) -> bytes:
    data = b""
    while chunk := await client.stream.receive_some():
        data += chunk
    return data


def parse_responses(
    data: bytes, methods: list[bytes] | None = None
) -> list[tuple[h11.Response, bytes]]:
    """Parse a byte stream of HTTP/1.1 responses with an h11 client."""
    conn = h11.Connection(h11.CLIENT)
    results: list[tuple[h11.Response, bytes]] = []
    conn.receive_data(data)
    conn.receive_data(b"")
    for method in methods or [b"GET"] * 10:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                results.append((response, body))
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return results
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return results
        conn.start_next_cycle()
    return results


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


def path_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# ---- keep-alive, pipelining, framing ---------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with open_test_client(validator(path_app)) as client:
        for i in range(5):
            response = await client.get(f"/{i}")
            assert response.body == f"/{i}".encode()
            assert response.header("Connection") is None
        assert not client.closed.is_set()


async def test_pipelined_requests_are_answered_in_order() -> None:
    """Request 1 is the slowest, yet its response must come first."""
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/1":
            trio.from_thread.run(release.wait, trio_token=token)
        return path_app(environ, start_response)

    async with open_test_client(validator(app)) as client:
        await client.stream.send_all(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        data = await read_until_closed(client)
    bodies = [body for _, body in parse_responses(data)]
    assert bodies == [b"/1", b"/2", b"/3"]


async def test_chunked_request_and_chunked_response() -> None:
    async with open_test_client(apps.echo) as client:
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
        )
        await client.stream.send_all(
            b"GET /?n=3&size=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await read_until_closed(client)
    ((first, body1),) = parse_responses(data)[:1]
    assert body1 == b"hello world"
    # The second request went to apps.echo too (a GET with no body): empty echo.
    assert first.status_code == 200


async def test_generator_without_length_is_sent_chunked() -> None:
    async with open_test_client(apps.stream) as client:
        await client.stream.send_all(
            b"GET /?n=3&size=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await read_until_closed(client)
    assert b"Transfer-Encoding: chunked\r\n" in data
    assert data.endswith(b"4\r\nAAAA\r\n4\r\nBBBB\r\n4\r\nCCCC\r\n0\r\n\r\n")


@pytest.mark.parametrize("app_sets_length", [True, False])
async def test_head_has_headers_and_content_length_but_no_body(app_sets_length: bool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = b"x" * 123
        headers = [("Content-Type", "text/plain")]
        if app_sets_length:
            headers.append(("Content-Length", "123"))
        start_response("200 OK", headers)
        return [body]

    async with open_test_client(app) as client:
        await client.stream.send_all(
            b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = await read_until_closed(client)
    (head, head_body), (_get, get_body) = parse_responses(data, [b"HEAD", b"GET"])
    assert header(head, b"content-length") == b"123"
    assert head_body == b""
    assert get_body == b"x" * 123  # framing intact: the GET after the HEAD parses


async def test_http10_gets_its_answer_then_the_connection_closes() -> None:
    async with open_test_client(apps.stream) as client:
        await client.stream.send_all(b"GET /?n=2&size=3 HTTP/1.0\r\n\r\n")
        data = await read_until_closed(client)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"chunked" not in head.lower()  # HTTP/1.0 knows no chunked: body delimited by close
    assert b"connection: close" in head.lower()
    assert body == b"AAABBB"


async def test_http10_keep_alive_request_is_still_closed() -> None:
    """h11 implements no HTTP/1.0 keep-alive, so even when asked we close (documented)."""
    async with open_test_client(apps.hello) as client:
        await client.stream.send_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = await read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"Hello, world!\n")


async def test_connection_close_from_the_client() -> None:
    async with open_test_client(apps.hello) as client:
        await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await read_until_closed(client)
    ((response, body),) = parse_responses(data)
    assert header(response, b"connection") == b"close"
    assert body == b"Hello, world!\n"


async def test_date_and_server_headers() -> None:
    async with open_test_client(apps.hello) as client:
        response = await client.get("/")
    assert response.header("Server") == "trioserve"
    assert (
        response.header(
            "Date",
        )
        is not None
    )
    assert response.header("Date").endswith(" GMT")  # type: ignore[union-attr]


# ---- Expect: 100-continue -----------------------------------------------------------


async def test_100_continue_sent_when_the_app_reads_the_body() -> None:
    async with open_test_client(apps.echo) as client:
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        received = await client.stream.receive_some()
        assert received == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.stream.send_all(b"ping")
        received = b""
        while not received.endswith(b"ping"):
            received += await client.stream.receive_some()
    assert received.startswith(b"HTTP/1.1 200 ")


async def test_no_100_continue_when_the_app_answers_without_reading() -> None:
    async with open_test_client(apps.hello) as client:
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        data = await read_until_closed(client)
    assert b"100 Continue" not in data
    assert data.startswith(b"HTTP/1.1 200 ")
    # The client was never told to send its body, so the connection cannot be reused.
    assert b"connection: close" in data.lower()


# ---- bad input ----------------------------------------------------------------


BAD_REQUESTS = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, id="bad-header-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n",
        431,
        id="headers-too-large",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="target-too-long"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
        + b"\r\n",
        431,
        id="too-many-headers",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n",
        413,
        id="content-length-too-large",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        id="unsupported-transfer-encoding",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
        id="conflicting-content-lengths",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        400,
        id="chunk-size-over-16-hex-digits",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n",
        413,
        id="chunk-size-over-the-body-limit",
    ),
    pytest.param(b"INVALID CONNECTION PREFACE\r\n\r\n", 400, id="not-http"),
]


@pytest.mark.parametrize(("request_bytes", "status"), BAD_REQUESTS)
async def test_bad_requests_get_the_right_status_and_close(
    request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    probe = AppProbe(apps.hello)
    with caplog.at_level(logging.INFO, logger="trioserve"):
        async with open_test_client(probe, max_request_body_size=1000) as client:
            # A valid request pipelined after the bad one must never be answered.
            await client.stream.send_all(request_bytes + b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert data.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in data.lower()
    assert b"Traceback" not in data
    assert probe.records == []  # the app never ran
    lines = [r for r in caplog.records if r.name.startswith("trioserve")]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith(str(status))
    # The body and the log line say what was wrong in words: no reprs of the bytes.
    body = data.partition(b"\r\n\r\n")[2].decode()
    reason = lines[0].getMessage().removeprefix(f"{status} ").rpartition(" from ")[0]
    assert body.endswith(f": {reason}\n"), (body, lines[0].getMessage())
    for text in (body, lines[0].getMessage()):
        assert "bytearray" not in text
        assert "b'" not in text
        assert 'b"' not in text


async def test_request_line_too_long_before_its_end_arrives() -> None:
    """414 as soon as the line exceeds the limit, without waiting for its newline."""
    async with open_test_client(apps.hello) as client:
        await client.stream.send_all(b"GET /" + b"a" * 9000)
        data = await read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 414 ")


async def test_chunked_body_over_the_limit_is_413_and_the_app_is_cancelled() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        while environ["wsgi.input"].read(100):
            pass
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read it all"]

    probe = AppProbe(app)
    async with open_test_client(probe, max_request_body_size=1000) as client:
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        # The app must be running before the limit is crossed: a request
        # refused before its thread starts never reaches the app at all.
        await probe.wait_started()
        for _ in range(20):
            await client.stream.send_all(b"64\r\n" + b"x" * 100 + b"\r\n")
        data = await read_until_closed(client)
        record = await probe.wait_finished()
    assert data.startswith(b"HTTP/1.1 413 ")
    assert record.cancelled
    assert len(record.body_read) <= 1000


@pytest.mark.parametrize(
    ("size", "status"),
    [(b"ffffffffffffffffff", 400), (b"10000000000000005", 400), (b"fffffffff", 413)],
    ids=["18-digits", "2^64+5", "64-GiB"],
)
async def test_chunk_size_refused_while_the_app_reads_comes_at_once(
    size: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A chunk size h11 would accept is refused as soon as it arrives: the app's
    read is cancelled and the client gets 400/413 and a close, not a wait for
    data that may never come (the autojump clock would turn such a wait into
    the body timeout's 408)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        while environ["wsgi.input"].read(100):
            pass
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read it all"]

    probe = AppProbe(validator(app))
    async with open_test_client(probe) as client:  # default body limit: 1 GiB
        await client.stream.send_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await probe.wait_started()
        await client.stream.send_all(size + b"\r\n")  # no data follows
        data = await read_until_closed(client)
        record = await probe.wait_finished()
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"connection: close" in data.lower()
    assert record.cancelled


async def test_one_bad_connection_does_not_hurt_another() -> None:
    async with open_test_client(apps.hello) as good, open_test_client(apps.hello) as bad:
        await bad.stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert (await read_until_closed(bad)).startswith(b"HTTP/1.1 400 ")
        assert (await good.get("/")).status == 200


# ---- disconnects cancel the app --------------------------------------------------


def endless(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    while True:
        yield b"x" * 4096


@pytest.mark.parametrize("abort", [True, False], ids=["reset", "close"])
async def test_disconnect_mid_response_cancels_the_app_thread(abort: bool) -> None:
    probe = AppProbe(endless)
    async with open_test_client(probe, threads=1) as client:
        stream = await client.open_stream("GET", "/")
        await stream.receive_headers()
        await stream.receive_data()
        await client.disconnect(abort=abort)
        record = await probe.wait_finished()
    assert record.cancelled
    assert record.closed
    await trio.testing.wait_all_threads_completed()
    assert trio.testing.active_thread_count() == 0
    # The limiter token came back: with threads=1 a new request is served at once.
    async with open_test_client(apps.hello, threads=1) as client:
        assert (await client.get("/")).status == 200


async def test_disconnect_mid_upload_cancels_the_reading_app() -> None:
    token = trio.lowlevel.current_trio_token()
    first_part_read = trio.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(5000)
        trio.from_thread.run_sync(first_part_read.set, trio_token=token)
        while environ["wsgi.input"].read(1024):  # blocks: the rest never comes
            pass
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    probe = AppProbe(app)
    async with open_test_client(probe) as client:
        stream = await client.open_stream(
            "POST", "/", headers=[("Content-Length", "100000")], end=False
        )
        await stream.send(b"x" * 5000)
        record = await probe.wait_started()
        await first_part_read.wait()
        await client.disconnect()
        await probe.wait_finished()
    assert record.cancelled
    assert record.exception is not None
    assert isinstance(record.exception, trio.Cancelled)
    assert len(record.body_read) == 5000


async def test_long_computation_can_poll_for_a_gone_client() -> None:
    token = trio.lowlevel.current_trio_token()
    polling = trio.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        check = environ["trioserve.check_cancelled"]
        trio.from_thread.run_sync(polling.set, trio_token=token)
        while True:  # "CPU work" that polls between steps
            check()

    probe = AppProbe(app)
    async with open_test_client(probe) as client:
        await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await polling.wait()
        await client.disconnect(abort=True)
        record = await probe.wait_finished()
    assert record.cancelled


async def test_client_half_close_still_gets_its_response() -> None:
    """A FIN after a complete request is not a disconnect (RFC 9112 §9.6)."""
    async with open_test_client(apps.hello) as client:
        await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.stream.send_eof()
        data = await read_until_closed(client)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"Hello, world!\n")


# ---- timeouts ------------------------------------------------------------------------


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_test_client(apps.hello, keep_alive_timeout=5) as client:
        assert (await client.get("/")).status == 200
        start = trio.current_time()
        assert await client.stream.receive_some() == b""
        assert 5 <= trio.current_time() - start < 6


async def test_a_new_connection_that_sends_nothing_is_closed_after_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One keep-alive period in all, though the server first waits to tell an HTTP/2
    preface from HTTP/1.1 (it used to idle a second period after that wait)."""
    async with open_test_client(apps.hello, keep_alive_timeout=5) as client:
        start = trio.current_time()
        assert await client.stream.receive_some() == b""
        assert 5 <= trio.current_time() - start < 6


async def test_a_request_sent_just_before_keep_alive_timeout_is_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(apps.hello, keep_alive_timeout=5) as client:
        await trio.sleep(4.9)
        assert (await client.get("/")).status == 200


async def test_connection_with_a_live_request_is_not_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = trio.lowlevel.current_trio_token()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trio.from_thread.run(trio.sleep, 60, trio_token=token)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow but fine"]

    async with open_test_client(validator(slow), keep_alive_timeout=5) as client:
        response = await client.get("/")
    assert response.body == b"slow but fine"


async def test_gathering_writes_deliver_every_piece_in_order_through_a_slow_reader() -> None:
    """_SocketIO.write_some then send_rest, as the sender calls them (os.writev):
    partial writes cut pieces anywhere, and more pieces than one call may take
    (IOV_MAX) go out in later calls."""
    from trioserve.connection import _IOV_MAX, _SocketIO

    left, right = trio.socket.socketpair()
    with left, right:
        left.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
        right.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        sizes = [1, 7, 3000, 0, 65536, 5] * (_IOV_MAX // 3)  # more pieces than IOV_MAX
        parts: list[bytes | memoryview] = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
        parts[3] = memoryview(b"view:" + bytes(5000))[5:]  # a view among the pieces
        expected = b"".join(parts)
        received = bytearray()

        async def read_slowly() -> None:
            while len(received) < len(expected):
                data = await right.recv(1500)
                assert data
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            with trio.CancelScope() as scope:
                io = _SocketIO(left.fileno())
                pending = list(parts)
                if not io.write_some(pending):
                    await io.send_rest(pending, scope, 30)
            assert not scope.cancelled_caught
        assert received == expected


async def test_writes_to_other_streams_join_pieces_at_most_write_chunk_at_a_time() -> None:
    """_StreamIO.send_rest (TLS, in-memory): small pieces are joined, large ones
    cut, so no single write (nor copy) is larger than WRITE_CHUNK; order is kept."""
    from trioserve.connection import WRITE_CHUNK, _StreamIO

    writes: list[int] = []
    received = bytearray()
    stream = trio.testing.MemorySendStream()

    async def collect() -> None:
        data = stream.get_data_nowait()
        writes.append(len(data))
        received.extend(data)

    stream.send_all_hook = collect
    parts: list[bytes | memoryview] = [b"a" * 10] * 100
    parts += [b"b" * (WRITE_CHUNK + 1000), memoryview(b"c" * 5000), b"d" * (WRITE_CHUNK - 1)]
    with trio.CancelScope() as scope:
        io = _StreamIO(stream)
        pending = list(parts)
        assert not io.write_some(pending)  # a trio stream is only written by awaiting
        assert pending == parts
        await io.send_rest(pending, scope, 30)
    assert received == b"".join(parts)
    assert max(writes) <= WRITE_CHUNK
    assert writes[0] == 1000  # the small pieces, joined into one write
    assert len(writes) == 5  # 1000 B; the big piece in two; c + d would pass WRITE_CHUNK


@pytest.mark.parametrize(
    ("framing", "payload"),
    [
        ("HTTP/2 DATA frames", [b"\x00" * 9, b"x" * 16384]),  # a frame header, then its data
        ("HTTP/1.1 chunks", [b"10000\r\n", b"x" * 65536, b"\r\n"]),
    ],
)
async def test_tls_writes_take_128_kib_of_payload_with_its_framing(
    framing: str, payload: list[bytes]
) -> None:
    """A piece holds 128 KiB of payload and the framing around it: eight full
    DATA frames, or two 64 KiB chunks, not one unit fewer (a third more pieces,
    each a call into the TLS layer)."""
    from trioserve.connection import _StreamIO

    writes: list[int] = []
    stream = trio.testing.MemorySendStream()

    async def collect() -> None:
        writes.append(len(stream.get_data_nowait()))

    stream.send_all_hook = collect
    unit = sum(map(len, payload))
    units = 8 if len(payload) == 2 else 2  # 128 KiB of payload
    parts: list[bytes | memoryview] = list(payload) * (units * 4)
    with trio.CancelScope() as scope:
        await _StreamIO(stream).send_rest(parts, scope, 30)
    assert sum(writes) == unit * units * 4
    assert len(writes) == 4, framing  # (a piece may take the next unit's header along)


async def test_a_task_running_streams_in_turn_opens_a_fresh_scope_after_a_cancel() -> None:
    """HTTP/1.1's request task and HTTP/2's parked stream tasks lend one cancel
    scope to stream after stream (``_run_in_turn``). A stream cancelled after its
    last checkpoint returns normally and leaves the scope cancelled: the next
    stream must still run in an uncancelled one."""
    from trioserve.connection import Connection

    seen: list[tuple[trio.CancelScope, bool]] = []

    class Stream:
        def __init__(self, cancel_late: bool) -> None:
            self.cancel_late = cancel_late
            self.cancel_reason: str | None = None

        async def run(self, scope: trio.CancelScope) -> None:
            seen.append((scope, scope.cancel_called))
            await trio.lowlevel.checkpoint()
            if self.cancel_late:
                # As RequestStream.cancel would, after the last await: a reason, then the scope.
                self.cancel_reason = "late"
                scope.cancel()

    # The next stream is already there when one returns (a pipelined request):
    # no wait of the task's own would notice the cancelled scope.
    queue = [Stream(False), Stream(False)]

    async def next_stream() -> Stream | None:
        return queue.pop(0) if queue else None

    with trio.fail_after(10):
        await Connection._run_in_turn(None, Stream(True), next_stream)  # type: ignore[arg-type]
    assert [cancelled for _, cancelled in seen] == [False, False, False]
    first, second, third = (scope for scope, _ in seen)
    assert second is not first  # a new scope after the cancel ...
    assert third is second  # ... and reused while nothing cancels it


def _bytes_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes] | list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/fails":
        raise RuntimeError("the app fails: trioserve answers 500 itself")
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    start_response("200 OK", [("Content-Type", "text/plain")])
    if path == "/streamed":
        return iter([b"abc", b"defg"])  # pushed chunk by chunk from the app thread
    return [b"abc", b"defg"]  # the whole response at once


@pytest.mark.parametrize("validated", [True, False], ids=["validator", "bare-list"])
@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_the_access_log_counts_the_body_bytes_the_client_gets(
    http2: bool, validated: bool
) -> None:
    """%b / bytes_sent: the body the client receives, the app's or trioserve's own
    error page; none for HEAD (however much the app produced) nor for a 204. Bare, a
    list response takes the whole-response path (the validator's wrapper is no list)."""
    from trioserve.responses import error_body
    from trioserve.testing import open_test_server

    logged: list[tuple[bytes, str, int, int]] = []
    async with open_test_server(validator(_bytes_app) if validated else _bytes_app) as server:
        server.context.access_log = lambda r: logged.append(
            (r.request.method, r.request.target.decode(), r.status, r.bytes_sent)
        )
        async with server.connect(http2=http2) as client:
            for method in ("GET", "HEAD"):
                for path in ("/whole", "/streamed", "/empty", "/fails"):
                    stream = await client.open_stream(method, path)
                    response = await stream.read_response()
                    received = len(response.body)
                    assert (response.status, received) == (
                        {"/empty": 204, "/fails": 500}.get(path, 200),
                        0 if method == "HEAD" or path == "/empty" else received,
                    )
    error_page = len(error_body(500))
    assert logged == [
        (b"GET", "/whole", 200, 7),
        (b"GET", "/streamed", 200, 7),
        (b"GET", "/empty", 204, 0),
        (b"GET", "/fails", 500, error_page),
        (b"HEAD", "/whole", 200, 0),
        (b"HEAD", "/streamed", 200, 0),
        (b"HEAD", "/empty", 204, 0),
        (b"HEAD", "/fails", 500, 0),
    ]


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(7, 5), (12, 10)],  # too long: the chunk past 7 is refused; too short: all 10 went
    ids=["too-long", "too-short"],
)
@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_a_whole_response_breaking_its_content_length_logs_what_went_out(
    http2: bool, declared: int, sent: int
) -> None:
    """A list response (the whole-response path) whose body breaks its
    Content-Length is cut short, and %b says how much of its body the client
    got. Bare: wsgiref's validator would stop the app before trioserve does."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", str(declared))])
        return [b"abcde", b"fghij"]

    from trioserve.testing import open_test_server

    logged: list[tuple[int, int]] = []
    async with open_test_server(app) as server:
        server.context.access_log = lambda r: logged.append((r.status, r.bytes_sent))
        async with server.connect(http2=http2) as client:
            stream = await client.open_stream("GET", "/")
            response = await stream.read_response()
    assert (response.status != 0, response.complete) == (not http2, False)
    # HTTP/1.1 sends what was queued, then closes; an HTTP/2 RST_STREAM drops
    # the stream's output that was not framed yet (here: all of it).
    assert response.body == (b"" if http2 else b"abcdefghij"[:sent])
    assert logged == [(200, len(response.body))]
