"""The scheduling policy of app threads (trioserve.app_threads): SCHED_BATCH when asked
(the command asks by default: tests/test_cli.py), and batch's bound on running ahead."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any
from wsgiref.validate import validator

import pytest
import trio

import trioserve.app_threads
from trioserve import Config, ConfigError
from trioserve.testing import open_test_client, open_test_server

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")

POLICY_NAMES = {os.SCHED_OTHER: "other", getattr(os, "SCHED_BATCH", -1): "batch"}


def policy_reporter(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The app thread's scheduling policy and identity, as ``<policy> <thread id>``."""
    policy = POLICY_NAMES.get(os.sched_getscheduler(0), "unknown")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{policy} {threading.get_ident()}".encode()]


@pytest.fixture
def fresh_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which threads earlier tests made batch, and whether a refusal was logged."""
    monkeypatch.setattr(trioserve.app_threads, "_this_thread", trioserve.app_threads._ThisThread())
    monkeypatch.setattr(trioserve.app_threads, "_warned", False)


@pytest.fixture
def policy_calls(monkeypatch: pytest.MonkeyPatch, fresh_threads: None) -> list[tuple[int, int]]:
    """(thread id, policy) of every sched_setscheduler call, each then made for real.

    A thread of trio's cache may still be batch from an earlier test: the calls,
    not only the policy the app sees, show that this test's server set it.
    """
    calls: list[tuple[int, int]] = []
    real = os.sched_setscheduler

    def recording(pid: int, policy: int, param: Any) -> None:
        calls.append((threading.get_ident(), policy))
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", recording)
    return calls


async def report(http2: bool, **options: Any) -> tuple[str, str]:
    async with open_test_client(validator(policy_reporter), http2=http2, **options) as client:
        response = await client.get("/")
    assert response.status == 200
    policy, ident = response.body.decode().split()
    return policy, ident


async def held_together(count: int, answer: Any, **options: Any) -> list[Any]:
    """``count`` GETs over one HTTP/2 connection, each app call held until all of them
    have arrived (``count`` threads run apps at once), then answered by ``answer``."""
    token = trio.lowlevel.current_trio_token()
    all_in = trio.Event()
    arrived = 0

    def arrive() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_in.set()

    def held(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trio.from_thread.run_sync(arrive, trio_token=token)
        trio.from_thread.run(all_in.wait, trio_token=token)
        return list(answer(environ, start_response))

    results: list[Any] = []
    with trio.fail_after(10):
        async with (
            open_test_server(validator(held), **options) as server,
            server.connect(http2=True) as client,
            trio.open_nursery() as nursery,
        ):

            async def get() -> None:
                results.append(await client.get("/"))

            for _ in range(count):
                nursery.start_soon(get)
    return results


@pytest.mark.parametrize("scheduling", ["auto", "normal"])
async def test_embedded_app_threads_are_left_as_they_are(
    monkeypatch: pytest.MonkeyPatch, fresh_threads: None, scheduling: str
) -> None:
    """Under serve_wsgi (the test server), auto, the default, is normal: the threads
    are the embedding program's."""
    calls: list[Any] = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda *args: calls.append(args))
    assert Config().app_thread_scheduling == "auto"
    await report(False, app_thread_scheduling=scheduling)
    await report(True, app_thread_scheduling=scheduling)
    assert calls == []


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_batch_runs_apps_in_batch_threads(
    http2: bool, policy_calls: list[tuple[int, int]]
) -> None:
    policy, ident = await report(http2, app_thread_scheduling="batch")
    assert policy == "batch"
    assert policy_calls == [(int(ident), os.SCHED_BATCH)]


async def test_batch_sets_the_policy_once_per_thread(policy_calls: list[tuple[int, int]]) -> None:
    # trio's thread cache hands out the thread that went idle last: the same one.
    first = await report(False, app_thread_scheduling="batch")
    second = await report(False, app_thread_scheduling="batch")
    assert first == second == ("batch", first[1])
    assert policy_calls == [(int(first[1]), os.SCHED_BATCH)]


async def test_a_refused_policy_is_logged_once_and_the_apps_still_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_threads: None
) -> None:
    def refuse(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    caplog.set_level(logging.WARNING, logger="trioserve.error")
    # Both requests hold their threads at once: two threads each try.
    results = await held_together(2, policy_reporter, app_thread_scheduling="batch")
    assert [r.status for r in results] == [200, 200]
    assert len({r.body.split()[1] for r in results}) == 2  # two threads
    refusals = [r for r in caplog.records if "scheduling policy" in r.getMessage()]
    assert len(refusals) == 1
    assert "Operation not permitted" in refusals[0].getMessage()


def test_an_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="app-thread-scheduling must be auto, batch or normal"):
        Config(app_thread_scheduling="idle")


async def test_batch_over_a_real_socket_with_an_independent_client(
    policy_calls: list[tuple[int, int]],
) -> None:
    from http.client import HTTPConnection

    from trioserve import serve_wsgi

    def fetch(port: int) -> tuple[int, bytes]:
        client = HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            client.request("GET", "/")
            response = client.getresponse()
            return response.status, response.read()
        finally:
            client.close()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await serve_wsgi(
                validator(policy_reporter),
                nursery,
                bind="127.0.0.1:0",
                app_thread_scheduling="batch",
            )
            status, body = await trio.to_thread.run_sync(fetch, server.port)
            nursery.cancel_scope.cancel()
    assert status == 200
    policy, ident = body.split()
    assert policy == b"batch"
    assert policy_calls == [(int(ident), os.SCHED_BATCH)]


# ---- batch's bound on running ahead ----------------------------------------------------


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry (the calling thread) per os.sched_yield, each then made for real."""
    seen: list[int] = []
    real = os.sched_yield

    def recording() -> None:
        seen.append(threading.get_ident())
        real()

    monkeypatch.setattr(os, "sched_yield", recording)
    return seen


async def test_the_limiter_gives_way_beyond_the_run_ahead(yields: list[int]) -> None:
    """Each token taken with more than ``run_ahead`` out (itself included) yields the
    core once; without a run-ahead nothing does."""
    from trioserve.app_threads import PromptLimiter

    limiter = trio.CapacityLimiter(10)
    bounded = PromptLimiter(limiter, run_ahead=2)
    out = []
    for borrower in range(5):
        await bounded.acquire_on_behalf_of(borrower)
        out.append(len(yields))
    assert out == [0, 0, 1, 2, 3]  # the third, fourth and fifth token
    for borrower in range(5):
        bounded.release_on_behalf_of(borrower)
    assert limiter.borrowed_tokens == 0
    unbounded = PromptLimiter(limiter)
    for borrower in range(5):
        await unbounded.acquire_on_behalf_of(borrower)
    assert len(yields) == 3


@pytest.mark.parametrize("scheduling", ["batch", "normal", "auto"])
async def test_batch_app_calls_give_way_beyond_the_run_ahead(
    scheduling: str, yields: list[int], fresh_threads: None
) -> None:
    """Under batch, with RUN_AHEAD + 3 requests held in their apps at once, the
    three taken past the bound each yield the core first; under normal (and auto,
    embedded) none does."""
    from trioserve.app_threads import RUN_AHEAD

    count = RUN_AHEAD + 3
    results = await held_together(count, policy_reporter, app_thread_scheduling=scheduling)
    statuses = [response.status for response in results]
    assert statuses == [200] * count
    assert yields == ([threading.get_ident()] * 3 if scheduling == "batch" else [])  # trio's
