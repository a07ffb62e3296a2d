"""The opening of a connection: PROXY header, TLS handshake, choice of protocol.

:func:`serve_connection` is what the accept loop runs for every accepted
socket. It reads the PROXY protocol header (from trusted peers, when
configured), finishes the TLS handshake under its timeout, and picks the
protocol: ALPN over TLS, the HTTP/2 connection preface on a cleartext port.
Then it hands the stream to a :class:`~trioserve.connection.Connection`,
which serves it until it closes.

A graceful stop reaches connections still in this phase through
``ServerContext.opening``: they get a short grace period to send their first
bytes, and are closed if they have asked for nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from .connection import READ_SIZE, Connection, socket_of
from .context import SHUTDOWN_FIRST_BYTES_GRACE, ServerContext
from .events import ServerProtocol
from .http2 import PREFACE
from .proxy import ProxyHeader, ProxyHeaderError, parse_proxy_header
from .tls import tls_environ
from .wsgi import ConnectionInfo

LOGGER = logging.getLogger("trioserve.error")


def connection_info(stream: trio.abc.Stream, ctx: ServerContext) -> ConnectionInfo:
    """Addresses and scheme for the environ, read once from the socket."""
    scheme = "https" if ctx.ssl_context is not None else "http"
    sock = socket_of(stream)
    forwarding = ctx.forwarding
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        default_port = "443" if scheme == "https" else "80"
        return ConnectionInfo(
            scheme, "localhost", default_port, None, None, ctx.root_path, forwarding
        )
    local = sock.getsockname()
    try:
        peer = sock.getpeername()
    except OSError:  # already disconnected
        peer = ("", 0)
    # Interned: every connection to one address, or from one host, shares the
    # strings instead of holding copies of its own for its whole life.
    return ConnectionInfo(
        scheme,
        sys.intern(str(local[0])),
        sys.intern(str(local[1])),
        sys.intern(str(peer[0])),
        str(peer[1]),
        ctx.root_path,
        forwarding,
    )


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first bytes were already read: they are served again first.

    Used after a PROXY protocol header, so that TLS (or protocol sniffing)
    sees exactly the bytes that followed the header.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


@dataclass(slots=True)
class _Opening:
    """A connection going through the opening phase, as far as it got."""

    stream: trio.abc.Stream
    info: ConnectionInfo
    http2: bool = False
    initial: bytearray = dataclasses.field(default_factory=bytearray)  # sniffed, not parsed

    def take_initial(self) -> bytes:
        """The sniffed bytes, handed over: this object lives as long as its connection
        (its serve_connection frame holds it), they need not."""
        data = bytes(self.initial)
        self.initial.clear()
        return data


async def serve_connection(
    stream: trio.abc.Stream,
    ctx: ServerContext,
    info: ConnectionInfo | None = None,
    *,
    accepted: bool = False,
) -> None:
    """Serve one accepted connection until it closes or dozes. Never raises for
    client misbehaviour.

    ``info`` overrides the addresses read from the socket (for in-memory streams).
    ``accepted``: the accept loop counted the connection in ``ctx.open_connections``;
    it is counted out when it closes. A connection that dozes (an idle HTTP/1.1
    one; see :mod:`trioserve.dozing`) has no task until it wakes: this returns,
    and the server's keeper goes on with it later, in a task of its own.
    """
    conn: Connection | None = None
    opening: _Opening | None = None
    try:
        if info is None:
            info = connection_info(stream, ctx)
        opening = _Opening(stream, info)
        with _ends_logged(opening):
            if await _open(opening, ctx):
                proto: ServerProtocol
                if opening.http2:
                    h2_proto = ctx.new_http2()
                    h2_proto.initiate()
                    proto = h2_proto
                else:
                    proto = ctx.new_http1(allow_h2c_upgrade=ctx.ssl_context is None)
                conn = Connection(opening.stream, proto, ctx, opening.info)
    finally:
        if conn is None:
            try:
                await trio.aclose_forcefully(stream if opening is None else opening.stream)
            finally:
                if accepted:
                    ctx.connection_closed()
    if conn is None or opening is None:
        return  # (closed above)
    ctx.connections.add(conn)
    await _serve(conn, ctx, accepted, opening.take_initial())


async def _serve(
    conn: Connection,
    ctx: ServerContext,
    accepted: bool,
    initial: bytes,
    readable: bool | None = None,
) -> None:
    """Run ``conn`` until it closes or dozes; with ``readable``, go on after a doze.

    A connection that closed is closed here and counted out. One that dozes is
    listed with the server's keeper instead, which starts this again (with
    ``readable``) when it wakes; its socket stays open meanwhile.
    """
    dozing = False
    try:
        with _ends_logged(conn):
            if readable is None:
                dozes = await conn.run(initial)
            else:
                dozes = await conn.resume(readable)
            if dozes:
                fd, due = conn.doze_listing()
                dozing = ctx.dozing.add(
                    fd, due, functools.partial(_serve, conn, ctx, accepted, b"")
                )
                if not dozing:
                    await conn.resume(False)  # the keeper has stopped: the server is cancelled
    finally:
        if not dozing:
            ctx.connections.discard(conn)
            try:
                await trio.aclose_forcefully(conn.stream)
            finally:
                if accepted:
                    ctx.connection_closed()


@contextlib.contextmanager
def _ends_logged(source: _Opening | Connection) -> Iterator[None]:
    """Log how a connection ended (``source.info``: its addresses), if it raised."""
    try:
        yield
    except ProxyHeaderError as exc:
        LOGGER.info("Invalid PROXY protocol header from %s: %s", _peer(source.info), exc)
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.TooSlowError,
        ssl.SSLError,
    ) as exc:
        LOGGER.debug("Connection from %s ended: %r", _peer(source.info), exc)
    except Exception:
        LOGGER.exception("Internal error on the connection from %s", _peer(source.info))


def _peer(info: ConnectionInfo) -> str:
    return f"{info.client_addr}:{info.client_port}" if info.client_addr else "unix socket"


async def _open(opening: _Opening, ctx: ServerContext) -> bool:
    """Run the opening phase; False if the connection should just be closed.

    Closed without a word: a cleartext client silent for a whole keep-alive
    period, and, during a graceful stop, one that has not asked for anything
    within the first-bytes grace.
    """
    with trio.CancelScope() as scope:
        ctx.opening.add(scope)
        if ctx.shutting_down:
            scope.deadline = trio.current_time() + SHUTDOWN_FIRST_BYTES_GRACE
        try:
            opened = await _handshake(opening, ctx)
        finally:
            ctx.opening.discard(scope)
    if scope.cancelled_caught:
        # Shutting down. A TLS connection, or one that has sent nothing, has
        # asked for nothing yet; part of a cleartext request (not the HTTP/2
        # preface, or sniffing would have ended) is served over HTTP/1.1.
        return ctx.ssl_context is None and bool(opening.initial)
    return opened


async def _handshake(opening: _Opening, ctx: ServerContext) -> bool:
    """PROXY header, then TLS or preface sniffing; False for a silent connection."""
    config = ctx.config
    if config.proxy_protocol and ctx.forwarding.trusts(opening.info.client_addr):
        with trio.fail_after(config.header_timeout):
            header, rest = await _read_proxy_header(opening.stream)
        if header.client is not None:
            address, port = header.client
            opening.info = dataclasses.replace(
                opening.info, client_addr=address, client_port=str(port)
            )
        if rest:
            assert isinstance(opening.stream, trio.SocketStream)
            opening.stream = PrefixedStream(opening.stream, rest)
    if ctx.ssl_context is not None:
        # Standard-compliant TLS (https_compatible=False): our close sends
        # close_notify (a lingering close's "we are done"); a client that drops
        # the TCP connection without one just reads as a lost connection.
        tls_stream = trio.SSLStream(opening.stream, ctx.ssl_context, server_side=True)
        opening.stream = tls_stream
        with trio.fail_after(config.tls_handshake_timeout):
            await tls_stream.do_handshake()
        opening.http2 = tls_stream.selected_alpn_protocol() == "h2"
        opening.info = dataclasses.replace(opening.info, tls=tls_environ(tls_stream))
        return True
    if not await _sniff_preface(opening.stream, opening.initial, config.keep_alive_timeout):
        return False  # silent for a whole keep-alive period: an idle connection
    opening.http2 = opening.initial.startswith(PREFACE)
    return True


async def _read_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyHeader, bytes]:
    """Read a PROXY v1/v2 header; return it and the bytes read past its end."""
    data = b""
    needed = 16
    while True:
        while len(data) < needed:
            chunk = await stream.receive_some(READ_SIZE)
            if not chunk:
                raise ProxyHeaderError("connection closed before the PROXY header ended")
            data += chunk
        result = parse_proxy_header(data)
        if isinstance(result, ProxyHeader):
            return result, data[result.length :]
        needed = result


async def _sniff_preface(stream: trio.abc.Stream, data: bytearray, timeout: float) -> bool:
    """Read into ``data`` until it either is, or cannot be, the HTTP/2 preface.

    False if the client sent nothing at all for ``timeout``: it is then closed
    as an idle connection, rather than handed to HTTP/1.1 to idle once more.
    """
    with trio.move_on_after(timeout) as waited:
        while len(data) < len(PREFACE) and PREFACE.startswith(data):
            chunk = await stream.receive_some(READ_SIZE)
            if not chunk:
                break
            data += chunk
    return bool(data) or not waited.cancelled_caught
