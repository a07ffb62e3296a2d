"""How the threads that run apps are scheduled by the kernel (Linux).

Handing a request to an app thread wakes that thread. Under Linux's default
policy the kernel may switch to it at once, ahead of the trio thread that woke
it. On a busy core that round trip buys nothing: the app thread's first need is
the GIL, which the trio thread still holds, so it sleeps again and the trio
thread runs on. Under ``SCHED_BATCH`` (sched(7)) a thread that wakes does not
preempt the one running: it runs once the trio thread waits for I/O, gives way
(below), or its time slice ends. The trio thread keeps its policy, so network
events still preempt whatever is running.

Measured with HTTP/1.1 hello on one busy core (``docs/running.md``): 3.8
context switches and 6.0 futex calls a request under the default policy, 1.4
and 2.9 under ``SCHED_BATCH``, and about 9% more requests a second.

Left alone, the event loop then runs ahead of the app threads: in a burst of
new connections it hands out a call to every thread of the pool before any of
them has run, and the memory of those many requests in flight at once stays
behind as allocator space (1,000 idle connections opened 50 at a time cost
8.6-8.9 KiB each against 7.0-7.3). So with more than ``RUN_AHEAD`` calls out
(another one, that is), the trio thread gives the core to the app threads
already woken (``os.sched_yield``) before it hands out the next: they run, the
pool stays at ``RUN_AHEAD + 1`` threads in that burst, and idle connections cost
about what they do under the default policy (with ``RUN_AHEAD`` 1: 7.3-7.5 KiB
against 7.2-7.4) while the requests a second stay those of batch. A thread
blocked on I/O is not runnable, and the yield returns at once.

The policy is set from inside the app thread, the first time it runs an app,
and stays with the thread: trio's thread cache reuses it for other work until
it exits after idling. That is the process's business: ``"auto"``, the
default, is batch when the trioserve command serves (trioserve.cli) and
normal under ``serve_wsgi``, where the threads are the embedding program's.
``"normal"`` leaves threads as they are. Elsewhere than Linux every policy
leaves threads alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import cast

import trio

from .events import RequestReceived
from .wsgi import AppResult, ConnectionInfo, StreamPort, WSGIApp, call_app

LOGGER = logging.getLogger("trioserve.error")

AppCaller = Callable[[WSGIApp, RequestReceived, ConnectionInfo, StreamPort, bytes, bool], AppResult]

_BATCH: int | None = getattr(os, "SCHED_BATCH", None)

# App calls in flight beyond which, under batch, the trio thread lets the app
# threads it woke run before it hands out the next call (see above). Chosen by
# measurement. Since input is waited for through trioserve.readiness, whose one
# look serves every socket that turned readable, handing out more calls per
# pass of the event loop pays: with 4, HTTP/1.1 hello (wrk -c50) served 1.00x
# to 1.08x the requests a second of 1 (median 1.02x, five alternating pairs;
# 8 added about 1% more). The pool then settles at 5 threads instead of 2, and
# their allocator arenas hold about 0.4-0.5 MiB more: a cost per process, not
# per connection (idle connections opened after 100 warm ones: 1,000 grew the
# process 5.4-6.4 MiB with 1 and 6.8-7.0 with 4; 3,000 grew it 11.1-11.2 MiB
# and 11.6, where a cost per connection would have added 1.2-1.5 MiB).
RUN_AHEAD = 4


class _ThisThread(threading.local):
    # The class attribute is every thread's starting value.
    batch = False  # this module made the thread SCHED_BATCH (or tried to)


_this_thread = _ThisThread()
_warned = False


def _enter_batch() -> None:
    """Put the calling thread under SCHED_BATCH; a refusal is logged once per process."""
    global _warned
    _this_thread.batch = True  # tried once per thread, refused or not
    if _BATCH is None:
        return
    try:
        os.sched_setscheduler(0, _BATCH, os.sched_param(0))
    except OSError as exc:  # a seccomp filter, say: the app runs all the same
        if not _warned:
            _warned = True
            LOGGER.warning("App threads keep their scheduling policy: %s", exc)


def batch_this_thread() -> None:
    """Put the calling thread under ``SCHED_BATCH``, the first time a thread asks
    (what a batch app call does first; ``bench/canned.py --shaped`` does the same)."""
    if not _this_thread.batch:
        _enter_batch()


def call_app_batch(
    app: WSGIApp,
    request: RequestReceived,
    info: ConnectionInfo,
    port: StreamPort,
    initial_body: bytes,
    body_complete: bool,
) -> AppResult:
    """:func:`~trioserve.wsgi.call_app` in a thread made ``SCHED_BATCH`` first."""
    if not _this_thread.batch:
        _enter_batch()
    return call_app(app, request, info, port, initial_body, body_complete)


def _batch(scheduling: str) -> bool:
    return scheduling == "batch" and _BATCH is not None


def app_caller(scheduling: str) -> AppCaller:
    """The function a stream runs its app with, in a worker thread, for ``scheduling``
    (``"auto"`` is resolved by the command; here it means normal).

    ``"normal"``: :func:`~trioserve.wsgi.call_app` itself, nothing added per call.
    """
    return call_app_batch if _batch(scheduling) else call_app


class PromptLimiter:
    """The app-thread limiter as ``trio.to_thread.run_sync`` takes it, minus a checkpoint.

    A free token is taken without the yield ``CapacityLimiter`` makes even
    then: ``to_thread.run_sync`` waits for its thread right after anyway, so
    that yield is a whole extra pass through the scheduler per request for
    nothing. With no token free it waits, first come first served, as before.
    With ``run_ahead``, once more than that many tokens are out, the calling
    (trio) thread gives up the core to runnable threads first (see the module's
    docstring).
    """

    __slots__ = ("_limiter", "_run_ahead")

    def __init__(self, limiter: trio.CapacityLimiter, run_ahead: int = 0) -> None:
        self._limiter = limiter
        self._run_ahead = run_ahead

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        limiter = self._limiter
        try:
            limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(borrower)
        if self._run_ahead and limiter.borrowed_tokens > self._run_ahead:
            os.sched_yield()

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)


def app_thread_limiter(limiter: trio.CapacityLimiter, scheduling: str) -> trio.CapacityLimiter:
    """What app calls pass to ``to_thread.run_sync`` as their limiter: ``limiter``
    without a needless checkpoint, and under batch with the run-ahead bound."""
    prompt = PromptLimiter(limiter, RUN_AHEAD if _batch(scheduling) else 0)
    # trio takes any CapacityLimiter-like object there (its docs say so); its
    # annotation says CapacityLimiter.
    return cast(trio.CapacityLimiter, prompt)
