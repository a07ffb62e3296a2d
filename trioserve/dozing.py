"""Dozing connections: idle HTTP/1.1 connections with no task, kept by one task for all.

An idle HTTP/1.1 connection on a plain socket dozes after ``DOZE_AFTER`` (see
:mod:`trioserve.connection`): its reader, sender and request tasks end, and
so does its own task. What is left is data: the connection object, its
socket and its protocol state, listed here with the time its keep-alive
ends. The server's one keeper task watches every listed socket through an
epoll instance of its own (one descriptor, which trio waits on like any
other), and starts the connection's task again in its own nursery: to serve
the next request when the socket turns readable, or to close the connection
when its keep-alive time is up, the server stops, or it is aborted.

Why no task: a task waiting on its socket holds the task itself, its
context, and a chain of coroutine frames (the connection's, ``wait_readable``'s
and trio's below it), about 3 KB together, over half of what an idle
connection kept alive otherwise. Idle keep-alive connections are most of a
busy server's connections. A cancel scope per connection for the keep-alive
time would cost about 900 bytes more; one sorted list and one deadline serve
them all instead.

Every connection of a server has the same keep-alive time, counted from when
it turned idle, and dozes about ``DOZE_AFTER`` after that, so the list comes
due in about the order it was made: a connection listed a few milliseconds
after one whose idle time began later is closed a few milliseconds late.

Only where ``select.epoll`` exists (Linux, where trio waits with epoll too);
elsewhere the keeper does not run and no connection dozes: idle connections
keep their tasks, and their readers keep the keep-alive time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

LOGGER = logging.getLogger("trioserve.error")

# An HTTP/1.1 keep-alive connection on a plain socket that has been idle this
# long (seconds) dozes: its reader, sender and request tasks end, and so does
# its own (Connection._doze). Those tasks are most of an idle connection's
# memory; restarting them costs about what one request does, so a connection
# busy enough to notice never dozes.
DOZE_AFTER = 0.1

# A connection that its reader's deadline found busy (requests came since the
# deadline was set) is not made to doze sooner than this (seconds) after: each
# such look costs the reader a cancelled wait and a new cancel scope, which at
# one a DOZE_AFTER came to about 1 us of the 75 us of CPU an HTTP/1.1 hello
# request takes under load. A connection that was busy dozes up to that much
# later once it turns idle; its keep-alive time is kept to the letter all the same.
BUSY_RECHECK = 1.0

# Sockets taken from the epoll instance per look (more wait for the next look).
_EVENTS_PER_LOOK = 1024

CAN_DOZE = hasattr(select, "epoll")

# Started (in the keeper's nursery) to go on with a dozing connection: True if
# its socket turned readable (serve the next request), False to close it.
Resume = Callable[[bool], Awaitable[None]]


class DozingConnections:
    """Dozing connections' sockets, each with the time its keep-alive ends and
    what to start when it wakes; and the keeper that watches them (``keep``)."""

    __slots__ = ("_due", "_epoll", "_nursery", "_task_name", "_wait", "running")

    def __init__(self) -> None:
        # descriptor -> (when its keep-alive time ends, what wakes it), in the
        # order listed (OrderedDict: the first entry and deleting any entry are
        # both O(1)).
        self._due: OrderedDict[int, tuple[float, Resume]] = OrderedDict()
        self._epoll: select.epoll | None = None  # the keeper's (while it runs)
        self._nursery: trio.Nursery | None = None  # where woken connections run
        self._task_name = ""
        self._wait: trio.CancelScope | None = None  # the keeper's wait, due at the first entry
        self.running = False  # the keeper runs: connections may doze

    def __len__(self) -> int:
        return len(self._due)

    def add(self, fd: int, due: float, resume: Resume) -> bool:
        """List ``fd``, whose connection's task is ending, until ``due``; False (and
        nothing listed) if the keeper has stopped: the caller closes it then.

        ``resume(True)`` is started once ``fd`` is readable (a request, or the
        client's close), ``resume(False)`` once ``due`` passes or ``wake`` is
        called. It is started in the keeper's nursery, so it outlives the caller.
        """
        epoll = self._epoll
        if not self.running or epoll is None:
            return False
        try:
            epoll.register(fd, select.EPOLLIN)  # (level-triggered: bytes already there count)
        except OSError as exc:  # (the kernel's limit of watched descriptors, say)
            LOGGER.warning("Closing an idle connection that cannot doze: %s", exc)
            return False
        self._due[fd] = (due, resume)
        wait = self._wait
        if wait is not None and due < wait.deadline:
            wait.deadline = due  # (the list was empty: the keeper waits without one)
        return True

    def wake(self, fd: int) -> None:
        """End ``fd``'s doze now, if it dozes: a graceful stop, or an abort."""
        entry = self._due.pop(fd, None)
        if entry is not None:
            self._resume(fd, entry[1], False)

    def _resume(self, fd: int, resume: Resume, readable: bool) -> None:
        assert self._epoll is not None
        assert self._nursery is not None
        # Before the connection's task may close it. (Nothing closes a listed
        # socket; if something did, the kernel has dropped it from the epoll
        # instance already, and the keeper must not fail for the whole server.)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        self._nursery.start_soon(resume, readable, name=self._task_name)

    async def keep(
        self,
        task_name: str = "dozing connection",
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch the listed sockets and their times, and wake each; runs until cancelled.

        Woken connections run in this task's nursery, named ``task_name``.
        Cancelled (the server's hard stop), it wakes every connection still
        listed with ``resume(False)``, in its cancelled nursery: each closes
        its socket and counts itself out, and nothing is left open.
        """
        if not CAN_DOZE:
            task_status.started()
            return  # (running stays False: no connection dozes)
        self._task_name = task_name
        with select.epoll() as epoll:
            try:
                async with trio.open_nursery() as nursery:
                    self._epoll = epoll
                    self._nursery = nursery
                    self.running = True
                    task_status.started()
                    try:
                        await self._watch(epoll)
                    finally:
                        self.running = False
                        while self._due:
                            fd, (_, resume) = self._due.popitem(last=False)
                            self._resume(fd, resume, False)
            finally:
                self.running = False
                self._epoll = None
                self._nursery = None

    async def _watch(self, epoll: select.epoll) -> None:
        due = self._due
        while True:
            first = next(iter(due.values()))[0] if due else math.inf
            with trio.CancelScope(deadline=first) as wait:
                self._wait = wait
                try:
                    await trio.lowlevel.wait_readable(epoll.fileno())  # any listed socket
                finally:
                    self._wait = None
            for fd, _events in epoll.poll(0, _EVENTS_PER_LOOK):
                entry = due.pop(fd, None)
                if entry is not None:
                    self._resume(fd, entry[1], True)
            now = trio.current_time()
            while due:
                fd, (when, resume) = next(iter(due.items()))
                if when > now:
                    # Sockets listed later are due later (see the module's docstring).
                    break
                del due[fd]
                self._resume(fd, resume, False)
