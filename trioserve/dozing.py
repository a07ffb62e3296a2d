"""The keep-alive clock of dozing connections: one task keeps it for all of them.

An idle HTTP/1.1 connection on a plain socket dozes after ``DOZE_AFTER`` (see
:mod:`trioserve.connection`): its tasks end, and its own task
waits in ``trio.lowlevel.wait_readable`` for the next request. The keep-alive
time must still end that wait. A cancel scope with a deadline would, but the
scope, its cancel status and its entries in trio's deadline heap come to about
900 bytes per connection: over a tenth of an idle connection's memory. So each
dozing connection is listed here instead, and one task per server wakes it
when its time is up with ``trio.lowlevel.notify_closing``: the wait raises
``trio.ClosedResourceError``, and the connection closes (it is closing, as
``notify_closing`` asks; a graceful stop and an abort close it the same way).

Every connection of a server has the same keep-alive time, counted from when
it turned idle, and dozes about ``DOZE_AFTER`` after that, so the list comes
due in about the order it was made: a connection listed a few milliseconds
after one whose idle time began later is closed a few milliseconds late.
"""

from __future__ import annotations

from collections import OrderedDict

import trio

from .wakeup import Wakeup

# An HTTP/1.1 keep-alive connection on a plain socket that has been idle this
# long (seconds) dozes: its reader, sender and request tasks end, and the
# connection's own task waits for the next bytes (Connection._doze). Those
# tasks are most of an idle connection's memory; restarting them costs about
# what one request does, so a connection busy enough to notice never dozes.
DOZE_AFTER = 0.1

# A connection that its reader's deadline found busy (requests came since the
# deadline was set) is not made to doze sooner than this (seconds) after: each
# such look costs the reader a cancelled wait and a new cancel scope, which at
# one a DOZE_AFTER came to about 1 us of the 75 us of CPU an HTTP/1.1 hello
# request takes under load. A connection that was busy dozes up to that much
# later once it turns idle; its keep-alive time is kept to the letter all the same.
BUSY_RECHECK = 1.0


class DozingConnections:
    """Dozing connections' sockets, each with the time its keep-alive ends."""

    __slots__ = ("_due", "_listed", "running")

    def __init__(self) -> None:
        # descriptor -> when its keep-alive time ends, in the order listed
        # (OrderedDict: the first entry and deleting any entry are both O(1)).
        self._due: OrderedDict[int, float] = OrderedDict()
        self._listed = Wakeup()  # the keeper sleeps on it while the list is empty
        self.running = False  # the keeper's task runs: connections may doze

    def __len__(self) -> int:
        return len(self._due)

    def add(self, fd: int, due: float) -> None:
        """List ``fd``, whose task is about to wait for it to become readable, until ``due``.

        The caller must not checkpoint between this and its wait, so that the
        keeper never wakes a socket nobody waits on.
        """
        self._due[fd] = due
        self._listed.set()

    def remove(self, fd: int) -> None:
        """``fd``'s wait is over (its next request came, or it was woken)."""
        self._due.pop(fd, None)

    def wake(self, fd: int) -> None:
        """End ``fd``'s doze now, if it dozes: a graceful stop, or an abort."""
        if self._due.pop(fd, None) is not None:
            trio.lowlevel.notify_closing(fd)

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake each listed socket once its keep-alive time is up; runs until cancelled."""
        due = self._due
        self.running = True
        try:
            task_status.started()
            while True:
                if not due:
                    await self._listed.wait()
                    continue
                fd, when = next(iter(due.items()))
                if trio.current_time() < when:
                    # Sockets listed later are due later (see the module's
                    # docstring); one that wakes meanwhile leaves the list,
                    # and this just looks again.
                    await trio.sleep_until(when)
                    continue
                del due[fd]
                trio.lowlevel.notify_closing(fd)
                # Thousands may come due at once: the others run in between.
                await trio.lowlevel.checkpoint()
        finally:
            self.running = False
