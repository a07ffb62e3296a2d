"""The lingering close: when the server closes first, the client still reads what it was sent.

A socket closed with unread input makes the kernel answer the peer's next
bytes with RST, and a peer that gets RST may lose response bytes it has not
read yet. So whenever trioserve closes first it sends FIN (over TLS:
close_notify, then FIN), then reads and discards the client's input for a
bounded time and amount (``CLOSE_TIMEOUT``, ``LINGER_BYTES``) before closing.

Every test here is a client that writes *after* the server's last bytes
(waiting until the server has done all it can first: every task blocked),
and only then reads. Over loopback an RST comes back at once, so without the
lingering close each of these fails every time (the read raises
``BrokenResourceError``, ECONNRESET); with it, the client reads the whole
answer and a clean end. Real sockets, cleartext and TLS, both protocols.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing

import trioserve.connection
from tests import apps
from tests.test_http2 import raw_frame
from trioserve import Server, serve_wsgi
from trioserve.http2 import PREFACE

TIMEOUT = 20
PING = raw_frame(0x6, 0, 0, b"12345678")
GOAWAY_UNKNOWN_CODE = raw_frame(0x7, 0, 0, (0).to_bytes(4, "big") + (0xFF).to_bytes(4, "big"))
# A DATA frame on stream 0 is a connection error (RFC 9113 §6.1): GOAWAY(PROTOCOL_ERROR).
BAD_FRAME = raw_frame(0x0, 0, 0, b"x")
EMPTY_SETTINGS = raw_frame(0x4, 0, 0, b"")
SETTINGS_ACK = raw_frame(0x4, 0x1, 0, b"")


@asynccontextmanager
async def serving(
    tls_files: tuple[str, str, str] | None, **options: object
) -> AsyncIterator[Server]:
    tls = {"certfile": tls_files[0], "keyfile": tls_files[1]} if tls_files else {}
    async with trio.open_nursery() as nursery:
        server = await serve_wsgi(apps.echo, nursery, bind="127.0.0.1:0", **tls, **options)
        yield server
        nursery.cancel_scope.cancel()


async def connect(
    server: Server, client_context: ssl.SSLContext | None, alpn: str = "http/1.1"
) -> trio.abc.Stream:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    if client_context is not None:
        client_context.set_alpn_protocols([alpn])
        # Like an HTTPS client: a TCP close without close_notify reads as the end (the
        # server sends one when it can; not when the client's data is still coming).
        tls = trio.SSLStream(
            stream, client_context, server_hostname="127.0.0.1", https_compatible=True
        )
        await tls.do_handshake()
        stream = tls
    return stream


async def read_to_the_end(stream: trio.abc.Stream) -> bytes:
    """Everything until the end; a reset (ECONNRESET) fails the test: that is the point."""
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


@pytest.fixture(params=["cleartext", "tls"])
def transport(
    request: pytest.FixtureRequest,
    tls_cert_files: tuple[str, str, str],
    client_ssl_context: ssl.SSLContext,
) -> tuple[tuple[str, str, str] | None, ssl.SSLContext | None]:
    if request.param == "tls":
        return tls_cert_files, client_ssl_context
    return None, None


async def test_http1_413_with_the_body_still_unread(
    transport: tuple[tuple[str, str, str] | None, ssl.SSLContext | None],
) -> None:
    """The server refuses a too-large body with 413 and closes while most of what the
    client sent is still unread in its socket (a close with unread input is a RST)."""
    tls_files, client_context = transport
    with trio.fail_after(TIMEOUT):
        async with serving(tls_files, max_request_body_size=1024) as server:
            stream = await connect(server, client_context)
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n"
            await stream.send_all(head + b"a" * 300_000)
            await trio.testing.wait_all_tasks_blocked()  # the 413 is out; the server closed
            answer = await read_to_the_end(stream)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"connection: close" in answer.lower()


async def test_http1_client_writing_after_the_servers_close(
    transport: tuple[tuple[str, str, str] | None, ssl.SSLContext | None],
) -> None:
    """The server has answered and closed (Connection: close); the client, which has
    not read yet, still writes twice (the second write would meet the first one's RST
    as EPIPE), then reads the whole response."""
    tls_files, client_context = transport
    with trio.fail_after(TIMEOUT):
        async with serving(tls_files) as server:
            stream = await connect(server, client_context)
            await stream.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                await stream.send_all(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()
            answer = await read_to_the_end(stream)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 1  # the late requests are not answered


async def test_http2_goaway_with_the_input_still_unread(
    transport: tuple[tuple[str, str, str] | None, ssl.SSLContext | None],
) -> None:
    """A connection error (DATA on stream 0) arrives followed by more frames than the
    server reads at once: GOAWAY(PROTOCOL_ERROR), then the server closes with input
    unread. The client reads the GOAWAY and a clean end."""
    tls_files, client_context = transport
    with trio.fail_after(TIMEOUT):
        async with serving(tls_files) as server:
            stream = await connect(server, client_context, alpn="h2")
            await stream.send_all(PREFACE + EMPTY_SETTINGS + SETTINGS_ACK)
            await stream.send_all(BAD_FRAME + PING * 10_000)
            await trio.testing.wait_all_tasks_blocked()
            answer = await read_to_the_end(stream)
    client = h2.connection.H2Connection()
    client.initiate_connection()
    goaways = [
        event
        for event in client.receive_data(answer)
        if isinstance(event, h2.events.ConnectionTerminated)
    ]
    assert [event.error_code for event in goaways] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]


async def test_h2spec_7_1_goaway_with_an_unknown_code_then_pings(
    transport: tuple[tuple[str, str, str] | None, ssl.SSLContext | None],
) -> None:
    """h2spec http2/7/1: after the SETTINGS exchange the client sends GOAWAY with an
    unknown error code, then PINGs. The server ends the connection (RFC 9113 §7 lets an
    unknown code count as INTERNAL_ERROR), with PINGs it never read still arriving;
    the connection must end cleanly, never with a reset (h2spec fails on a reset).
    Here the PINGs come in the same write, more than one read's worth, so some are
    certain to be unread when the server closes; h2spec sends one PING separately,
    which is unread only when it loses the race with the close (about 1 run in 4)."""
    tls_files, client_context = transport
    with trio.fail_after(TIMEOUT):
        async with serving(tls_files) as server:
            stream = await connect(server, client_context, alpn="h2")
            await stream.send_all(PREFACE + EMPTY_SETTINGS + SETTINGS_ACK)
            await stream.send_all(GOAWAY_UNKNOWN_CODE + PING * 10_000)
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(PING)  # and one after the server's last frame
            await trio.testing.wait_all_tasks_blocked()
            answer = await read_to_the_end(stream)
    assert answer  # the server's SETTINGS and its ACK, at least


async def test_lingering_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never stops sending is not read forever: after LINGER_BYTES the
    server closes (with a reset, as the input is then unread: it was warned by FIN)."""
    monkeypatch.setattr(trioserve.connection, "LINGER_BYTES", 64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with serving(None, max_request_body_size=1024) as server:
            stream = await connect(server, None)
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
            await stream.send_all(head + b"a" * 2000)
            closed = False
            with trio.move_on_after(TIMEOUT / 2):
                while True:
                    try:
                        await stream.send_all(b"b" * 65536)
                    except trio.BrokenResourceError:
                        closed = True
                        break
    assert closed, "the server read for ever"


async def test_lingering_is_bounded_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that neither closes nor sends is closed after CLOSE_TIMEOUT."""
    monkeypatch.setattr(trioserve.connection, "CLOSE_TIMEOUT", 0.2)
    with trio.fail_after(TIMEOUT):
        async with serving(None, max_request_body_size=1024) as server:
            stream = await connect(server, None)
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
            await stream.send_all(head + b"a" * 2000)
            answer = await read_to_the_end(stream)  # FIN comes at once...
            assert answer.startswith(b"HTTP/1.1 413 ")
            # ...and the socket goes when the linger time is up, with the client silent.
            while server.open_connections:
                await server.wait_connections_changed()


async def test_tls_close_sends_close_notify(
    tls_cert_files: tuple[str, str, str], client_ssl_context: ssl.SSLContext
) -> None:
    """When nothing of the client's is left unread, the server's TLS close is the
    standard one: close_notify before FIN, so even a strict client (one that reads a
    TCP close without close_notify as truncation) reads a clean end."""
    with trio.fail_after(TIMEOUT):
        async with serving(tls_cert_files) as server:
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            client_ssl_context.set_alpn_protocols(["http/1.1"])
            stream = trio.SSLStream(tcp, client_ssl_context, server_hostname="127.0.0.1")
            await stream.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await read_to_the_end(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
