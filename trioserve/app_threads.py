"""How the threads that run apps are scheduled by the kernel (Linux).

Handing a request to an app thread wakes that thread. Under Linux's default
policy the kernel may switch to it at once, ahead of the trio thread that woke
it. On a busy core that round trip buys nothing: the app thread's first need is
the GIL, which the trio thread still holds, so it sleeps again and the trio
thread runs on. The same happens on the way back. Under ``SCHED_BATCH``
(sched(7)) a thread that wakes does not preempt the one running: it runs once
the trio thread waits for I/O, or at the next tick. The trio thread keeps the
default policy, so network events still preempt whatever is running.

Measured with HTTP/1.1 hello on one core (``docs/performance.md``): 3.8
context switches and 6.0 futex calls a request before, 1.4 and 2.9 after, and
the app threads' system time down from about 10 to about 5 µs a request.

The policy is set from inside the app thread, the first time it runs an app,
and stays with the thread (trio's thread cache reuses it for other work, and
ends it after it idles). ``"normal"`` puts back the default policy on a thread
this module changed. Elsewhere than Linux both choices leave threads alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from .events import RequestReceived
from .wsgi import AppResult, ConnectionInfo, StreamPort, WSGIApp, call_app

LOGGER = logging.getLogger("trioserve.error")

AppCaller = Callable[[WSGIApp, RequestReceived, ConnectionInfo, StreamPort, bytes, bool], AppResult]

_BATCH: int | None = getattr(os, "SCHED_BATCH", None)
_NORMAL: int | None = getattr(os, "SCHED_OTHER", None)


class _ThisThread(threading.local):
    # The class attribute is every thread's starting value.
    batch = False  # this module made the thread SCHED_BATCH (or tried to)


_this_thread = _ThisThread()
_warned = False


def _set_policy(policy: int) -> None:
    """Put the calling thread under ``policy``; a refusal is logged once per process."""
    global _warned
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # a seccomp filter, say: the app runs all the same
        if not _warned:
            _warned = True
            LOGGER.warning("App threads keep their scheduling policy: %s", exc)


def _enter_batch() -> None:
    _this_thread.batch = True  # tried once per thread, refused or not
    if _BATCH is not None:
        _set_policy(_BATCH)


def batch_this_thread() -> None:
    """Put the calling thread under ``SCHED_BATCH`` as app threads are (once per thread).

    For code that stands in for an app thread: ``bench/canned.py --shaped``.
    """
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


def call_app_normal(
    app: WSGIApp,
    request: RequestReceived,
    info: ConnectionInfo,
    port: StreamPort,
    initial_body: bytes,
    body_complete: bool,
) -> AppResult:
    """:func:`~trioserve.wsgi.call_app` in a thread under the default policy.

    Only a thread :func:`call_app_batch` changed (another server in this
    process chose ``"batch"``) is changed back.
    """
    if _this_thread.batch:
        _this_thread.batch = False
        if _NORMAL is not None:
            _set_policy(_NORMAL)
    return call_app(app, request, info, port, initial_body, body_complete)


def app_caller(scheduling: str) -> AppCaller:
    """The function a stream runs its app with, in a worker thread, for ``scheduling``."""
    return call_app_batch if scheduling == "batch" else call_app_normal
