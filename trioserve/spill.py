"""Response bytes parked on disk, so that a slow client does not hold an app thread.

A streamed response makes its app thread wait whenever the client is behind
(the stream's output is at its high-water mark). A client that reads slowly,
or not at all, would so hold a thread for as long as it likes, and a few dozen
such clients would hold them all. Once a thread has waited ``--spill-after``
seconds for its client in one go, the rest of that response goes to a
:class:`Spill`: an anonymous temporary file the app thread writes and the trio
side reads back as the client takes the bytes. The thread moves on at disk
speed, and the app's resources (its iterable, a database cursor) are released
when it finishes rather than when the client does.

Bounded twice: a response keeps at most ``--max-spill-per-response`` bytes on
disk at once (beyond that its thread waits until the client has read them
all, then the file is reused), and the server at most ``--max-spill-total``
(:class:`SpillBudget`; a response that finds it used up does not spill, and its
thread waits for the client as before). An endless stream therefore still
ends up back-pressured, never buffered without bound.

The file is opened and written only in the app thread (``write``), and read
only on the trio side (``read``) with positional I/O, so neither moves the
other's file offset. ``written`` is published after the bytes are in the file.
The trio side may ``rewind`` only while the writer is parked waiting for it.
No trio here: this module is plain I/O and arithmetic.
"""

from __future__ import annotations

import os
import tempfile
import threading


class SpillBudget:
    """The disk the whole server may use for spilled responses (``--max-spill-total``).

    Charged for every byte written and given back as files are rewound or
    closed. Writers check :attr:`has_room` before they go on, so the total
    can be passed by at most one chunk per spilling response.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    @property
    def has_room(self) -> bool:
        return self.used < self.total

    def charge(self, size: int) -> None:
        with self._lock:
            self.used += size

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used -= size


class Spill:
    """One response's bytes on disk: appended by its app thread, read back by trio.

    Args:
      budget: the server's :class:`SpillBudget`, charged for every byte written.
      limit: bytes this response may keep on disk at once.
      directory: where the (at once unlinked) file goes; None: the system's temp dir.
    """

    def __init__(self, budget: SpillBudget, limit: int, directory: str | None = None) -> None:
        self._budget = budget
        self._limit = limit
        self._directory = directory
        self._fd: int | None = None
        self.written = 0  # bytes in the file (set by the writer after each write)
        self.read_offset = 0  # bytes handed back to trio (set by the reader)
        self.failed: OSError | None = None  # the disk refused a write

    @property
    def unread(self) -> int:
        return self.written - self.read_offset

    def write(self, data: bytes | memoryview) -> bool:
        """App thread: append ``data``; False when the file has no room for more.

        ``data`` is always written (so a response can exceed its limit by one
        chunk at most); the answer says whether the thread may write again
        before the reader has caught up. A disk error also answers False and is
        kept in ``failed`` for the trio side to end the response with.
        """
        try:
            if self._fd is None:
                self._fd = _anonymous_file(self._directory)
            view = memoryview(data)
            offset = self.written
            while view:
                done = os.pwrite(self._fd, view, offset)
                offset += done
                view = view[done:]
        except OSError as exc:
            self.failed = exc
            return False
        self._budget.charge(offset - self.written)
        self.written = offset
        return self.written < self._limit and self._budget.has_room

    def read(self, size: int) -> bytes:
        """Trio side: up to ``size`` of the bytes not yet read back."""
        size = min(size, self.unread)
        if size <= 0 or self._fd is None:
            return b""
        data = os.pread(self._fd, size, self.read_offset)
        self.read_offset += len(data)
        return data

    def rewind(self) -> None:
        """Everything written was read back: reuse the file from its start.

        Only while the writer is parked (it is waiting for exactly this).
        """
        self._budget.give_back(self.written)
        self.written = self.read_offset = 0
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        """Give the file and its share of the budget back (idempotent)."""
        fd, self._fd = self._fd, None
        self._budget.give_back(self.written)
        self.written = self.read_offset = 0
        if fd is not None:
            os.close(fd)


def writable_directory(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def default_directory() -> str:
    """$TMPDIR if set; else /var/tmp, which is on disk by convention (/tmp is often
    memory, and spilling to memory would defeat the purpose); else Python's choice."""
    if os.environ.get("TMPDIR"):
        return tempfile.gettempdir()
    if writable_directory("/var/tmp"):
        return "/var/tmp"
    return tempfile.gettempdir()


def _anonymous_file(directory: str | None) -> int:
    """A file nobody else can open, gone from the disk when it is closed."""
    fd, path = tempfile.mkstemp(prefix="trioserve-spill-", dir=directory or default_directory())
    os.unlink(path)
    return fd
