"""The trio side of one request: its task, its body buffer, and its cancel scope.

A :class:`RequestStream` is created by the connection's reader when a request
head arrives and lives until its response has ended (or the stream was reset).
Its task, :meth:`RequestStream.run`, waits for a slot on the app-thread
limiter, runs the app in a worker thread, and sends whatever the thread leaves
for it. Everything the thread asks for goes through ``push``,
``take_body_nowait`` and the ``wait_*`` methods here (the
:class:`~trioserve.wsgi.StreamPort` protocol).

Rules:

1. The task runs inside :attr:`RequestStream.cancel_scope`, registered with the
   connection by stream id. Cancelling it is how a reset, a disconnect or a
   shutdown reaches the app: the thread's next read or write raises
   ``trio.Cancelled``.
2. Once cancelled, nothing more is sent for the stream: ``take_body_nowait``
   and ``take_pushed`` check for cancellation before touching the protocol.
3. Every stream ends exactly one way: a complete response, an error response
   (500, or the status a bad request earned), or a reset. ``run`` makes sure of
   it in its ``finally`` block, so a stream is never left half-open.
4. The body buffer is fed by the reader without ever blocking it; flow-control
   credit goes back to the peer only when the app takes the data.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .events import FileSegment, InvalidResponse, RequestReceived
from .wsgi import AppResult, ResponseHead, StreamCancelled, call_app

if TYPE_CHECKING:
    from .connection import Connection

LOGGER = logging.getLogger("trioserve.error")

# RST_STREAM code for a response the app (not the client) broke, RFC 9113 §7.
INTERNAL_ERROR = 0x2

# Response statuses that never carry a body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


class _BodyBuffer:
    """Request body bytes received but not yet handed to the app."""

    __slots__ = ("_changed", "chunks", "ended", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.ended = False
        self._changed = trio.Event()

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self._changed.set()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.size = 0
        return data

    async def wait(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()


# An HTTP/2 stream may queue this much response data before its app thread
# waits for the socket to drain, counting chunks it pushed that trio has not yet
# taken (push()). Per stream: a connection carries up to
# --h2-max-concurrent-streams of them.
STREAM_HIGH_WATER = 256 * 1024

# The same for HTTP/1.1, where one response at a time has the connection: as
# much as the connection's output bound (connection.OUTPUT_HIGH_WATER). Four
# times fewer waits than 256 KiB: each wait is a thread handoff, and a streamed
# download runs about 1.6x faster for it.
HTTP1_HIGH_WATER = 1024 * 1024

# The most request body awaited before the app gets a thread (--body-prebuffer): the
# HTTP/1.1 reader stops reading at BODY_HIGH_WATER (64 KiB) until the app reads,
# so waiting for more could never end.
MAX_BODY_PREBUFFER = 64 * 1024


class RequestStream:
    """One request/response exchange on a connection (see module docstring)."""

    def __init__(self, conn: Connection, request: RequestReceived) -> None:
        self.conn = conn
        self.request = request
        self.stream_id = request.stream_id
        self.body = _BodyBuffer()
        if request.end_stream:
            self.body.ended = True
        self.cancel_scope = trio.CancelScope()
        self.response_head: ResponseHead | None = None
        self.response_started = False
        self.response_ended = False
        self.reset_by_peer = False
        self.reading_body = False  # the app has asked for body data (HTTP/1.1 reads ahead)
        self.error_status: int | None = None  # set when a bad request cancels us
        self.counted = False  # counts against ServerContext.requests_in_flight
        self.status = 0
        self.bytes_sent = 0
        self.started_at = time.time()
        self._continue_sent = False
        self.can_sendfile = conn.can_sendfile()  # read by the app thread (wsgi.call_app)
        self._file: FileSegment | None = None  # a response body going out by sendfile
        # Response chunks pushed by the app thread, not yet taken by trio (push()).
        self._push_lock = threading.Lock()
        self._pushed: list[tuple[ResponseHead | None, bytes]] = []
        self._pushed_size = 0
        self._take_scheduled = False
        self._queued = 0  # the stream's queued output, as of the last take
        self.high_water = STREAM_HIGH_WATER if conn.proto.multiplexed else HTTP1_HIGH_WATER
        self._trio_token = conn.trio_token

    # ---- called from the app thread through trio.from_thread ---------------

    def take_body_nowait(self) -> bytes | None:
        """Buffered body bytes, b"" at the end, or None if the thread must wait."""
        if trio.current_effective_deadline() == -math.inf:
            raise StreamCancelled
        self.reading_body = True
        body = self.body
        if body.size:
            data = body.take()
            self.conn.body_consumed(self.stream_id, len(data))
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
        with trio.move_on_after(self.conn.ctx.body_timeout) as timer:
            await self.body.wait()
        if timer.cancelled_caught:
            # The client stopped sending mid-body: the app's read must not hang.
            LOGGER.info(
                "408 request body stalled for %.0fs: %s %s from %s",
                self.conn.ctx.body_timeout,
                self.request.method.decode("latin-1"),
                self.request.target.decode("latin-1"),
                self.conn.info.client_addr or "unix socket",
            )
            self.error_status = 408
            self.cancel_scope.cancel()
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
        ctx = self.conn.ctx
        if body.ended or self.request.expects_continue or not ctx.body_prebuffer:
            return
        wanted = min(ctx.body_prebuffer, MAX_BODY_PREBUFFER)
        if self.conn.proto.multiplexed:
            # Credit comes back only as the app reads: never wait for more
            # than one stream window.
            wanted = min(wanted, ctx.h2_initial_window_size)
        limiter = self.conn.limiter
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
        with self._push_lock:
            self._pushed.append((head, data))
            self._pushed_size += len(data)
            schedule = not self._take_scheduled
            self._take_scheduled = True
            keep_going = self._pushed_size + self._queued < self.high_water
        if schedule:
            self._trio_token.run_sync_soon(self.take_pushed)
        return keep_going

    def take_pushed(self) -> None:
        """Trio side: queue what the app thread pushed, in order, and wake the sender.

        Runs as a ``run_sync_soon`` callback (outside any task), and also from
        the stream's task before it looks at the response state, so nothing
        pushed is ever left behind. Must not raise: an error here would be the
        run loop's. Once the stream is cancelled, pushed data is dropped (rule 2).
        """
        with self._push_lock:
            pushed = self._pushed
            if not pushed:
                self._take_scheduled = False
                return
            self._pushed = []
            # Count what is being taken as queued until the exact figure below:
            # a push() in between must not see these bytes counted nowhere.
            self._queued += self._pushed_size
            self._pushed_size = 0
            self._take_scheduled = False
        if self.cancel_scope.cancel_called or self.response_ended or self.conn.cancelled:
            return
        proto = self.conn.proto
        try:
            for head, data in pushed:
                if head is not None:
                    self._start_response(head)
                if data:
                    proto.send_body(self.stream_id, data)
                    self.bytes_sent += len(data)
        except InvalidResponse as exc:
            # The app broke HTTP framing (e.g. more bytes than its Content-Length).
            self._abort(f"invalid response: {exc}")
            return
        except Exception:  # a bug of ours: end this stream, not the server
            LOGGER.exception("Internal error queueing a response body")
            self._abort("internal error")
            return
        self.conn.wake_sender()
        self._queued = proto.stream_output_size(self.stream_id)

    async def wait_writable(self) -> None:
        """Block the app thread until its queued output drains below the high-water mark.

        A stream whose own output makes no progress for ``write_timeout`` (the
        client keeps its window at zero, or stops reading) is reset and the
        app is cancelled: a stalled client must not hold a thread forever.
        Progress of other streams does not count.
        """
        self.take_pushed()
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_for_output(self._writable)
        self._queued = self.conn.proto.stream_output_size(self.stream_id)

    def _writable(self, stream_id: int) -> bool:
        return self.conn.proto.stream_output_size(stream_id) < self.high_water

    async def _wait_sent(self) -> None:
        """HTTP/2: hold the stream open until its finished response has gone out.

        Only for a response that is waiting for window: the rest goes out with
        the sender's next write, under the connection's write timeout.

        A response the app returned whole can still be queued for
        flow-control window; the same stall rule as :meth:`wait_writable`
        applies to it, so a client that never opens its window cannot pin
        the queued bytes forever.
        """
        proto = self.conn.proto
        await self._wait_for_output(lambda sid: not proto.stream_output_size(sid))

    async def _wait_for_output(self, ready: Callable[[int], bool]) -> None:
        conn = self.conn
        timeout = conn.ctx.write_timeout
        queued = conn.proto.stream_output_size(self.stream_id)
        deadline = trio.current_time() + timeout
        while not ready(self.stream_id):
            with trio.move_on_at(deadline):
                await conn.wait_output_drained()
            now_queued = conn.proto.stream_output_size(self.stream_id)
            if now_queued < queued:
                queued = now_queued
                deadline = trio.current_time() + timeout
            elif trio.current_time() >= deadline:
                LOGGER.info(
                    "Resetting %s %s for %s: no output accepted for %.0fs",
                    self.request.method.decode("latin-1"),
                    self.request.target.decode("latin-1"),
                    conn.info.client_addr or "a unix socket client",
                    timeout,
                )
                self.response_ended = True
                conn.reset_stream(self.stream_id)
                self.cancel_scope.cancel()
                await trio.lowlevel.checkpoint()  # raises Cancelled into the app thread

    # ---- the stream's task --------------------------------------------------

    async def run(self) -> None:
        """Run the app for this request and finish the stream, whatever happens."""
        conn = self.conn
        try:
            if self.error_status is None:  # refused up front (503) otherwise
                with self.cancel_scope:
                    await self._wait_for_body_start()
                    await self._run_app()
                    if self._file is not None and not self._file.sent:
                        await self._wait_file_sent(self._file)
                    if conn.proto.stream_blocked(self.stream_id):
                        # The app is done: the stream no longer counts against
                        # the concurrent-stream limit while its data waits.
                        conn.streams_draining += 1
                        try:
                            await self._wait_sent()
                        finally:
                            conn.streams_draining -= 1
        finally:
            if self._file is not None:
                self._file.release()  # the app's iterable (wsgi.file_wrapper) closes the file
            self._finish()
            conn.stream_done(self)

    async def _wait_file_sent(self, segment: FileSegment) -> None:
        """Hold the stream (and its file open) until the sender has sent the file.

        The sender's write timeout covers a client that stops reading; losing
        the connection cancels this wait.
        """
        while not segment.sent:
            await self.conn.wait_output_drained()

    async def _run_app(self) -> None:
        conn = self.conn
        initial = self.body.take() if self.body.size else b""
        if initial:
            conn.body_consumed(self.stream_id, len(initial))
        share = conn.stream_thread_share()
        try:
            try:
                if share is None:
                    result = await self._call_app(initial)
                else:
                    async with share:
                        result = await self._call_app(initial)
            finally:
                self.take_pushed()  # whatever the thread pushed before it returned
        except Exception:
            LOGGER.exception(
                "Error in the application handling %s %s",
                self.request.method.decode("latin-1"),
                self.request.target.decode("latin-1"),
            )
            if not self.response_started:
                self._send_error(500)
            else:
                self._abort("the application failed after the response started")
            return
        if result.file is not None:
            result.file.close_file = result.close
            self._file = result.file
        self._complete(result)

    async def _call_app(self, initial: bytes) -> AppResult:
        conn = self.conn
        return await trio.to_thread.run_sync(
            call_app,
            conn.app,
            self.request,
            conn.info,
            self,
            initial,
            self.body.ended,
            limiter=conn.limiter,
        )

    def _complete(self, result: AppResult) -> None:
        """Send what the app thread left for us and end the response."""
        if self.cancel_scope.cancel_called or self.response_ended:
            return
        proto = self.conn.proto
        try:
            if result.head is not None:
                head = result.head
                if head.status not in _NO_BODY_STATUSES and not any(
                    name.lower() in (b"content-length", b"transfer-encoding")
                    for name, _ in head.headers
                ):
                    size = sum(map(len, result.body))
                    head.headers.append((b"Content-Length", str(size).encode("ascii")))
                self._start_response(head)
                for chunk in result.body:
                    if head.status not in _NO_BODY_STATUSES:
                        proto.send_body(self.stream_id, chunk)
                        self.bytes_sent += len(chunk)
                if result.file is not None:
                    if head.status in _NO_BODY_STATUSES:
                        result.file.sent = True  # nothing of it to send
                    else:
                        proto.send_file(self.stream_id, result.file)  # (HEAD: marked sent)
                        self.bytes_sent += result.file.length
            proto.end_stream(self.stream_id)
        except InvalidResponse as exc:
            self._abort(f"invalid response: {exc}")
            return
        self.response_ended = True
        self.conn.wake_sender()

    # ---- ending the stream --------------------------------------------------

    def _start_response(self, head: ResponseHead) -> None:
        self.status = head.status
        self.response_head = head
        self.response_started = True
        self.conn.send_response(self.stream_id, head)

    def _send_continue(self) -> None:
        if self.request.expects_continue and not self._continue_sent and not self.response_started:
            self._continue_sent = True
            self.conn.proto.send_continue(self.stream_id)
            self.conn.wake_sender()

    def _send_error(self, status: int, detail: str = "") -> None:
        self.status = status
        self.response_started = True
        self.response_ended = True
        # After a 4xx about the request itself, its body state is unknown:
        # that HTTP/1.1 connection is not reused.
        close = 400 <= status < 500 and not self.body.ended
        self.conn.proto.send_error_response(self.stream_id, status, detail, close=close)
        self.conn.wake_sender()

    def _abort(self, why: str) -> None:
        """Give up on this response mid-way: reset the stream (HTTP/1.1: close)."""
        LOGGER.error(
            "Aborting %s %s: %s",
            self.request.method.decode("latin-1"),
            self.request.target.decode("latin-1"),
            why,
        )
        self.response_ended = True
        self.conn.reset_stream(self.stream_id, INTERNAL_ERROR)
        self.cancel_scope.cancel()

    def _finish(self) -> None:
        """Make sure the stream ended exactly one way (rule 3)."""
        if self.response_ended or self.reset_by_peer:
            return
        if self.error_status is not None and not self.response_started:
            self._send_error(self.error_status)
            return
        # Cancelled (shutdown, disconnect, protocol error) before finishing.
        self.response_ended = True
        self.conn.reset_stream(self.stream_id)
