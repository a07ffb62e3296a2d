"""The keeper of dozing connections (trioserve.dozing), on its own.

Socket pairs stand in for dozing connections, listed with what to start when
they wake, as trioserve.opening lists a dozing connection. The keeper must
start each exactly once: with True when its socket turns readable, with False
when its time is up (not before), when woken, or when the keeper is cancelled.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trioserve import dozing as dozing_module
from trioserve.dozing import DozingConnections


@contextmanager
def socket_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        yield pairs
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@asynccontextmanager
async def keeper() -> AsyncIterator[tuple[DozingConnections, trio.Nursery]]:
    dozing = DozingConnections()
    assert not dozing.running
    async with trio.open_nursery() as nursery:
        await nursery.start(dozing.keep)
        assert dozing.running
        yield dozing, nursery
        nursery.cancel_scope.cancel()
    assert not dozing.running


class Dozer:
    """Lists a socket as a dozing connection is listed; records how it was woken."""

    def __init__(self, dozing: DozingConnections, sock: socket.socket, due: float) -> None:
        self.dozing = dozing
        self.fd = sock.fileno()
        self.due = due
        self.ended: str | None = None
        self.ended_at: float | None = None
        self.task_name: str | None = None

    async def doze(self) -> None:
        assert self.dozing.add(self.fd, self.due, self.resume)

    async def resume(self, readable: bool) -> None:
        assert self.ended is None, "woken twice"
        self.ended = "readable" if readable else "woken"
        self.ended_at = trio.current_time()
        self.task_name = trio.lowlevel.current_task().name


async def doze_in_order(nursery: trio.Nursery, *dozers: Dozer) -> None:
    """Start ``dozers`` so that they are listed in this order (trio runs new tasks in
    any order; in the server, the order comes from when each connection went idle)."""
    for dozer in dozers:
        nursery.start_soon(dozer.doze)
        await trio.testing.wait_all_tasks_blocked()


async def test_each_socket_is_woken_when_its_time_is_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket_pairs(3) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            dozers = [
                Dozer(dozing, a, start + due) for (a, _), due in zip(pairs, (5, 7, 9), strict=True)
            ]
            await doze_in_order(nursery, *dozers)
            await trio.sleep_until(start + 10)  # (mock time, as in every test here)
            assert [d.ended for d in dozers] == ["woken"] * 3
            assert [d.ended_at for d in dozers] == [d.due for d in dozers]
            assert len(dozing) == 0


async def test_a_socket_that_becomes_readable_leaves_the_list(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its next request came: the keeper never wakes it, and the later socket
    is still woken on time."""
    with socket_pairs(2) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            first = Dozer(dozing, pairs[0][0], start + 5)
            second = Dozer(dozing, pairs[1][0], start + 6)
            await doze_in_order(nursery, first, second)
            await trio.sleep_until(start + 1)
            assert len(dozing) == 2
            pairs[0][1].send(b"GET")
            await trio.sleep_until(start + 2)
            assert (first.ended, first.ended_at) == ("readable", start + 1)
            assert len(dozing) == 1
            await trio.sleep_until(start + 7)
            assert (second.ended, second.ended_at) == ("woken", start + 6)
            # The readable one's socket was left alone: a wait on it works, the
            # bytes are all there, and the keeper no longer watches it.
            with trio.fail_after(1):
                await trio.lowlevel.wait_readable(pairs[0][0])
            assert pairs[0][0].recv(10) == b"GET"


async def test_wake_ends_a_doze_at_once_and_only_a_listed_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket_pairs(2) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            dozer = Dozer(dozing, pairs[0][0], start + 100)
            nursery.start_soon(dozer.doze)
            await trio.sleep_until(start + 1)
            dozing.wake(pairs[1][0].fileno())  # not listed: nothing happens
            dozing.wake(dozer.fd)
            await trio.testing.wait_all_tasks_blocked()
            assert (dozer.ended, dozer.ended_at) == ("woken", start + 1)
            dozing.wake(dozer.fd)  # no longer listed: not started twice
            await trio.testing.wait_all_tasks_blocked()
            assert len(dozing) == 0


async def test_the_keeper_waits_for_the_first_socket_without_spinning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An empty list: the keeper sleeps until something is listed, then keeps its time."""
    with socket_pairs(1) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            # (A keeper that spun would keep the mock clock from ever getting here.)
            await trio.sleep_until(start + 1000)
            dozer = Dozer(dozing, pairs[0][0], start + 1003)
            nursery.start_soon(dozer.doze)
            await trio.sleep_until(start + 1005)
            assert (dozer.ended, dozer.ended_at) == ("woken", start + 1003)


async def test_a_socket_listed_out_of_order_is_woken_with_the_one_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The documented bound: never early, and late by no more than the earlier
    listed socket's time."""
    with socket_pairs(2) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            first = Dozer(dozing, pairs[0][0], start + 5.0)
            second = Dozer(dozing, pairs[1][0], start + 4.99)
            await doze_in_order(nursery, first, second)
            await trio.sleep_until(start + 10)
            assert first.ended_at == start + 5.0
            assert second.ended == "woken"
            assert second.ended_at is not None
            assert start + 4.99 <= second.ended_at <= start + 5.0


async def test_bytes_already_there_wake_a_socket_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The request came while the connection's tasks were ending: not lost."""
    with socket_pairs(1) as pairs:
        async with keeper() as (dozing, nursery):
            pairs[0][1].send(b"GET")
            start = trio.current_time()
            dozer = Dozer(dozing, pairs[0][0], start + 5)
            await doze_in_order(nursery, dozer)
            await trio.testing.wait_all_tasks_blocked()
            assert (dozer.ended, dozer.ended_at) == ("readable", start)
            assert len(dozing) == 0


async def test_more_readable_sockets_than_one_look_takes_are_all_woken(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dozing_module, "_EVENTS_PER_LOOK", 2)
    with socket_pairs(5) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()
            dozers = [Dozer(dozing, a, start + 100) for a, _ in pairs]
            await doze_in_order(nursery, *dozers)
            for _, b in pairs:
                b.send(b"x")
            await trio.sleep_until(start + 1)
            assert [d.ended for d in dozers] == ["readable"] * 5
            assert [d.ended_at for d in dozers] == [start] * 5


async def test_woken_connections_run_in_the_keepers_nursery_with_its_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket_pairs(1) as pairs:
        dozing = DozingConnections()
        async with trio.open_nursery() as nursery:
            await nursery.start(dozing.keep, "a connection")
            start = trio.current_time()
            dozer = Dozer(dozing, pairs[0][0], start + 1)
            await dozer.doze()
            await trio.sleep_until(start + 2)  # (mock time: its keep-alive is up)
            assert (dozer.ended, dozer.task_name) == ("woken", "a connection")
            nursery.cancel_scope.cancel()


async def test_a_cancelled_keeper_wakes_every_listed_socket_to_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server's hard stop: each listed connection is started, with False, in
    the keeper's cancelled nursery (it closes its socket, and can do no more);
    the keeper ends only after they have."""
    started: list[Any] = []

    with socket_pairs(3) as pairs:
        dozing = DozingConnections()
        async with trio.open_nursery() as nursery:
            await nursery.start(dozing.keep)

            async def resume(readable: bool) -> None:
                started.append(readable)
                try:
                    await trio.sleep_forever()  # (as a polite close would wait on its client)
                except trio.Cancelled:
                    started.append("cancelled")
                    raise

            for a, _ in pairs:
                assert dozing.add(a.fileno(), trio.current_time() + 100, resume)
            nursery.cancel_scope.cancel()
        assert started.count(False) == 3
        assert started.count("cancelled") == 3
        assert len(dozing) == 0
        assert not dozing.running
        # Stopped: nothing more is listed (the caller closes its connection itself).
        assert not dozing.add(pairs[0][0].fileno(), trio.current_time() + 1, resume)
        assert len(dozing) == 0


async def test_without_epoll_the_keeper_lets_no_connection_doze(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dozing_module, "CAN_DOZE", False)
    dozing = DozingConnections()
    async with trio.open_nursery() as nursery:
        await nursery.start(dozing.keep)
        assert not dozing.running


@contextmanager
def regular_file(path: Path) -> Iterator[int]:
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


async def test_a_socket_the_kernel_will_not_watch_is_not_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """Listing fails (epoll refuses a regular file, as it would any descriptor past
    the kernel's limit of watches): add says so, the caller closes its connection,
    and the keeper goes on."""
    with regular_file(tmp_path / "not-a-socket") as fd, socket_pairs(1) as pairs:
        async with keeper() as (dozing, nursery):
            start = trio.current_time()

            async def never(readable: bool) -> None:
                raise AssertionError("woken")

            assert not dozing.add(fd, start + 1, never)
            assert len(dozing) == 0
            assert "cannot doze" in caplog.text
            dozer = Dozer(dozing, pairs[0][0], start + 5)
            await doze_in_order(nursery, dozer)
            pairs[0][1].send(b"x")
            await trio.sleep_until(start + 1)
            assert (dozer.ended, dozer.ended_at) == ("readable", start)
