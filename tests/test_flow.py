"""Backpressure and flow control in both directions, fairness, and bounded memory.

Everything runs in memory through ``trioserve.testing``: its pipe has a bounded
buffer, so a client that stops reading (or sending) pushes back on the server
exactly as a TCP peer would.

How the tests wait without sleeping: the interesting moments are steady
states ("the client is blocked", "the app is blocked"), and a steady state is
when every trio task is blocked *and* no app thread is running Python code.
``trio.testing.wait_all_tasks_blocked`` sees only the first half (a worker
thread computing the next chunk leaves every trio task blocked), so
:func:`settle` also looks at each task's await stack: a task inside
``trio.to_thread.run_sync`` that is not running a ``trio.from_thread.run``
coroutine for its thread has a thread at work, and we wait for it.

The HTTP/2 client's reader task never waits to write (its SETTINGS ACKs, PING
ACKs and WINDOW_UPDATEs go out through a separate sender task), so a test that
fills the pipe towards the server does not stop the client from reading.
The client returns credit as data arrives; ``pause_reading()`` withholds it
(``socket=True``: stops reading the connection), and responses too large to
keep are read with ``receive_data(keep=False)``.

The clock is the real one: ``autojump_clock`` would jump to the next deadline
whenever the trio tasks are idle, including while an app thread is busy, so it
cannot be combined with threads. Every test has an absolute ``fail_after``
instead, so a hang fails the test.

Numbers measured when these tests were written (defaults: 64 KiB READ_SIZE and
BODY_HIGH_WATER, 256 KiB STREAM_HIGH_WATER, 1 MiB HTTP1_HIGH_WATER and
OUTPUT_HIGH_WATER, 256 KiB HTTP/2 stream window and pipe) are quoted next to each
bound.
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import h11
import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from tests.apps import hello as apps_hello
from tests.helpers import TraceMemory
from trioserve.connection import (
    BODY_HIGH_WATER,
    BODY_READ_AHEAD,
    OUTPUT_HIGH_WATER,
    READ_SIZE,
)
from trioserve.http1 import MAX_WRITE
from trioserve.http2 import CONTROL_BUDGET, CONTROL_PER_STREAM, MAX_BATCH
from trioserve.stream import HTTP1_HIGH_WATER, STREAM_HIGH_WATER
from trioserve.testing import (
    DEFAULT_PIPE_CAPACITY,
    FrameInfo,
    TestClient,
    TestStream,
    open_test_client,
)

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])

KiB = 1024
MiB = 1024 * KiB

# Absolute limit per test: a lost wake-up or a deadlock fails instead of hanging.
# Generous (the tests take well under a second each, the 64 MiB ones a few
# seconds) so that a loaded CI machine does not turn slowness into failures.
TIMEOUT = 30
SLOW_TIMEOUT = 90  # the 64 MiB transfers under tracemalloc

# The client's default HTTP/2 windows (RFC 9113 §6.9.2), stream and connection.
H2_DEFAULT_WINDOW = 65535
# The server's default HTTP/2 receive window per stream (Config.h2_initial_window_size).
SERVER_WINDOW = 256 * KiB

Environ = dict[str, Any]


# ---- helpers ------------------------------------------------------------------------


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible pseudo-random bytes (so a misplaced chunk changes the hash)."""
    return random.Random(seed).randbytes(size)


def digest_of(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _all_tasks() -> Iterator[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def _thread_at_work(task: trio.lowlevel.Task) -> bool:
    """Is ``task`` waiting for a worker thread that is running Python code right now?

    Inside ``to_thread.run_sync`` a task either waits for its thread's next
    message (``wait_task_rescheduled``: the thread is busy) or runs a
    ``from_thread.run`` coroutine for it (the thread is parked in trio).
    """
    codes = [frame.f_code for frame, _ in task.iter_await_frames()]
    for index in range(len(codes) - 1, -1, -1):
        if codes[index] is _TO_THREAD:
            return codes[index + 1 : index + 2] == [_WAIT_RESCHEDULED]
    return False


_TO_THREAD = trio.to_thread.run_sync.__code__
_WAIT_RESCHEDULED = trio.lowlevel.wait_task_rescheduled.__code__


class _OnTaskScheduled(trio.abc.Instrument):
    def __init__(self, woken: trio.Event) -> None:
        self.woken = woken
        self.waiter = trio.lowlevel.current_task()

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task is not self.waiter and not self.woken.is_set():
            self.woken.set()


async def settle() -> None:
    """Wait until nothing can happen any more: every task blocked, every app thread parked."""
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if not any(_thread_at_work(task) for task in _all_tasks()):
            return
        # A thread is at work: sleep until its next hop wakes some task (spinning
        # here would keep the GIL from it). No checkpoint between the check and
        # installing the instrument, so no wake-up can slip through.
        woken = trio.Event()
        instrument = _OnTaskScheduled(woken)
        trio.lowlevel.add_instrument(instrument)
        try:
            await woken.wait()
        finally:
            trio.lowlevel.remove_instrument(instrument)


class Gate:
    """App threads call :meth:`wait` to park in trio until the test calls :meth:`open`.

    The wait goes through ``trio.from_thread.run`` *without* a trio_token, so
    it runs inside the request's own task: a reset or disconnect cancels it
    (with a token it would run in a system task that nothing cancels, and a
    failing test would hang on the thread at teardown).
    """

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.parked = 0
        self._changed = trio.Event()

    async def _park(self) -> None:
        self.parked += 1
        self._changed.set()
        self._changed = trio.Event()
        await self.opened.wait()

    def wait(self) -> None:
        """Called from an app thread."""
        trio.from_thread.run(self._park)

    async def wait_parked(self, count: int = 1) -> None:
        while self.parked < count:
            await self._changed.wait()

    def open(self) -> None:
        self.opened.set()


async def drain(stream: TestStream, digest: Any = None) -> int:
    """Read a response to its end without keeping it: returns its size, updates ``digest``.

    The response must have ended properly (END_STREAM / end of message), not
    been reset or cut off.
    """
    total = 0
    while data := await stream.receive_data(keep=False):
        total += len(data)
        if digest is not None:
            digest.update(data)
    assert stream.response.complete
    return total


def data_frames(client: TestClient) -> list[FrameInfo]:
    """Every DATA frame the client received so far, in order (needs ``record_frames=True``)."""
    assert client.frames is not None
    return [frame for frame in client.frames if frame.type == "DATA"]


def send_window(client: TestClient, stream_id: int | None = None) -> int:
    """The client's HTTP/2 send window for ``stream_id`` (None: the connection).

    Private access: TestClient has no public view of its own send windows, so
    this reads its h2 state.
    """
    if stream_id is None:
        return int(client._h2.outbound_flow_control_window)
    return int(client._h2.local_flow_control_window(stream_id))


def streaming_app(
    chunks: list[bytes], count: int, produced: list[int] | None = None, *, fresh: bool = False
) -> Any:
    """A generator response of ``count`` chunks cycling through ``chunks`` (no Content-Length).

    ``produced[0]`` counts the chunks handed to the server so far. ``fresh``
    yields a new copy of each chunk, as a real app would: a server that kept
    references to sent chunks would then show in memory measurements.
    """

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for i in range(count):
            if produced is not None:
                produced[0] += 1
            chunk = chunks[i % len(chunks)]
            yield bytes(memoryview(chunk)) if fresh else chunk

    return validator(app)


def expected_stream_digest(chunks: list[bytes], count: int) -> str:
    digest = hashlib.sha256()
    for i in range(count):
        digest.update(chunks[i % len(chunks)])
    return digest.hexdigest()


def digest_reply(environ: Environ, start_response: Any, size: int = 65536) -> list[bytes]:
    """Read the whole body with read(size) and answer "<length> <sha256>"."""
    digest = hashlib.sha256()
    total = 0
    while chunk := environ["wsgi.input"].read(size):
        digest.update(chunk)
        total += len(chunk)
    out = f"{total} {digest.hexdigest()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


async def test_settle_waits_for_an_app_thread_at_work() -> None:
    """The helper every test relies on: settle() must not return while a thread runs."""
    release = threading.Event()
    settled = False

    async def settle_in_background() -> None:
        nonlocal settled
        await settle()
        settled = True

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, release.wait))
            nursery.start_soon(settle_in_background)
            try:
                # Twice: waiters wake in the order they started waiting, so the
                # second call lets settle() take its own turn first.
                await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                assert not settled  # every task is blocked, but the thread is not parked
            finally:
                release.set()  # the thread cannot be cancelled: always let it go
    assert settled


# ---- 1. upload backpressure -----------------------------------------------------------

# The client sends its body in pieces of this size and counts completed pieces.
PIECE = 16 * KiB
UPLOAD_PIPE = 64 * KiB


@pytest.mark.parametrize(
    ("http2", "window"),
    [(False, None), (True, None), (True, 16 * KiB)],
    ids=["http1", "http2", "http2-16k-window"],
)
async def test_upload_blocks_the_client_while_the_app_does_not_read(
    http2: bool, window: int | None
) -> None:
    """A client cannot push more than a bounded amount at an app that is not reading.

    HTTP/2: the stream window (256 KiB by default), plus what arrived with the
    HEADERS before the stream task started (taken and credited at once, at most
    one READ_SIZE). Measured: 256 KiB, and the client's window is exactly 0.
    A window below 65535 only applies once the client has seen it (before that
    the protocol default holds), so the bound is 65535 + READ_SIZE. Measured
    with 16 KiB: 32 KiB, sent before the SETTINGS arrived, after which the
    client's window went negative (-16 KiB).
    HTTP/1.1: that first read (in the InputStream) + the body buffer the reader
    pauses at (BODY_HIGH_WATER + one READ_SIZE) + the pipe. Measured: 128 to
    144 KiB with a 64 KiB pipe.
    """
    body = payload(4 * MiB)
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        gate.wait()  # not a byte read before the test says so
        return digest_reply(environ, start_response)

    if window is not None:
        bound = H2_DEFAULT_WINDOW + READ_SIZE
        options: dict[str, Any] = {"h2_initial_window_size": window}
    elif http2:
        bound = SERVER_WINDOW + READ_SIZE
        options = {}
    else:
        bound = READ_SIZE + BODY_HIGH_WATER + READ_SIZE + UPLOAD_PIPE
        options = {}
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=http2, pipe_capacity=UPLOAD_PIPE, **options
        ) as client:

            def check(stream_id: int, blocked_at: int) -> None:
                print(f"upload blocked after {blocked_at} bytes (bound {bound})")
                assert PIECE <= blocked_at <= bound
                if http2:
                    # Blocked by flow control, not by the pipe. (Below 0 when the
                    # client sent at the default 65535 before a smaller window
                    # arrived: RFC 9113 §6.9.2 allows that.)
                    assert send_window(client, stream_id) <= 0

            response = await blocked_upload(client, body, gate, check)
    assert response.status == 200
    assert response.text == f"{len(body)} {digest_of(body)}"


async def blocked_upload(
    client: TestClient, body: bytes, gate: Gate, check: Callable[[int, int], None]
) -> Any:
    """POST ``body`` in PIECEs to an app parked at ``gate``. Once the upload is stuck,
    ``check(stream_id, bytes sent)``, make sure it stays stuck, open the gate and
    return the response."""
    sent = [0]
    stream = await client.open_stream(
        "POST", "/", headers=[("Content-Length", str(len(body)))], end=False
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_in_pieces, stream, body, sent)
        await gate.wait_parked()
        await settle()
        blocked_at = sent[0]
        check(stream.stream_id, blocked_at)
        await settle()
        assert sent[0] == blocked_at  # a steady state: nothing moves any more
        gate.open()
    return await stream.read_response()


async def send_in_pieces(stream: Any, body: bytes, sent: list[int]) -> None:
    """Send ``body`` in PIECEs, counting in ``sent[0]`` the bytes the client got out."""
    for start in range(0, len(body), PIECE):
        await stream.send(body[start : start + PIECE])
        sent[0] += PIECE
    await stream.end()


async def test_http1_reads_further_ahead_once_the_app_reads_the_body() -> None:
    """HTTP/1.1: once the app has read from wsgi.input, the reader buffers up to
    BODY_READ_AHEAD (not BODY_HIGH_WATER) ahead of it, so each batch the app takes
    is bigger; memory stays bounded by that. Measured: 400 KiB."""
    body = payload(4 * MiB)
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        wsgi_input = environ["wsgi.input"]
        first = wsgi_input.read(1)
        gate.wait()  # one byte read, then nothing until the test says so
        digest, total = hashlib.sha256(first), len(first)
        while chunk := wsgi_input.read(65536):
            digest.update(chunk)
            total += len(chunk)
        out = f"{total} {digest.hexdigest()}".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))]
        )
        return [out]

    low = BODY_HIGH_WATER + READ_SIZE + UPLOAD_PIPE  # the most before the app reads
    bound = READ_SIZE + BODY_READ_AHEAD + READ_SIZE + UPLOAD_PIPE

    def check(stream_id: int, blocked_at: int) -> None:
        print(f"upload blocked after {blocked_at} bytes (bound {bound})")
        assert low < blocked_at <= bound

    with trio.fail_after(TIMEOUT):
        async with open_test_client(validator(app), pipe_capacity=UPLOAD_PIPE) as client:
            response = await blocked_upload(client, body, gate, check)
    assert response.status == 200
    assert response.text == f"{len(body)} {digest_of(body)}"


# ---- 2. HTTP/2 credit comes back as the app consumes ------------------------------------


async def test_http2_credit_is_returned_as_the_app_reads() -> None:
    """Credit for what the app took goes back at once, not at the end of the body.

    The app parks before reading (the client stops at one window), reads one
    small piece and parks again: the client must get another window's worth
    through, and no more. Then the app reads the rest in 4 KiB pieces.
    Measured: blocked at 256 KiB, then at 512 KiB. (wsgi.input fetches all
    that is buffered per hop, so a read(4096) frees the whole window: the
    server may hold two windows of body per stream, one in the app thread.)
    """
    body = payload(2 * MiB, seed=1)
    first, second = Gate(), Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        first.wait()
        head = environ["wsgi.input"].read(4096)
        second.wait()
        digest = hashlib.sha256(head)
        total = len(head)
        while chunk := environ["wsgi.input"].read(4096):
            digest.update(chunk)
            total += len(chunk)
        out = f"{total} {digest.hexdigest()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [out]

    sent = [0]
    with trio.fail_after(TIMEOUT):
        async with open_test_client(validator(app), http2=True) as client:
            stream = await client.open_stream("POST", "/", end=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_in_pieces, stream, body, sent)
                await first.wait_parked()
                await settle()
                before = sent[0]
                assert before <= SERVER_WINDOW + READ_SIZE
                first.open()
                await second.wait_parked()
                await settle()
                after = sent[0]
                print(f"credit: blocked at {before}, then at {after} after one read")
                # The app's one read took everything buffered (up to a window):
                # that credit let the client send about one more window.
                assert before + SERVER_WINDOW // 2 <= after <= before + SERVER_WINDOW + READ_SIZE
                second.open()
            response = await stream.read_response()
    assert response.text == f"{len(body)} {digest_of(body)}"


async def test_http2_stalled_stream_does_not_starve_the_connection_window() -> None:
    """One stream whose app never reads must not stop another stream's upload.

    With two concurrent streams the connection window is 2 x 256 KiB: the
    stalled stream can hold only its own stream window of it, so the other
    stream uploads 4 MiB (16 connection windows) while the first stays stalled.
    """
    stalled_body = payload(1 * MiB, seed=2)
    moving_body = payload(4 * MiB, seed=3)
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/stalled":
            gate.wait()
        return digest_reply(environ, start_response)

    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=True, h2_max_concurrent_streams=2
        ) as client:
            stalled = await client.open_stream("POST", "/stalled", end=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(stalled.send, stalled_body, end=True))
                await gate.wait_parked()
                await settle()
                assert send_window(client, stalled.stream_id) == 0
                moving = await client.post("/moving", body=moving_body)
                assert moving.text == f"{len(moving_body)} {digest_of(moving_body)}"
                assert not gate.opened.is_set()  # the first stream was stalled all along
                gate.open()
            response = await stalled.read_response()
    assert response.text == f"{len(stalled_body)} {digest_of(stalled_body)}"


async def test_http2_reset_stalled_streams_give_their_connection_credit_back() -> None:
    """A stalled stream that is reset must return the connection window it held.

    Connection window 2 x 256 KiB (two concurrent streams). Four times over, a
    stream fills its window at an app that never reads and is reset: 1 MiB in
    all, twice the connection window. If a reset stream's buffered body were
    not credited back, the connection window would run dry by the third round.
    """
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/stalled":
            gate.wait()  # until the reset cancels it
        return digest_reply(environ, start_response)

    body = payload(1 * MiB, seed=4)
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=True, h2_max_concurrent_streams=2
        ) as client:
            for round_ in range(4):
                stalled = await client.open_stream("POST", "/stalled", end=False)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stalled.send, body)
                    await gate.wait_parked(round_ + 1)
                    await settle()
                    # Blocked by the stream's window; the connection has room left.
                    assert send_window(client, stalled.stream_id) == 0
                    assert send_window(client) >= SERVER_WINDOW // 2
                    # The sender waits for a WINDOW_UPDATE, not in a write: safe to cancel.
                    nursery.cancel_scope.cancel()
                await stalled.reset()
                await settle()  # the app saw the reset and returned
            response = await client.post("/moving", body=body)
    assert response.text == f"{len(body)} {digest_of(body)}"


async def test_http2_a_response_ended_on_the_wire_frees_its_stream_slot() -> None:
    """A generator's declared body is all sent while the generator runs on: END_STREAM
    goes out with the last byte, and with h2_max_concurrent_streams=1 the client's next
    stream is served, not refused, while that app still runs."""
    gate = Gate()
    body = b"streamed body"

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        start_response("200 OK", headers)
        if environ["PATH_INFO"] == "/next":
            return [body]

        def chunks() -> Iterator[bytes]:
            yield body[:5]
            yield body[5:]
            gate.wait()  # still running after its last byte went out

        return chunks()

    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=True, h2_max_concurrent_streams=1
        ) as client:
            first = await client.get("/first")  # complete while its app is parked
            await gate.wait_parked()
            second = await client.get("/next")
            assert not gate.opened.is_set()
            gate.open()
    assert (first.status, first.body) == (200, body)
    assert (second.status, second.body) == (200, body)


# ---- 3. download backpressure ------------------------------------------------------------

CHUNK = 16 * KiB
DOWNLOAD_CHUNKS = 512  # 8 MiB


@pytest.mark.parametrize("mode", ["http1", "http2-window", "http2-socket"])
async def test_download_blocks_the_app_while_the_client_does_not_read(mode: str) -> None:
    """An app streaming a large response is blocked while the client reads nothing.

    http1: the client stops reading the socket. Produced at most: the pipe +
    the write under way (MAX_WRITE) + HTTP1_HIGH_WATER queued (+ a chunk each).
    Measured: 1.25 MiB (1 MiB with 512 KiB queued, whose write was half taken by
    the pipe).
    http2-window: the client withholds WINDOW_UPDATEs (pause_reading) but keeps
    reading the socket: the client's 64 KiB window + STREAM_HIGH_WATER queued.
    Measured: 320 KiB.
    http2-socket: windows wide open (16 MiB, more than the whole body), the
    client stops reading the socket (pause_reading(socket=True)). The client's
    last read + the pipe + one MAX_BATCH in flight + STREAM_HIGH_WATER queued.
    Measured: 512 KiB.
    """
    chunks = [payload(CHUNK, seed=i) for i in range(4)]
    produced = [0]
    app = streaming_app(chunks, DOWNLOAD_CHUNKS, produced)
    http2 = mode != "http1"
    if mode == "http1":
        bound = DEFAULT_PIPE_CAPACITY + MAX_WRITE + HTTP1_HIGH_WATER + 2 * CHUNK
    elif mode == "http2-window":
        bound = H2_DEFAULT_WINDOW + STREAM_HIGH_WATER + 2 * CHUNK
    else:
        bound = READ_SIZE + DEFAULT_PIPE_CAPACITY + MAX_BATCH + STREAM_HIGH_WATER + 2 * CHUNK
    settings: dict[int, int] | None = (
        {SettingCodes.INITIAL_WINDOW_SIZE: 16 * MiB} if mode == "http2-socket" else None
    )
    with trio.fail_after(TIMEOUT):
        async with open_test_client(app, http2=http2, h2_settings=settings) as client:
            if mode == "http2-socket":
                await client.open_window(16 * MiB)
            client.pause_reading(socket=mode == "http2-socket")
            stream = await client.open_stream("GET", "/")
            await settle()
            blocked_at = produced[0] * CHUNK
            print(f"{mode}: app blocked after producing {blocked_at} bytes (bound {bound})")
            assert 0 < blocked_at <= bound
            await settle()
            assert produced[0] * CHUNK == blocked_at  # it stopped growing
            await client.resume_reading()
            digest = hashlib.sha256()
            size = await drain(stream, digest)
    assert stream.response.status == 200
    assert size == DOWNLOAD_CHUNKS * CHUNK
    assert digest.hexdigest() == expected_stream_digest(chunks, DOWNLOAD_CHUNKS)


# ---- 4. HTTP/2 zero window ---------------------------------------------------------------


@pytest.mark.parametrize("opened_by", ["window-update", "settings"])
async def test_http2_zero_initial_window_sends_headers_then_waits_for_credit(
    opened_by: str,
) -> None:
    """A zero window lets the headers through and nothing else, until the client opens it:
    with a WINDOW_UPDATE for the stream, or by raising SETTINGS_INITIAL_WINDOW_SIZE.
    """
    chunks = [payload(CHUNK, seed=10 + i) for i in range(4)]
    count = 64  # 1 MiB
    produced = [0]
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            streaming_app(chunks, count, produced),
            http2=True,
            h2_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0},
            record_frames=True,
        ) as client:
            stream = await client.open_stream("GET", "/")
            response = await stream.receive_headers()
            assert response.status == 200
            await settle()
            assert data_frames(client) == []  # headers, and not a byte of data
            # The app is blocked: only STREAM_HIGH_WATER (+ the chunk that crossed it) queued.
            assert produced[0] * CHUNK <= STREAM_HIGH_WATER + CHUNK
            assert produced[0] < count
            await client.resume_reading()  # nothing was withheld: does not help
            await settle()
            assert data_frames(client) == []
            if opened_by == "window-update":
                # One WINDOW_UPDATE for the stream: from then on the client's
                # acknowledgements keep that window open until the end.
                await stream.open_window(64 * KiB)
            else:
                # Private access: TestClient has no API to change its SETTINGS
                # mid-connection. ping() sends them (queued ahead of the PING).
                client._h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 64 * KiB})
                await client.ping()
            digest = hashlib.sha256()
            size = await drain(stream, digest)
    assert size == count * CHUNK
    assert digest.hexdigest() == expected_stream_digest(chunks, count)


async def test_http2_stream_at_zero_window_does_not_block_another_stream() -> None:
    """A stream stalled at zero window waits for its WINDOW_UPDATE without holding up
    another stream: /small completes (its own window opened) while /big has not
    sent a byte; then /big's window opens and it completes too.
    """
    big_chunks = [payload(CHUNK, seed=20 + i) for i in range(4)]
    small = payload(5000, seed=30)
    big_app = streaming_app(big_chunks, 64)  # 1 MiB, validated

    @validator
    def small_app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return iter([small[:2000], small[2000:]])

    def app(environ: Environ, start_response: Any) -> Any:
        chosen = big_app if environ["PATH_INFO"] == "/big" else small_app
        return chosen(environ, start_response)

    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            app, http2=True, h2_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, record_frames=True
        ) as client:
            big = await client.open_stream("GET", "/big")
            await big.receive_headers()
            await settle()  # /big: its app is blocked with a full queue and no window
            little = await client.open_stream("GET", "/small")
            await little.receive_headers()
            await little.open_window(64 * KiB)
            response = await little.read_response()
            assert response.complete
            assert response.body == small
            # /big still at zero: not one DATA frame for it.
            assert {frame.stream_id for frame in data_frames(client)} == {little.stream_id}
            await big.open_window(64 * KiB)
            digest = hashlib.sha256()
            size = await drain(big, digest)
    assert size == 64 * CHUNK
    assert digest.hexdigest() == expected_stream_digest(big_chunks, 64)


# ---- 5. the peer's SETTINGS_MAX_FRAME_SIZE ----------------------------------------------


@pytest.mark.parametrize("max_frame", [None, 65536], ids=["default-16384", "65536"])
async def test_http2_data_frames_respect_the_peers_max_frame_size(max_frame: int | None) -> None:
    chunks = [payload(64 * KiB, seed=40 + i) for i in range(2)]
    count = 32  # 2 MiB
    settings: dict[int, int] = {SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB}
    if max_frame is not None:
        settings[SettingCodes.MAX_FRAME_SIZE] = max_frame
    limit = max_frame or 16384
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            streaming_app(chunks, count), http2=True, h2_settings=settings, record_frames=True
        ) as client:
            await client.open_window(4 * MiB)
            stream = await client.open_stream("GET", "/")
            digest = hashlib.sha256()
            size = await drain(stream, digest)
            sizes = [frame.length for frame in data_frames(client)]
    assert size == count * 64 * KiB
    assert digest.hexdigest() == expected_stream_digest(chunks, count)
    assert sum(sizes) == size
    assert max(sizes) <= limit
    assert max(sizes) == limit  # and frames are filled up to it: the setting is followed


# ---- 6. fairness -------------------------------------------------------------------------


def _longest_run(order: list[int]) -> int:
    longest = run = 0
    previous = None
    for sid in order:
        run = run + 1 if sid == previous else 1
        previous = sid
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("windows", ["wide", "default"])
async def test_http2_concurrent_downloads_are_interleaved(windows: str) -> None:
    """Three 4 MiB downloads on one connection share it round-robin, frame by frame.

    Each app hands over its whole body at once (after all three have started),
    so every stream always has data ready: while all three are under way no
    stream may get more than two DATA frames in a row, and their frame counts
    stay within a few frames of each other. "wide": windows far larger than the
    bodies (pure scheduling); "default": the client's 64 KiB windows, credit
    returned as the data arrives. Measured longest run: 1 (up to 6 under load, "default").
    """
    size = 4 * MiB
    bodies = {path: payload(size, seed=50 + i) for i, path in enumerate(["/a", "/b", "/c"])}
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        body = bodies[environ["PATH_INFO"]]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        gate.wait()
        yield body

    settings: dict[int, int] | None = (
        {SettingCodes.INITIAL_WINDOW_SIZE: 64 * MiB} if windows == "wide" else None
    )
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=True, h2_settings=settings, record_frames=True
        ) as client:
            if windows == "wide":
                await client.open_window(64 * MiB)
            streams = {path: await client.open_stream("GET", path) for path in bodies}
            await gate.wait_parked(3)
            results: dict[str, str] = {}

            async def download(path: str) -> None:
                digest = hashlib.sha256()
                await drain(streams[path], digest)
                results[path] = digest.hexdigest()

            async with trio.open_nursery() as nursery:
                for path in bodies:
                    nursery.start_soon(download, path)
                gate.open()
            order = [frame.stream_id for frame in data_frames(client)]
    assert results == {path: digest_of(body) for path, body in bodies.items()}
    sids = {stream.stream_id for stream in streams.values()}
    start = max(order.index(sid) for sid in sids)  # all three have started
    end = min(len(order) - 1 - order[::-1].index(sid) for sid in sids)  # one has ended
    middle = order[start:end]
    assert len(middle) > len(order) // 2  # the three really overlapped
    counts = [middle.count(sid) for sid in sids]
    print(f"{windows}: longest run {_longest_run(middle)}, frames per stream {counts}")
    if windows == "wide":
        # Every stream always has window: strict round-robin.
        assert _longest_run(middle) <= 2
    else:
        # A stream may send its whole 64 KiB window (four 16 KiB frames) while
        # the others wait for their credit to come back, and a WINDOW_UPDATE
        # read meanwhile extends that run; never two windows' worth, though.
        # (A busy machine makes the client late with credit: runs of 6 seen.)
        assert _longest_run(middle) <= 8
    assert max(counts) - min(counts) <= 4


# ---- 7. bounded server memory -------------------------------------------------------------

# 64 MiB through the server in each direction. The bound is far below it: a
# server that buffered the body, or anything proportional to it, fails.
# tracemalloc sees every thread, the client included; the client here keeps
# nothing (running hash, pieces dropped), so its share is its bounded pipe and
# parser buffers. Measured peaks: 0.4-0.6 MiB for downloads, 0.9-1.4 MiB for
# uploads, so 4 MiB leaves room for allocator noise while catching anything
# that holds even a few windows too many. tracemalloc slows allocation down but
# 64 MiB still takes only 1-3 seconds, the data moving in 64 KiB pieces.
BIG = 64 * MiB
MEMORY_BOUND = 4 * MiB


@both_protocols
async def test_streaming_a_64_mib_response_uses_bounded_memory(http2: bool) -> None:
    chunks = [payload(64 * KiB, seed=60 + i) for i in range(4)]
    count = BIG // (64 * KiB)
    # Wider client windows only to spare thousands of WINDOW_UPDATE round trips.
    settings: dict[int, int] = {SettingCodes.INITIAL_WINDOW_SIZE: 1 * MiB}
    digest = hashlib.sha256()
    with trio.fail_after(SLOW_TIMEOUT), TraceMemory() as memory:
        async with open_test_client(
            streaming_app(chunks, count, fresh=True), http2=http2, h2_settings=settings
        ) as client:
            if http2:
                await client.open_window(1 * MiB)
            stream = await client.open_stream("GET", "/")
            size = await drain(stream, digest)
    print(f"download over {'HTTP/2' if http2 else 'HTTP/1.1'}: peak {memory.peak} bytes")
    assert size == BIG
    assert digest.hexdigest() == expected_stream_digest(chunks, count)
    assert memory.peak < MEMORY_BOUND


@both_protocols
async def test_uploading_64_mib_through_wsgi_input_uses_bounded_memory(http2: bool) -> None:
    chunks = [payload(64 * KiB, seed=70 + i) for i in range(4)]
    count = BIG // (64 * KiB)
    app = validator(digest_reply)
    with trio.fail_after(SLOW_TIMEOUT), TraceMemory() as memory:
        async with open_test_client(app, http2=http2) as client:
            stream = await client.open_stream(
                "POST", "/", headers=[("Content-Length", str(BIG))], end=False
            )
            for i in range(count):
                await stream.send(chunks[i % len(chunks)])
            await stream.end()
            response = await stream.read_response()
    print(f"upload over {'HTTP/2' if http2 else 'HTTP/1.1'}: peak {memory.peak} bytes")
    assert response.text == f"{BIG} {expected_stream_digest(chunks, count)}"
    assert memory.peak < MEMORY_BOUND


# ---- 8. HTTP/1.1 pipelining against a client that does not read ----------------------------

PIPELINED = 400
RESPONSE_SIZE = 64 * KiB


@pytest.mark.parametrize(
    "response",
    [
        "list",
        "generator",
    ],
)
async def test_http1_pipelined_requests_stop_being_answered_while_output_is_unread(
    response: str,
) -> None:
    """A client that pipelines requests and reads nothing gets a bounded number answered.

    400 requests for 64 KiB each (25 MiB of responses). Until the client reads,
    the server may only get ahead by about what fits in the pipe, the sender's
    batch and OUTPUT_HIGH_WATER (+ HTTP1_HIGH_WATER for a streamed response).
    Measured: 8 answered with a streamed response; with a list response the
    next pipelined request is held back while output is over OUTPUT_HIGH_WATER.
    """
    calls = [0]
    bodies = [bytes([65 + i % 26]) * RESPONSE_SIZE for i in range(26)]

    def app(environ: Environ, start_response: Any) -> Any:
        calls[0] += 1
        index = int(environ["PATH_INFO"][1:])
        body = bodies[index % 26]
        if response == "list":
            start_response(
                "200 OK",
                [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
            )
            return [body]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return iter([body[: len(body) // 2], body[len(body) // 2 :]])

    bound_bytes = DEFAULT_PIPE_CAPACITY + OUTPUT_HIGH_WATER + HTTP1_HIGH_WATER + 2 * RESPONSE_SIZE
    requests = b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(PIPELINED))
    with trio.fail_after(TIMEOUT):
        # validator() wraps every response in an iterator, which would hide the
        # list fast path (a list response is queued whole, in one hop).
        served = app if response == "list" else validator(app)
        async with open_test_client(served) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.stream.send_all, requests)
            await settle()
            answered = calls[0]
            print(f"{response}: {answered} of {PIPELINED} answered before the client read")
            assert answered * RESPONSE_SIZE <= bound_bytes
            # Now read them all, in order, intact.
            reader = h11.Connection(h11.CLIENT)
            for i in range(PIPELINED):
                reader.send(h11.Request(method="GET", target=f"/{i}", headers=[("Host", "x")]))
                reader.send(h11.EndOfMessage())
                status = 0
                size = 0
                while True:
                    event = reader.next_event()
                    if event is h11.NEED_DATA:
                        reader.receive_data(await client.stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        assert event.data == bodies[i % 26][size : size + len(event.data)]
                        size += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        raise AssertionError(f"unexpected {event!r}")
                assert (status, size) == (200, RESPONSE_SIZE)
                reader.start_next_cycle()
    assert calls[0] == PIPELINED


# ---- 9. HTTP/2 padding ---------------------------------------------------------------------


async def test_http2_padding_is_credited_at_once() -> None:
    """Padding never uses up the window: the app reads nothing, yet four windows' worth of
    padded DATA frames (1 byte of data each) get through.

    Each frame carries 1 data byte + 255 padding (+ the pad length byte): 257
    flow-controlled bytes. Only the data bytes may stay uncredited.
    """
    window = H2_DEFAULT_WINDOW
    frames = 4 * window // 257 + 1
    gate = Gate()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        gate.wait()
        return digest_reply(environ, start_response)

    data = payload(frames, seed=80)
    sent = 0
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            validator(app), http2=True, h2_initial_window_size=window
        ) as client:
            stream = await client.open_stream("POST", "/", end=False)

            async def send_padded() -> None:
                nonlocal sent
                for i in range(frames):
                    # One frame each (waits for 257 bytes of window if need be).
                    await stream.send(data[i : i + 1], pad_length=255)
                    sent += 1
                await stream.end()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_padded)
                await gate.wait_parked()
                await settle()
                print(f"padding: {sent} of {frames} padded frames through, app read nothing")
                assert sent == frames  # 4 windows of flow-controlled bytes, none read
                # What is not credited yet is the data (and h2's batching of updates).
                assert send_window(client, stream.stream_id) >= window - frames - window // 2
                gate.open()
            response = await stream.read_response()
    assert response.text == f"{frames} {digest_of(data)}"


# ---- HTTP/2: a peer that sends and never reads ----------------------------------------------


async def test_http2_ping_flood_from_a_client_that_never_reads_is_bounded() -> None:
    """Every PING earns a PING ACK; a client that floods them and never reads is stopped.

    Two defences bound it: the server stops reading once OUTPUT_HIGH_WATER of
    its output is unread, and, first here, the control-frame budget (about
    CONTROL_BUDGET frames without useful work) ends the connection with
    GOAWAY(ENHANCE_YOUR_CALM). The client's pushing is bounded by the budget,
    one READ_SIZE and the two pipes; when it reads again it finds the GOAWAY.
    """
    batch = 1000
    pings = 0
    pipe = 64 * KiB
    bound = (CONTROL_BUDGET + CONTROL_PER_STREAM) * 17 + READ_SIZE + 2 * pipe + batch * 17
    with trio.fail_after(TIMEOUT):
        async with open_test_client(
            apps_hello, http2=True, pipe_capacity=pipe, h2_idle_timeout=10 * TIMEOUT
        ) as client:
            # Finish the handshake first (SETTINGS and their ACKs), so that only
            # PINGs and their ACKs are in flight while the client does not read.
            assert (await client.get("/")).status == 200
            await settle()
            client.pause_reading(socket=True)

            stop = False

            async def flood() -> None:
                # Stopped by a flag, not cancelled: a write cancelled half-way
                # would leave half a frame in the pipe.
                # Private access: TestClient.ping() waits for each ACK; it has no
                # way to send PINGs without waiting (what a flood is).
                nonlocal pings
                for i in range(4 * MiB // 17 // batch):
                    if stop or client.closed.is_set():
                        return
                    for j in range(batch):
                        client._h2.ping((i * batch + j).to_bytes(8, "big"))
                    await client._flush()
                    pings += batch

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await settle()
                print(f"ping flood: blocked after {pings * 17} bytes of PINGs (bound {bound})")
                assert 0 < pings * 17 <= bound
                stop = True
                await client.resume_reading()
                await client.closed.wait()
    assert client.goaway_received is not None
    assert client.goaway_received.error_code == ErrorCodes.ENHANCE_YOUR_CALM
