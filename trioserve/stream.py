"""The trio side of one request: its task, its body buffer, and its cancel scope.

A :class:`RequestStream` is created by its connection when a request head
arrives and lives until its response has ended (or the stream was reset). Its
task, :meth:`RequestStream.run`, waits for a slot on the app-thread limiter,
runs the app in a worker thread, and sends whatever the thread leaves for it.

Two seams, one on each side:

* Towards the app thread, :class:`~trioserve.wsgi.StreamPort`: everything the
  thread asks for goes through ``push``, ``take_body_nowait`` and the
  ``wait_*`` methods here.
* Towards the connection, :class:`StreamOwner`: the stream queues its response
  (head, body, end, error, reset) and returns flow-control credit through it,
  and tells it when it is done. It knows nothing else of its connection, and
  nothing of HTTP/1.1 or HTTP/2. The connection talks back with
  :meth:`~RequestStream.feed_body`, :meth:`~RequestStream.end_body` and
  :meth:`~RequestStream.cancel`.

Rules:

1. The task runs inside a cancel scope, and :meth:`RequestStream.cancel`
   cancels it: that is how a reset, a disconnect or a refusal reaches the app
   (the thread's next read or write raises ``trio.Cancelled``). The
   connection's tasks (HTTP/1.1's request task, HTTP/2's stream tasks) lend
   each stream in turn the scope they run in, and open a new one only after a
   cancellation: entering and leaving a trio cancel scope costs about a tenth
   of a hello request's time on the trio thread. The stream an h2c upgrade
   carries runs the same way, in a task of its own that ends with it.
2. Once cancelled, nothing more is sent for the stream: ``take_body_nowait``
   and ``take_pushed`` check for cancellation before queueing anything.
3. Every stream ends exactly one way: a complete response, an error response
   (500, or the status a refused request earned), or a reset (none at all if
   the peer reset it first). :meth:`RequestStream.run` makes sure of it in its
   ``finally`` block, so a stream is never left half-open.
4. The body buffer is fed by the reader without ever blocking it; flow-control
   credit goes back to the peer only when the app takes the data.

Why a list and a wake-up rather than trio memory channels. The design
sketch carries body and output on memory channels; measured here (CPython
3.11, this project's machines) they would cost without buying anything:

* Body. The reader must never wait on one stream (rule 4), so a channel
  would be unbounded and fed with ``send_nowait``: the bound comes from flow
  control and the reader's pause, not from the channel. The app takes
  everything buffered per hop, which a channel yields one item at a time. And
  ``open_memory_channel`` costs 5.2 µs and 1.8 KB per stream, against 0.3 µs
  and 0.8 KB for this buffer (whose wake-up is made only if someone waits):
  5 % of a whole HTTP/1.1 request's budget on the trio thread. Cancellation
  needs no channel either: the cancel scope reaches the waiting task.
* Output. The protocol object is the queue (it frames and interleaves every
  stream's output under flow control), and the app thread's chunks reach it
  from a ``run_sync_soon`` callback. A channel would need a task to receive
  from it: one more task switch per batch of chunks, for bytes that are
  already in order.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

import trio

from .context import ServerContext
from .events import UNCHECKED, FileSegment, InvalidResponse, RequestReceived, ResetReason
from .responses import HAS_FRAMING, field_traits
from .spill import Spill
from .wakeup import Wakeup
from .wsgi import AppResult, ConnectionInfo, ResponseHead, StreamCancelled

LOGGER = logging.getLogger("trioserve.error")

# Response statuses that never carry a body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})

# An HTTP/2 stream may queue this much response data before its app thread
# waits for the socket to drain, counting chunks it pushed that trio has not yet
# taken (push()). Per stream: a connection carries up to
# --h2-max-concurrent-streams of them.
STREAM_HIGH_WATER = 256 * 1024

# The same for HTTP/1.1, where one response at a time has the connection. Each
# wait is a thread handoff costing about as much as writing eight chunks of 64
# KiB, so what an app thread pushes per wake sets a streamed download's speed
# (64 KiB chunks, one core: 1,350 MiB/s at 128 KiB, 2,300 at 256 KiB, 3,700 at
# 512 KiB, 4,800 at 1 MiB). A client that stops reading holds this much memory,
# plus the write under way (http1.MAX_WRITE), for the write timeout: together
# 1 MiB, the bound they had as 512 KiB each. Of the splits of that MiB, 768
# KiB queued and 256 KiB writes streams fastest (4,100-4,250 MiB/s, against
# 3,700-3,850 for 512 and 512, and 3,800-3,950 for 896 and 128).
HTTP1_HIGH_WATER = 768 * 1024

# The name app threads get (trio's default formats one per call from the task's name).
APP_THREAD_NAME = "trioserve app"

# A spilling stream (spill.py) keeps at most this much of its response queued in
# memory, reading the next piece back from its file as the client takes it.
SPILL_REFILL = 64 * 1024

# The most request body awaited before the app gets a thread (--body-prebuffer): the
# HTTP/1.1 reader stops reading at BODY_HIGH_WATER (64 KiB) until the app reads,
# so waiting for more could never end.
MAX_BODY_PREBUFFER = 64 * 1024


class StreamOwner(Protocol):
    """What a :class:`RequestStream` needs from its connection, and all it may use.

    Every ``send_*``/``end``/``reset`` call queues output for the connection's
    sender (and wakes it); none blocks. ``stream_id`` names the stream on the
    connection.
    """

    multiplexed: bool  # HTTP/2: many streams share the connection and its threads
    can_sendfile: bool  # a response body may go out with os.sendfile

    @property
    def torn_down(self) -> bool:
        """The whole connection is being dropped: nothing queued will be sent."""
        ...

    def send_head(self, stream_id: int, head: ResponseHead) -> None: ...
    def send_whole(self, stream_id: int, head: ResponseHead, body: list[bytes]) -> None:
        """``send_head``, ``send_body`` for each chunk, then ``end``, in one call."""
        ...

    def send_body(self, stream_id: int, data: bytes) -> None: ...
    def send_file(self, stream_id: int, segment: FileSegment) -> None: ...
    def end(self, stream_id: int) -> None: ...
    def send_continue(self, stream_id: int) -> None: ...
    def send_error(self, stream_id: int, status: int, *, close: bool) -> int:
        """Answer with trioserve's own error page; the body bytes it queued."""
        ...

    def reset(self, stream_id: int, reason: ResetReason) -> int:
        """Abandon the response; the body bytes queued for it that were dropped."""
        ...

    def output_queued(self, stream_id: int) -> int:
        """Response bytes of this stream queued and not yet handed to the socket."""
        ...

    def output_blocked(self, stream_id: int) -> bool:
        """Is more of this stream queued than its flow-control window lets out now?"""
        ...

    async def wait_output_progress(self) -> None:
        """Return once the sender has written something (or the connection ends)."""
        ...

    def output_room(self, stream_id: int) -> int:
        """Body bytes of this stream the peer would accept now (HTTP/2 flow control)."""
        ...

    def take_output(self, stream_id: int) -> list[bytes | memoryview]:
        """Take back this stream's queued body bytes not yet framed (HTTP/2; HTTP/1.1: none)."""
        ...

    def watch_output(self, stream: RequestStream, watching: bool) -> None:
        """Call ``stream.output_progressed()`` after each write (or stop, if not ``watching``)."""
        ...

    def body_consumed(self, stream_id: int, size: int) -> None:
        """The app took ``size`` body bytes: return the credit, resume reading."""
        ...

    def thread_share(self) -> trio.CapacityLimiter | None:
        """A limiter bounding this connection's share of the app threads, if any."""
        ...

    def stream_done(self, stream: RequestStream) -> None:
        """The stream's task is over: forget it, log it, move on."""
        ...


class Response(enum.Enum):
    """How far a stream's response has gone."""

    PENDING = "pending"  # nothing queued: an error response is still possible
    STARTED = "started"  # the head is queued; body may follow
    ENDED = "ended"  # complete, an error response, or reset: nothing more goes out


# The members as module constants, which the code below reads instead: on Python
# 3.11 reading an attribute of an Enum class (``Response.ENDED``) goes through EnumType's
# ``__getattr__`` hook, about 70 ns against about 10 for a global, and every request
# reads a few.
_RESPONSE_PENDING: Final = Response.PENDING
_RESPONSE_STARTED: Final = Response.STARTED
_RESPONSE_ENDED: Final = Response.ENDED


class CancelReason(enum.Enum):
    """Why a stream was cancelled, which decides how it ends (rule 3)."""

    PEER = "peer"  # the peer reset it or went away: send nothing, not even a reset
    REFUSED = "refused"  # the request broke a rule: answer its status if nothing went out
    ABANDONED = "abandoned"  # we gave up on it (output stalled, the app broke its response)


class Failure(enum.Enum):
    """How a stream ended without the app's complete response, as far as the stream knows.

    Recorded where the ending is decided, for the server's counters; the
    connection refines CANCELLED by how it was cancelled (a peer reset, a lost
    connection, a shutdown: see ``Connection.stream_done``).
    """

    APP_ERROR = "app error"  # the app raised, or broke its own response
    STALLED = "stalled"  # the client accepted none of its output for write_timeout
    REFUSED = "refused"  # answered with error_status (or reset) instead of the app's response
    CANCELLED = "cancelled"  # cut short by the peer, the connection or a stop


class _BodyBuffer:
    """Request body bytes received but not yet handed to the app."""

    __slots__ = ("_changed", "chunks", "ended", "size")

    def __init__(self, ended: bool) -> None:
        self.chunks: list[bytes] = []  # (appended, joined and cleared: a list is cheaper to make)
        self.size = 0
        self.ended = ended
        self._changed: Wakeup | None = None  # made only if someone ever waits

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self._changed is not None:
            self._changed.set()

    def end(self) -> None:
        self.ended = True
        if self._changed is not None:
            self._changed.set()

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.size = 0
        return data

    async def wait(self) -> None:
        if self._changed is None:
            self._changed = Wakeup()
        await self._changed.wait()


class RequestStream:
    """One request/response exchange on a connection (see module docstring)."""

    # Slots: one is made per request, and its attributes are read on every hop.
    __slots__ = (
        "_body_bytes",
        "_continue_sent",
        "_ctx",
        "_file",
        "_owner",
        "_push_lock",
        "_pushed",
        "_pushed_size",
        "_queued",
        "_scope",
        "_spill",
        "_spill_backlog",
        "_take_scheduled",
        "_trio_token",
        "admitted",
        "app_done",
        "body",
        "can_sendfile",
        "cancel_reason",
        "error_status",
        "failure",
        "high_water",
        "info",
        "reading_body",
        "request",
        "response",
        "response_head",
        "started_at",
        "status",
        "stream_id",
    )

    def __init__(
        self,
        owner: StreamOwner,
        ctx: ServerContext,
        info: ConnectionInfo,
        request: RequestReceived,
        *,
        refuse: int | None = None,
    ) -> None:
        self._owner = owner
        self._ctx = ctx
        self.info = info
        self.request = request
        self.stream_id = request.stream_id
        self.body = _BodyBuffer(request.end_stream)
        # The scope this stream's task runs in, while it runs (rule 1).
        self._scope: trio.CancelScope | None = None
        self.response = _RESPONSE_PENDING
        self.response_head: ResponseHead | None = None
        self.cancel_reason: CancelReason | None = None
        self.error_status: int | None = None  # the status a refused request is answered with
        self.failure: Failure | None = None  # None: the app's complete response (or still going)
        self.admitted = refuse is None  # counts against ServerContext.requests_in_flight
        self.app_done = False  # the app has returned (its response may still be queued)
        self.reading_body = False  # the app has asked for body data (HTTP/1.1 reads ahead)
        self.status = 0
        # Response body bytes queued for the client and not dropped since (a
        # reset's unframed output, HTTP/2 output taken back to spill to disk).
        self._body_bytes = 0
        self.started_at = time.time()
        self._continue_sent = False
        self.can_sendfile = owner.can_sendfile  # read by the app thread (wsgi.call_app)
        self._file: FileSegment | None = None  # a response body going out by sendfile
        # Response chunks pushed by the app thread, not yet taken by trio (push()).
        self._push_lock = threading.Lock()
        self._pushed: list[tuple[ResponseHead | None, bytes]] = []
        self._pushed_size = 0
        self._take_scheduled = False
        self._queued = 0  # the stream's queued output, as of the last take
        # Set once the app thread has waited --spill-after for this client: the
        # rest of the response goes through a file (see spill.py).
        self._spill: Spill | None = None
        self._spill_backlog: list[bytes | memoryview] = []  # taken back at the switch: first
        self.high_water = STREAM_HIGH_WATER if owner.multiplexed else HTTP1_HIGH_WATER
        self._trio_token = ctx.trio_token
        if refuse is not None:
            self.cancel(CancelReason.REFUSED, refuse)

    @property
    def bytes_sent(self) -> int:
        """The response body's bytes (the access log's ``%b``), the app's or trioserve's
        own error page: none for a HEAD request, whose head describes a body it never
        gets (no more than for a 204 or 304, which have none). A response reset
        counts what went out before the reset: HTTP/1.1 sends what was queued, then
        closes; HTTP/2 drops what was not framed yet."""
        return 0 if self.request.method == b"HEAD" else self._body_bytes

    # ---- called by the connection -------------------------------------------

    def feed_body(self, data: bytes) -> bool:
        """Buffer request body bytes; False if nobody will read them (cancelled)."""
        if self.cancel_reason is not None:
            return False
        self.body.feed(data)
        return True

    def end_body(self) -> None:
        """The request body is complete."""
        self.body.end()

    def cancel(self, reason: CancelReason, status: int | None = None) -> None:
        """Stop this stream's app and decide how the stream ends (rule 3).

        ``status`` goes with :attr:`CancelReason.REFUSED`: the response the
        request gets if none has started. The first reason given is kept,
        except that the peer going away always wins (nothing can be sent then).
        """
        if self.cancel_reason is None or reason is CancelReason.PEER:
            self.cancel_reason = reason
            if status is not None:
                self.error_status = status
        if self._scope is not None:
            self._scope.cancel()

    @property
    def body_buffered(self) -> int:
        """Body bytes received and not yet taken by the app."""
        return self.body.size

    # ---- called from the app thread through trio.from_thread ---------------

    def take_body_nowait(self) -> bytes | None:
        """Buffered body bytes, b"" at the end, or None if the thread must wait."""
        if trio.current_effective_deadline() == -math.inf:
            raise StreamCancelled
        self.reading_body = True
        body = self.body
        if body.size:
            data = body.take()
            self._owner.body_consumed(self.stream_id, len(data))
            return data
        if body.ended:
            return b""
        self._send_continue()
        return None

    async def wait_body(self) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            data = self.take_body_nowait()
            if data is not None:
                return data
            await self._wait_body_progress()

    async def _wait_body_progress(self) -> None:
        """Wait for more request body; 408 and cancel if none comes for ``body_timeout``."""
        timeout = self._ctx.config.body_timeout
        with trio.move_on_after(timeout) as timer:
            await self.body.wait()
        if timer.cancelled_caught:
            # The client stopped sending mid-body: the app's read must not hang.
            LOGGER.info(
                "408 request body stalled for %.0fs: %s %s from %s",
                timeout,
                self.request.method.decode("latin-1"),
                self.request.target.decode("latin-1"),
                self.info.client_addr or "unix socket",
            )
            self.cancel(CancelReason.REFUSED, 408)
            await trio.lowlevel.checkpoint()  # raises Cancelled (into the app thread, if any)

    async def _wait_for_body_start(self) -> None:
        """While app threads are scarce, hold a request back until its body has come in.

        An app reading ``wsgi.input`` holds a thread for as long as the client
        takes to send the body; a client trickling a byte at a time (R.U.D.Y.)
        never stalls long enough for ``body_timeout``, so a few of them could
        pin every thread. So once half the threads are busy, a request whose
        body is still arriving waits here, costing a task and at most
        ``--body-prebuffer`` bytes instead of a thread, until that much of the
        body (or all of it) is in. With threads to spare the app starts at
        once, so it can read a body as it streams in. A client that sent
        ``Expect: 100-continue`` is never held: it sends nothing until the app
        reads.
        """
        body = self.body
        config = self._ctx.config
        if body.ended or self.request.expects_continue or not config.body_prebuffer:
            return
        wanted = min(config.body_prebuffer, MAX_BODY_PREBUFFER)
        if self._owner.multiplexed:
            # Credit comes back only as the app reads: never wait for more
            # than one stream window.
            wanted = min(wanted, config.h2_initial_window_size)
        limiter = self._ctx.limiter
        while (
            not body.ended
            and body.size < wanted
            and limiter.available_tokens <= limiter.total_tokens // 2
        ):
            await self._wait_body_progress()

    def push(self, head: ResponseHead | None, data: bytes) -> bool:
        """App thread: hand over ``head`` (first call) and ``data`` without waiting.

        The one method here that runs in the app thread itself. The chunk goes
        on a list that the trio side drains from a ``run_sync_soon`` callback
        (:meth:`take_pushed`), so a streaming app makes no round trip per chunk:
        transmission goes on while the app produces its next block, as PEP 3333
        allows. Returns False when the thread should wait (:meth:`wait_writable`)
        before pushing more: what it has pushed and the trio side has not taken
        yet, plus the stream's queue as of the last take, reach its high-water
        mark. So a stream holds no more response data than when every chunk was
        a round trip.
        """
        spill = self._spill
        if spill is not None:
            keep_going = self._push_to_spill(spill, data)
            data = b""  # only the news that the file grew goes to trio
        with self._push_lock:
            if data or head is not None:
                self._pushed.append((head, data))
                self._pushed_size += len(data)
                keep_going = self._pushed_size + self._queued < self.high_water
            schedule = not self._take_scheduled
            self._take_scheduled = True
        if schedule:
            self._trio_token.run_sync_soon(self.take_pushed)
        return keep_going

    def _push_to_spill(self, spill: Spill, data: bytes) -> bool:
        """App thread: append to the spill file (what was taken back goes first)."""
        backlog, self._spill_backlog = self._spill_backlog, []
        for chunk in backlog:
            spill.write(chunk)
        return spill.write(data)

    def take_pushed(self) -> None:
        """Trio side: queue what the app thread pushed, in order.

        Runs as a ``run_sync_soon`` callback (outside any task), and also from
        the stream's task before it looks at the response state, so nothing
        pushed is ever left behind. Must not raise: an error here would be the
        run loop's. Once the stream is cancelled, pushed data is dropped (rule 2).
        """
        with self._push_lock:
            pushed = self._pushed
            self._take_scheduled = False
            if pushed:
                self._pushed = []
                # Count what is being taken as queued until the exact figure
                # below: a push() in between must not see these bytes nowhere.
                self._queued += self._pushed_size
                self._pushed_size = 0
        owner = self._owner
        if self.cancel_reason is not None or self.response is _RESPONSE_ENDED or owner.torn_down:
            return
        sid = self.stream_id
        try:
            for head, data in pushed:
                if head is not None:
                    self._start_response(head)
                if data:
                    owner.send_body(sid, data)
                    self._body_bytes += len(data)
            if self._spill is not None:
                self._refill(self._spill)
        except InvalidResponse as exc:
            # The app broke HTTP framing (e.g. more bytes than its Content-Length).
            self._abort(f"invalid response: {exc}")
            return
        except Exception:  # a bug of ours: end this stream, not the server
            LOGGER.exception("Internal error queueing a response body")
            self._abort("internal error")
            return
        self._queued = owner.output_queued(sid)

    def output_progressed(self) -> None:
        """The connection wrote something: a spilling stream reads its next piece back."""
        spill = self._spill
        if spill is None or self.cancel_reason is not None or self.response is _RESPONSE_ENDED:
            return
        try:
            self._refill(spill)
        except InvalidResponse as exc:
            self._abort(f"invalid response: {exc}")

    def _refill(self, spill: Spill) -> None:
        """Queue spilled bytes back: at most SPILL_REFILL in memory, and no more than the
        peer's window."""
        if spill.failed is not None:
            self._abort(f"cannot write the response to {spill.failed.filename or 'disk'}")
            return
        owner = self._owner
        sid = self.stream_id
        while spill.unread:
            # No more than the peer would take now: a client that opens no
            # window costs no memory here, however many streams it has.
            room = min(SPILL_REFILL - owner.output_queued(sid), owner.output_room(sid))
            if room <= 0:
                return
            data = spill.read(room)
            owner.send_body(sid, data)
            self._body_bytes += len(data)

    async def wait_writable(self) -> None:
        """Block the app thread until its queued output drains below the high-water mark.

        A stream whose own output makes no progress for ``write_timeout`` (the
        client keeps its window at zero, or stops reading) is reset and the
        app is cancelled: a stalled client must not hold a thread forever.
        Progress of other streams does not count.
        """
        self.take_pushed()
        await trio.lowlevel.checkpoint_if_cancelled()
        spill = self._spill
        if spill is not None:
            # Its file is full (or the server's spill budget is used up): the
            # thread waits until the client has read all of it back, then the
            # file is reused from its start.
            await self._wait_for_output(self._spill_drained)
            spill.rewind()
            return
        if self._writable():
            # The sender wrote the queue while this call was on its way from the
            # thread (the usual case with a client that keeps up): nothing to
            # wait for, so no timers to set up either.
            self._queued = self._owner.output_queued(self.stream_id)
            return
        config = self._ctx.config
        if config.spill_after and self._ctx.spill_budget.has_room:
            with trio.move_on_after(config.spill_after):
                await self._wait_for_output(self._writable)
                self._queued = self._owner.output_queued(self.stream_id)
                return
            self._start_spill()
            return
        await self._wait_for_output(self._writable)
        self._queued = self._owner.output_queued(self.stream_id)

    def _start_spill(self) -> None:
        """This client is slow: from now on the app thread writes to a file (spill.py)."""
        config = self._ctx.config
        self._spill = Spill(self._ctx.spill_budget, config.max_spill_per_response, config.spill_dir)
        # Data queued but not yet framed goes to the file too (HTTP/2), so that
        # a spilling stream holds about SPILL_REFILL of memory, not its high water.
        backlog = self._spill_backlog = self._owner.take_output(self.stream_id)
        self._body_bytes -= sum(map(len, backlog))  # counted again when they go out
        self._owner.watch_output(self, True)
        LOGGER.debug(
            "%s %s: the client takes more than %.2gs; spilling the response",
            self.request.method.decode("latin-1"),
            self.request.target.decode("latin-1"),
            config.spill_after,
        )

    async def _drain_spill(self, spill: Spill) -> None:
        """The app has returned: send what it left in the file (and backlog), then end."""
        backlog, self._spill_backlog = self._spill_backlog, []
        for chunk in backlog:  # the app stopped before it wrote these out
            self._owner.send_body(self.stream_id, bytes(chunk))
            self._body_bytes += len(chunk)
        self._refill(spill)
        await self._wait_for_output(self._spill_drained)

    def _spill_drained(self) -> bool:
        spill = self._spill
        return spill is None or (not spill.unread and spill.failed is None)

    def _writable(self) -> bool:
        return self._owner.output_queued(self.stream_id) < self.high_water

    def _all_sent(self) -> bool:
        return not self._owner.output_queued(self.stream_id)

    def _remaining(self) -> int:
        """Response bytes not yet handed to the socket: queued, and still in the file."""
        queued = self._owner.output_queued(self.stream_id)
        return queued + self._spill.unread if self._spill is not None else queued

    async def _wait_for_output(self, ready: Callable[[], bool]) -> None:
        owner = self._owner
        timeout = self._ctx.config.write_timeout
        queued = self._remaining()
        deadline = trio.current_time() + timeout
        while not ready():
            with trio.move_on_at(deadline):
                await owner.wait_output_progress()
            now_queued = self._remaining()
            if now_queued < queued:
                queued = now_queued
                deadline = trio.current_time() + timeout
            elif trio.current_time() >= deadline:
                LOGGER.info(
                    "Resetting %s %s for %s: no output accepted for %.0fs",
                    self.request.method.decode("latin-1"),
                    self.request.target.decode("latin-1"),
                    self.info.client_addr or "a unix socket client",
                    timeout,
                )
                self.failure = Failure.STALLED
                self._reset(ResetReason.CANCEL)
                self.cancel(CancelReason.ABANDONED)
                await trio.lowlevel.checkpoint()  # raises Cancelled into the app thread

    # ---- the stream's task --------------------------------------------------

    async def run(self, scope: trio.CancelScope) -> None:
        """Run the app for this request and finish the stream, whatever happens.

        ``scope`` is the (uncancelled) cancel scope the caller runs this in,
        lent to the stream until this returns (rule 1). A cancellation of it
        propagates to the caller, which must also check ``scope.cancel_called``
        once this returns if the stream was cancelled (a cancel that came after
        the last checkpoint raised nothing).
        """
        try:
            if self.cancel_reason is not None:  # refused before it started (503)
                return
            self._scope = scope
            if not self.body.ended:  # (its own first check: spares bodiless requests a call)
                await self._wait_for_body_start()
            result = await self._run_app()
            self.app_done = True
            if result is not None:
                if self._spill is not None:
                    await self._drain_spill(self._spill)
                self._complete(result)
            if self._file is not None and not self._file.sent:
                await self._wait_file_sent(self._file)
            owner = self._owner
            if owner.multiplexed and owner.output_blocked(self.stream_id):
                # HTTP/2: hold the stream open until its finished response has
                # gone out, under the same stall rule as wait_writable, so a
                # client that never opens its window cannot pin the queued bytes
                # forever.
                await self._wait_for_output(self._all_sent)
        finally:
            self._scope = None  # a late cancel() must not reach a lent scope's next stream
            self._end()

    def _end(self) -> None:
        """The stream's last step, run or not: release what it holds, end it, report it."""
        self.app_done = True
        if self._file is not None:
            self._file.release()  # the app's iterable (wsgi.file_wrapper) closes the file
        if self._spill is not None:
            self._owner.watch_output(self, False)
            self._spill.close()
        if self.response is not _RESPONSE_ENDED:  # (_finish's own first check, spelled out)
            self._finish()
        self._owner.stream_done(self)

    def abandon(self) -> None:
        """End a stream whose task never ran it: its connection's tasks ended first.

        Nothing can be sent any more, so it ends as if the peer had gone (rule 3).
        """
        self.cancel(CancelReason.PEER)
        self._end()

    async def _wait_file_sent(self, segment: FileSegment) -> None:
        """Hold the stream (and its file open) until the sender has sent the file.

        The sender's write timeout covers a client that stops reading; losing
        the connection cancels this wait.
        """
        while not segment.sent:
            await self._owner.wait_output_progress()

    async def _run_app(self) -> AppResult | None:
        """The app's result, or None if it failed (and the stream has been answered)."""
        initial = self.body.take() if self.body.size else b""
        if initial:
            self._owner.body_consumed(self.stream_id, len(initial))
        ctx = self._ctx
        owner = self._owner
        share = owner.thread_share() if owner.multiplexed else None  # (HTTP/1.1: none)
        try:
            if share is not None:
                await share.acquire()
            try:
                result = await trio.to_thread.run_sync(
                    ctx.call_app,
                    ctx.app,
                    self.request,
                    self.info,
                    self,
                    initial,
                    self.body.ended,
                    limiter=ctx.thread_limiter,
                    thread_name=APP_THREAD_NAME,
                )
            finally:
                if share is not None:
                    share.release()
                if self._pushed:  # the thread is done: nobody pushes meanwhile
                    self.take_pushed()  # whatever it pushed before it returned
        except Exception:
            LOGGER.exception(
                "Error in the application handling %s %s",
                self.request.method.decode("latin-1"),
                self.request.target.decode("latin-1"),
            )
            self.failure = Failure.APP_ERROR
            if self.response is _RESPONSE_PENDING:
                self._send_error(500)
            else:
                self._abort("the application failed after the response started")
            return None
        if result.file is not None:
            result.file.close_file = result.close
            self._file = result.file
        return result

    def _complete(self, result: AppResult) -> None:
        """Send what the app thread left for us and end the response."""
        if self.cancel_reason is not None or self.response is _RESPONSE_ENDED:
            return
        owner = self._owner
        sid = self.stream_id
        head = result.head
        try:
            if head is None:
                owner.end(sid)  # the app streamed: head and body went out already
            elif result.file is not None:
                self._start_response(head)
                if head.status in _NO_BODY_STATUSES:
                    result.file.sent = True  # nothing of it to send
                else:
                    owner.send_file(sid, result.file)  # (HEAD: marked sent)
                    self._body_bytes += result.file.length
                owner.end(sid)
            else:
                # The whole response is here: one call queues it, head to end.
                bodyless = head.status in _NO_BODY_STATUSES
                body = [] if bodyless else result.body
                size = sum(map(len, body))
                declared = head.content_length
                if bodyless or declared == size:
                    pass
                elif declared is None or declared == UNCHECKED:
                    if not field_traits(head.headers, head.traits) & HAS_FRAMING:
                        # The whole body is here: say how long it is.
                        head.headers.append((b"Content-Length", str(size).encode("ascii")))
                        if declared is None:  # (a checked head stays checked)
                            head.content_length = size
                else:
                    # The body breaks its Content-Length: queued piece by piece,
                    # so what went out before the protocol refused the rest is
                    # counted (the access log's bytes), then the response aborts.
                    self._start_response(head)
                    for chunk in body:
                        owner.send_body(sid, chunk)
                        self._body_bytes += len(chunk)
                    owner.end(sid)  # raises if too short (for HEAD, nothing was checked)
                    self.response = _RESPONSE_ENDED
                    return
                self._response_started(head)
                owner.send_whole(sid, head, body)
                self._body_bytes += size
        except InvalidResponse as exc:
            self._abort(f"invalid response: {exc}")
            return
        self.response = _RESPONSE_ENDED

    # ---- ending the stream --------------------------------------------------

    def _start_response(self, head: ResponseHead) -> None:
        self._response_started(head)
        self._owner.send_head(self.stream_id, head)

    def _response_started(self, head: ResponseHead) -> None:
        """Record that ``head`` is this stream's response, about to be queued."""
        self.status = head.status
        self.response_head = head
        self.response = _RESPONSE_STARTED

    def _send_continue(self) -> None:
        if (
            self.request.expects_continue
            and not self._continue_sent
            and self.response is _RESPONSE_PENDING
        ):
            self._continue_sent = True
            self._owner.send_continue(self.stream_id)

    def _send_error(self, status: int) -> None:
        self.status = status
        self.response = _RESPONSE_ENDED
        # After a 4xx about the request itself, its body state is unknown:
        # that HTTP/1.1 connection is not reused.
        close = 400 <= status < 500 and not self.body.ended
        self._body_bytes = self._owner.send_error(self.stream_id, status, close=close)

    def _reset(self, reason: ResetReason) -> None:
        """End the response with a reset (HTTP/1.1: close), unless the peer reset first."""
        self.response = _RESPONSE_ENDED
        if self.cancel_reason is not CancelReason.PEER:
            # (the access log counts only the body bytes that still go out)
            self._body_bytes -= self._owner.reset(self.stream_id, reason)

    def _abort(self, why: str) -> None:
        """Give up on this response mid-way because the app broke it."""
        LOGGER.error(
            "Aborting %s %s: %s",
            self.request.method.decode("latin-1"),
            self.request.target.decode("latin-1"),
            why,
        )
        self.failure = Failure.APP_ERROR
        self._reset(ResetReason.APP_ERROR)
        self.cancel(CancelReason.ABANDONED)

    def _whole_body_queued(self) -> bool:
        """Did all of a Content-Length response's body reach the connection?

        Then the peer that went away had everything but the end marker (HTTP/2
        END_STREAM, queued a moment later): one-shot clients such as curl close
        as soon as they have Content-Length bytes. That is a complete response,
        as it is on HTTP/1.1, where the end adds no bytes.
        """
        head = self.response_head
        if head is None:
            return False
        for name, value in head.headers:
            if name.lower() == b"content-length":
                return value.isdigit() and int(value) == self._body_bytes
        return False

    def _finish(self) -> None:
        """Make sure the stream ended exactly one way (rule 3)."""
        if self.response is _RESPONSE_ENDED:
            return
        if self.cancel_reason is CancelReason.PEER:
            if not self._whole_body_queued():
                self.failure = Failure.CANCELLED
            self.response = _RESPONSE_ENDED  # nobody to tell
            return
        if self.error_status is not None:
            self.failure = Failure.REFUSED
            if self.response is _RESPONSE_PENDING:
                self._send_error(self.error_status)
                return
        else:
            # Cancelled (shutdown, disconnect, protocol error) before finishing.
            self.failure = Failure.CANCELLED
        self._reset(ResetReason.CANCEL)
