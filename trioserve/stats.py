"""What a server counts while it serves: plain integers, cheap enough for every request.

Theory of operation
-------------------

A :class:`ServerStats` is one process's counters: 64-bit integers (and two
floats) at fixed places in a small buffer. The trio thread adds to them with
plain integer additions, at most once per request
(:meth:`ServerStats.request_done`, from ``Connection.stream_done``), once per
connection opening and closing, and once per socket read and write (bytes in
and out). No lock, no await, no allocation, no prometheus_client object is
involved: a request costs about half a microsecond here. What already exists
elsewhere (requests in flight, busy app threads, the thread limit) is not
counted again: it is read when someone asks (:meth:`ServerStats.publish`).

Reading is the rare side. :meth:`ServerStats.read` copies the buffer into a
:class:`Snapshot`, which :mod:`trioserve.metrics` turns into Prometheus metric
families at scrape time.

Worker processes (``-w N``). The buffer can be shared memory: the supervisor
creates one block per worker (:class:`SharedStats`: an anonymous memory file,
mapped by both processes), passes its descriptor to the worker, and reads
every block when scraped. Counts are therefore exact and current without
asking the workers, and they survive the worker: when one exits (recycled,
reloaded, crashed or killed), the supervisor folds its last counts into a
retired total, so no ``_total`` series ever goes backwards. Gauges are
different: they belong to live workers, which write theirs into their block
when the supervisor asks (:meth:`ServerStats.publish`).

Writes are aligned 8-byte stores, which no reader sees half-done; a reader may
see a request counted by status and not yet in the duration histogram, which
the next scrape sets right. That is the usual contract of monitoring counters.

The layout (:data:`LAYOUT`) is fixed by the constants below; a block starts
with the layout's id, so a worker running newer code than its supervisor (a
reload after an upgrade) counts privately rather than into the wrong places.
"""

from __future__ import annotations

import enum
import mmap
import os
import tempfile
import time
import zlib
from bisect import bisect_left
from dataclasses import dataclass

PROTOCOLS = ("HTTP/1.1", "HTTP/2")
HTTP1, HTTP2 = 0, 1  # protocol numbers: indices into PROTOCOLS

# Status classes: "none" for a stream that ended without a response head.
# Final statuses are 200 to 599 (responses.py), so there is no 1xx.
STATUS_CLASSES = ("none", "2xx", "3xx", "4xx", "5xx")


class Cause(enum.IntEnum):
    """Why a request ended without the app's complete response (see docs/metrics.md).

    The values are the counters' places in the buffer; 0 means "it did not fail".
    """

    PEER_RESET = 1  # the client reset the stream (HTTP/2 RST_STREAM)
    CONNECTION_LOST = 2  # the connection broke or the client closed it mid-request
    STALLED_OUTPUT = 3  # the client stopped reading the response for --write-timeout
    PROTOCOL_ERROR = 4  # a fatal protocol error ended the connection (HTTP/2 GOAWAY)
    REJECTED = 5  # trioserve refused it: malformed, over a limit, too slow (400, 408, 413...)
    OVERLOADED = 6  # refused for capacity: 503 (--max-requests-in-flight), REFUSED_STREAM
    APP_ERROR = 7  # the app raised, or broke its own response (500, or a reset)
    SHUTDOWN = 8  # cancelled by the server stopping (graceful timeout, hard stop)

    @property
    def label(self) -> str:
        return self.name.lower()


# Upper bounds of the request-duration histogram's buckets, in seconds (plus
# +Inf). Finer than Prometheus's defaults at the low end, where trioserve's
# own overhead (about 100 µs a request) and fast apps live; up to a minute
# above, where slow uploads and long polls end.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BUCKETS = len(DURATION_BUCKETS) + 1  # with +Inf


class _Layout:
    """Where each counter lives in the buffer, in 8-byte words."""

    def __init__(self) -> None:
        self.size = 1  # word 0: the layout id
        # Cause members are word numbers 1..8, so "counts[cause] += 1".
        assert [int(cause) for cause in Cause] == list(range(1, len(Cause) + 1))
        self.size += len(Cause)
        protocols = len(PROTOCOLS)
        self.requests = self._take(protocols * len(STATUS_CLASSES))
        self.received = self._take(protocols)
        self.sent = self._take(protocols)
        self.opened = self._take(protocols)
        self.closed = self._take(protocols)
        self.buckets = self._take(protocols * _BUCKETS)
        self.counters_end = self.size
        # Gauges: written by publish(), never added to.
        self.in_flight = self._take(1)
        self.threads_busy = self._take(1)
        self.threads_limit = self._take(1)
        self.seconds = self._take(protocols)  # float64: the duration sums, per protocol
        shape = repr((sorted(vars(self).items()), DURATION_BUCKETS, PROTOCOLS, STATUS_CLASSES))
        self.id = zlib.crc32(shape.encode())

    def _take(self, words: int) -> int:
        start = self.size
        self.size += words
        return start


LAYOUT = _Layout()
BUFFER_SIZE = LAYOUT.size * 8

# Word of requests_total for protocol p and status s: _STATUS_WORD[p * 10 + s // 100].
_STATUS_WORD = tuple(
    LAYOUT.requests + protocol * len(STATUS_CLASSES) + (hundreds - 1 if 2 <= hundreds <= 5 else 0)
    for protocol in range(len(PROTOCOLS))
    for hundreds in range(10)
)
_BUCKET_WORD = tuple(LAYOUT.buckets + protocol * _BUCKETS for protocol in range(len(PROTOCOLS)))


class ServerStats:
    """One process's counters, in ``buffer`` (private memory unless given shared memory).

    ``counts`` and its word numbers (``received_word``...) are public for the
    connection driver, which adds socket byte counts straight into it.
    """

    def __init__(self, buffer: bytearray | mmap.mmap | None = None) -> None:
        if buffer is None:
            buffer = bytearray(BUFFER_SIZE)
        view = memoryview(buffer)
        self.counts = view[: LAYOUT.seconds * 8].cast("Q")
        self.seconds = view[LAYOUT.seconds * 8 : BUFFER_SIZE].cast("d")
        self._buffer = buffer
        if not self.counts[0]:
            self.counts[0] = LAYOUT.id

    # ---- the trio thread's side: additions --------------------------------

    def request_done(self, protocol: int, status: int, cause: int, started_at: float) -> None:
        """Count one finished request: its status class, its duration, why it failed.

        ``status`` is 0 if no response head went out; ``cause`` is a
        :class:`Cause` or 0; ``started_at`` is the ``time.time()`` it began.
        """
        counts = self.counts
        counts[_STATUS_WORD[protocol * 10 + status // 100]] += 1
        duration = time.time() - started_at
        if duration < 0.0:  # the wall clock was set back meanwhile
            duration = 0.0
        counts[_BUCKET_WORD[protocol] + bisect_left(DURATION_BUCKETS, duration)] += 1
        self.seconds[protocol] += duration
        if cause:
            counts[cause] += 1

    def connection_opened(self, protocol: int) -> None:
        self.counts[LAYOUT.opened + protocol] += 1

    def connection_closed(self, protocol: int) -> None:
        self.counts[LAYOUT.closed + protocol] += 1

    # ---- the reading side -------------------------------------------------

    def publish(self, in_flight: int, threads_busy: int, threads_limit: int) -> None:
        """Write the gauges into the buffer (where a supervisor reads them).

        Never below 0: the words are unsigned, and a miscount elsewhere must not
        fail every scrape (or end a worker's channel task) from then on.
        """
        counts = self.counts
        counts[LAYOUT.in_flight] = max(0, in_flight)
        counts[LAYOUT.threads_busy] = max(0, threads_busy)
        counts[LAYOUT.threads_limit] = max(0, threads_limit)

    def read(self) -> Snapshot:
        """The counters as they are now, with the gauges as last published."""
        counts = self.counts.tolist()
        opened, closed = LAYOUT.opened, LAYOUT.closed
        return Snapshot(
            counters=tuple(counts[: LAYOUT.counters_end]),
            seconds=tuple(self.seconds.tolist()),
            in_flight=counts[LAYOUT.in_flight],
            threads_busy=counts[LAYOUT.threads_busy],
            threads_limit=counts[LAYOUT.threads_limit],
            open_connections=tuple(
                max(0, counts[opened + p] - counts[closed + p]) for p in range(len(PROTOCOLS))
            ),
            workers=1,
        )

    def release(self) -> None:
        """Let go of the buffer (a shared block can be unmapped only then); no use after."""
        self.counts.release()
        self.seconds.release()


def _zeros(count: int) -> tuple[int, ...]:
    return (0,) * count


@dataclass(frozen=True)
class Snapshot:
    """What one process (or, summed, every worker) has counted, at one moment.

    Counters only grow; gauges (requests in flight, threads, open connections,
    workers) are the values now. ``a + b`` adds both; ``retired()`` keeps a
    process's counters once it has exited.
    """

    counters: tuple[int, ...] = _zeros(LAYOUT.counters_end)
    seconds: tuple[float, ...] = (0.0,) * len(PROTOCOLS)
    in_flight: int = 0
    threads_busy: int = 0
    threads_limit: int = 0
    open_connections: tuple[int, ...] = _zeros(len(PROTOCOLS))
    workers: int = 0

    def __add__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            counters=tuple(map(int.__add__, self.counters, other.counters)),
            seconds=tuple(map(float.__add__, self.seconds, other.seconds)),
            in_flight=self.in_flight + other.in_flight,
            threads_busy=self.threads_busy + other.threads_busy,
            threads_limit=self.threads_limit + other.threads_limit,
            open_connections=tuple(map(int.__add__, self.open_connections, other.open_connections)),
            workers=self.workers + other.workers,
        )

    def retired(self) -> Snapshot:
        """Only the counters: what an exited process leaves to the totals."""
        return Snapshot(counters=self.counters, seconds=self.seconds)

    def requests(self, protocol: str, status: str) -> int:
        """Requests of ``protocol`` ("HTTP/1.1", "HTTP/2") that ended with ``status`` ("2xx"...)."""
        p = PROTOCOLS.index(protocol)
        return self.counters[
            LAYOUT.requests + p * len(STATUS_CLASSES) + STATUS_CLASSES.index(status)
        ]

    def failed(self, cause: Cause) -> int:
        return self.counters[cause]

    def received_bytes(self, protocol: str) -> int:
        return self.counters[LAYOUT.received + PROTOCOLS.index(protocol)]

    def sent_bytes(self, protocol: str) -> int:
        return self.counters[LAYOUT.sent + PROTOCOLS.index(protocol)]

    def connections(self, protocol: str) -> int:
        """Connections that were served with ``protocol`` (h2c upgrades count for both)."""
        return self.counters[LAYOUT.opened + PROTOCOLS.index(protocol)]

    def open(self, protocol: str) -> int:
        return self.open_connections[PROTOCOLS.index(protocol)]

    def duration_buckets(self, protocol: str) -> list[int]:
        """The histogram's cumulative counts, one per bound of DURATION_BUCKETS, then +Inf."""
        start = _BUCKET_WORD[PROTOCOLS.index(protocol)]
        total = 0
        cumulative = []
        for count in self.counters[start : start + _BUCKETS]:
            total += count
            cumulative.append(total)
        return cumulative

    def duration_sum(self, protocol: str) -> float:
        return self.seconds[PROTOCOLS.index(protocol)]


class SharedStats:
    """A worker's counters in shared memory, created by the supervisor (see the docstring).

    The block is an anonymous memory file (``memfd_create``; elsewhere an
    unnamed temporary file), so nothing is left behind on disk whatever ends
    the processes. Its descriptor (``fd``) is passed to the worker, which maps
    it with :func:`attach_shared_stats`.
    """

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("trioserve-stats", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as file:
                self.fd = os.dup(file.fileno())
            os.set_inheritable(self.fd, False)
        try:
            os.ftruncate(self.fd, BUFFER_SIZE)
            self._map = mmap.mmap(self.fd, BUFFER_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self.stats = ServerStats(self._map)

    def close(self) -> None:
        """Unmap the block and close the descriptor (read it first: it is gone after)."""
        self.stats.release()
        self._map.close()
        os.close(self.fd)


def attach_shared_stats(fd: int) -> ServerStats | None:
    """In a worker: the supervisor's block behind ``fd``; None if it is not one (wrong layout)."""
    try:
        if os.fstat(fd).st_size != BUFFER_SIZE:
            return None
        block = mmap.mmap(fd, BUFFER_SIZE)
    except (OSError, ValueError):
        return None
    finally:
        try:
            os.close(fd)  # the mapping stays
        except OSError:
            pass
    stats = ServerStats(block)
    if stats.counts[0] != LAYOUT.id:
        return None
    return stats
