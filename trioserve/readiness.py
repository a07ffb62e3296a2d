"""Readiness of busy connections' sockets: one edge-triggered epoll for them all.

A connection's reader waits for its socket to turn readable once per request
or so. ``trio.lowlevel.wait_readable`` arms trio's epoll one-shot, so every
such wait costs an ``epoll_ctl`` system call and trio's bookkeeping around it
(about 2 us a request in all, of the 55-60 an HTTP/1.1 hello request costs on
one core). Here a plain socket is registered once, edge-triggered, for as long
as its connection has tasks, with an epoll instance of the server's own; trio
waits on that one descriptor, and the watcher task marks the sockets the kernel
reports and wakes their readers. Under load one look finds many sockets ready,
so the watcher's own wait (and its re-arming) is shared between them.

Edge-triggered means the kernel reports a socket when bytes arrive, not while
bytes are there. A reader therefore waits only after a read came back short or
failed with EAGAIN (``trioserve.connection._SocketIO`` does), and whatever
arrives after that read is a new edge. A mark can be stale (the bytes it
reported were read already); the read then fails with EAGAIN and the reader
waits again.

The watcher costs a task step of its own per look, which only pays when a
look finds more than one socket: a server with one busy connection answered
about 4% fewer requests a second through it (HTTP/1.1 hello, ``wrk -c1``),
with eight the same, with sixteen and more, more. So the first ``WATCH_FROM``
connections with tasks wait through trio, and only those beyond are watched.

Only where ``select.epoll`` exists (Linux, where trio waits with epoll too). A
socket the kernel refuses to watch, and every socket once the watcher has
stopped, is waited on through trio as before.
"""

from __future__ import annotations

import contextlib
import logging
import select

import trio

LOGGER = logging.getLogger("trioserve.error")

HAVE_EPOLL = hasattr(select, "epoll")

# Sockets taken from the epoll instance per look (more wait for the next look).
_EVENTS_PER_LOOK = 1024

# Connections with tasks that wait through trio before any is watched (see above).
WATCH_FROM = 4


class WatchedSocket:
    """One socket on the watch: a reader's wait for its next bytes."""

    __slots__ = ("_abort_fn", "_ready", "_waiter", "fd", "watched")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.watched = True  # False once unregistered, or the watcher stopped
        # An edge came since the last wait (maybe for bytes read already).
        self._ready = True
        self._waiter: trio.lowlevel.Task | None = None
        self._abort_fn = self._abort  # bound once: no allocation per wait

    async def wait_readable(self) -> None:
        """Return once bytes may have come since the last wait; a stale mark
        returns at once, without a checkpoint (the caller reads, and its read
        fails with EAGAIN)."""
        if self._ready:
            self._ready = False
            return
        if not self.watched:
            await trio.lowlevel.wait_readable(self.fd)
            return
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_fn)
        self._ready = False

    def _mark(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def _abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class SocketWatch:
    """The server's busy sockets (``add``, ``remove``), the watched ones among them,
    and their watcher (``watch``)."""

    __slots__ = ("_epoll", "_sockets", "busy", "watch_from")

    def __init__(self, watch_from: int = WATCH_FROM) -> None:
        self._epoll: select.epoll | None = None  # the watcher's (while it runs)
        self._sockets: dict[int, WatchedSocket] = {}
        self.watch_from = watch_from
        self.busy = 0  # sockets added and not removed, watched or not

    @property
    def running(self) -> bool:
        return self._epoll is not None

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, fd: int) -> WatchedSocket | None:
        """A busy connection's socket, until ``remove``: watched, or None (the caller
        waits through trio) if fewer than ``watch_from`` others are busy, the
        watcher does not run, or the kernel refuses."""
        self.busy += 1
        epoll = self._epoll
        if epoll is None or self.busy <= self.watch_from:
            return None
        try:
            # (Bytes already there are reported too: the first mark comes at once.)
            epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        except OSError as exc:  # the kernel's limit of watched descriptors, say
            LOGGER.debug("Socket %d waited on through trio: %s", fd, exc)
            return None
        watched = WatchedSocket(fd)
        self._sockets[fd] = watched
        return watched

    def remove(self, watched: WatchedSocket | None) -> None:
        """What ``add`` gave, once the connection's tasks have ended: before its
        socket is closed, or handed to the keeper of dozing connections."""
        self.busy -= 1
        if watched is None or not watched.watched:
            return
        watched.watched = False
        fd = watched.fd
        if self._sockets.get(fd) is watched:
            del self._sockets[fd]
            if self._epoll is not None:
                # (Never raises into the caller: a socket closed already has
                # left the epoll instance with its last descriptor.)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark the sockets the kernel reports, and wake their readers; runs until cancelled.

        When it stops, every socket still watched is woken and left to trio's
        own wait from then on, so no reader is stranded.
        """
        if not HAVE_EPOLL:
            task_status.started()
            return
        with select.epoll() as epoll:
            self._epoll = epoll
            try:
                task_status.started()
                sockets = self._sockets
                while True:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    for fd, _events in epoll.poll(0, _EVENTS_PER_LOOK):
                        watched = sockets.get(fd)
                        if watched is not None:
                            watched._mark()
            finally:
                self._epoll = None
                for watched in self._sockets.values():
                    watched.watched = False
                    watched._mark()
                self._sockets.clear()
