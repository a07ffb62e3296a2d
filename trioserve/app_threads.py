"""How the threads that run apps are scheduled by the kernel (Linux), when asked.

Handing a request to an app thread wakes that thread. Under Linux's default
policy the kernel may switch to it at once, ahead of the trio thread that woke
it. On a busy core that round trip buys nothing: the app thread's first need is
the GIL, which the trio thread still holds, so it sleeps again and the trio
thread runs on. Under ``SCHED_BATCH`` (sched(7)) a thread that wakes does not
preempt the one running: it runs once the trio thread waits for I/O, or when
the trio thread's time slice ends. The trio thread keeps its policy, so network
events still preempt whatever is running.

Measured with HTTP/1.1 hello on one busy core (``docs/running.md``): 3.8
context switches and 6.0 futex calls a request under the default policy, 1.4
and 2.9 under ``SCHED_BATCH``, and about 9% more requests a second. It is not
the default because the event loop then runs ahead of the app threads: a burst
of new connections has more requests in flight at once, and more threads and
allocator space stay behind afterwards (1 to 1.6 KiB more per connection for
1,000 idle connections opened 50 at a time). An app thread woken by its own I/O
(a database's answer) no longer preempts either.

The policy is set from inside the app thread, the first time it runs an app,
and stays with the thread: trio's thread cache reuses it for other work until
it exits after idling. ``"normal"`` leaves threads as they are. Elsewhere than
Linux both leave threads alone.
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


def app_caller(scheduling: str) -> AppCaller:
    """The function a stream runs its app with, in a worker thread, for ``scheduling``.

    ``"normal"``: :func:`~trioserve.wsgi.call_app` itself, nothing added per call.
    """
    return call_app_batch if scheduling == "batch" else call_app
