"""RequestStream alone, against a recording StreamOwner: the four rules of stream.py.

No connection, no protocol, no bytes: the stream's whole view of its connection
is the :class:`~trioserve.stream.StreamOwner` interface, so a fake owner that
records every call shows exactly how a stream ends. The app runs in a real
worker thread (``trio.to_thread.run_sync``), so cancellation reaches it the
way it does in the server.

1. Cancelling the stream reaches the app thread at its next read or write.
2. Once cancelled, nothing more is queued for the stream.
3. Every stream ends exactly one way: a complete response, an error response,
   or a reset (none at all if the peer reset it first); ``stream_done`` once.
4. Feeding the body never blocks, and credit goes back only as the app reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
import trio
import trio.testing

from tests.helpers import no_threads_left
from trioserve.config import Config
from trioserve.context import ServerContext, context_from_config
from trioserve.events import FileSegment, RequestReceived, ResetReason
from trioserve.responses import error_body
from trioserve.stream import CancelReason, RequestStream, Response
from trioserve.wsgi import ConnectionInfo, ResponseHead

Environ = dict[str, Any]
INFO = ConnectionInfo("http", "testserver", "80", "127.0.0.1", "50000")
TIMEOUT = 10


class RecordingOwner:
    """A StreamOwner that queues nothing anywhere: it writes down every call."""

    multiplexed = False
    can_sendfile = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.done: list[RequestStream] = []
        self.finished = trio.Event()
        self.queued = 0

    @property
    def torn_down(self) -> bool:
        return False

    def send_head(self, stream_id: int, head: ResponseHead) -> None:
        self.calls.append(("head", head.status))

    def send_whole(self, stream_id: int, head: ResponseHead, body: list[bytes]) -> None:
        self.calls.append(("whole", head.status, dict(head.headers), body))

    def send_body(self, stream_id: int, data: bytes) -> None:
        self.calls.append(("body", data))

    def send_file(self, stream_id: int, segment: FileSegment) -> None:
        self.calls.append(("file", segment.length))

    def end(self, stream_id: int) -> None:
        self.calls.append(("end",))

    def send_continue(self, stream_id: int) -> None:
        self.calls.append(("continue",))

    def send_error(self, stream_id: int, status: int, *, close: bool) -> int:
        self.calls.append(("error", status))
        return len(error_body(status))

    def reset(self, stream_id: int, reason: ResetReason) -> int:
        self.calls.append(("reset", reason))
        return 0

    def output_queued(self, stream_id: int) -> int:
        return self.queued

    def output_blocked(self, stream_id: int) -> bool:
        return False

    async def wait_output_progress(self) -> None:
        await trio.sleep_forever()

    def output_room(self, stream_id: int) -> int:
        return 1 << 20

    def take_output(self, stream_id: int) -> list[bytes | memoryview]:
        return []

    def watch_output(self, stream: RequestStream, watching: bool) -> None:
        self.calls.append(("watch", watching))

    def body_consumed(self, stream_id: int, size: int) -> None:
        self.calls.append(("consumed", size))

    def thread_share(self) -> trio.CapacityLimiter | None:
        return None

    def stream_done(self, stream: RequestStream) -> None:
        self.done.append(stream)
        self.finished.set()

    @property
    def endings(self) -> list[tuple[Any, ...]]:
        """The calls that end a stream."""
        return [call for call in self.calls if call[0] in ("end", "whole", "error", "reset")]


def request(*, body: bool = False, method: bytes = b"GET") -> RequestReceived:
    headers = [(b"host", b"testserver")]
    if body:
        headers.append((b"transfer-encoding", b"chunked"))
    return RequestReceived(
        stream_id=1,
        method=method,
        target=b"/",
        headers=headers,
        http_version="1.1",
        end_stream=not body,
    )


def context(app: Any, **options: Any) -> ServerContext:
    return context_from_config(validator(app), Config(**options))


class Started:
    """An app wrapper's signal to the test, from the app thread: the app is running."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome: BaseException | None = None
        self.ended = threading.Event()


async def run_alone(stream: RequestStream) -> None:
    """Run ``stream`` in a cancel scope of its own, as a connection's task lends one."""
    with trio.CancelScope() as scope:
        await stream.run(scope)


async def run_stream(
    app: Any, *, refuse: int | None = None, body: bool = False, **options: Any
) -> tuple[RequestStream, RecordingOwner]:
    owner = RecordingOwner()
    stream = RequestStream(owner, context(app, **options), INFO, request(body=body), refuse=refuse)
    with trio.fail_after(TIMEOUT):
        await run_alone(stream)
    return stream, owner


def hello(environ: Environ, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def streamed(environ: Environ, start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"one"
    yield b"two"


def fails_at_once(environ: Environ, start_response: Any) -> Iterable[bytes]:
    raise RuntimeError("the app is broken")


def fails_midway(environ: Environ, start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first"
    raise RuntimeError("broken half-way")


def blocked_reader(started: Started) -> Any:
    """An app that blocks reading the body, and records how that read ended."""

    def reader(environ: Environ, start_response: Any) -> Iterable[bytes]:
        started.event.set()
        try:
            environ["wsgi.input"].read(1)
        except BaseException as exc:
            started.outcome = exc
            raise
        return hello(environ, start_response)

    return reader


# ---- rule 3: every stream ends exactly one way ------------------------------------------


async def test_a_list_response_is_sent_whole_and_ended() -> None:
    stream, owner = await run_stream(hello)
    assert owner.calls == [("head", 200), ("body", b"hello"), ("end",)]
    assert owner.done == [stream]
    assert stream.response is Response.ENDED


@pytest.mark.parametrize(
    ("headers", "sent"),
    [
        ([("Content-Length", "5")], {b"Content-Length": b"5"}),
        ([], {b"Content-Length": b"5"}),  # the whole body is here: its length is added
    ],
    ids=["with Content-Length", "without"],
)
async def test_a_list_response_goes_to_the_owner_in_one_call(
    headers: list[tuple[str, str]], sent: dict[bytes, bytes]
) -> None:
    """The list fast path (wsgi.call_app hands the body back with its return value).
    Not through wsgiref's validator, whose iterable wrapper is not a list."""

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", headers)
        return [b"hel", b"lo"]

    owner = RecordingOwner()
    ctx = context_from_config(app, Config())
    stream = RequestStream(owner, ctx, INFO, request())
    with trio.fail_after(TIMEOUT):
        await run_alone(stream)
    assert owner.calls == [("whole", 200, sent, [b"hel", b"lo"])]
    assert (stream.response, stream.status, stream.bytes_sent) == (Response.ENDED, 200, 5)
    assert owner.done == [stream]


async def test_a_streamed_response_is_pushed_then_ended() -> None:
    stream, owner = await run_stream(streamed)
    assert owner.calls == [("head", 200), ("body", b"one"), ("body", b"two"), ("end",)]
    assert owner.done == [stream]


async def test_an_app_failing_before_its_response_gets_a_500() -> None:
    stream, owner = await run_stream(fails_at_once)
    assert owner.calls == [("error", 500)]
    assert stream.status == 500
    assert owner.done == [stream]


async def test_an_app_failing_after_its_response_started_is_reset() -> None:
    _, owner = await run_stream(fails_midway)
    assert owner.endings == [("reset", ResetReason.APP_ERROR)]
    assert owner.calls[0] == ("head", 200)


async def test_a_request_refused_up_front_never_reaches_the_app() -> None:
    calls = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        calls.append(environ["PATH_INFO"])
        return hello(environ, start_response)

    stream, owner = await run_stream(app, refuse=503)
    assert calls == []
    assert owner.calls == [("error", 503)]
    assert not stream.admitted
    assert owner.done == [stream]


@pytest.mark.parametrize(
    ("reason", "status", "ending"),
    [
        (CancelReason.PEER, None, []),
        (CancelReason.REFUSED, 413, [("error", 413)]),
        (CancelReason.ABANDONED, None, [("reset", ResetReason.CANCEL)]),
    ],
    ids=["peer-reset-sends-nothing", "refused-gets-its-status", "abandoned-is-reset"],
)
async def test_a_stream_cancelled_before_its_response_ends_as_its_reason_says(
    reason: CancelReason, status: int | None, ending: list[tuple[Any, ...]]
) -> None:
    """The app blocks reading the body; the stream is cancelled meanwhile (rule 1
    delivers it to the thread); how the stream ends depends only on the reason."""
    started = Started()
    owner = RecordingOwner()
    stream = RequestStream(
        owner, context(blocked_reader(started), body_prebuffer=0), INFO, request(body=True)
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_alone, stream)
            await trio.to_thread.run_sync(started.event.wait)
            await trio.testing.wait_all_tasks_blocked()
            stream.cancel(reason, status)
    assert isinstance(started.outcome, trio.Cancelled)  # rule 1
    assert owner.endings == ending
    assert owner.done == [stream]
    await no_threads_left()


async def test_the_peer_going_away_overrides_an_earlier_refusal() -> None:
    """Refused (413) and then the connection lost: nobody is left to answer."""
    owner = RecordingOwner()
    stream = RequestStream(owner, context(hello), INFO, request(body=True))
    stream.cancel(CancelReason.REFUSED, 413)
    stream.cancel(CancelReason.PEER)
    stream.cancel(CancelReason.ABANDONED)  # later reasons do not replace the peer's
    assert stream.cancel_reason is CancelReason.PEER
    with trio.fail_after(TIMEOUT):
        await run_alone(stream)
    assert owner.calls == []
    assert owner.done == [stream]


async def test_a_refusal_after_the_response_started_is_a_reset() -> None:
    """Rule 3: an error status is possible only while nothing has gone out."""
    gate = threading.Event()
    started = Started()

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"head and a first chunk"
        started.event.set()
        gate.wait(TIMEOUT)
        yield b"never sent"

    owner = RecordingOwner()
    stream = RequestStream(owner, context(app), INFO, request())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_alone, stream)
            await trio.to_thread.run_sync(started.event.wait)
            stream.take_pushed()  # what the thread pushed so far is queued
            stream.cancel(CancelReason.REFUSED, 413)
            gate.set()
    assert owner.calls[0] == ("head", 200)
    assert owner.endings == [("reset", ResetReason.CANCEL)]
    assert ("body", b"never sent") not in owner.calls  # rule 2
    assert owner.done == [stream]


async def test_a_lent_scope_carries_the_cancel_to_the_caller() -> None:
    """Rule 1 with HTTP/1.1's lent scope: cancelling the stream cancels the scope
    its caller runs it in, so the caller's ``with`` is what catches it."""
    started = Started()
    owner = RecordingOwner()
    stream = RequestStream(
        owner, context(blocked_reader(started), body_prebuffer=0), INFO, request(body=True)
    )

    async def caller() -> None:
        with trio.CancelScope() as scope:
            await stream.run(scope)
        lent.append(scope)

    lent: list[trio.CancelScope] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.event.wait)
            await trio.testing.wait_all_tasks_blocked()
            stream.cancel(CancelReason.ABANDONED)
    assert isinstance(started.outcome, trio.Cancelled)
    [scope] = lent
    assert scope.cancel_called
    assert scope.cancelled_caught
    assert owner.endings == [("reset", ResetReason.CANCEL)]
    assert owner.done == [stream]


async def test_a_finished_stream_no_longer_reaches_its_lent_scope() -> None:
    """Once ``run`` has returned, the scope belongs to the caller's next stream: a
    late cancel of the finished one (a disconnect noticed afterwards, say) must
    not reach it."""
    owner = RecordingOwner()
    stream = RequestStream(owner, context(hello), INFO, request())
    with trio.fail_after(TIMEOUT), trio.CancelScope() as scope:
        await stream.run(scope)
        stream.cancel(CancelReason.PEER)
        assert not scope.cancel_called
    assert owner.endings == [("end",)]


# ---- rule 2: once cancelled, nothing more is queued -------------------------------------


async def test_chunks_pushed_after_a_cancel_are_dropped() -> None:
    owner = RecordingOwner()
    stream = RequestStream(owner, context(hello), INFO, request())
    head = ResponseHead(200, b"OK", [])
    stream.push(head, b"before")
    stream.take_pushed()
    stream.cancel(CancelReason.PEER)
    stream.push(None, b"after")
    stream.take_pushed()
    assert owner.calls == [("head", 200), ("body", b"before")]


# ---- rule 4: the body buffer never blocks the feeder; credit follows the app -----------


async def test_body_credit_is_returned_only_as_the_app_reads() -> None:
    taken = threading.Event()
    proceed = threading.Event()
    received: list[bytes] = []

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        wsgi_input = environ["wsgi.input"]
        received.append(wsgi_input.read(6))
        taken.set()
        proceed.wait(TIMEOUT)
        received.append(wsgi_input.read(65536))
        return hello(environ, start_response)

    owner = RecordingOwner()
    stream = RequestStream(owner, context(app, body_prebuffer=0), INFO, request(body=True))
    for piece in (b"first ", b"second ", b"third"):  # never blocks, whatever the size
        assert stream.feed_body(piece)
    assert not owner.calls  # no credit before the app reads
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_alone, stream)
            await trio.to_thread.run_sync(taken.wait)
            # Everything buffered went to the app's thread in one batch.
            assert [call for call in owner.calls if call[0] == "consumed"] == [("consumed", 18)]
            assert stream.feed_body(b" and more")
            stream.end_body()
            proceed.set()
    assert received == [b"first ", b"second third and more"]
    consumed = [call for call in owner.calls if call[0] == "consumed"]
    assert consumed == [("consumed", 18), ("consumed", 9)]
    assert owner.calls[-3:] == [("head", 200), ("body", b"hello"), ("end",)]


async def test_a_cancelled_stream_refuses_body_bytes() -> None:
    """The connection then hands the credit straight back (nobody will read them)."""
    owner = RecordingOwner()
    stream = RequestStream(owner, context(hello), INFO, request(body=True))
    assert stream.feed_body(b"wanted")
    stream.cancel(CancelReason.PEER)
    assert not stream.feed_body(b"unwanted")
    assert stream.body_buffered == len(b"wanted")
