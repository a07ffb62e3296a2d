"""The connection driver: one nursery per connection, one reader, one sender, a task per stream.

General theory of operation
---------------------------

:func:`trioserve.opening.serve_connection` finishes the opening phase (PROXY
header, TLS, choice of protocol) and hands the stream and a sans-IO protocol
object to a :class:`Connection`, which runs this task tree::

    Connection.run
    └── nursery
        ├── _reader_task        the only task that reads the socket
        ├── _sender_task        the only task that writes the socket
        └── RequestStream.run   one stream at a time per task, in a cancel scope lent to it
            └── to_thread.run_sync(call_app)   the WSGI app, in a worker thread

HTTP/1.1 runs its requests one after another in one long-lived request task
(``_request_task``); HTTP/2 runs each concurrent stream in a task of its own,
and a task whose stream is done parks to be handed the next one
(``_stream_task``). Either way a task lends each stream the cancel scope it
runs in, so cancelling a stream reaches that stream's app alone, and a fresh
scope is opened only after one was cancelled: starting a task and opening a
scope per request would cost about a sixth of a hello request on this thread.

Who may block on what:

* The reader blocks only on the socket, and pauses (waiting on a wake-up)
  only for connection-wide reasons: the peer is not reading our output, or,
  on HTTP/1.1, the current request's body buffer is full. It never waits on
  one HTTP/2 stream; per-stream body memory is bounded by flow control instead.
* The sender sleeps until woken, then writes everything the protocol has
  queued in one gathering write (``buffers_to_send``), awaiting only when the
  kernel has no room.
* Stream tasks block on the app thread; app threads block (through
  ``trio.from_thread``) on body data or on output draining.

The driver speaks to its streams through two narrow doors: it implements
:class:`~trioserve.stream.StreamOwner` (what a stream may ask of it), and it
reaches a stream only through ``feed_body``, ``end_body`` and ``cancel``. The
reader sends only two signals backwards: it cancels a stream (reset,
disconnect, bad request) and it wakes the sender. Protocol state (the sans-IO
object in ``self.proto``) is touched only from trio tasks and ``run_sync_soon``
callbacks, which trio runs one at a time, so it needs no locks. Which protocol
it is never matters here: both speak :class:`~trioserve.events.ServerProtocol`.

An HTTP/1.1 connection on a plain socket that has been idle for
``DOZE_AFTER`` dozes: its reader, sender and request tasks end, its nursery
closes, and ``Connection.run`` returns True. Its caller lists it with the
server's one keeper (:mod:`trioserve.dozing`), which holds no task for it and
starts ``Connection.resume`` in a new one when the socket turns readable (or
to close it, when the keep-alive time is up, the server stops or it is
aborted). Idle keep-alive connections are most of a server's connections, and
their tasks were most of their memory.

The connection ends when the protocol says it is closing, no stream is live,
and all output is flushed; or at once when the socket breaks, in which case
every stream is cancelled. Either way the nursery waits for every app thread
to return, so nothing outlives the connection.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from functools import partial
from typing import Final

import trio

from .context import ServerContext
from .dozing import BUSY_RECHECK, DOZE_AFTER
from .events import (
    UNCHECKED,
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    Event,
    FileSegment,
    RequestReceived,
    ResetReason,
    ServerProtocol,
    StreamReset,
    UpgradeToH2,
    WindowOpened,
)
from .readiness import WatchedSocket
from .responses import HAS_DATE, HAS_SERVER, field_traits
from .stats import HTTP1, HTTP2, LAYOUT, Cause
from .stream import CancelReason, Failure, RequestStream
from .wakeup import Wakeup
from .wsgi import ConnectionInfo, ResponseHead

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

# Writes to a trio stream (TLS) are cut into pieces of at most this size, each
# with its own write_timeout: the timeout bounds a pause in progress, not a whole
# response. Whole parts are joined into a piece while they fit: 128 KiB of payload
# and room for the framing around it, so eight 16 KiB HTTP/2 DATA frames with
# their 9-byte headers, or two 64 KiB HTTP/1.1 chunks with their size lines, go
# in one piece (at exactly 128 KiB only seven, or one, did: a third more pieces).
# Each piece is copied twice (joined here, encrypted by the TLS layer), and both
# copies are freed before the next piece. At 256 KiB the pair was big enough
# that in most server processes glibc's malloc gave the heap back to the kernel
# after every piece and faulted it in again for the next (whether it does
# depends on what the process allocated before): 70,000 page faults per 200 MiB
# sent. HTTP/2 over TLS downloads went from 550 MiB/s at 256 KiB to 900 here;
# smaller pieces cost more calls into the TLS layer (96 KiB: 720, 64 KiB: 690).
WRITE_CHUNK = 128 * 1024 + 1024

# os.writev takes at most this many pieces per call (IOV_MAX).
try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16  # POSIX's minimum

# os.sendfile: at most this much per call, with a checkpoint between calls so
# one large file cannot hold up the other connections.
SENDFILE_CHUNK = 4 * 1024 * 1024
HAVE_SENDFILE = hasattr(os, "sendfile")

# Lingering close: when we close first, the peer's next bytes would otherwise
# meet a closed socket, and the kernel's RST can destroy our last response
# before the peer reads it. So after our last bytes we send FIN (TLS:
# close_notify, then FIN) and read and discard what still comes, for at most
# this long and this much (Apache's lingering close allows 2 s and 512 KiB).
CLOSE_TIMEOUT = 2.0
LINGER_BYTES = 512 * 1024

# HTTP/2: a stream's task, once its stream is done, waits (parks) for the
# connection's next stream instead of ending, so a busy connection neither
# starts a task nor opens a cancel scope per stream (together about a sixth of
# an h2c hello request's time on the trio thread). As many may park as the
# connection allows concurrent streams; once the connection has been idle for
# DOZE_AFTER, all but this many end, so an idle connection keeps no crowd of
# tasks (a parked task is about 3 KB).
IDLE_PARKED_RUNNERS = 4

_LONG_AGO = -math.inf  # one float for every connection's "never"

# Names of the tasks that serve connections. Without one, trio formats a name
# from the function for every task it starts: a string per task, held for its
# life (and per idle connection, whose own task is all it keeps running).
CONNECTION_TASK = "trioserve connection"
_READER_TASK = "trioserve connection reader"
_SENDER_TASK = "trioserve connection sender"
_REQUEST_TASK = "trioserve connection requests"
_STREAM_TASK = "trioserve connection stream"


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


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP or unix socket under ``stream`` (through TLS and other wrappers), if any."""
    while hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


async def linger_close(stream: trio.abc.Stream) -> None:
    """Close ``stream`` so that the peer can read everything we sent (see LINGER_BYTES).

    Bounded by CLOSE_TIMEOUT in all; whatever happens, the stream is closed.
    """
    try:
        with trio.move_on_after(CLOSE_TIMEOUT):
            if isinstance(stream, trio.SSLStream):
                await _linger_tls(stream)
            elif isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
                await _discard(stream.receive_some)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the peer is gone: nothing left to protect
    finally:
        await trio.aclose_forcefully(stream)


async def _linger_tls(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    """close_notify, then FIN, then discard: through a second descriptor of the socket.

    ``SSLStream.aclose`` sends close_notify and closes its transport at once;
    the duplicate keeps the connection itself open (the kernel closes it with
    the last descriptor) so that we can half-close it and read what follows.
    """
    sock = socket_of(stream)
    if sock is None:
        await stream.aclose()
        return
    spare = sock.dup()
    try:
        await stream.aclose()
        spare.shutdown(socket.SHUT_WR)
        await _discard(spare.recv)
    finally:
        spare.close()


async def _discard(receive: Callable[[int], Awaitable[bytes | bytearray]]) -> None:
    """Read and drop input until EOF or LINGER_BYTES."""
    total = 0
    while total < LINGER_BYTES:
        data = await receive(READ_SIZE)
        if not data:
            return
        total += len(data)


class _SocketIO:
    """A plain TCP or unix socket, read and written with non-blocking system calls.

    The event loop is asked to wait only when the kernel says so (EAGAIN), so a
    request that arrives whole and a response that fits the socket buffer cost
    one read, one write and no epoll registration or deadline of their own.
    Cheaper than ``trio.SocketStream``'s general path, which brackets every
    call with checkpoints. A reader that keeps finding data yields every
    ``_SPINS`` reads all the same, so a fast sender cannot starve other tasks.
    """

    __slots__ = ("_drained", "_spins", "fd", "watched")
    _SPINS = 4

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._spins = 0
        # The last read took less than it asked for: the kernel had no more, so
        # the next read waits for readiness first instead of failing with EAGAIN.
        self._drained = False
        # The server's watch on the socket while the connection has tasks
        # (trioserve.readiness); None: wait through trio.
        self.watched: WatchedSocket | None = None

    def known_readable(self) -> None:
        """The socket was seen readable (a doze ended): the next read need not wait first."""
        self._drained = False

    async def receive(self) -> bytes:
        """The next bytes from the peer; b"" at EOF."""
        wait_first = self._drained
        while True:
            if wait_first:
                self._spins = 0
                watched = self.watched
                if watched is None:
                    await trio.lowlevel.wait_readable(self.fd)
                else:
                    await watched.wait_readable()
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                wait_first = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
            self._drained = len(data) < READ_SIZE
            self._spins += 1
            if self._spins >= self._SPINS:
                self._spins = 0
                await trio.lowlevel.checkpoint()
            return data

    def write_some(self, parts: list[bytes | memoryview]) -> bool:
        """Write as much of ``parts`` as the kernel takes now, in order, without
        waiting: True once all of it went, else ``parts`` holds the rest.

        Gathering writes (os.writev): the pieces go to the kernel as they are,
        never joined into a copy first. A plain synchronous call, so a
        response that fits the socket buffer costs the sender no await.
        """
        fd = self.fd
        while True:
            try:
                if len(parts) == 1:
                    sent = os.write(fd, parts[0])
                else:
                    sent = os.writev(fd, parts if len(parts) <= _IOV_MAX else parts[:_IOV_MAX])
            except BlockingIOError:
                return False
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
            done = 0
            for part in parts:
                if sent < len(part):
                    break
                sent -= len(part)
                done += 1
            else:
                return True  # all of it: the usual case
            del parts[:done]
            if sent:
                parts[0] = memoryview(parts[0])[sent:]
            if done < _IOV_MAX or sent:
                return False  # the kernel took less than offered: it is full

    async def send_rest(
        self, parts: list[bytes | memoryview], scope: trio.CancelScope, timeout: float
    ) -> None:
        """Write the rest of ``parts`` (``write_some`` found the kernel full) as room
        comes; a wait for room longer than ``timeout`` cancels ``scope``."""
        while True:
            scope.deadline = trio.current_time() + timeout  # progress since the last wait
            await trio.lowlevel.wait_writable(self.fd)
            if self.write_some(parts):
                return


class _StreamIO:
    """Any other trio stream (TLS, after a PROXY header, in-memory): its own methods,
    with the write timeout set per piece of at most WRITE_CHUNK."""

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive(self) -> bytes | bytearray:
        return await self._stream.receive_some(READ_SIZE)

    def write_some(self, parts: list[bytes | memoryview]) -> bool:
        """Nothing: a trio stream is written by awaiting it (``send_rest``)."""
        return False

    async def send_rest(
        self, parts: list[bytes | memoryview], scope: trio.CancelScope, timeout: float
    ) -> None:
        """Send ``parts`` in order, small ones joined into writes of up to WRITE_CHUNK
        (TLS makes records of them anyway): what is copied at once stays that small."""
        batch: list[bytes | memoryview] = []
        size = 0
        for part in parts:
            if batch and size + len(part) > WRITE_CHUNK:
                await self.send_all(b"".join(batch), scope, timeout)
                batch = []
                size = 0
            batch.append(part)
            size += len(part)
        if batch:
            await self.send_all(batch[0] if len(batch) == 1 else b"".join(batch), scope, timeout)

    async def send_all(
        self, data: bytes | memoryview, scope: trio.CancelScope, timeout: float
    ) -> None:
        if len(data) <= WRITE_CHUNK:
            scope.deadline = trio.current_time() + timeout
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            scope.deadline = trio.current_time() + timeout
            await self._stream.send_all(view[:WRITE_CHUNK])
            view = view[WRITE_CHUNK:]


class _Phase(enum.Enum):
    """Where the connection is on its way to closing.

    OPEN -> INPUT_ENDED (EOF) -> DONE, or to ABORTED or LOST from either;
    OPEN -> DOZING -> OPEN while an HTTP/1.1 connection idles (or DOZING ->
    DONE when its keep-alive time runs out, or the server stops). Only OPEN
    reads; only DONE closes politely (lingering) after the nursery.
    """

    OPEN = "open"  # reading and writing
    DOZING = "dozing"  # idle HTTP/1.1, no tasks: the connection task waits for input
    INPUT_ENDED = "input ended"  # the peer sent EOF: nothing more to read; answers still go out
    ABORTED = "aborted"  # fatal protocol error: our last words (GOAWAY) go out, then close
    LOST = "lost"  # the socket broke: every stream is cancelled
    DONE = "done"  # everything answered and sent: close politely


# The members as module constants, which the code below reads instead: on Python
# 3.11 reading an attribute of an Enum class (``_Phase.OPEN``) goes through EnumType's
# ``__getattr__`` hook, about 70 ns against about 10 for a global, and the request path
# reads them on every pass.
_PHASE_OPEN: Final = _Phase.OPEN
_PHASE_DOZING: Final = _Phase.DOZING
_PHASE_INPUT_ENDED: Final = _Phase.INPUT_ENDED
_PHASE_ABORTED: Final = _Phase.ABORTED
_PHASE_LOST: Final = _Phase.LOST
_PHASE_DONE: Final = _Phase.DONE


async def _no_next_stream() -> None:
    """For ``Connection._run_in_turn``: a task that runs one stream and ends."""
    return None


class _Runner:
    """An HTTP/2 stream task waiting for its next stream (Connection._park)."""

    __slots__ = ("stream", "wakeup")

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        self.stream: RequestStream | None = None


class Connection:
    """The driver: runs one connection's tasks around a sans-IO protocol object.

    Implements :class:`~trioserve.stream.StreamOwner` for its streams.
    """

    # Slots: an idle keep-alive connection is mostly this object and its tasks.
    __slots__ = (
        "_abort_code",
        "_busy_until",
        "_counts",
        "_doze_tried",
        "_dropped",
        "_head_started",
        "_idle_goaway_sent",
        "_idle_since",
        "_in_flight",
        "_io",
        "_lost_cause",
        "_next_stream",
        "_nursery",
        "_output_drained",
        "_output_wanted",
        "_parked",
        "_phase",
        "_pipeline_waiting",
        "_protocol",
        "_read_scope",
        "_reader_done",
        "_reader_wakeup",
        "_received_word",
        "_requests",
        "_sent_word",
        "_stats",
        "_thread_share",
        "_watchers",
        "can_sendfile",
        "ctx",
        "info",
        "multiplexed",
        "proto",
        "stream",
        "streams",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        proto: ServerProtocol,
        ctx: ServerContext,
        info: ConnectionInfo,
    ) -> None:
        self.stream = stream
        # Plain sockets get the lean path; the raw descriptor stays owned by the stream.
        self._io: _SocketIO | _StreamIO = (
            _SocketIO(stream.socket.fileno())
            if type(stream) is trio.SocketStream
            else _StreamIO(stream)
        )
        self.proto = proto
        self.ctx = ctx
        self.info = info
        self.multiplexed = proto.multiplexed
        self.can_sendfile = (
            HAVE_SENDFILE and not proto.multiplexed and type(stream) is trio.SocketStream
        )
        # HTTP/2 streams take a slot of this connection's share before a thread.
        self._thread_share: trio.CapacityLimiter | None = None
        self.streams: dict[int, RequestStream] = {}
        self._nursery: trio.Nursery | None = None
        self._phase = _PHASE_OPEN
        self._output_wanted = Wakeup()  # the sender sleeps on it
        self._output_drained: trio.Event | None = None  # made only when a stream waits
        self._reader_wakeup = Wakeup()  # the reader sleeps on it while paused
        self._in_flight = 0  # bytes handed to send_all and not yet sent
        self._reader_done = False
        self._read_scope: trio.CancelScope | None = None  # the reader's current wait
        self._head_started: float | None = None  # when the current partial request head began
        self._idle_goaway_sent = False
        # When the last request finished (None: one is in progress); the reader's
        # deadline is moved only to make it earlier (see _read_loop).
        self._idle_since: float | None = trio.current_time()
        self._doze_tried: float | None = None  # the _idle_since of the last chance to doze
        # The reader's deadline last found the connection busy: no doze deadline
        # before this (BUSY_RECHECK), so a busy connection's reader is not woken
        # every DOZE_AFTER.
        self._busy_until = _LONG_AGO
        self._dropped = False  # abort() was called
        self._pipeline_waiting = False  # HTTP/1.1: next request held back until output drains
        # Told of every write: spilling streams (made at the first one).
        self._watchers: set[RequestStream] | None = None
        # HTTP/1.1: the request task's wake-up (None until the first request) and
        # the request waiting for it.
        self._requests: Wakeup | None = None
        self._next_stream: RequestStream | None = None
        # HTTP/2: stream tasks waiting for the next stream (IDLE_PARKED_RUNNERS),
        # made at the first (an HTTP/1.1 connection never needs it).
        self._parked: list[_Runner] | None = None
        # The server's counters (trioserve.stats), and this connection's words in them.
        self._stats = ctx.stats
        self._counts = ctx.stats.counts
        self._protocol = HTTP2 if proto.multiplexed else HTTP1
        self._received_word = LAYOUT.received + self._protocol
        self._sent_word = LAYOUT.sent + self._protocol
        self._lost_cause = Cause.CONNECTION_LOST  # what a LOST phase means for its streams
        self._abort_code = 0  # the error code of an ABORTED connection (0: the peer's EOF)
        if ctx.shutting_down:
            proto.start_shutdown()

    # ---- lifecycle ----------------------------------------------------------

    async def run(self, initial: bytes = b"") -> bool:
        """Serve the connection until it closes; True if it dozes instead.

        A dozing connection has no task: its caller lists it with the server's
        keeper (``doze_listing``), which starts ``resume`` when it wakes.
        """
        self._stats.connection_opened(self._protocol)
        return await self._serve(initial)

    async def resume(self, readable: bool) -> bool:
        """Go on after a doze: serve what came if ``readable``, else close (the
        keep-alive time is up, the server stops, or ``abort``). True if it
        dozes again."""
        if readable and not self._dropped:
            self._phase = _PHASE_OPEN
            assert isinstance(self._io, _SocketIO)  # (only those doze)
            self._io.known_readable()
            return await self._serve(b"")
        try:
            if self._phase is _PHASE_DOZING and not self._dropped:
                self._phase = _PHASE_DONE
                await self._close_politely()
        finally:
            self._stats.connection_closed(self._protocol)
        return False

    def doze_listing(self) -> tuple[int, float]:
        """A dozing connection's socket, and when its keep-alive time ends."""
        assert isinstance(self._io, _SocketIO)
        assert self._idle_since is not None
        return self._io.fd, self._idle_since + self.ctx.config.keep_alive_timeout

    async def _serve(self, initial: bytes) -> bool:
        dozes = False
        try:
            await self._run_tasks(initial)
            if self._phase is _PHASE_DOZING and not self._dropped:
                dozes = self._doze()
            if self._phase is _PHASE_DONE:
                await self._close_politely()
        finally:
            if not dozes:
                self._stats.connection_closed(self._protocol)
        return dozes

    async def _run_tasks(self, initial: bytes) -> None:
        """The connection's nursery, until its tasks end (its frame, and the nursery, go then)."""
        io = self._io
        if type(io) is _SocketIO:
            # Watched while it has tasks: not while it dozes (the keeper
            # watches it then), nor once they ended and it closes.
            io.watched = self.ctx.readiness.add(io.fd)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if initial:
                    # Bytes read while choosing the protocol go in before any task
                    # runs, so nobody mistakes this connection for an idle one.
                    self._counts[self._received_word] += len(initial)
                    self._receive(initial)
                nursery.start_soon(self._sender_task, name=_SENDER_TASK)
                nursery.start_soon(self._reader_task, name=_READER_TASK)
        finally:
            # (Also when an outer cancel, a server's hard stop, ends the nursery.)
            self._nursery = None
            if type(io) is _SocketIO:
                self.ctx.readiness.remove(io.watched)
                io.watched = None
            # A request dispatched while the tasks were being cancelled (by a
            # read already done) may have been handed to a task that never ran
            # again.
            self._next_stream = None
            for stream in [s for s in self.streams.values() if not s.app_done]:
                stream.abandon()  # so it is counted out (requests_in_flight) all the same

    def start_shutdown(self) -> None:
        """Graceful stop: finish what is in flight, accept nothing new, then close."""
        self.proto.start_shutdown()
        self._wake_sender()
        self._wake_reader()
        self._wake_dozer()  # nothing in flight: close now

    def abort(self) -> None:
        """Stop now: cancel every stream and drop the connection."""
        # Also while its tasks are ending for a doze: run() must not go on to
        # wait for a next request then.
        self._dropped = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self._wake_dozer()

    def _wake_dozer(self) -> None:
        """End the doze now, if the connection dozes (see _doze)."""
        io = self._io
        if self._phase is _PHASE_DOZING and isinstance(io, _SocketIO):
            self.ctx.dozing.wake(io.fd)

    @property
    def dozing(self) -> bool:
        """An idle HTTP/1.1 connection whose tasks have ended until its next request."""
        return self._phase is _PHASE_DOZING

    def _may_doze(self) -> bool:
        """Is this an idle HTTP/1.1 connection with nothing at all under way?"""
        proto = self.proto
        return (
            self._phase is _PHASE_OPEN
            and type(self._io) is _SocketIO
            and not self.multiplexed
            and not self.streams
            and self._next_stream is None
            and not self._pipeline_waiting
            and not self._in_flight
            and not self._watchers
            and self._output_drained is None
            and not proto.output_size
            and not proto.buffered_input
            and not proto.partial_request
            and not proto.closing
            and not self.ctx.shutting_down
            and self.ctx.dozing.running  # (someone keeps the keep-alive time)
        )

    def _doze(self) -> bool:
        """The tasks have ended for a doze: keep only what an idle connection needs.

        True if it dozes (the caller lists it, with no task left); False if it
        is closing after all (a graceful stop began meanwhile): closed politely.
        """
        self._requests = None  # its task has ended: the next request starts one
        self._reader_done = False
        # Hold only what the next request cannot build again (see DOZE_AFTER):
        # the parser, and the streams table a dict keeps after its last key goes.
        self.proto.release_idle()
        self.streams = {}
        if self.proto.closing or self.ctx.shutting_down:
            self._phase = _PHASE_DONE
            return False
        return True

    @property
    def _reading(self) -> bool:
        return self._phase is _PHASE_OPEN

    async def _close_politely(self) -> None:
        """We close first: let the peer see our last bytes (a lingering close)."""
        await linger_close(self.stream)

    # ---- reader ---------------------------------------------------------------

    async def _reader_task(self) -> None:
        try:
            await self._read_loop()
        finally:
            self._reader_done = True
            self._wake_sender()  # it may be waiting for us to stop (_stop_reader)

    async def _stop_reader(self) -> None:
        """Stop the reader and wait until it has: a lingering close reads the socket too."""
        while not self._reader_done:
            if self._read_scope is not None:
                self._read_scope.cancel()
            await self._output_wanted.wait()

    async def _read_loop(self) -> None:
        # One cancel scope for many reads. Its deadline is only ever moved
        # earlier (a request head begins; the connection turns idle with no
        # deadline set); when it fires, the real deadline is worked out, and if
        # it is still ahead (the connection was busy meanwhile) the wait goes
        # on. So a keep-alive connection changes no deadline per request.
        counts = self._counts
        while True:
            with trio.CancelScope(deadline=self._idle_deadline()) as idle:
                self._read_scope = idle
                try:
                    while self._phase is _PHASE_OPEN:  # (self._reading, spelled out)
                        if self._reading_paused():
                            await self._reader_wakeup.wait()
                            continue
                        data = await self._io.receive()
                        counts[self._received_word] += len(data)
                        self._receive(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._connection_lost()
                    return
                finally:
                    self._read_scope = None
            if not self._reading:
                return  # cancelled by _stop_reader, or the input ended meanwhile
            if not idle.cancelled_caught:
                continue
            now = trio.current_time()
            if now < self._idle_deadline():
                # The deadline was stale (the connection was busy meanwhile): wait
                # on with the real one, and no doze deadline for BUSY_RECHECK.
                self._busy_until = now + BUSY_RECHECK
                continue
            if self._idle_expired():
                return

    def _receive(self, data: bytes | bytearray) -> None:
        proto = self.proto
        proto.receive_data(data)
        if not data and self._phase is _PHASE_OPEN:
            self._phase = _PHASE_INPUT_ENDED
        self._dispatch(proto.next_events())
        if proto.partial_request:
            if self._head_started is None:  # a request head has begun: header_timeout
                self._head_started = trio.current_time()
                self._tighten_deadline()
        elif self._head_started is not None:
            self._head_started = None
        if proto.wants_sender:
            self._wake_sender()

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
        config = self.ctx.config
        if self._head_started is not None:
            return self._head_started + config.header_timeout
        if self._idle_since is None or self.streams or self.proto.buffered_input:
            return math.inf
        if self.multiplexed:
            deadline = self._idle_since + config.h2_idle_timeout
            parked = self._parked
            if parked is not None and len(parked) > IDLE_PARKED_RUNNERS:  # time to shed some
                return min(deadline, max(self._idle_since + DOZE_AFTER, self._busy_until))
            return deadline
        deadline = self._idle_since + config.keep_alive_timeout
        if self._doze_tried != self._idle_since and type(self._io) is _SocketIO:
            return min(deadline, max(self._idle_since + DOZE_AFTER, self._busy_until))
        return deadline

    def _idle_expired(self) -> bool:
        """The idle deadline passed; True if the reader should stop reading."""
        if self._head_started is not None:
            self._dispatch(self.proto.expire_partial_request())
            self._wake_sender()
            return True
        if not self.multiplexed:
            assert self._idle_since is not None
            if trio.current_time() < self._idle_since + self.ctx.config.keep_alive_timeout:
                # DOZE_AFTER is up, not the keep-alive time: one chance per idle
                # spell (a connection still sending its answer stays as it is).
                self._doze_tried = self._idle_since
                if not self._may_doze():
                    return False
                self._phase = _PHASE_DOZING  # the sender ends too, and the nursery
                return True
            self.start_shutdown()  # idle HTTP/1.1 connection: close it
            return True
        parked = self._parked
        if parked is not None and len(parked) > IDLE_PARKED_RUNNERS:
            assert self._idle_since is not None
            if trio.current_time() < self._idle_since + self.ctx.config.h2_idle_timeout:
                # DOZE_AFTER is up, not the idle timeout: shed parked tasks.
                while len(parked) > IDLE_PARKED_RUNNERS:
                    parked.pop().wakeup.set()  # handed no stream: it ends
                return False
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

    def _tighten_deadline(self) -> None:
        """Bring the reader's deadline forward if the real one is earlier (see _read_loop)."""
        scope = self._read_scope
        if scope is not None:
            deadline = self._idle_deadline()
            if deadline < scope.deadline:
                scope.deadline = deadline

    def _reading_paused(self) -> bool:
        if self.proto.output_size + self._in_flight > OUTPUT_HIGH_WATER:
            return True
        if not self.multiplexed:
            if self.proto.buffered_input > PIPELINE_HIGH_WATER:
                return True
            for stream in self.streams.values():
                limit = BODY_READ_AHEAD if stream.reading_body else BODY_HIGH_WATER
                if stream.body.size >= limit:  # (stream.body_buffered, spelled out)
                    return True
        return False

    def _wake_reader(self) -> None:
        self._reader_wakeup.set()

    def _connection_lost(self, cause: Cause = Cause.CONNECTION_LOST) -> None:
        """The socket broke (or we dropped a client that reads nothing): cancel everything."""
        if self._phase is not _PHASE_LOST:
            self._lost_cause = cause
        self._phase = _PHASE_LOST
        self._cancel_all()
        self.proto.send_failed()
        self._wake_sender()

    def _cancel_all(self) -> None:
        for stream in self.streams.values():
            stream.cancel(CancelReason.PEER)

    # ---- dispatch -------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case BodyReceived(stream_id=stream_id, data=data):
                    stream = self.streams.get(stream_id)
                    if stream is None or not stream.feed_body(data):
                        # Nobody will read it: hand the flow-control credit straight back.
                        self.proto.acknowledge_body(stream_id, len(data))
                case RequestReceived():
                    self._start_stream(event)
                case BodyEnded(stream_id=stream_id):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.end_body()
                case StreamReset(stream_id=stream_id):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.cancel(CancelReason.PEER)
                case BadRequest():
                    self._bad_request(event)
                case UpgradeToH2():
                    self._upgrade(event)
                case ConnectionClosed(abort=abort, error_code=code):
                    # A clean HTTP/2 GOAWAY is not the end of reading: the peer
                    # still sends WINDOW_UPDATEs for the streams it lets finish.
                    if abort and self._phase is not _PHASE_LOST:
                        self._phase = _PHASE_ABORTED
                        self._abort_code = code
                        self._cancel_all()
                case WindowOpened():
                    # The sender is woken after every read anyway; spilling
                    # streams queue what the new window lets out.
                    for stream in list(self._watchers or ()):
                        stream.output_progressed()

    def _start_stream(self, event: RequestReceived) -> None:
        ctx = self.ctx
        config = ctx.config
        if self.multiplexed and self._live_apps() >= config.h2_max_concurrent_streams:
            # Live app invocations (reset ones still running included) are
            # bounded per connection: refuse, the client may retry (RFC 9113 §8.7).
            self.proto.reset_stream(event.stream_id, ResetReason.REFUSED)
            self._stats.request_done(HTTP2, 0, Cause.OVERLOADED, time.time())
            return
        limit = config.max_requests_in_flight
        refuse: int | None = None
        if limit and ctx.requests_in_flight >= limit:
            # Overloaded: an immediate 503 beats an unbounded queue for threads.
            LOGGER.info(
                "503 %d requests already in flight, refusing %s from %s",
                ctx.requests_in_flight,
                event.target.decode("latin-1"),
                self.info.client_addr or "unix socket",
            )
            refuse = 503
        else:
            ctx.requests_in_flight += 1
        stream = RequestStream(self, ctx, self.info, event, refuse=refuse)
        self.streams[event.stream_id] = stream
        self._idle_since = None  # busy (the reader's deadline catches up lazily)
        if not self.multiplexed:
            # HTTP/1.1 answers one request at a time, so one long-lived task
            # runs them all in turn (_run_in_turn), rather than a task being
            # started and torn down for every request.
            if self._requests is None:
                self._requests = Wakeup()
                assert self._nursery is not None
                self._nursery.start_soon(self._request_task, stream, name=_REQUEST_TASK)
            else:
                self._next_stream = stream
                self._requests.set()
        elif self._parked:
            runner = self._parked.pop()
            runner.stream = stream
            runner.wakeup.set()
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._stream_task, stream, name=_STREAM_TASK)

    async def _request_task(self, stream: RequestStream) -> None:
        await self._run_in_turn(stream, self._next_request)

    async def _next_request(self) -> RequestStream:
        while (stream := self._next_stream) is None:
            assert self._requests is not None
            await self._requests.wait()
        self._next_stream = None
        return stream

    async def _stream_task(self, stream: RequestStream) -> None:
        """HTTP/2: run ``stream``, then each stream handed over while parked.

        Concurrent streams have tasks of their own; a task whose stream is done
        parks (``_park``) rather than ending, and the next new stream goes to it.
        """
        runner = _Runner()
        await self._run_in_turn(stream, partial(self._park, runner))

    async def _run_in_turn(
        self,
        stream: RequestStream,
        next_stream: Callable[[], Awaitable[RequestStream | None]],
    ) -> None:
        """Run ``stream``, then each one ``next_stream`` gives, until it gives None.

        Each runs in a cancel scope lent to it (``RequestStream.run``), so its
        cancel reaches its own app alone; a new scope is opened only after one
        was cancelled. ``next_stream`` is awaited with no stream holding the
        scope, so nothing cancels that wait but the connection's end.
        """
        upcoming: RequestStream | None = stream
        while upcoming is not None:
            with trio.CancelScope() as scope:
                while upcoming is not None:
                    current, upcoming = upcoming, None
                    await current.run(scope)
                    # Only RequestStream.cancel cancels a lent scope (it has no
                    # deadline), and it sets cancel_reason first: so a stream
                    # never cancelled costs no look at the scope (whose
                    # cancel_called reads the clock).
                    if current.cancel_reason is not None and scope.cancel_called:
                        break  # (a cancel after its last checkpoint raised nothing)
                    upcoming = await next_stream()
            if scope.cancel_called:
                upcoming = await next_stream()

    async def _park(self, runner: _Runner) -> RequestStream | None:
        """Wait to be handed the next stream; None: end (too many wait already)."""
        parked = self._parked
        if parked is None:
            parked = self._parked = []
        elif len(parked) >= self.ctx.config.h2_max_concurrent_streams:
            return None
        parked.append(runner)
        try:
            await runner.wakeup.wait()
        except BaseException:
            # The connection is ending (its nursery was cancelled).
            if runner in parked:
                parked.remove(runner)
            raise
        stream, runner.stream = runner.stream, None
        return stream

    def _live_apps(self) -> int:
        """Streams whose app has not returned yet (HTTP/2's concurrency bound).

        Counted only at the limit: a stream whose app finished but whose
        response waits for window no longer counts against it. Nor does one
        whose response has ended on the wire while its app finishes: the
        client may open the next stream at once, and such apps are bounded
        anyway, each holding one of the connection's app threads.
        """
        streams = self.streams
        if len(streams) < self.ctx.config.h2_max_concurrent_streams:
            return len(streams)
        ended = self.proto.response_ended
        return sum(1 for sid, stream in streams.items() if not stream.app_done and not ended(sid))

    def _bad_request(self, event: BadRequest) -> None:
        client = self.info.client_addr or "unix socket"
        LOGGER.info("%d %s from %s", event.status, event.reason, client)
        if event.answered:  # a request the protocol layer refused before any stream began
            self._stats.request_done(self._protocol, event.status, Cause.REJECTED, time.time())
        if event.stream_id is not None:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.cancel(CancelReason.REFUSED, event.status)

    def _upgrade(self, event: UpgradeToH2) -> None:
        """Switch this connection to HTTP/2 after ``101 Switching Protocols``."""
        old = self.proto
        proto = self.ctx.new_http2()
        request = dataclasses.replace(event.request, stream_id=1, end_stream=True)
        proto.initiate_upgrade(event.settings, request, preamble=old.data_to_send())
        self.proto = proto
        self.multiplexed = True
        self.can_sendfile = False
        # Counted as an HTTP/1.1 connection that closed and an HTTP/2 one that opened.
        self._stats.connection_closed(HTTP1)
        self._stats.connection_opened(HTTP2)
        self._protocol = HTTP2
        self._received_word = LAYOUT.received + HTTP2
        self._sent_word = LAYOUT.sent + HTTP2
        # Admitted like any request (stream_done counts it out again).
        self.ctx.requests_in_flight += 1
        stream = RequestStream(self, self.ctx, self.info, request)
        if event.body:
            stream.feed_body(event.body)
            proto.note_upgrade_body(len(event.body))
        self.streams[1] = stream
        self._idle_since = None
        assert self._nursery is not None
        self._nursery.start_soon(
            self._run_in_turn,
            stream,
            _no_next_stream,
            name=f"stream 1 (upgraded) from {self.info.client_addr}",
        )
        if event.trailing:
            self._receive(event.trailing)

    # ---- StreamOwner: what a RequestStream asks of its connection -------------

    @property
    def torn_down(self) -> bool:
        """The whole connection is being torn down (abort, lost socket, hard stop)."""
        return self._nursery is not None and self._nursery.cancel_scope.cancel_called

    def send_head(self, stream_id: int, head: ResponseHead) -> None:
        """Queue a response head, adding the Date and Server headers if the app did not."""
        traits = self._add_server_fields(head)
        self.proto.send_response(
            stream_id,
            head.status,
            head.headers,
            reason=head.reason,
            content_length=head.content_length,
            traits=traits,
        )
        self._wake_sender()

    def send_whole(self, stream_id: int, head: ResponseHead, body: list[bytes]) -> None:
        """Queue a complete response (``send_head``, ``send_body`` for each chunk, ``end``)."""
        traits = self._add_server_fields(head)
        self.proto.send_whole_response(
            stream_id,
            head.status,
            head.headers,
            body,
            reason=head.reason,
            content_length=head.content_length,
            traits=traits,
        )
        self._output_wanted.set()

    def _add_server_fields(self, head: ResponseHead) -> int:
        """Append Date and Server to ``head`` unless the app set them; the app's traits."""
        traits = head.traits
        headers = head.headers
        if traits == UNCHECKED:  # (trioserve.wsgi checked it: the usual case)
            traits = field_traits(headers)
        if not traits & HAS_DATE:
            headers.append((b"Date", date_header()))
        server_header = self.ctx.server_header
        if server_header and not traits & HAS_SERVER:
            headers.append((b"Server", server_header))
        return traits

    def send_body(self, stream_id: int, data: bytes) -> None:
        self.proto.send_body(stream_id, data)
        self._wake_sender()

    def send_file(self, stream_id: int, segment: FileSegment) -> None:
        self.proto.send_file(stream_id, segment)
        self._wake_sender()

    def end(self, stream_id: int) -> None:
        self.proto.end_stream(stream_id)
        self._wake_sender()

    def send_continue(self, stream_id: int) -> None:
        self.proto.send_continue(stream_id)
        self._wake_sender()

    def send_error(self, stream_id: int, status: int, *, close: bool) -> int:
        queued = self.proto.send_error_response(stream_id, status, close=close)
        self._wake_sender()
        return queued

    def reset(self, stream_id: int, reason: ResetReason) -> int:
        """Abandon a response mid-way (HTTP/2: RST_STREAM; HTTP/1.1: close);
        the body bytes queued for it that were dropped."""
        dropped = self.proto.reset_stream(stream_id, reason)
        self._wake_sender()
        return dropped

    def output_queued(self, stream_id: int) -> int:
        return self.proto.stream_output_size(stream_id)

    def output_blocked(self, stream_id: int) -> bool:
        return self.proto.stream_blocked(stream_id)

    def output_room(self, stream_id: int) -> int:
        return self.proto.stream_send_room(stream_id)

    def take_output(self, stream_id: int) -> list[bytes | memoryview]:
        return self.proto.take_stream_output(stream_id)

    def watch_output(self, stream: RequestStream, watching: bool) -> None:
        if watching:
            if self._watchers is None:
                self._watchers = set()
            self._watchers.add(stream)
        elif self._watchers is not None:
            self._watchers.discard(stream)

    async def wait_output_progress(self) -> None:
        if self._output_drained is None:
            self._output_drained = trio.Event()
        await self._output_drained.wait()

    def body_consumed(self, stream_id: int, size: int) -> None:
        """The app took ``size`` body bytes: return flow-control credit, maybe resume reading."""
        self.proto.acknowledge_body(stream_id, size)
        if self.proto.output_size:
            self._wake_sender()
        self._wake_reader()

    def thread_share(self) -> trio.CapacityLimiter | None:
        """HTTP/2: the limiter bounding this connection's share of the app threads.

        None for HTTP/1.1, which runs one request at a time anyway.
        """
        share = self.ctx.config.max_threads_per_connection
        if self._thread_share is None and self.multiplexed and share:
            self._thread_share = trio.CapacityLimiter(share)
        return self._thread_share

    def stream_done(self, stream: RequestStream) -> None:
        """A stream's task finished: forget it and let the connection move on."""
        self.streams.pop(stream.stream_id, None)
        ctx = self.ctx
        if stream.admitted:
            ctx.requests_in_flight -= 1
            ctx.requests_served += 1
            if ctx.max_requests and ctx.requests_served == ctx.max_requests and ctx.on_max_requests:
                ctx.on_max_requests()
        if self.multiplexed and stream.body.size:
            # Unread body: give the connection-level credit back.
            self.proto.acknowledge_body(stream.stream_id, stream.body_buffered)
        failure = stream.failure
        self._stats.request_done(
            self._protocol,
            stream.status,
            0 if failure is None else self._failure_cause(stream, failure),
            stream.started_at,
        )
        if ctx.access_log is not None:
            ctx.access_log(stream)
        self._start_next_request()
        if not self.streams:
            now = self._idle_since = trio.current_time()
            scope = self._read_scope
            # The idle deadline is at least ctx.idle_floor away, and not before
            # _busy_until: a reader's deadline due by then stays (the usual case
            # under load: it fires, finds the connection busy again, and waits
            # on). It was worked out as an earlier idle spell's, and those only
            # come later (so do the idle timeouts and _busy_until): never late.
            if scope is not None:
                deadline = scope.deadline  # (a property: read once)
                if deadline > now + ctx.idle_floor and deadline > self._busy_until:
                    self._tighten_deadline()
        wanted = self._output_wanted
        if not wanted.armed and (self.proto.wants_sender or self._phase is _PHASE_ABORTED):
            # Something to send, or the sender may now close the connection. (A
            # whole response woke the sender already: it looks at all of this
            # when it runs.)
            wanted.set()
        self._reader_wakeup.set()

    def _failure_cause(self, stream: RequestStream, failure: Failure) -> Cause:
        """Why ``stream`` ended without the app's complete response (the counters' cause)."""
        if failure is Failure.APP_ERROR:
            return Cause.APP_ERROR
        if failure is Failure.STALLED:
            return Cause.STALLED_OUTPUT
        if failure is Failure.REFUSED:
            return Cause.REJECTED if stream.admitted else Cause.OVERLOADED
        # CANCELLED: by whom?
        if stream.cancel_reason is None:
            return Cause.SHUTDOWN  # the connection's tasks were cancelled: a hard stop
        if stream.cancel_reason is CancelReason.REFUSED:
            return Cause.REJECTED  # refused after its response had started: reset
        if self._phase is _PHASE_LOST:
            return self._lost_cause
        if self._phase is _PHASE_ABORTED:
            # HTTP/2 reports the peer's EOF as an abort without an error code.
            return Cause.PROTOCOL_ERROR if self._abort_code else Cause.CONNECTION_LOST
        # A reset while the connection stayed up; HTTP/1.1 can only "reset" by closing.
        return Cause.PEER_RESET if self.multiplexed else Cause.CONNECTION_LOST

    # ---- sender ---------------------------------------------------------------

    def _wake_sender(self) -> None:
        self._output_wanted.set()

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
                    self.ctx.config.write_timeout,
                )
                self._connection_lost(Cause.STALLED_OUTPUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Streams get cancelled; the nursery still waits for their threads.
            self._connection_lost()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _send_loop(self, write_scope: trio.CancelScope) -> None:
        io = self._io
        timeout = self.ctx.config.write_timeout
        timed = False  # a write set write_scope's deadline (cheaper than asking the scope)
        while True:
            # Write what the protocol has queued, bytes or a file.
            proto = self.proto  # (an h2c upgrade replaces it)
            parts = proto.buffers_to_send()
            if parts:
                size = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
                self._in_flight = size
                if not io.write_some(parts):
                    timed = True
                    await io.send_rest(parts, write_scope, timeout)
                self._counts[self._sent_word] += size
            elif (segment := proto.file_to_send()) is not None:
                self._in_flight = segment.length
                timed = True
                await self._sendfile(segment, write_scope)
            else:
                # Nothing queued: end, or wait to be woken.
                if self._phase is _PHASE_DOZING:
                    return  # the reader has ended; _sender_task ends the request task
                if self._phase is _PHASE_ABORTED:
                    # Our last words (GOAWAY) are out. Close the socket now rather
                    # than when the cancelled apps' threads return, which can take
                    # until their next read or write.
                    await self._stop_reader()
                    await self._close_politely()
                    return
                if proto.closing and not self.streams and not proto.has_queued_streams:
                    # Done: no app still running and no response still waiting
                    # for flow-control window (it goes out once the peer opens it).
                    if self._phase is not _PHASE_LOST:
                        self._phase = _PHASE_DONE
                    return
                if timed:
                    timed = False
                    write_scope.deadline = math.inf  # idle: no write to time out
                await self._output_wanted.wait()
                continue
            self._in_flight = 0
            if self._watchers:
                for stream in list(self._watchers):
                    stream.output_progressed()
            drained = self._output_drained
            if drained is not None:
                self._output_drained = None
                drained.set()
            self._reader_wakeup.set()  # it may be waiting for output to drain
            if self._pipeline_waiting:
                self._start_next_request()

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
        timeout = self.ctx.config.write_timeout
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
            self._counts[self._sent_word] += sent
            offset += sent
            remaining -= sent
            await trio.lowlevel.checkpoint()  # a big file must not hold up other connections
        segment.sent = True

    def _start_next_request(self) -> None:
        """HTTP/1.1: take the next pipelined request, unless the peer is behind on reading.

        Pipelined requests already buffered would otherwise be answered one
        after another into memory, however little of it the client reads.
        """
        if self.multiplexed or self.streams or self._nursery is None:
            return  # (None: the connection's tasks have ended, nobody would run it)
        if self.proto.output_size + self._in_flight > OUTPUT_HIGH_WATER:
            self._pipeline_waiting = True  # the sender comes back here once output drains
            return
        self._pipeline_waiting = False
        events = self.proto.next_events()
        if events:
            self._dispatch(events)
