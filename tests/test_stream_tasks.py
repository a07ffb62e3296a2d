"""HTTP/2 stream tasks: reused from stream to stream, each stream still cancelled alone.

A stream's task, once its stream is done, parks and is handed the
connection's next stream (``Connection._stream_task``); a connection idle for
DOZE_AFTER keeps only IDLE_PARKED_RUNNERS of them. The tests count the live
and spawned stream tasks, and check that a reset still reaches only its own
app, and that the task that ran it serves the next stream uncancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
import trio
import trio.testing

from trioserve.connection import DOZE_AFTER, IDLE_PARKED_RUNNERS
from trioserve.events import RequestReceived
from trioserve.testing import AppProbe, TestServer, open_test_server

STREAM_TASK = "_stream_task"
CONCURRENT = 10
TIMEOUT = 10


def live_stream_tasks() -> int:
    """How many stream tasks are alive, anywhere under the root task."""
    count = 0
    tasks = [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        assert task is not None
        count += task.coro.cr_code.co_name == STREAM_TASK
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return count


async def settled(server: TestServer) -> None:
    """Wait until no stream is live and every task waits (an app thread may
    still be returning when the client already has its whole response)."""
    for _ in range(100_000):  # a bound in steps: under the mock clock no deadline passes
        await trio.testing.wait_all_tasks_blocked()
        if not any(conn.streams for conn in server.context.connections):
            return
    raise AssertionError("a stream never finished")


class SpawnCounter(trio.abc.Instrument):
    """Counts the stream tasks started while it is installed."""

    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += task.coro.cr_code.co_name in (STREAM_TASK, "run")


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


async def test_sequential_streams_reuse_one_task() -> None:
    counter = SpawnCounter()
    async with open_test_server(validator(hello)) as server, server.connect(http2=True) as client:
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(5):
                response = await client.get("/")
                assert response.body == b"hello"
                await settled(server)
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == 1


async def test_the_task_of_a_reset_stream_serves_the_next_one() -> None:
    """The reset reaches the blocked app (its own scope); the same task, parked
    after the cancel, then serves later streams in a fresh, uncancelled scope."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/block":
            environ["wsgi.input"].read()  # the body never ends: only a cancel stops this
        return hello(environ, start_response)

    probe = AppProbe(app)
    counter = SpawnCounter()
    with trio.fail_after(TIMEOUT):
        async with open_test_server(probe) as server, server.connect(http2=True) as client:
            trio.lowlevel.add_instrument(counter)
            try:
                stream = await client.open_stream("POST", "/block", end=False)
                await stream.send(b"part")
                await probe.wait_started()
                await stream.reset()
                record = await probe.wait_finished()
                assert record.cancelled
                await settled(server)
                for _ in range(3):
                    response = await client.get("/")
                    assert response.status == 200
                    assert response.body == b"hello"
                    await settled(server)
            finally:
                trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == 1
    assert [r.cancelled for r in probe.records] == [True, False, False, False]


async def test_an_idle_connection_keeps_only_a_few_parked_tasks(
    mock_clock: trio.testing.MockClock,
) -> None:
    """CONCURRENT streams at once need as many tasks; they all park when done,
    and DOZE_AFTER of idleness later all but IDLE_PARKED_RUNNERS have ended."""
    together = threading.Barrier(CONCURRENT)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        together.wait(TIMEOUT)  # every stream's app runs at the same time
        yield from hello(environ, start_response)

    async with open_test_server(validator(app)) as server, server.connect(http2=True) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENT):
                nursery.start_soon(client.get, "/")
        await settled(server)
        assert live_stream_tasks() == CONCURRENT

        mock_clock.jump(DOZE_AFTER)
        await trio.testing.wait_all_tasks_blocked()
        assert live_stream_tasks() == IDLE_PARKED_RUNNERS

        together = threading.Barrier(1)
        response = await client.get("/")  # a parked task still serves
        assert response.status == 200
        await settled(server)
        assert live_stream_tasks() == IDLE_PARKED_RUNNERS


@pytest.mark.parametrize("http2", [True, False], ids=["h2-parked-task", "http1-request-task"])
async def test_a_request_arriving_as_the_connection_is_cancelled_still_ends(http2: bool) -> None:
    """The connection's nursery is cancelled, and before its tasks have run
    again one more request is dispatched (from a read already done). The task
    it is handed to, a parked HTTP/2 stream task or HTTP/1.1's request task
    waiting for its next request, will never run it. It must still end
    (stream_done) once the connection's tasks are over, so the server's count
    of requests in flight goes back to zero."""
    async with open_test_server(validator(hello)) as server, server.connect(http2=http2) as client:
        response = await client.get("/")
        assert response.status == 200
        await settled(server)
        [conn] = server.context.connections
        # The first request's task waits for the next one.
        assert conn._parked if http2 else conn._requests is not None
        assert conn._nursery is not None
        conn._nursery.cancel_scope.cancel()
        late = RequestReceived(
            stream_id=3 if http2 else 2,
            method=b"GET",
            target=b"/",
            headers=[] if http2 else [(b"host", b"testserver")],
            http_version="2" if http2 else "1.1",
            end_stream=True,
        )
        conn._dispatch([late])
        await trio.testing.wait_all_tasks_blocked()
        assert conn.streams == {}
        assert server.context.requests_in_flight == 0
