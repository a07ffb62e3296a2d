"""trioserve.wakeup.Wakeup: the reader's and sender's reusable wake-up call."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioserve.wakeup import Wakeup


async def test_a_set_with_nobody_waiting_is_kept_for_the_next_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wakeup = Wakeup()
    wakeup.set()
    wakeup.set()  # kept once, like trio.Event
    with trio.fail_after(1):
        await wakeup.wait()
    with trio.move_on_after(1) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught  # the two sets were one


async def test_set_wakes_the_waiting_task_and_can_be_used_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wakeup = Wakeup()
    woken: list[float] = []

    async def sleeper() -> None:
        for _ in range(3):
            await wakeup.wait()
            woken.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        for delay in (1, 2, 3):
            await trio.sleep(delay)
            wakeup.set()
    assert woken == [1, 3, 6]


async def test_a_cancelled_wait_leaves_no_waiter_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wakeup = Wakeup()
    with trio.move_on_after(0.01):
        await wakeup.wait()
    wakeup.set()  # nobody waits now: kept, not delivered to the cancelled task
    with trio.fail_after(1):
        await wakeup.wait()


async def test_only_one_task_may_wait() -> None:
    wakeup = Wakeup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wakeup.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await wakeup.wait()
        wakeup.set()


async def test_sets_before_the_woken_task_runs_are_one_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The sender is woken by a response, then again by the end of its stream, before it
    runs: one wake-up. A pending second one would cost it an extra empty round."""
    wakeup = Wakeup()
    wakes: list[float] = []

    async def sleeper() -> None:
        while True:
            await wakeup.wait()
            wakes.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        await trio.testing.wait_all_tasks_blocked()
        wakeup.set()
        wakeup.set()  # the sleeper is rescheduled but has not run yet
        await trio.sleep(1)
        wakeup.set()  # it is waiting again: a new wake-up
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert wakes == [0, 1]


async def test_armed_while_a_wake_up_is_on_its_way() -> None:
    """``armed``: a set kept for the next wait, or a waiter rescheduled that has not
    run yet; either way the woken task will look again (Connection.stream_done
    skips a second wake of the sender on it)."""
    wakeup = Wakeup()
    assert not wakeup.armed
    wakeup.set()
    assert wakeup.armed  # kept for the next wait
    await wakeup.wait()
    assert not wakeup.armed
    seen: list[bool] = []

    async def sleeper() -> None:
        await wakeup.wait()
        seen.append(wakeup.armed)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        await trio.testing.wait_all_tasks_blocked()
        assert not wakeup.armed  # waiting, nothing on its way
        wakeup.set()
        assert wakeup.armed  # rescheduled, not run yet
    assert seen == [False]  # once it runs, the wake-up is spent
