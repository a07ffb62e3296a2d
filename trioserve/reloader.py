"""``--reload``: watch Python files, and have the supervisor restart the worker on a change.

The supervisor of :mod:`trioserve.workers` runs the server as a worker process
even with one worker, so a change can be picked up by starting a new worker
(new code, imported afresh) while the old one serves; the old one stops once
the new one serves. :func:`watch` waits for changes with the watchfiles
library (a native watcher in a thread; its async API runs on trio through
anyio) and calls back once per batch of changes: watchfiles gathers changes
made close together, so saving several files is one restart, announced in one
log line.

A new worker that fails to import (a syntax error, a missing name) shows its
error on stderr and exits; the supervisor then waits for the next change
instead of retrying (see ``Supervisor.reload_on_change``), while the old worker,
if one ever started, keeps serving the last code that worked. Nothing is
retried until a file changes again.

Only ``.py``, ``.pyx`` and ``.pyd`` files count, and watchfiles' usual
directories are ignored (``.git``, ``.venv``, ``__pycache__``, ``node_modules``,
tool caches).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from .config import ConfigError

LOGGER = logging.getLogger("trioserve.error")


def check_reload_available() -> None:
    """Raises ConfigError if watchfiles (the ``reload`` extra) is not installed."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--reload needs the watchfiles package: pip install 'trioserve[reload]'"
        ) from None


async def watch(directories: Sequence[str], on_change: Callable[[str], None]) -> None:
    """Call ``on_change(description)`` for each batch of changed Python files, until cancelled."""
    import watchfiles

    paths = [os.path.abspath(directory) for directory in directories]  # noqa: ASYNC240 - no I/O
    LOGGER.info("Watching %s for changed Python files (--reload)", ", ".join(paths))
    async for changes in watchfiles.awatch(*paths, watch_filter=watchfiles.PythonFilter()):
        names = sorted({_shown(path) for _, path in changes})
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        on_change(f"{shown} changed")


def _shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
