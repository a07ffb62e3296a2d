"""Resets, disconnects and cancellation: what the app and the wire see when a client gives up.

The guarantee (docs/cancellation.md, "What your app sees"), checked in
every scenario here:

- the app thread's next read of ``wsgi.input``, ``write()`` or next chunk raises
  ``trio.Cancelled`` (``AppRecord.cancelled``, and the thread's ``call_app``
  itself ended with ``trio.Cancelled``);
- the iterable's ``close()`` ran exactly once;
- not one frame for the stream is sent once the server has processed the reset;
- the thread slot is released: a later request is still served, with as many
  apps running at once as there are threads (``Workload /slot``);
- every other stream on the connection completes with a correct body;
- no worker thread is left running at the end.

Mostly HTTP/2, in memory; HTTP/1.1 too where the scenario exists there (a
"reset" is then an abrupt disconnect). Server timeouts and shutdown need a
real ``Server`` and are covered elsewhere.

How the tests observe it:

- ``AppProbe`` records, per request, whether ``trio.Cancelled`` reached the
  app, how often ``close()`` was called and what body it read.
- ``record_frames=True``: ``client.frames`` lists every frame the client
  receives, parsed from the raw bytes (h2 drops frames for a stream the client
  has reset without any event, so h2 events alone could never show a server
  that keeps sending after a reset). ``client.ping()`` is a full round trip:
  the server has processed all we sent before it, and everything it sent
  before processing it has reached us.
- ``open_test_server`` + ``server.connect()``: several connections on one
  server, hence one thread limiter, to show that a *disconnected* connection
  gave its thread slot back (``server.context.limiter`` also counts the
  requests waiting for a thread).

Patches of server internals, only to observe them, kept where nothing public
gives the same certainty:

- :class:`Waits` wraps ``RequestStream.wait_body`` / ``wait_writable``, so a
  test knows the request is really blocked waiting for the client before it
  resets, and ``Connection.stream_done``, so it knows a request's task is over
  (nothing more can be sent for it) while other apps on the connection still
  run. (With no other app running, ``wait_all_threads_completed`` +
  ``wait_all_tasks_blocked`` says the same, and tests use that.)
- ``thread_outcomes`` wraps ``trioserve.app_threads.call_app`` to record how each
  app thread ended.

Private client access, where ``trioserve.testing`` has no API: the client's
HTTP/2 send windows (:func:`send_window`), and a GOAWAY coalesced with the
next DATA frame in one write.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from wsgiref.validate import validator

import h2.errors
import h2.settings
import pytest
import trio
import trio.testing
from hyperframe.frame import GoAwayFrame

import trioserve.app_threads
import trioserve.stream
from tests.helpers import no_threads_left
from trioserve.connection import Connection
from trioserve.stream import RequestStream
from trioserve.testing import (
    AppProbe,
    AppRecord,
    FrameInfo,
    TestClient,
    TestServer,
    open_test_client,
    open_test_server,
)

TIMEOUT = 10  # seconds: a hang fails the test instead of blocking the run

NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR  # 2
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM  # 7
CANCEL = h2.errors.ErrorCodes.CANCEL  # 8

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])

Environ = dict[str, Any]
TEXT = [("Content-Type", "text/plain")]
BINARY = [("Content-Type", "application/octet-stream")]


def pattern(name: str, size: int) -> bytes:
    """``size`` bytes that depend on their position and on ``name``: a lost or misplaced
    chunk, or bytes from another stream, show."""
    seed = sum(name.encode()) % 251
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


# ---------------------------------------------------------------------------
# The app under test
# ---------------------------------------------------------------------------


class _Counted:
    """A response iterable that counts its close() calls, per request path."""

    def __init__(self, workload: Workload, path: str, body: Iterator[bytes]) -> None:
        self._workload = workload
        self._path = path
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def close(self) -> None:
        with self._workload.lock:
            self._workload.closes[self._path] += 1
        self._body.close()


class Workload:
    """The WSGI app under test; the first path segment picks the behaviour.

    ``/hold/NAME``    waits until ``open_gate("hold")`` (inside trio's system
                      nursery: a reset does not end the wait), answers ``held NAME``
    ``/slot/TAG-I``   signals ``slot/TAG-I``, waits until ``open_gate("slot/TAG")``,
                      answers ``slot TAG-I`` (see :func:`prove_free_slots`)
    ``/block/NAME``   waits on ``plain_gate``, a threading.Event (plain Python, no
                      trio hop to cancel), then streams forever
    ``/body/NAME?size=N``  streams ``pattern(NAME, N)`` in 16 KiB chunks
    ``/forever/NAME?mode=yield|write``  streams 4 KiB chunks forever
    ``/read/NAME``    reads 5 bytes, signals, reads to the end, answers the length
    ``/unread/NAME``  never reads its body: waits in a trio hop (a reset cancels it)
    ``/echo/NAME``    reads the whole body and answers it
    ``/fail/before``, ``/fail/after``  raise before / after the first body chunk
    ``/stubborn/NAME``  streams with write(); when write() raises trio.Cancelled it
                      swallows it and writes 20 more times, then yields a last chunk

    Every response is a :class:`_Counted` iterable; the app's body runs inside
    it, so close() matters on every path.
    """

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.lock = threading.Lock()
        self.called: list[str] = []  # PATH_INFO of every call that reached the app
        self.closes: Counter[str] = Counter()
        self.raised: dict[str, BaseException] = {}  # what the app's own code saw raised
        self.swallowed: Counter[str] = Counter()  # /stubborn: trio.Cancelled caught
        self.plain_gate = threading.Event()
        self._events: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self._open_gates: set[str] = set()
        self.app = validator(self._app)

    # ---- trio side ----------------------------------------------------------

    async def reached(self, name: str) -> None:
        """Wait until the app signalled ``name``."""
        await self._events["signal/" + name].wait()

    def open_gate(self, name: str) -> None:
        self._open_gates.add(name)
        self._events["gate/" + name].set()

    def release_all(self) -> None:
        for name in ["hold", *(key[5:] for key in list(self._events) if key.startswith("gate/"))]:
            self.open_gate(name)
        self.plain_gate.set()

    @asynccontextmanager
    async def releasing(self) -> AsyncIterator[None]:
        """On the way out (also on failure) let every app that waits go on."""
        try:
            yield
        finally:
            self.release_all()

    async def _wait_gate(self, name: str) -> None:
        if name not in self._open_gates:
            await self._events["gate/" + name].wait()

    # ---- thread side ---------------------------------------------------------

    def signal(self, name: str) -> None:
        trio.from_thread.run_sync(self._events["signal/" + name].set, trio_token=self.token)

    def gate(self, name: str) -> None:
        trio.from_thread.run(self._wait_gate, name, trio_token=self.token)

    def _app(self, environ: Environ, start_response: Any) -> _Counted:
        path = environ["PATH_INFO"]
        with self.lock:
            self.called.append(path)
        kind, _, name = path.strip("/").partition("/")
        query = dict(p.split("=", 1) for p in environ["QUERY_STRING"].split("&") if "=" in p)
        handler = getattr(self, "_" + kind)
        return _Counted(
            self, path, self._watch(path, handler(environ, start_response, name, query))
        )

    def _watch(self, path: str, body: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from body
        except GeneratorExit:
            raise
        except BaseException as exc:
            self.raised[path] = exc
            raise

    def _hold(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        self.signal(f"hold/{name}")
        self.gate("hold")
        start_response("200 OK", TEXT)
        yield f"held {name}".encode()

    def _slot(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        self.signal(f"slot/{name}")
        self.gate("slot/" + name.rpartition("-")[0])
        start_response("200 OK", TEXT)
        yield f"slot {name}".encode()

    def _block(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        self.signal(f"block/{name}")
        self.plain_gate.wait()
        start_response("200 OK", BINARY)
        while True:
            yield b"b" * 4096

    def _body(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        size = int(q.get("size", "100000"))
        data = pattern(name, size)
        start_response("200 OK", [*BINARY, ("Content-Length", str(size))])
        for start in range(0, size, 16384):
            yield data[start : start + 16384]

    def _forever(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        write = start_response("200 OK", BINARY)
        chunk = b"f" * 4096
        if q.get("mode") == "write":
            while True:
                write(chunk)
        while True:
            yield chunk

    def _read(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        wsgi_input = environ["wsgi.input"]
        total = len(wsgi_input.read(5))
        self.signal(f"read/{name}")
        while chunk := wsgi_input.read(1024):
            total += len(chunk)
        start_response("200 OK", TEXT)
        yield str(total).encode()

    def _unread(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        self.signal(f"unread/{name}")
        trio.from_thread.run(trio.sleep_forever)  # in the request's task: a reset ends it
        start_response("200 OK", TEXT)
        yield b"unreachable"

    def _echo(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        chunks = []
        while chunk := environ["wsgi.input"].read(65536):
            chunks.append(chunk)
        body = b"".join(chunks)
        start_response("200 OK", [*BINARY, ("Content-Length", str(len(body)))])
        yield body

    def _fail(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        start_response("200 OK", TEXT)
        if name == "after":
            yield b"partial"
        raise ValueError(f"failing {name} the headers")

    def _stubborn(self, environ: Environ, start_response: Any, name: str, q: dict[str, str]) -> Any:
        path = environ["PATH_INFO"]
        write = start_response("200 OK", BINARY)
        while self.swallowed[path] < 20:
            try:
                write(b"s" * 4096)
            except trio.Cancelled:
                self.swallowed[path] += 1  # a misbehaving app: it carries on
        yield b"late chunk after the reset"


# ---------------------------------------------------------------------------
# Observation helpers
# ---------------------------------------------------------------------------


def _path(stream: RequestStream) -> str:
    return stream.request.target.decode("latin-1").partition("?")[0]


class Waits:
    """Where request tasks wait for their client (``wait_body`` / ``wait_writable``), and
    which have ended (``Connection.stream_done``), by path (see the ``waits`` fixture)."""

    def __init__(self) -> None:
        self.entered: Counter[tuple[str, str]] = Counter()
        self.inside: Counter[tuple[str, str]] = Counter()
        self.done: Counter[str] = Counter()
        self._changed = trio.Event()

    def changed(self) -> None:
        """Called by the wrappers: wake whoever waits in :meth:`until`."""
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def entered_times(self, kind: str, path: str, times: int) -> None:
        await self.until(lambda: self.entered[kind, path] >= times)

    async def stream_done(self, path: str) -> None:
        """Wait until the request task for ``path`` has finished (after its thread did)."""
        await self.until(lambda: self.done[path] > 0)

    async def settled_in(self, kind: str, path: str) -> None:
        """Wait until ``path``'s task sits in ``wait_<kind>`` and stays there."""
        while True:
            await self.until(lambda: self.inside[kind, path] > 0)
            await trio.testing.wait_all_tasks_blocked()
            if self.inside[kind, path] > 0:
                return


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Waits:
    """Observe (never change) RequestStream.wait_body / wait_writable and
    Connection.stream_done: each wrapper calls the original and only counts."""
    observed = Waits()

    def observe(kind: str, original: Callable[[RequestStream], Any]) -> Any:
        async def wrapper(self: RequestStream) -> Any:
            key = (kind, _path(self))
            observed.entered[key] += 1
            observed.inside[key] += 1
            observed.changed()
            try:
                return await original(self)
            finally:
                observed.inside[key] -= 1
                observed.changed()

        return wrapper

    original_done = Connection.stream_done

    def stream_done(self: Connection, stream: RequestStream) -> None:
        original_done(self, stream)
        observed.done[_path(stream)] += 1
        observed.changed()

    monkeypatch.setattr(Connection, "stream_done", stream_done)
    monkeypatch.setattr(RequestStream, "wait_body", observe("body", RequestStream.wait_body))
    monkeypatch.setattr(
        RequestStream, "wait_writable", observe("writable", RequestStream.wait_writable)
    )
    return observed


class Outcomes:
    """How each app thread's ``call_app`` ended, by path: the exception, or None."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.ended: dict[str, BaseException | None] = {}
        self._events: defaultdict[str, trio.Event] = defaultdict(trio.Event)

    def _record(self, path: str, outcome: BaseException | None) -> None:
        self.ended[path] = outcome
        self._events[path].set()

    def record(self, path: str, outcome: BaseException | None) -> None:  # in the app thread
        trio.from_thread.run_sync(self._record, path, outcome, trio_token=self.token)

    async def of(self, path: str) -> BaseException | None:
        """Wait until the thread for ``path`` has left ``call_app``; how did it end?"""
        await self._events[path].wait()
        return self.ended[path]


@pytest.fixture
async def thread_outcomes(monkeypatch: pytest.MonkeyPatch) -> Outcomes:
    """Observe (never change) how ``call_app`` ends in each app thread.

    Patched where the app threads call it: :mod:`trioserve.app_threads`.
    """
    outcomes = Outcomes()
    original = trioserve.app_threads.call_app

    def recording(app: Any, request: Any, *args: Any) -> Any:
        path = request.target.decode("latin-1").partition("?")[0]
        try:
            result = original(app, request, *args)
        except BaseException as exc:
            outcomes.record(path, exc)
            raise
        outcomes.record(path, None)
        return result

    monkeypatch.setattr(trioserve.app_threads, "call_app", recording)
    return outcomes


def frames_for(client: TestClient, stream_id: int, since: int = 0) -> list[FrameInfo]:
    """The frames the client received for ``stream_id``, from ``client.frames[since]`` on."""
    assert client.frames is not None  # connected with record_frames=True
    return [frame for frame in client.frames[since:] if frame.stream_id == stream_id]


def frame_mark(client: TestClient) -> int:
    """How many frames the client has received so far (a ``since`` for :func:`frames_for`)."""
    assert client.frames is not None
    return len(client.frames)


def waiting_for_a_thread(server: TestServer) -> int:
    """Requests of any connection to ``server`` queued for a worker thread."""
    return int(server.context.limiter.statistics().tasks_waiting)


def send_window(client: TestClient) -> int:
    """The client's HTTP/2 connection send window.

    Private access: TestClient has no public view of its own send windows.
    """
    return int(client._h2.outbound_flow_control_window)


async def prove_free_slots(client: TestClient, w: Workload, count: int, tag: str) -> None:
    """``count`` apps run at the same time on ``client``: ``count`` thread slots are free."""
    streams = [await client.open_stream("GET", f"/slot/{tag}-{i}") for i in range(count)]
    for i in range(count):
        await w.reached(f"slot/{tag}-{i}")
    w.open_gate(f"slot/{tag}")
    for i, stream in enumerate(streams):
        response = await stream.read_response()
        assert (response.status, response.body) == (200, f"slot {tag}-{i}".encode())
        assert response.complete


async def apps_done() -> None:
    """Every app thread has ended and every request task has done what followed (all of
    them: use only when no other app is left running)."""
    while True:
        await trio.testing.wait_all_threads_completed()
        await trio.testing.wait_all_tasks_blocked()
        if trio.testing.active_thread_count() == 0:
            return


async def assert_cancelled(record: AppRecord, w: Workload, outcomes: Outcomes, path: str) -> None:
    """The app for ``path`` saw trio.Cancelled and its iterable was closed exactly once."""
    assert record.cancelled, path
    assert record.close_calls == 1, path
    assert w.closes[path] == 1, path
    outcome = await outcomes.of(path)
    assert isinstance(outcome, trio.Cancelled), (path, outcome)


# ---------------------------------------------------------------------------
# 1. Reset before the app starts: the work is dropped
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["http2-same-connection", "http2-other-connection", "http1"])
async def test_request_reset_while_waiting_for_a_thread_never_runs(where: str) -> None:
    http2 = where != "http1"
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with open_test_server(probe, threads=1) as server, AsyncExitStack() as stack:
            first = await stack.enter_async_context(
                server.connect(http2=http2, record_frames=http2)
            )
            second = first
            if where != "http2-same-connection":
                second = await stack.enter_async_context(
                    server.connect(http2=http2, record_frames=http2)
                )
            await stack.enter_async_context(w.releasing())

            holder = await first.open_stream("GET", "/hold/first")
            await w.reached("hold/first")  # the only thread is taken
            victim = await second.open_stream("GET", "/body/victim")
            if http2:
                await second.ping()
            await trio.testing.wait_all_tasks_blocked()
            assert waiting_for_a_thread(server) == 1  # queued for the thread

            await victim.reset()
            # No app runs for it: once every task is blocked, its task is done.
            await trio.testing.wait_all_tasks_blocked()
            assert waiting_for_a_thread(server) == 0  # it gave up waiting for a thread

            w.open_gate("hold")  # the thread is free now: the victim must not get it
            response = await holder.read_response()
            assert (response.status, response.body) == (200, b"held first")
            assert response.complete
            later = await first.get("/body/later?size=1000")  # threads=1: the slot came back
            assert later.body == pattern("later", 1000)
            if http2:
                await second.ping()
                assert frames_for(second, victim.stream_id) == []  # not even a RST_STREAM
        assert "/body/victim" not in w.called
        assert [r.path for r in probe.records] == ["/hold/first", "/body/later"]
        assert w.closes == Counter({"/hold/first": 1, "/body/later": 1})
        await no_threads_left()


# ---------------------------------------------------------------------------
# 2. Reset while the app waits for more request body
# ---------------------------------------------------------------------------


@both_protocols
async def test_reset_while_the_app_reads_the_body(
    http2: bool, waits: Waits, thread_outcomes: Outcomes
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    threads = 2 if http2 else 1
    with trio.fail_after(TIMEOUT):
        # body_prebuffer=0: the app must run before its body is in, however few threads are free
        async with open_test_server(probe, threads=threads, body_prebuffer=0) as server:
            async with server.connect(http2=http2, record_frames=http2) as client, w.releasing():
                bystander = None
                if http2:
                    bystander = await client.open_stream("POST", "/echo/by", end=False)
                    await bystander.send(pattern("up", 30000))
                victim = await client.open_stream("POST", "/read/v", end=False)
                await waits.entered_times("body", "/read/v", 1)  # waiting: nothing sent yet
                await victim.send(b"first")
                await waits.entered_times("body", "/read/v", 2)  # read(5) done, blocked again

                await victim.reset()
                record = await probe.wait_finished(path="/read/v")
                await assert_cancelled(record, w, thread_outcomes, "/read/v")
                assert isinstance(w.raised["/read/v"], trio.Cancelled)  # raised by read()
                assert bytes(record.body_read) == b"first"

                if bystander is not None:
                    # The bystander's app still runs: only the hook says the victim's
                    # task is over.
                    await waits.stream_done("/read/v")
                    await client.ping()
                    assert frames_for(client, victim.stream_id) == []  # it never answered
                    await bystander.send(pattern("up", 30000)[::-1], end=True)
                    response = await bystander.read_response()
                    assert (response.status, response.complete) == (200, True)
                    assert response.body == pattern("up", 30000) + pattern("up", 30000)[::-1]
                    await prove_free_slots(client, w, threads, "after")
            if not http2:
                async with server.connect(http2=False) as again, w.releasing():
                    await prove_free_slots(again, w, threads, "after")
        await no_threads_left()


# ---------------------------------------------------------------------------
# 3. Reset while the app streams its response
# ---------------------------------------------------------------------------


@both_protocols
@pytest.mark.parametrize("mode", ["yield", "write"])
async def test_reset_while_the_app_streams_its_response(
    http2: bool, mode: str, waits: Waits, thread_outcomes: Outcomes
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    threads = 2 if http2 else 1
    with trio.fail_after(TIMEOUT):
        # body_prebuffer=0: the app must run before its body is in, however few threads are free
        async with open_test_server(probe, threads=threads, body_prebuffer=0) as server:
            async with server.connect(http2=http2, record_frames=http2) as client, w.releasing():
                # The victim is streaming (headers and data received) before the
                # bystander starts.
                victim = await client.open_stream("GET", f"/forever/v?mode={mode}")
                response = await victim.receive_headers()
                assert response.status == 200
                assert await victim.receive_data()
                bystander = (
                    await client.open_stream("GET", "/body/by?size=300000") if http2 else None
                )

                if http2:
                    assert frames_for(client, victim.stream_id)  # its HEADERS and DATA, seen
                await victim.reset()
                mark = 0
                if http2:
                    await client.ping()  # processed: from here on, nothing for the victim
                    mark = frame_mark(client)
                record = await probe.wait_finished(path="/forever/v")
                await assert_cancelled(record, w, thread_outcomes, "/forever/v")
                if mode == "write":
                    assert isinstance(w.raised["/forever/v"], trio.Cancelled)  # raised by write()

                if bystander is not None:
                    # The bystander's app may still run: only the hook says the
                    # victim's task is over.
                    await waits.stream_done("/forever/v")
                    await client.ping()
                    assert frames_for(client, victim.stream_id, since=mark) == []
                    by = await bystander.read_response()
                    assert (by.status, by.body, by.complete) == (200, pattern("by", 300000), True)
                    await prove_free_slots(client, w, threads, "after")
            if not http2:
                async with server.connect(http2=False) as again, w.releasing():
                    await prove_free_slots(again, w, threads, "after")
        await no_threads_left()


# ---------------------------------------------------------------------------
# 4. Reset while the app is blocked on flow control
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["http2-zero-window", "http2-paused", "http1-paused"])
async def test_reset_while_the_app_is_blocked_on_flow_control(
    how: str, waits: Waits, thread_outcomes: Outcomes
) -> None:
    http2 = how.startswith("http2")
    zero_window = how == "http2-zero-window"
    w = Workload()
    probe = AppProbe(w.app)
    threads = 2 if http2 else 1
    settings: dict[int, int] | None = (
        {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0} if zero_window else None
    )
    with trio.fail_after(TIMEOUT):
        async with open_test_server(probe, threads=threads) as server:
            async with (
                server.connect(http2=http2, h2_settings=settings, record_frames=http2) as client,
                w.releasing(),
            ):
                if not zero_window:
                    client.pause_reading()
                victim = await client.open_stream("GET", "/forever/v")
                bystander = (
                    await client.open_stream("GET", "/body/by?size=100000") if http2 else None
                )
                if zero_window and bystander is not None:
                    await bystander.open_window(100000)  # only the bystander gets a window
                await waits.settled_in("writable", "/forever/v")  # the app's write blocks

                await victim.reset()
                mark = 0
                if http2:
                    await client.ping()
                    mark = frame_mark(client)
                record = await probe.wait_finished(path="/forever/v")
                await assert_cancelled(record, w, thread_outcomes, "/forever/v")

                if bystander is not None:
                    # The bystander's app still runs (blocked on flow control): only
                    # the hook says the victim's task is over.
                    await waits.stream_done("/forever/v")
                    await client.resume_reading()
                    await client.ping()
                    assert frames_for(client, victim.stream_id, since=mark) == []
                    by = await bystander.read_response()
                    assert (by.status, by.body, by.complete) == (200, pattern("by", 100000), True)
                    if not zero_window:  # a zero window would stall the slots' bodies
                        await prove_free_slots(client, w, threads, "after")
            if not http2 or zero_window:
                async with server.connect(http2=http2) as again, w.releasing():
                    await prove_free_slots(again, w, threads, "after")
        await no_threads_left()


async def test_reset_drops_response_data_already_handed_over() -> None:
    """The app has finished; its output waits for window. A reset must drop it, not send it."""
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(probe, http2=True, record_frames=True) as client,
            w.releasing(),
        ):
            client.pause_reading()  # the 65535-byte windows run dry
            victim = await client.open_stream("GET", "/body/v?size=200000")
            bystander = await client.open_stream("GET", "/body/by?size=100000")
            record = await probe.wait_finished(path="/body/v")  # all 200000 bytes handed over
            assert not record.cancelled
            await client.ping()

            await victim.reset()  # credits back what arrived for it (unread, withheld)
            await client.ping()
            mark = frame_mark(client)
            await client.resume_reading()  # credit for the connection: the queue could go now
            by = await bystander.read_response()
            assert (by.status, by.body, by.complete) == (200, pattern("by", 100000), True)
            await client.ping()
            assert frames_for(client, victim.stream_id, since=mark) == []
        assert w.closes["/body/v"] == 1
        await no_threads_left()


# ---------------------------------------------------------------------------
# 5. One reset among several streams
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("victim_kind", ["forever", "read"])
@pytest.mark.parametrize("code", [CANCEL, NO_ERROR], ids=["CANCEL", "NO_ERROR"])
async def test_reset_of_one_stream_leaves_the_others_intact(
    victim_kind: str,
    code: int,
    waits: Waits,
    thread_outcomes: Outcomes,
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    path = f"/{victim_kind}/v"
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(probe, http2=True, threads=5, record_frames=True) as client,
            w.releasing(),
        ):
            if victim_kind == "forever":
                victim = await client.open_stream("GET", path)
                await victim.receive_headers()
                await victim.receive_data()
            else:
                victim = await client.open_stream("POST", path, end=False)
                await waits.entered_times("body", path, 1)
                await victim.send(b"first")
                await waits.entered_times("body", path, 2)
            big = await client.open_stream("GET", "/body/big?size=600000")
            upload = await client.open_stream("POST", "/echo/up", end=False)
            await upload.send(pattern("up", 40000))
            holder = await client.open_stream("GET", "/hold/h")
            small = await client.open_stream("GET", "/body/small?size=10")
            await w.reached("hold/h")

            await victim.reset(code)
            await client.ping()
            mark = frame_mark(client)
            record = await probe.wait_finished(path=path)
            await assert_cancelled(record, w, thread_outcomes, path)
            await waits.stream_done(path)  # other apps still run: only the hook says so
            await client.ping()
            assert frames_for(client, victim.stream_id, since=mark) == []

            w.open_gate("hold")
            await upload.send(pattern("up2", 40000), end=True)
            responses = [await stream.read_response() for stream in (big, upload, holder, small)]
            assert [r.body for r in responses] == [
                pattern("big", 600000),
                pattern("up", 40000) + pattern("up2", 40000),
                b"held h",
                pattern("small", 10),
            ]
            for other in (big, upload, holder, small):
                assert other.response.status == 200
                assert other.response.complete
                assert other.reset_code is None
            for other_path in ("/body/big", "/echo/up", "/hold/h", "/body/small"):
                other_record = await probe.wait_finished(path=other_path)
                assert not other_record.cancelled
                assert w.closes[other_path] == 1
                assert await thread_outcomes.of(other_path) is None
            await prove_free_slots(client, w, 5, "after")
        await no_threads_left()


# ---------------------------------------------------------------------------
# 6. The client goes away with several requests in flight
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http2", "how"),
    [
        (True, "abort"),
        (True, "close"),
        (True, "goaway-error"),
        (False, "abort"),
        (False, "close"),
    ],
    ids=["http2-abort", "http2-close", "http2-goaway-error", "http1-abort", "http1-close"],
)
async def test_client_gone_cancels_every_request_in_flight(
    http2: bool, how: str, waits: Waits, thread_outcomes: Outcomes
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    threads = 3 if http2 else 1
    with trio.fail_after(TIMEOUT):
        # body_prebuffer=0: the app must run before its body is in, however few threads are free
        async with open_test_server(probe, threads=threads, body_prebuffer=0) as server:
            async with server.connect(http2=http2) as client, w.releasing():
                streaming = await client.open_stream("GET", "/forever/a")
                await streaming.receive_headers()
                await streaming.receive_data()
                running = ["/forever/a"]
                if http2:
                    reading = await client.open_stream("POST", "/read/b", end=False)
                    await waits.entered_times("body", "/read/b", 1)
                    await reading.send(b"first")
                    await waits.entered_times("body", "/read/b", 2)
                    await client.open_stream("POST", "/unread/c", end=False)
                    await w.reached("unread/c")
                    running += ["/read/b", "/unread/c"]
                    await client.open_stream("GET", "/body/queued")
                    await client.ping()
                else:
                    # Pipelined behind the streaming response: it waits its turn.
                    # (TestClient does not pipeline: the raw request goes on the wire.)
                    await client.stream.send_all(b"GET /body/queued HTTP/1.1\r\nHost: x\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()
                assert waiting_for_a_thread(server) == (1 if http2 else 0)

                if how == "goaway-error":
                    await client.goaway(INTERNAL_ERROR)
                else:
                    await client.disconnect(abort=how == "abort")
                for path in running:
                    record = await probe.wait_finished(path=path)
                    await assert_cancelled(record, w, thread_outcomes, path)
                if how == "goaway-error":
                    await client.closed.wait()  # the server closes once its streams are gone
            assert "/body/queued" not in w.called
            assert len(probe.records) == len(running)
            await trio.testing.wait_all_threads_completed()
            async with server.connect(http2=http2) as again, w.releasing():
                await prove_free_slots(again, w, threads, "after")
        await no_threads_left()


# ---------------------------------------------------------------------------
# 7. A clean client GOAWAY lets the streams in flight finish
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coalesced",
    [
        pytest.param(False, id="goaway-alone"),
        pytest.param(True, id="goaway-with-next-frames"),
    ],
)
async def test_clean_client_goaway_lets_streams_in_flight_finish(
    coalesced: bool, thread_outcomes: Outcomes
) -> None:
    """RFC 9113 §6.8: after GOAWAY(NO_ERROR) the server may, and trioserve does, finish them.

    In flight when the GOAWAY comes: a response (``big``), an upload the client keeps
    sending after its GOAWAY, an app still running (``holder``) and a request still
    waiting for a thread (``queued``). All the responses fit in the client's windows
    (see the next test for one that does not). ``coalesced`` puts the GOAWAY and the
    next DATA frame in one write (one read for the server), as TCP may; otherwise the
    server reads the GOAWAY alone.
    """
    w = Workload()
    probe = AppProbe(w.app)
    big_size = 20000
    threads = 2  # the upload's app and the holder's: ``queued`` waits for a thread
    # body_prebuffer=0: the upload's app must start (and hold its thread) while its
    # body is still coming, even with half the threads busy.
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(probe, http2=True, threads=threads, body_prebuffer=0) as client,
            w.releasing(),
        ):
            big = await client.open_stream("GET", f"/body/big?size={big_size}")
            upload = await client.open_stream("POST", "/echo/up", end=False)
            await upload.send(pattern("up", 10000))
            holder = await client.open_stream("GET", "/hold/h")
            await w.reached("hold/h")
            queued = await client.open_stream("GET", "/body/queued?size=5000")
            await client.ping()
            await trio.testing.wait_all_tasks_blocked()
            assert "/body/queued" not in w.called  # every thread is taken

            part = pattern("up2", 10000)
            if coalesced:
                # Private access: client.goaway() writes the GOAWAY on its own, so the
                # DATA frame is queued in the client's h2 and both go out in one write.
                client._h2.send_data(upload.stream_id, part)
                frame = GoAwayFrame(stream_id=0, last_stream_id=0, error_code=NO_ERROR)
                await client._raw_send(frame.serialize() + client._h2.data_to_send())
                await upload.end()
            else:
                await client.goaway(NO_ERROR)
                await trio.testing.wait_all_tasks_blocked()  # the server has read it alone
                await upload.send(part, end=True)
            w.open_gate("hold")

            responses = [await stream.read_response() for stream in (big, upload, holder, queued)]
            assert client.goaway_received is None  # no GOAWAY of the server's own (no error)
            assert [r.body for r in responses] == [
                pattern("big", big_size),
                pattern("up", 10000) + part,
                b"held h",
                pattern("queued", 5000),
            ]
            for stream in (big, upload, holder, queued):
                assert (stream.response.status, stream.reset_code) == (200, None)
                assert stream.response.complete
            await client.closed.wait()  # then the server closes: no new streams can come
        for path in ("/body/big", "/echo/up", "/hold/h", "/body/queued"):
            assert await thread_outcomes.of(path) is None
            assert w.closes[path] == 1
        await no_threads_left()


async def test_clean_client_goaway_still_delivers_a_response_waiting_for_window() -> None:
    """The app is done, but most of its response waits for the client's window when
    the GOAWAY(NO_ERROR) comes; the stream is still in flight and must complete."""
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with open_test_client(probe, http2=True) as client, w.releasing():
            client.pause_reading()  # the 65535-byte windows run dry
            big = await client.open_stream("GET", "/body/big?size=200000")
            await probe.wait_finished(path="/body/big")  # 200000 bytes handed over: app done
            await apps_done()  # its request task waits for window, not for the app
            await client.ping()

            await client.goaway(NO_ERROR)
            await trio.testing.wait_all_tasks_blocked()
            await client.resume_reading()  # the window opens again
            response = await big.read_response()
            assert (response.status, len(response.body)) == (200, 200000)
            assert response.body == pattern("big", 200000)
            assert response.complete
            assert client.goaway_received is None
        assert w.closes["/body/big"] == 1
        await no_threads_left()


# ---------------------------------------------------------------------------
# 8. App errors
# ---------------------------------------------------------------------------


@both_protocols
@pytest.mark.parametrize("when", ["before", "after"])
async def test_app_error_before_or_after_the_headers(
    http2: bool,
    when: str,
    caplog: pytest.LogCaptureFixture,
    thread_outcomes: Outcomes,
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    path = f"/fail/{when}"
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.ERROR, logger="trioserve"):
        async with open_test_server(probe, threads=1) as server:
            async with server.connect(http2=http2) as client, w.releasing():
                stream = await client.open_stream("GET", path)
                response = await stream.read_response()
                record = await probe.wait_finished(path=path)
                assert isinstance(record.exception, ValueError)
                assert not record.cancelled
                assert record.close_calls == 1
                assert w.closes[path] == 1
                assert isinstance(await thread_outcomes.of(path), ValueError)
                if when == "before":
                    assert response.status == 500
                    assert response.complete
                    assert b"Traceback" not in response.body
                    assert b"failing" not in response.body
                    assert stream.reset_code is None
                elif http2:
                    assert stream.reset_code == INTERNAL_ERROR
                    assert not response.complete
                    assert response.body in (b"", b"partial")
                else:
                    # HTTP/1.1 can only signal an incomplete response by closing.
                    assert client.closed.is_set()
                    assert not response.complete
                    assert response.body in (b"", b"partial")
                if http2 or when == "before":
                    # The connection survives, and threads=1: the slot came back.
                    assert (await client.get("/body/next?size=100")).body == pattern("next", 100)
            if not http2 and when == "after":
                async with server.connect(http2=False) as again, w.releasing():
                    assert (await again.get("/body/next?size=100")).body == pattern("next", 100)
        logged = [r for r in caplog.records if r.getMessage().startswith("Error in the app")]
        assert len(logged) == 1
        assert logged[0].exc_info is not None
        await no_threads_left()


# ---------------------------------------------------------------------------
# 9. Live app calls, reset ones included, are bounded per connection
# ---------------------------------------------------------------------------


async def test_reset_streams_whose_threads_still_run_count_against_the_stream_limit(
    thread_outcomes: Outcomes,
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    limit = 3
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(
                probe,
                http2=True,
                h2_max_concurrent_streams=limit,
                threads=limit + 1,
                record_frames=True,
            ) as client,
            w.releasing(),
        ):
            blocked = [await client.open_stream("GET", f"/block/{i}") for i in range(limit)]
            for i in range(limit):
                await w.reached(f"block/{i}")
            for stream in blocked:
                await stream.reset()
            await client.ping()
            mark = frame_mark(client)
            assert trio.testing.active_thread_count() == limit  # their threads still run

            refused = await client.open_stream("GET", "/slot/refused-0")
            await refused.read_response()
            assert refused.reset_code == REFUSED_STREAM
            assert "/slot/refused-0" not in w.called  # a free thread was there; not used

            w.plain_gate.set()  # the reset apps go on, and their next chunk is refused
            for i in range(limit):
                path = f"/block/{i}"
                record = await probe.wait_finished(path=path)
                await assert_cancelled(record, w, thread_outcomes, path)
            await apps_done()  # their stream tasks are done too
            await client.ping()
            for stream in blocked:
                assert frames_for(client, stream.stream_id, since=mark) == []
            await prove_free_slots(client, w, limit, "after")  # served again, all at once
        await no_threads_left()


# ---------------------------------------------------------------------------
# 11. A reset stream's unread body is credited back to the connection window
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["app-running", "waiting-for-a-thread"])
async def test_unread_body_of_a_reset_stream_is_credited_back(
    state: str, thread_outcomes: Outcomes
) -> None:
    """With the connection window down to what one stream may send, a leak would stall
    every later upload on the connection."""
    window = 65535
    queued = state == "waiting-for-a-thread"
    streams = 2 if queued else 1
    connection_window = window * streams  # what trioserve opens: per-stream x max streams
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(
                probe,
                http2=True,
                threads=1,
                body_prebuffer=0,  # the app must run before its body is in
                h2_initial_window_size=window,
                h2_max_concurrent_streams=streams,
                record_frames=True,
            ) as client,
            w.releasing(),
        ):
            await client.ping()
            assert send_window(client) == connection_window
            holder = None
            if queued:
                holder = await client.open_stream("GET", "/hold/h")
                await w.reached("hold/h")
            victim = await client.open_stream("POST", "/unread/v", end=False)
            if queued:
                await client.ping()
                await trio.testing.wait_all_tasks_blocked()
                assert "/unread/v" not in w.called
            else:
                await w.reached("unread/v")
            await victim.send(b"u" * window)  # the body arrives after the request started
            await client.ping()
            # Nobody read it, so no credit came back (flow control holds).
            assert send_window(client) == connection_window - window

            await victim.reset()
            record = None
            if queued:
                # No app runs for it: once every task is blocked, its task is done.
                await trio.testing.wait_all_tasks_blocked()
            else:
                record = await probe.wait_finished(path="/unread/v")
                await apps_done()  # the only app: its task is over too
            await client.ping()  # the server's WINDOW_UPDATE, if any, came before the ACK
            assert send_window(client) == connection_window  # credited back, all of it
            if holder is not None:
                w.open_gate("hold")
                assert (await holder.read_response()).body == b"held h"
                assert "/unread/v" not in w.called
            else:
                assert record is not None
                await assert_cancelled(record, w, thread_outcomes, "/unread/v")
                assert bytes(record.body_read) == b""

            upload = pattern("after", 4 * connection_window)
            response = await client.post("/echo/after", body=upload)
            assert (response.status, response.body, response.complete) == (200, upload, True)
        await no_threads_left()


# ---------------------------------------------------------------------------
# 12. Not one frame after the reset, whatever the app does
# ---------------------------------------------------------------------------


async def test_no_frame_after_a_reset_even_from_an_app_that_ignores_cancellation(
    thread_outcomes: Outcomes,
) -> None:
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(probe, http2=True, threads=1, record_frames=True) as client,
            w.releasing(),
        ):
            victim = await client.open_stream("GET", "/stubborn/s")
            await victim.receive_headers()
            assert await victim.receive_data()
            assert frames_for(client, victim.stream_id)  # its HEADERS and DATA, seen

            await victim.reset()
            await client.ping()
            mark = frame_mark(client)
            record = await probe.wait_finished(path="/stubborn/s")
            # Every write() after the reset raised, and so did handing over the last chunk.
            assert w.swallowed["/stubborn/s"] == 20
            await assert_cancelled(record, w, thread_outcomes, "/stubborn/s")
            await apps_done()  # the only app: its request task is over too
            await client.ping()
            assert frames_for(client, victim.stream_id, since=mark) == []
            assert (await client.get("/body/next?size=100")).body == pattern("next", 100)
        await no_threads_left()


async def test_reset_stream_receives_nothing_after_the_server_saw_the_reset(
    thread_outcomes: Outcomes,
) -> None:
    """The app keeps producing for a while after the reset (it is blocked in plain
    Python when the reset comes); nothing of it may reach the wire."""
    w = Workload()
    probe = AppProbe(w.app)
    with trio.fail_after(TIMEOUT):
        async with (
            open_test_client(probe, http2=True, threads=1, record_frames=True) as client,
            w.releasing(),
        ):
            victim = await client.open_stream("GET", "/block/v")
            await w.reached("block/v")
            await victim.reset()
            await client.ping()
            w.plain_gate.set()  # only now does the app start producing
            record = await probe.wait_finished(path="/block/v")
            await assert_cancelled(record, w, thread_outcomes, "/block/v")
            await apps_done()  # the only app: its request task is over too
            await client.ping()
            assert frames_for(client, victim.stream_id) == []  # no HEADERS, DATA or RST_STREAM
            assert (await client.get("/body/next?size=100")).body == pattern("next", 100)
        await no_threads_left()
