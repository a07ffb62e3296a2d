"""Connection lifecycle: one nursery per connection, one reader, one sender, a task per stream.

General theory of operation
---------------------------

:func:`serve_connection` finishes the TLS handshake (under a timeout), picks
the protocol (ALPN, or the HTTP/2 preface on a cleartext port), and hands the
socket to a :class:`Connection`, which runs this task tree::

    Connection.run
    └── nursery
        ├── _reader_task        the only task that reads the socket
        ├── _sender_task        the only task that writes the socket
        └── RequestStream.run   one per request/stream, each in its own cancel scope
            └── to_thread.run_sync(call_app)   the WSGI app, in a worker thread

Who may block on what:

* The reader blocks only on the socket, and pauses (waiting on an event) only
  for connection-wide reasons: the peer is not reading our output, or, on
  HTTP/1.1, the current request's body buffer is full. It never waits on one
  HTTP/2 stream; per-stream body memory is bounded by flow control instead.
* The sender sleeps until woken, then writes everything the protocol has
  queued in one ``send_all`` (``data_to_send`` coalesces).
* Stream tasks block on the app thread; app threads block (through
  ``trio.from_thread``) on body data or on output draining.

The reader sends only two signals backwards: it cancels a stream's scope
(reset, disconnect, bad request) and it wakes the sender. Protocol state (the
sans-IO object in ``self.proto``) is touched only from trio tasks, which trio
runs one at a time, so it needs no locks.

The connection ends when the protocol says it is closing, no stream is live,
and all output is flushed; or at once when the socket breaks, in which case
every stream is cancelled. Either way the nursery waits for every app thread
to return, so nothing outlives the connection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol

import h2.errors
import trio

from .events import (
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    Event,
    FileSegment,
    Headers,
    RequestReceived,
    StreamReset,
    UpgradeToH2,
    WindowOpened,
)
from .http1 import HTTP1Connection
from .http2 import PREFACE, HTTP2Connection
from .proxy import AllowList, ProxyHeader, ProxyHeaderError, parse_proxy_header
from .stream import RequestStream
from .tls import tls_environ
from .wakeup import Wakeup
from .wsgi import ConnectionInfo, ResponseHead, WSGIApp

LOGGER = logging.getLogger("trioserve.error")

# Bytes asked for per socket read: large enough that a fast upload needs few
# reads, small enough to bound what one read can add to memory.
READ_SIZE = 64 * 1024

# Stop reading from a peer that leaves this much of our output unread: it is
# either slow or flooding us with requests for replies it never collects.
OUTPUT_HIGH_WATER = 1024 * 1024

# HTTP/1.1 only: stop reading while this much request body waits for the app,
# or this much pipelined input waits for its turn.
BODY_HIGH_WATER = 64 * 1024
PIPELINE_HIGH_WATER = 64 * 1024
# ...but once the app reads the body, read this far ahead of it: each batch it
# takes is a thread handoff, so bigger batches make uploads about 1.5x faster.
# Only requests that hold a thread get it, which bounds the extra memory by
# --threads rather than by the connection count.
BODY_READ_AHEAD = 256 * 1024

# Writes are cut into pieces of at most this size, each with its own
# write_timeout: the timeout bounds a pause in progress, not a whole response.
WRITE_CHUNK = 256 * 1024

# os.sendfile: at most this much per call, with a checkpoint between calls so
# one large file cannot hold up the other connections.
SENDFILE_CHUNK = 4 * 1024 * 1024
HAVE_SENDFILE = hasattr(os, "sendfile")

# GOAWAY code for a peer that abuses the protocol (RFC 9113 §7).
ENHANCE_YOUR_CALM = 0xB

# How long closing a connection may take: flushing a TLS close_notify, or
# letting the peer read our last response before we drop unread input.
CLOSE_TIMEOUT = 2.0

# On a graceful stop, a connection still in its TLS handshake or waiting for
# its first bytes gets this long to send a request (one that was accepted just
# before the stop is probably sending it right now); a silent one is closed.
SHUTDOWN_FIRST_BYTES_GRACE = 1.0


class ServerProtocol(Protocol):
    """What the driver needs from a sans-IO protocol object (HTTP/1.1 or HTTP/2)."""

    multiplexed: bool

    @property
    def closing(self) -> bool: ...
    @property
    def output_size(self) -> int: ...
    @property
    def buffered_input(self) -> int: ...
    @property
    def partial_request(self) -> bool: ...
    @property
    def has_queued_streams(self) -> bool: ...
    def stream_output_size(self, stream_id: int) -> int: ...
    def send_file(self, stream_id: int, segment: FileSegment) -> None: ...
    def file_to_send(self) -> FileSegment | None: ...
    def stream_blocked(self, stream_id: int) -> bool: ...
    def receive_data(self, data: bytes | bytearray) -> None: ...
    def next_events(self) -> list[Event]: ...
    def data_to_send(self) -> bytes: ...
    def send_continue(self, stream_id: int) -> None: ...
    def send_response(
        self, stream_id: int, status: int, headers: Headers, *, reason: bytes = b""
    ) -> None: ...
    def send_body(self, stream_id: int, data: bytes) -> None: ...
    def end_stream(self, stream_id: int) -> None: ...
    def send_error_response(
        self, stream_id: int, status: int, detail: str = "", *, close: bool = False
    ) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int = ...) -> None: ...
    def acknowledge_body(self, stream_id: int, size: int) -> None: ...
    def start_shutdown(self) -> None: ...
    def send_failed(self) -> None: ...


@dataclass(eq=False)
class ServerContext:
    """What every connection of one server shares."""

    app: WSGIApp
    limiter: trio.CapacityLimiter
    connection_threads: int = 0  # HTTP/2: app threads one connection may hold; 0: all
    keep_alive_timeout: float = 5.0
    tls_handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    write_timeout: float = 60.0
    h2_idle_timeout: float = 30.0
    ssl_context: ssl.SSLContext | None = None
    forwarding: AllowList = dataclasses.field(default_factory=AllowList)
    proxy_protocol: bool = False
    max_connections: int = 0  # 0: no limit
    max_requests_in_flight: int = 0  # 0: no limit
    body_prebuffer: int = 0  # body bytes awaited before the app, once threads are scarce
    requests_in_flight: int = 0
    requests_served: int = 0
    max_requests: int = 0  # this worker stops gracefully after serving so many; 0: never
    on_max_requests: Callable[[], None] | None = None
    root_path: str = ""
    server_header: bytes | None = b"trioserve"
    max_header_size: int = 64 * 1024
    max_request_line_size: int = 8 * 1024
    max_header_count: int = 100
    max_body_size: int = 0
    h2_max_concurrent_streams: int = 100
    h2_initial_window_size: int = 256 * 1024
    h2_max_frame_size: int = 16 * 1024
    h2_max_header_list_size: int = 64 * 1024
    access_log: Callable[[RequestStream], None] | None = None
    connections: set[Connection] = dataclasses.field(default_factory=set)
    shutting_down: bool = False
    open_connections: int = 0  # accepted and not yet closed (counted by the accept loop)
    accepting: int = 0  # accept tasks still running
    # Cancel scopes of connections still in their TLS handshake or waiting for
    # their first bytes: a graceful stop shortens these to the first-bytes grace.
    opening: set[trio.CancelScope] = dataclasses.field(default_factory=set)

    def start_shutdown(self) -> None:
        """Graceful stop: every connection finishes what it has, then closes."""
        self.shutting_down = True
        deadline = trio.current_time() + SHUTDOWN_FIRST_BYTES_GRACE
        for scope in self.opening:
            scope.deadline = min(scope.deadline, deadline)
        for conn in list(self.connections):
            conn.start_shutdown()

    _connections_changed: trio.Event = dataclasses.field(default_factory=trio.Event)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.connections_changed()

    def connections_changed(self) -> None:
        self._connections_changed.set()
        self._connections_changed = trio.Event()

    async def wait_connections_changed(self) -> None:
        await self._connections_changed.wait()

    def new_http1(self, *, allow_h2c_upgrade: bool) -> HTTP1Connection:
        return HTTP1Connection(
            max_header_size=self.max_header_size,
            max_request_line_size=self.max_request_line_size,
            max_header_count=self.max_header_count,
            max_body_size=self.max_body_size,
            allow_h2c_upgrade=allow_h2c_upgrade,
        )

    def new_http2(self) -> HTTP2Connection:
        return HTTP2Connection(
            max_concurrent_streams=self.h2_max_concurrent_streams,
            initial_window_size=self.h2_initial_window_size,
            max_frame_size=self.h2_max_frame_size,
            max_header_list_size=self.h2_max_header_list_size,
            max_body_size=self.max_body_size,
            max_header_count=self.max_header_count,
            max_path_length=self.max_request_line_size,
        )


class _DateHeader:
    """The Date header value, formatted at most once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


date_header = _DateHeader()


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, trio.SSLStream | PrefixedStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


def connection_info(stream: trio.abc.Stream, ctx: ServerContext) -> ConnectionInfo:
    """Addresses and scheme for the environ, read once from the socket."""
    scheme = "https" if ctx.ssl_context is not None else "http"
    sock = _socket_of(stream)
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
    return ConnectionInfo(
        scheme, str(local[0]), str(local[1]), str(peer[0]), str(peer[1]), ctx.root_path, forwarding
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


async def serve_connection(
    stream: trio.abc.Stream, ctx: ServerContext, info: ConnectionInfo | None = None
) -> None:
    """Serve one accepted connection until it closes. Never raises for client misbehaviour.

    ``info`` overrides the addresses read from the socket (for in-memory streams).
    """
    peer = "?"
    try:
        tls = ctx.ssl_context is not None
        alpn = None
        initial = bytearray()
        if info is None:
            info = connection_info(stream, ctx)
        peer = f"{info.client_addr}:{info.client_port}" if info.client_addr else "unix socket"
        with trio.CancelScope() as opening:
            ctx.opening.add(opening)
            if ctx.shutting_down:
                opening.deadline = trio.current_time() + SHUTDOWN_FIRST_BYTES_GRACE
            try:
                if ctx.proxy_protocol and ctx.forwarding.trusts(info.client_addr):
                    with trio.fail_after(ctx.header_timeout):
                        header, rest = await _read_proxy_header(stream)
                    if header.client is not None:
                        address, port = header.client
                        info = dataclasses.replace(info, client_addr=address, client_port=str(port))
                        peer = f"{address}:{port}"
                    if rest:
                        assert isinstance(stream, trio.SocketStream)
                        stream = PrefixedStream(stream, rest)
                if ctx.ssl_context is not None:
                    stream = trio.SSLStream(
                        stream, ctx.ssl_context, server_side=True, https_compatible=True
                    )
                    with trio.fail_after(ctx.tls_handshake_timeout):
                        await stream.do_handshake()
                    alpn = stream.selected_alpn_protocol()
                    info = dataclasses.replace(info, tls=tls_environ(stream))
                elif not await _sniff_preface(stream, initial, ctx.keep_alive_timeout):
                    return  # silent for a whole keep-alive period: an idle connection
            finally:
                ctx.opening.discard(opening)
        if opening.cancelled_caught and (tls or not initial):
            return  # shutting down, and this connection has asked for nothing yet
        proto: ServerProtocol
        if alpn == "h2" or (not tls and initial.startswith(PREFACE)):
            h2_proto = ctx.new_http2()
            h2_proto.initiate()
            proto = h2_proto
        else:
            proto = ctx.new_http1(allow_h2c_upgrade=not tls)
        conn = Connection(stream, proto, ctx, info)
        ctx.connections.add(conn)
        try:
            await conn.run(bytes(initial))
        finally:
            ctx.connections.discard(conn)
    except ProxyHeaderError as exc:
        LOGGER.info("Invalid PROXY protocol header from %s: %s", peer, exc)
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.TooSlowError,
        ssl.SSLError,
    ) as exc:
        LOGGER.debug("Connection from %s ended: %r", peer, exc)
    except Exception:
        LOGGER.exception("Internal error on the connection from %s", peer)
    finally:
        await trio.aclose_forcefully(stream)


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


class Connection:
    """The driver: runs one connection's tasks around a sans-IO protocol object."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        proto: ServerProtocol,
        ctx: ServerContext,
        info: ConnectionInfo,
    ) -> None:
        self.stream = stream
        self.proto = proto
        self.ctx = ctx
        self.app = ctx.app
        self.limiter = ctx.limiter
        # HTTP/2 streams take a slot of this connection's share before a thread.
        self.thread_share: trio.CapacityLimiter | None = None
        self.streams_draining = 0  # streams whose app finished, their response still queued
        self.info = info
        self.streams: dict[int, RequestStream] = {}
        self._nursery: trio.Nursery | None = None
        self.trio_token = trio.lowlevel.current_trio_token()  # app threads push chunks through it
        self._output_wanted = Wakeup()  # the sender sleeps on it
        self._output_drained: trio.Event | None = None  # made only when a stream waits
        self._reader_wakeup = Wakeup()  # the reader sleeps on it while paused
        self._in_flight = 0  # bytes handed to send_all and not yet sent
        self._peer_done = False  # EOF or GOAWAY seen: read no more
        self._clean_close = False  # the sender finished normally: close politely
        self._linger = False  # unread request data may follow: drain before closing
        self._aborted = False  # fatal protocol error: send what is queued (GOAWAY), then close
        self._reader_done = False
        self._read_scope: trio.CancelScope | None = None  # the reader's current wait
        self._head_started: float | None = None  # when the current partial request head began
        self._idle_goaway_sent = False
        self._idle_since: float | None = None  # when the last request finished
        self._pipeline_waiting = False  # HTTP/1.1: next request held back until output drains
        if ctx.shutting_down:
            proto.start_shutdown()

    # ---- lifecycle ----------------------------------------------------------

    async def run(self, initial: bytes = b"") -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if initial:
                # Bytes read while choosing the protocol go in before any task
                # runs, so nobody mistakes this connection for an idle one.
                self._receive(initial)
            nursery.start_soon(self._sender_task)
            nursery.start_soon(self._reader_task)
        if self._clean_close:
            await self._close_politely()

    def start_shutdown(self) -> None:
        """Graceful stop: finish what is in flight, accept nothing new, then close."""
        self.proto.start_shutdown()
        self.wake_sender()
        self._wake_reader()

    def abort(self) -> None:
        """Stop now: cancel every stream and drop the connection."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _close_politely(self) -> None:
        """Let the peer see our last bytes before the socket goes away.

        Closing with unread input in the kernel buffer makes it send RST, which
        can destroy a response the client has not read yet (e.g. a 413 sent
        before the body arrived). So: half-close, and discard input for a
        moment, as nginx's lingering_close does.
        """
        with trio.move_on_after(CLOSE_TIMEOUT):
            if (
                self._linger
                and self._reader_done
                and isinstance(self.stream, trio.abc.HalfCloseableStream)
            ):
                try:
                    await self.stream.send_eof()
                    while await self.stream.receive_some(READ_SIZE):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await self.stream.aclose()

    # ---- reader ---------------------------------------------------------------

    async def _reader_task(self) -> None:
        try:
            await self._read_loop()
        finally:
            self._reader_done = True

    async def _read_loop(self) -> None:
        # One cancel scope for many reads: its deadline is moved as the
        # connection turns busy or idle (_update_idle_deadline), which is much
        # cheaper than a new scope per read.
        while not self._peer_done:
            with trio.CancelScope(deadline=self._idle_deadline()) as idle:
                self._read_scope = idle
                try:
                    while not self._peer_done:
                        if self._reading_paused():
                            await self._wait_reader_wakeup()
                            continue
                        self._receive(await self.stream.receive_some(READ_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._connection_lost()
                    return
                finally:
                    self._read_scope = None
            if idle.cancelled_caught and self._idle_expired():
                return

    def _receive(self, data: bytes | bytearray) -> None:
        proto = self.proto
        proto.receive_data(data)
        if not data:
            self._peer_done = True
        self._dispatch(proto.next_events())
        self._update_idle_deadline()  # a request head may have just begun, or ended
        if proto.output_size or proto.has_queued_streams or proto.closing:
            self.wake_sender()

    def _idle_deadline(self) -> float:
        """When the reader gives up waiting on the client.

        * A request head (HTTP/1.1) or header block (HTTP/2) has begun and is
          not complete: ``header_timeout`` from its first byte. A slowloris
          client trickling bytes never extends it.
        * Otherwise, while a request is in progress: no deadline here (body
          and write progress have their own).
        * Otherwise the connection is idle: ``keep_alive_timeout`` (HTTP/1.1)
          or ``h2_idle_timeout`` (HTTP/2), counted from when it became idle;
          PINGs and other control frames do not make it busy.
        """
        now = trio.current_time()
        if self.proto.partial_request:
            if self._head_started is None:
                self._head_started = now
            return self._head_started + self.ctx.header_timeout
        self._head_started = None
        if self.streams or self.proto.buffered_input:
            self._idle_since = None
            return math.inf
        if self._idle_since is None:
            self._idle_since = now
        if self.proto.multiplexed:
            return self._idle_since + self.ctx.h2_idle_timeout
        return self._idle_since + self.ctx.keep_alive_timeout

    def _idle_expired(self) -> bool:
        """The idle deadline passed; True if the reader should stop reading."""
        if self._head_started is not None:
            if isinstance(self.proto, HTTP1Connection):
                self._bad_request(self.proto.timeout_request_head())
            elif isinstance(self.proto, HTTP2Connection):
                self.proto.fail(ENHANCE_YOUR_CALM, "header block not completed in time")
                self._dispatch(self.proto.next_events())
            self.wake_sender()
            return True
        if not self.proto.multiplexed:
            self.start_shutdown()  # idle HTTP/1.1 connection: close it
            return True
        if self._idle_goaway_sent:
            # No answer to our GOAWAY's PING in a whole idle period: give up.
            self.abort()
            return True
        # HTTP/2: the two-step GOAWAY needs the client's PING ACK, so keep
        # reading, and give the client one more idle period to answer it.
        self._idle_goaway_sent = True
        self._idle_since = trio.current_time()
        self.start_shutdown()
        return False

    def _update_idle_deadline(self) -> None:
        # The reader may already be waiting when the connection turns idle or
        # busy: move its deadline rather than waiting for its next read.
        if self._read_scope is not None:
            deadline = self._idle_deadline()
            if self._read_scope.deadline != deadline:
                self._read_scope.deadline = deadline

    def _reading_paused(self) -> bool:
        if self.proto.output_size + self._in_flight > OUTPUT_HIGH_WATER:
            return True
        if not self.proto.multiplexed:
            if self.proto.buffered_input > PIPELINE_HIGH_WATER:
                return True
            for stream in self.streams.values():
                limit = BODY_READ_AHEAD if stream.reading_body else BODY_HIGH_WATER
                if stream.body.size >= limit:
                    return True
        return False

    async def _wait_reader_wakeup(self) -> None:
        await self._reader_wakeup.wait()

    def _wake_reader(self) -> None:
        self._reader_wakeup.set()

    def _connection_lost(self) -> None:
        """The socket broke: nobody is listening any more, cancel everything."""
        self._peer_done = True
        for stream in self.streams.values():
            stream.reset_by_peer = True
            stream.cancel_scope.cancel()
        self.proto.send_failed()
        self.wake_sender()

    # ---- dispatch -------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            kind = type(event)
            if kind is BodyReceived:
                assert isinstance(event, BodyReceived)
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.cancel_scope.cancel_called:
                    # Nobody will read it: hand the flow-control credit straight back.
                    self.proto.acknowledge_body(event.stream_id, len(event.data))
                else:
                    stream.body.feed(event.data)
            elif kind is RequestReceived:
                assert isinstance(event, RequestReceived)
                self._start_stream(event)
            elif kind is BodyEnded:
                assert isinstance(event, BodyEnded)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body.end()
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_peer = True
                    stream.cancel_scope.cancel()
            elif kind is BadRequest:
                assert isinstance(event, BadRequest)
                self._bad_request(event)
            elif kind is UpgradeToH2:
                assert isinstance(event, UpgradeToH2)
                self._upgrade(event)
            elif kind is ConnectionClosed:
                assert isinstance(event, ConnectionClosed)
                # A clean HTTP/2 GOAWAY is not the end of reading: the peer
                # still sends WINDOW_UPDATEs for the streams it lets finish.
                if event.abort:
                    self._peer_done = True
                    self._aborted = True
                    for stream in self.streams.values():
                        stream.reset_by_peer = True
                        stream.cancel_scope.cancel()
            elif kind is WindowOpened:
                pass  # the sender is woken after every dispatch anyway

    def _start_stream(self, event: RequestReceived) -> None:
        proto = self.proto
        live_apps = len(self.streams) - self.streams_draining
        if proto.multiplexed and live_apps >= self.ctx.h2_max_concurrent_streams:
            # Live app invocations (reset ones still running included) are
            # bounded per connection: refuse, the client may retry (RFC 9113 §8.7).
            proto.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = RequestStream(self, event)
        ctx = self.ctx
        if ctx.max_requests_in_flight and ctx.requests_in_flight >= ctx.max_requests_in_flight:
            # Overloaded: an immediate 503 beats an unbounded queue for threads.
            LOGGER.info(
                "503 %d requests already in flight, refusing %s from %s",
                ctx.requests_in_flight,
                event.target.decode("latin-1"),
                self.info.client_addr or "unix socket",
            )
            stream.error_status = 503
        else:
            stream.counted = True
            ctx.requests_in_flight += 1
        self.streams[event.stream_id] = stream
        self._update_idle_deadline()
        assert self._nursery is not None
        self._nursery.start_soon(stream.run)

    def _bad_request(self, event: BadRequest) -> None:
        client = self.info.client_addr or "unix socket"
        LOGGER.info("%d %s from %s", event.status, event.reason, client)
        self._linger = True
        if event.stream_id is not None:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.error_status = event.status
                stream.cancel_scope.cancel()

    def _upgrade(self, event: UpgradeToH2) -> None:
        """Switch this connection to HTTP/2 after ``101 Switching Protocols``."""
        old = self.proto
        proto = self.ctx.new_http2()
        request = dataclasses.replace(event.request, stream_id=1, end_stream=True)
        proto.initiate_upgrade(event.settings, request, preamble=old.data_to_send())
        self.proto = proto
        stream = RequestStream(self, request)
        if event.body:
            stream.body.feed(event.body)
            proto.note_upgrade_body(len(event.body))
        self.streams[1] = stream
        assert self._nursery is not None
        self._nursery.start_soon(
            stream.run, name=f"stream 1 (upgraded) from {self.info.client_addr}"
        )
        if event.trailing:
            self._receive(event.trailing)

    # ---- services for RequestStream ------------------------------------------

    @property
    def cancelled(self) -> bool:
        """The whole connection is being torn down (abort, lost socket, hard stop)."""
        return self._nursery is not None and self._nursery.cancel_scope.cancel_called

    def wake_sender(self) -> None:
        self._output_wanted.set()

    def stream_thread_share(self) -> trio.CapacityLimiter | None:
        """HTTP/2: the limiter bounding this connection's share of the app threads.

        None for HTTP/1.1, which runs one request at a time anyway.
        """
        if self.thread_share is None and self.proto.multiplexed and self.ctx.connection_threads:
            self.thread_share = trio.CapacityLimiter(self.ctx.connection_threads)
        return self.thread_share

    async def wait_output_drained(self) -> None:
        if self._output_drained is None:
            self._output_drained = trio.Event()
        await self._output_drained.wait()

    def send_response(self, stream_id: int, head: ResponseHead) -> None:
        """Queue a response head, adding the Date and Server headers if the app did not."""
        headers = head.headers
        has_date = has_server = False
        for name, _ in headers:
            lowered = name.lower()
            if lowered == b"date":
                has_date = True
            elif lowered == b"server":
                has_server = True
        if not has_date:
            headers.append((b"Date", date_header()))
        if not has_server and self.ctx.server_header:
            headers.append((b"Server", self.ctx.server_header))
        self.proto.send_response(stream_id, head.status, headers, reason=head.reason)

    def body_consumed(self, stream_id: int, size: int) -> None:
        """The app took ``size`` body bytes: return flow-control credit, maybe resume reading."""
        self.proto.acknowledge_body(stream_id, size)
        if self.proto.output_size:
            self.wake_sender()
        self._wake_reader()

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon a response mid-way (HTTP/2: RST_STREAM ``error_code``; HTTP/1.1: close)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.reset_by_peer:
            return  # the peer already reset it; a reset of our own would be noise
        self.proto.reset_stream(stream_id, error_code)
        self.wake_sender()

    def stream_done(self, stream: RequestStream) -> None:
        """A stream's task finished: forget it and let the connection move on."""
        self.streams.pop(stream.stream_id, None)
        ctx = self.ctx
        if stream.counted:
            ctx.requests_in_flight -= 1
            ctx.requests_served += 1
            if ctx.max_requests and ctx.requests_served == ctx.max_requests and ctx.on_max_requests:
                ctx.on_max_requests()
        if stream.body.size and self.proto.multiplexed:
            # Unread body: give the connection-level credit back.
            self.proto.acknowledge_body(stream.stream_id, stream.body.size)
        if not stream.body.ended:
            self._linger = True
        if self.ctx.access_log is not None:
            self.ctx.access_log(stream)
        self._start_next_request()
        self._update_idle_deadline()
        proto = self.proto
        if proto.output_size or proto.has_queued_streams or proto.closing or self._aborted:
            # Something to send, or the sender may now close the connection. A
            # keep-alive response already went out with the sender's last wake.
            self.wake_sender()
        self._wake_reader()

    async def _send_with_deadline(self, data: bytes, scope: trio.CancelScope) -> None:
        """Write ``data``, each piece due within ``write_timeout`` of the last one."""
        timeout = self.ctx.write_timeout
        if len(data) <= WRITE_CHUNK:
            scope.deadline = trio.current_time() + timeout
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            scope.deadline = trio.current_time() + timeout
            await self.stream.send_all(view[:WRITE_CHUNK])
            view = view[WRITE_CHUNK:]

    async def _sendfile(self, segment: FileSegment, scope: trio.CancelScope) -> None:
        """Send ``segment`` from its file with ``os.sendfile`` (plain-TCP HTTP/1.1 only)."""
        assert isinstance(self.stream, trio.SocketStream)
        sock = self.stream.socket
        if segment.abandoned:  # its request ended first: the descriptor may be closed
            raise trio.BrokenResourceError("the response was abandoned")
        segment.in_use = True
        try:
            await self._sendfile_loop(segment, sock, scope)
        finally:
            segment.let_go()  # closes the file if its request ended meanwhile

    async def _sendfile_loop(
        self, segment: FileSegment, sock: trio.socket.SocketType, scope: trio.CancelScope
    ) -> None:
        out_fd = sock.fileno()
        timeout = self.ctx.write_timeout
        offset, remaining = segment.offset, segment.length
        while remaining:
            scope.deadline = trio.current_time() + timeout
            try:
                sent = os.sendfile(out_fd, segment.fd, offset, min(remaining, SENDFILE_CHUNK))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"sendfile failed: {exc}") from exc
            if not sent:
                # The file shrank since its length was announced: the response
                # can only be cut short, by closing the connection.
                LOGGER.warning(
                    "File ended %d bytes early while sending it to %s",
                    remaining,
                    self.info.client_addr or "a unix socket client",
                )
                raise trio.BrokenResourceError("file ended early")
            offset += sent
            remaining -= sent
            await trio.lowlevel.checkpoint()  # a big file must not hold up other connections
        segment.sent = True

    async def _send_pending(self, write_scope: trio.CancelScope) -> bool:
        """Write what the protocol has queued, bytes or a file; False if nothing was."""
        data = self.proto.data_to_send()
        if data:
            self._in_flight = len(data)
            await self._send_with_deadline(data, write_scope)
            return True
        segment = self.proto.file_to_send()
        if segment is not None:
            self._in_flight = segment.length
            await self._sendfile(segment, write_scope)
            return True
        return False

    def can_sendfile(self) -> bool:
        """May responses on this connection be sent with ``os.sendfile``?"""
        return (
            HAVE_SENDFILE and not self.proto.multiplexed and type(self.stream) is trio.SocketStream
        )

    async def _send_loop(self, write_scope: trio.CancelScope) -> None:
        while True:
            if await self._send_pending(write_scope):
                self._in_flight = 0
                drained = self._output_drained
                if drained is not None:
                    self._output_drained = None
                    drained.set()
                self._wake_reader()
                if self._pipeline_waiting:
                    self._start_next_request()
                continue
            if self._aborted:
                # Our last words (GOAWAY) are out. Close the socket now rather
                # than when the cancelled apps' threads return, which can take
                # until their next read or write.
                await self._close_politely()
                return
            if self.proto.closing and not self.streams and not self.proto.has_queued_streams:
                # Done: no app still running and no response still waiting
                # for flow-control window (it goes out once the peer opens it).
                self._clean_close = True
                return
            write_scope.deadline = math.inf
            await self._output_wanted.wait()

    def _start_next_request(self) -> None:
        """HTTP/1.1: take the next pipelined request, unless the peer is behind on reading.

        Pipelined requests already buffered would otherwise be answered one
        after another into memory, however little of it the client reads.
        """
        if self.proto.multiplexed or self.streams:
            return
        if self.proto.output_size + self._in_flight > OUTPUT_HIGH_WATER:
            self._pipeline_waiting = True  # the sender comes back here once output drains
            return
        self._pipeline_waiting = False
        self._dispatch(self.proto.next_events())

    # ---- sender ---------------------------------------------------------------

    async def _sender_task(self) -> None:
        try:
            # One cancel scope for every write: its deadline is set while a
            # write is under way (write_timeout) and lifted while idle.
            with trio.CancelScope() as write_scope:
                await self._send_loop(write_scope)
            if write_scope.cancelled_caught:
                LOGGER.info(
                    "Dropping %s: it read nothing for %.0fs",
                    self.info.client_addr or "a unix socket client",
                    self.ctx.write_timeout,
                )
                self._connection_lost()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Streams get cancelled; the nursery still waits for their threads.
            self._connection_lost()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
