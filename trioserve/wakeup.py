"""A reusable wake-up call for one waiting task.

The connection's reader and sender each sleep until another task has work for
them. A ``trio.Event`` does that, but it cannot be reset, so every wake-up
would allocate a new Event and its ParkingLot (about 700 bytes, several per
request and per idle connection). :class:`Wakeup` keeps one object for the
connection's lifetime and has the same "a call made while nobody waits is
kept for the next wait" meaning.
"""

from __future__ import annotations

import trio


class Wakeup:
    """Wake one waiting task; a :meth:`set` with no waiter is remembered."""

    __slots__ = ("_abort_fn", "_pending", "_waiter", "_woken")

    def __init__(self) -> None:
        self._pending = False
        self._waiter: trio.lowlevel.Task | None = None
        # The waiter was rescheduled and has not run yet: a further set() is
        # the same wake-up (it will look at the state when it runs anyway).
        self._woken = False
        self._abort_fn = self._abort  # bound once: no allocation per wait

    @property
    def armed(self) -> bool:
        """A wake-up is on its way: the next wait returns at once, or the waiter
        was rescheduled and has not run yet (either way it will look again)."""
        return self._pending or self._woken

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._woken = True
            trio.lowlevel.reschedule(waiter)
        elif not self._woken:
            self._pending = True

    async def wait(self) -> None:
        """Return once :meth:`set` has been called since the last wait (a checkpoint)."""
        if self._pending:
            self._pending = False
            await trio.lowlevel.checkpoint()
            return
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already waiting on this Wakeup")
        self._waiter = trio.lowlevel.current_task()
        try:
            await trio.lowlevel.wait_task_rescheduled(self._abort_fn)
        finally:
            self._woken = False

    def _abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED
