"""The watch on busy connections' sockets (trioserve.readiness).

On its own, socket pairs stand in for connections: a reader that waits is
woken when bytes arrive and not before, a stale mark costs one read that
fails with EAGAIN, once the watcher stops nobody is left waiting, and the first
few busy sockets wait through trio. Then in a server: a connection's socket is
watched exactly while it has tasks (not while it dozes, not once closed), and
its requests are read through it.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from tests import apps
from tests.test_doze import all_closed, get
from tests.test_dozing import socket_pairs as dozing_socket_pairs
from trioserve import readiness as readiness_module
from trioserve.connection import DOZE_AFTER, _SocketIO
from trioserve.readiness import WATCH_FROM, SocketWatch, WatchedSocket
from trioserve.server import serve_wsgi

pytestmark = pytest.mark.skipif(not readiness_module.HAVE_EPOLL, reason="needs select.epoll")


@contextmanager
def socket_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """test_dozing's pairs, ours non-blocking as a connection's socket is."""
    with dozing_socket_pairs(count) as pairs:
        for ours, _peer in pairs:
            ours.setblocking(False)
        yield pairs


@asynccontextmanager
async def watching() -> AsyncIterator[tuple[SocketWatch, trio.Nursery]]:
    watch = SocketWatch(watch_from=0)  # every socket watched
    assert not watch.running
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.watch)
        assert watch.running
        yield watch, nursery
        nursery.cancel_scope.cancel()
    assert not watch.running


def drain(sock: socket.socket) -> bytes:
    """Read everything there is now, as a reader does before it waits."""
    data = b""
    while True:
        try:
            more = sock.recv(65536)
        except BlockingIOError:
            return data
        if not more:
            return data
        data += more


class Waiter:
    """A reader's wait on ``watched``, in a task of its own; records when it returned."""

    def __init__(self, watched: WatchedSocket) -> None:
        self.watched = watched
        self.done = trio.Event()

    @property
    def returned(self) -> bool:
        return self.done.is_set()

    async def wait(self) -> None:
        await self.watched.wait_readable()
        self.done.set()

    async def woken(self) -> None:
        """Wait for it to return (the watcher's own wait is on the kernel)."""
        with trio.fail_after(5):
            await self.done.wait()


async def marked(watched: WatchedSocket) -> None:
    """Wait for the watcher to mark ``watched`` (the kernel reports it first)."""
    with trio.fail_after(5):
        while not watched._ready:
            await trio.lowlevel.checkpoint()


async def test_a_reader_waits_for_bytes_and_no_longer() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        async with watching() as (watch, nursery):
            watched = watch.add(ours.fileno())
            assert watched is not None
            assert len(watch) == 1
            # The first wait returns at once: bytes may have come before the watch.
            await watched.wait_readable()
            waiter = Waiter(watched)
            nursery.start_soon(waiter.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not waiter.returned  # nothing sent yet
            peer.send(b"hello")
            await waiter.woken()
            assert drain(ours) == b"hello"
            watch.remove(watched)
            assert len(watch) == 0


async def test_bytes_there_before_the_watch_are_reported() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        peer.send(b"early")
        async with watching() as (watch, nursery):
            watched = watch.add(ours.fileno())
            assert watched is not None
            await watched.wait_readable()  # (the first mark is set at listing)
            waiter = Waiter(watched)
            nursery.start_soon(waiter.wait)
            await waiter.woken()
            assert drain(ours) == b"early"


async def test_a_stale_mark_returns_at_once_then_the_reader_waits() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        async with watching() as (watch, nursery):
            watched = watch.add(ours.fileno())
            assert watched is not None
            await watched.wait_readable()
            peer.send(b"one")
            await marked(watched)
            assert drain(ours) == b"one"  # read before waiting: the mark is stale now
            with trio.testing.assert_no_checkpoints():
                await watched.wait_readable()
            waiter = Waiter(watched)
            nursery.start_soon(waiter.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not waiter.returned  # nothing new: it waits for the next edge
            peer.send(b"two")
            await waiter.woken()
            assert drain(ours) == b"two"


async def test_more_ready_sockets_than_one_look_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_module, "_EVENTS_PER_LOOK", 2)
    with socket_pairs(5) as pairs:
        async with watching() as (watch, nursery):
            waiters = []
            for ours, _peer in pairs:
                watched = watch.add(ours.fileno())
                assert watched is not None
                await watched.wait_readable()
                waiters.append(Waiter(watched))
                nursery.start_soon(waiters[-1].wait)
            await trio.testing.wait_all_tasks_blocked()
            for _ours, peer in pairs:
                peer.send(b"x")
            for waiter in waiters:
                await waiter.woken()


async def test_a_cancelled_wait_leaves_the_socket_usable() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        async with watching() as (watch, nursery):
            watched = watch.add(ours.fileno())
            assert watched is not None
            await watched.wait_readable()
            scope = trio.CancelScope()

            async def cancelled_wait() -> None:
                with scope:
                    await watched.wait_readable()

            nursery.start_soon(cancelled_wait)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert scope.cancelled_caught
            waiter = Waiter(watched)
            nursery.start_soon(waiter.wait)  # the cancelled wait is no longer in the way
            await trio.testing.wait_all_tasks_blocked()
            peer.send(b"x")
            await waiter.woken()


async def test_two_waiters_is_a_bug() -> None:
    with socket_pairs(1) as [(ours, _peer)]:
        async with watching() as (watch, nursery):
            watched = watch.add(ours.fileno())
            assert watched is not None
            await watched.wait_readable()
            nursery.start_soon(watched.wait_readable)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await watched.wait_readable()
            nursery.cancel_scope.cancel()


async def test_when_the_watcher_stops_waiters_wake_and_wait_through_trio() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        async with trio.open_nursery() as outer:
            watch = SocketWatch(watch_from=0)
            watcher_scope = trio.CancelScope()

            async def run_watcher(*, task_status: trio.TaskStatus[None]) -> None:
                with watcher_scope:
                    await watch.watch(task_status=task_status)

            await outer.start(run_watcher)
            watched = watch.add(ours.fileno())
            assert watched is not None
            await watched.wait_readable()
            waiter = Waiter(watched)
            outer.start_soon(waiter.wait)
            await trio.testing.wait_all_tasks_blocked()
            watcher_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert waiter.returned  # woken, not stranded
            assert not watch.running
            assert len(watch) == 0
            assert not watched.watched
            assert watch.add(ours.fileno()) is None  # nothing is watched any more
            # Its reader reads (EAGAIN), then waits through trio's own epoll.
            assert drain(ours) == b""
            waiter = Waiter(watched)
            outer.start_soon(waiter.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not waiter.returned
            peer.send(b"x")
            await waiter.woken()


async def test_a_refused_descriptor_is_waited_on_through_trio(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve.error")
    with tempfile.TemporaryFile() as regular:  # epoll refuses regular files (EPERM)
        async with watching() as (watch, _nursery):
            assert watch.add(regular.fileno()) is None
            assert len(watch) == 0
    assert "waited on through trio" in caplog.text


async def test_removing_a_socket_whose_descriptor_was_reused_keeps_the_new_one() -> None:
    with socket_pairs(1) as [(ours, peer)]:
        async with watching() as (watch, _nursery):
            fd = ours.fileno()
            old = watch.add(fd)
            assert old is not None
            # Closed without removing (the kernel drops it from the epoll
            # instance), then the number is reused for a new socket.
            replacement = os.dup(peer.fileno())
            os.dup2(replacement, fd)  # (ours' number now names another socket)
            os.close(replacement)
            new = watch.add(fd)
            assert new is not None
            watch.remove(old)
            assert len(watch) == 1  # the new registration stays
            watch.remove(new)
            assert len(watch) == 0
            assert watch.busy == 0


def test_without_epoll_nothing_is_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_module, "HAVE_EPOLL", False)

    async def main() -> None:
        watch = SocketWatch(watch_from=0)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.watch)
        assert not watch.running
        with socket_pairs(1) as [(ours, _peer)]:
            assert watch.add(ours.fileno()) is None

    trio.run(main)


async def test_the_first_busy_sockets_wait_through_trio() -> None:
    with socket_pairs(4) as pairs:
        watch = SocketWatch(watch_from=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.watch)
            given = [watch.add(ours.fileno()) for ours, _peer in pairs]
            assert given[0] is None
            assert given[1] is None  # (a look would find one socket at a time)
            assert given[2] is not None
            assert given[3] is not None
            assert watch.busy == 4
            assert len(watch) == 2
            for watched in given:
                watch.remove(watched)
            assert watch.busy == 0
            assert len(watch) == 0
            # The count went down with them: the first ones wait through trio again.
            assert watch.add(pairs[0][0].fileno()) is None
            nursery.cancel_scope.cancel()


# ---- in a server -------------------------------------------------------------


async def test_a_connection_is_watched_while_it_has_tasks(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server = await serve_wsgi(apps.hello, nursery, bind="127.0.0.1:0", keep_alive_timeout=5.0)
        ctx = server._context
        assert ctx is not None
        assert ctx.readiness.running
        ctx.readiness.watch_from = 0  # (by default one busy connection is not watched)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        [conn] = ctx.connections
        io = conn._io
        assert type(io) is _SocketIO
        assert io.watched is not None
        assert io.watched.watched
        assert len(ctx.readiness) == 1
        # Idle: it dozes, its tasks end, and the dozing keeper watches it instead.
        for _ in range(1_000):
            await trio.testing.wait_all_tasks_blocked()
            if conn.dozing:
                break
            mock_clock.jump(DOZE_AFTER)
        assert conn.dozing
        assert io.watched is None
        assert len(ctx.readiness) == 0
        # Its next request wakes it: watched again, and read through the watch.
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        assert io.watched is not None
        assert len(ctx.readiness) == 1
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        await stream.aclose()
        await all_closed(server)
        assert len(ctx.readiness) == 0  # closed: nothing left behind
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_first_few_are_watched(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server = await serve_wsgi(apps.hello, nursery, bind="127.0.0.1:0")
        ctx = server._context
        assert ctx is not None
        streams = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(20)]
        for _round in range(3):
            async with trio.open_nursery() as clients:
                for stream in streams:
                    clients.start_soon(get, stream)
        # All but the first WATCH_FROM; each waits one way or the other.
        assert ctx.readiness.busy == 20
        assert len(ctx.readiness) == 20 - WATCH_FROM
        for stream in streams:
            await stream.aclose()
        await all_closed(server)
        assert len(ctx.readiness) == 0
        assert ctx.readiness.busy == 0
        nursery.cancel_scope.cancel()
