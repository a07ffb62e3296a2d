"""Metrics: the counters (trioserve.stats) in memory, the Prometheus side (trioserve.metrics).

In memory, through ``trioserve.testing`` on both protocols: each request lands in its
protocol and status class, each failure under its cause, bytes in and out match what
crossed the pipe, durations fall into the right histogram buckets, gauges show what is
in flight. The server's counters are read with ``ServerContext.snapshot()``, the same
call a scrape makes.

When has the server counted a request? Its stream's task has ended. With no app left
running, ``wait_all_threads_completed`` + ``wait_all_tasks_blocked`` (:func:`settled`)
says so; while an app is held on purpose, the tests wait on its probe instead.

End to end through the command, with real scrapes parsed by prometheus_client's parser
(and Debian's promtool and prometheus where installed): tests/test_metrics_cli.py.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import h2.errors
import h2.settings
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import trioserve.stats
from tests.apps import Blocker, Gate
from trioserve.context import ServerContext
from trioserve.metrics import MetricsCollector
from trioserve.stats import (
    BUFFER_SIZE,
    DURATION_BUCKETS,
    PROTOCOLS,
    STATUS_CLASSES,
    Cause,
    ServerStats,
    SharedStats,
    Snapshot,
    attach_shared_stats,
)
from trioserve.testing import AppProbe, MemoryEndpoint, TestClient, open_test_server

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
Environ = dict[str, Any]
TEXT = [("Content-Type", "text/plain")]


def protocol_of(http2: bool) -> str:
    return "HTTP/2" if http2 else "HTTP/1.1"


def _app(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """``/status/NNN`` answers NNN; ``/raise`` raises at once, ``/raise-late`` after its
    first chunk; ``/too-long`` sends more than its Content-Length; ``/read`` reads the
    whole body first."""
    path = environ["PATH_INFO"]
    if path.startswith("/status/"):
        start_response(f"{path[8:]} Whatever", TEXT)
        return [b"status"]
    if path == "/raise":
        raise RuntimeError("the app fails (a test)")
    if path == "/raise-late":
        start_response("200 OK", TEXT)
        return _late_failure()
    if path == "/too-long":
        start_response("200 OK", [*TEXT, ("Content-Length", "3")])
        return [b"more than three"]
    size = 0
    while chunk := environ["wsgi.input"].read(65536):
        size += len(chunk)
    start_response("200 OK", TEXT)
    return [b"read %d bytes" % size]


def _late_failure() -> Iterator[bytes]:
    yield b"a first chunk"
    raise RuntimeError("the app fails after its response started (a test)")


app = validator(_app)


async def settled() -> None:
    """No app thread left and every task waiting: whatever ended has been counted."""
    await trio.testing.wait_all_threads_completed()
    await trio.testing.wait_all_tasks_blocked()


def requests(snapshot: Snapshot, protocol: str) -> dict[str, int]:
    """The nonzero requests_total counts of ``protocol``, by status class."""
    counts = {status: snapshot.requests(protocol, status) for status in STATUS_CLASSES}
    return {status: count for status, count in counts.items() if count}


def failures(snapshot: Snapshot) -> dict[str, int]:
    """The nonzero requests_failed_total counts, by cause label."""
    return {cause.label: snapshot.failed(cause) for cause in Cause if snapshot.failed(cause)}


def other(protocol: str) -> str:
    return next(p for p in PROTOCOLS if p != protocol)


# ---------------------------------------------------------------------------
# Requests by protocol and status class
# ---------------------------------------------------------------------------


@both_protocols
async def test_requests_are_counted_by_protocol_and_status_class(http2: bool) -> None:
    protocol = protocol_of(http2)
    async with open_test_server(app) as server:
        async with server.connect(http2=http2) as client:
            for status in (200, 201, 302, 404, 503):
                assert (await client.get(f"/status/{status}")).status == status
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, protocol) == {"2xx": 2, "3xx": 1, "4xx": 1, "5xx": 1}
    assert requests(snapshot, other(protocol)) == {}
    assert failures(snapshot) == {}  # an app's own 503 is a complete response
    assert snapshot.duration_buckets(protocol)[-1] == 5  # +Inf: every request
    assert snapshot.duration_buckets(other(protocol))[-1] == 0
    assert snapshot.connections(protocol) == 1
    assert snapshot.connections(other(protocol)) == 0
    assert snapshot.open(protocol) == 0


@both_protocols
@pytest.mark.parametrize(
    ("path", "status_class"),
    [("/raise", "5xx"), ("/raise-late", "2xx"), ("/too-long", "2xx")],
    ids=["before-the-response", "mid-response", "broken-framing"],
)
async def test_app_error_is_counted_under_its_cause(
    http2: bool, path: str, status_class: str
) -> None:
    """500 when nothing went out yet, else a reset (HTTP/1.1: a close): either way one
    app_error; the status class is that of the head that went out."""
    protocol = protocol_of(http2)
    async with open_test_server(app) as server:
        async with server.connect(http2=http2) as client:
            stream = await client.open_stream("GET", path)
            response = await stream.read_response()
            assert response.complete is (path == "/raise")
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, protocol) == {status_class: 1}
    assert failures(snapshot) == {"app_error": 1}


# ---------------------------------------------------------------------------
# Resets and disconnects, by cause
# ---------------------------------------------------------------------------


async def _reading_request(client: TestClient, probe: AppProbe) -> Any:
    """A POST whose app is blocked reading a body that has only begun."""
    stream = await client.open_stream(
        "POST", "/read", headers=[("Content-Length", "100")], body=b"x" * 10, end=False
    )
    await probe.wait_started()
    return stream


async def test_peer_reset_is_counted_as_peer_reset_with_no_status() -> None:
    probe = AppProbe(app)
    async with open_test_server(probe) as server, server.connect(http2=True) as client:
        stream = await _reading_request(client, probe)
        await stream.reset()
        assert (await probe.wait_finished()).cancelled
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, "HTTP/2") == {"none": 1}
    assert failures(snapshot) == {"peer_reset": 1}


@pytest.mark.parametrize("length", [None, "1048576"], ids=["streamed", "content-length"])
async def test_peer_reset_mid_response_is_a_failure_with_the_status_sent(
    length: str | None,
) -> None:
    """The head went out, the body had not all been queued: still a peer reset, counted
    with the status class of the head (a Content-Length body is complete only once all
    of it was queued)."""
    blocker = Blocker()
    headers = [] if length is None else [("Content-Length", length)]
    app = validator(_with_headers(blocker, headers))
    async with open_test_server(app) as server, server.connect(http2=True) as client:
        stream = await client.open_stream("GET", "/stream")
        await stream.receive_headers()
        await stream.reset()
        await trio.testing.wait_all_threads_completed()  # the app saw the reset
        await trio.testing.wait_all_tasks_blocked()
        snapshot = server.context.snapshot()
    assert requests(snapshot, "HTTP/2") == {"2xx": 1}
    assert failures(snapshot) == {"peer_reset": 1}


def _with_headers(blocker: Blocker, headers: list[tuple[str, str]]) -> Any:
    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream"), *headers])
        return blocker._body()

    return app


@both_protocols
@pytest.mark.parametrize("abort", [False, True], ids=["close", "tcp-reset"])
async def test_disconnect_mid_request_is_counted_as_connection_lost(
    http2: bool, abort: bool
) -> None:
    probe = AppProbe(app)
    async with open_test_server(probe) as server:
        async with server.connect(http2=http2) as client:
            await _reading_request(client, probe)
            await client.disconnect(abort=abort)
            assert (await probe.wait_finished()).cancelled
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, protocol_of(http2)) == {"none": 1}
    assert failures(snapshot) == {"connection_lost": 1}
    assert snapshot.open(protocol_of(http2)) == 0


async def test_goaway_with_an_error_is_counted_as_protocol_error() -> None:
    probe = AppProbe(app)
    async with open_test_server(probe) as server, server.connect(http2=True) as client:
        await _reading_request(client, probe)
        await client.goaway(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
        assert (await probe.wait_finished()).cancelled
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, "HTTP/2") == {"none": 1}
    assert failures(snapshot) == {"protocol_error": 1}


@both_protocols
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
async def test_body_over_the_limit_is_a_rejected_413(http2: bool, declared: bool) -> None:
    """Declared: the protocol layer answers before any stream (BadRequest.answered).
    Streamed: the request's stream is refused once the body passes the limit."""
    protocol = protocol_of(http2)
    headers = [("Content-Length", "20")] if declared else []
    async with open_test_server(app, max_request_body_size=10) as server:
        async with server.connect(http2=http2) as client:
            stream = await client.open_stream("POST", "/read", headers=headers, end=False)
            await stream.send(b"x" * 20, end=True)
            assert (await stream.read_response()).status == 413
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, protocol) == {"4xx": 1}
    assert failures(snapshot) == {"rejected": 1}


async def test_malformed_request_answered_by_the_protocol_layer_is_rejected() -> None:
    """The client's raw bytes (private: trioserve.testing only sends valid requests)."""
    async with open_test_server(app) as server:
        async with server.connect() as client:
            await client._raw_send(b"NOT HTTP AT ALL\r\n\r\n")
            response = await _read_until_closed(client)
            assert response.startswith(b"HTTP/1.1 400 "), response
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, "HTTP/1.1") == {"4xx": 1}
    assert failures(snapshot) == {"rejected": 1}


async def _read_until_closed(client: TestClient) -> bytes:
    data = b""
    with trio.fail_after(TIMEOUT):
        while chunk := await client.stream.receive_some(65536):
            data += chunk
    return data


@both_protocols
async def test_requests_refused_over_max_requests_in_flight_are_overloaded(http2: bool) -> None:
    protocol = protocol_of(http2)
    gate = Gate(timeout=TIMEOUT)
    async with open_test_server(validator(gate), max_requests_in_flight=1) as server:
        async with server.connect(http2=http2) as first, server.connect(http2=http2) as second:
            held = await first.open_stream("GET", "/held")
            await trio.to_thread.run_sync(gate.started.wait, TIMEOUT)
            assert (await second.get("/refused")).status == 503
            gate.release.set()
            assert (await held.read_response()).status == 200
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, protocol) == {"2xx": 1, "5xx": 1}
    assert failures(snapshot) == {"overloaded": 1}


async def test_refused_stream_over_the_live_app_bound_is_overloaded() -> None:
    """A reset stream whose app still runs keeps its place under
    --h2-max-concurrent-streams: the next stream is refused (REFUSED_STREAM)."""
    gate = Gate(timeout=TIMEOUT)
    async with (
        open_test_server(validator(gate), h2_max_concurrent_streams=1) as server,
        server.connect(http2=True) as client,
    ):
        held = await client.open_stream("GET", "/held")
        await trio.to_thread.run_sync(gate.started.wait, TIMEOUT)
        await held.reset()
        refused = await client.open_stream("GET", "/refused")
        await refused.read_response()
        assert refused.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM
        gate.release.set()
        await settled()
        snapshot = server.context.snapshot()
    assert requests(snapshot, "HTTP/2") == {"none": 2}
    assert failures(snapshot) == {"overloaded": 1, "peer_reset": 1}


@both_protocols
async def test_client_that_stops_reading_is_counted_as_stalled_output(
    http2: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """HTTP/2: a zero window, the stream is reset after --write-timeout; HTTP/1.1: an
    unread socket, the response is abandoned (the clock jumps over the timeout)."""
    protocol = protocol_of(http2)
    blocker = Blocker(chunk=b"x" * 65536)
    zero_window = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0} if http2 else None
    async with (
        open_test_server(validator(blocker)) as server,
        server.connect(http2=http2, h2_settings=zero_window) as client,
    ):
        client.pause_reading(socket=True)
        await client.open_stream("GET", "/stream")
        await trio.to_thread.run_sync(blocker.started.wait, TIMEOUT)
        await trio.testing.wait_all_threads_completed()  # cancelled by the stall
        await trio.testing.wait_all_tasks_blocked()
        snapshot = server.context.snapshot()
        blocker.release.set()
    assert requests(snapshot, protocol) == {"2xx": 1}
    assert failures(snapshot) == {"stalled_output": 1}


@both_protocols
async def test_request_cut_short_by_a_hard_stop_is_counted_as_shutdown(http2: bool) -> None:
    probe = AppProbe(app)
    context: ServerContext | None = None
    with trio.CancelScope() as stop:
        async with open_test_server(probe) as server:
            context = server.context
            async with server.connect(http2=http2) as client:
                await _reading_request(client, probe)
                stop.cancel()
                await trio.sleep_forever()
    assert context is not None
    snapshot = context.snapshot()
    assert requests(snapshot, protocol_of(http2)) == {"none": 1}
    assert failures(snapshot) == {"shutdown": 1}


# ---------------------------------------------------------------------------
# Bytes, connections, gauges, durations
# ---------------------------------------------------------------------------


@both_protocols
async def test_bytes_in_and_out_are_what_crossed_the_connection(
    http2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte each end of the in-memory pipe wrote, counted by the pipe itself."""
    written: Counter[MemoryEndpoint] = Counter()
    real_send_all = MemoryEndpoint.send_all

    async def counting_send_all(self: MemoryEndpoint, data: Any) -> None:
        await real_send_all(self, data)
        written[self] += len(data)

    monkeypatch.setattr(MemoryEndpoint, "send_all", counting_send_all)
    protocol = protocol_of(http2)
    async with open_test_server(app) as server:
        async with server.connect(http2=http2) as client:
            client_end = client.stream
            assert (await client.post("/read", b"y" * 5000)).body == b"read 5000 bytes"
            assert (await client.get("/status/202")).status == 202
        await settled()
        snapshot = server.context.snapshot()
    (server_end,) = set(written) - {client_end}
    assert snapshot.received_bytes(protocol) == written[client_end] > 5000
    assert snapshot.sent_bytes(protocol) == written[server_end] > 0
    assert snapshot.received_bytes(other(protocol)) == snapshot.sent_bytes(other(protocol)) == 0


@both_protocols
async def test_gauges_show_what_is_in_flight_now(http2: bool) -> None:
    protocol = protocol_of(http2)
    gate = Gate(timeout=TIMEOUT)
    async with open_test_server(validator(gate), threads=3) as server:
        context = server.context
        async with server.connect(http2=http2) as client:
            held = await client.open_stream("GET", "/held")
            await trio.to_thread.run_sync(gate.started.wait, TIMEOUT)
            during = context.snapshot()
            gate.release.set()
            assert (await held.read_response()).status == 200
            await settled()
            after = context.snapshot()
        await settled()
        closed = context.snapshot()
    assert (during.in_flight, during.threads_busy, during.threads_limit) == (1, 1, 3)
    assert (during.open(protocol), during.open(other(protocol))) == (1, 0)
    assert during.workers == 1
    assert (after.in_flight, after.threads_busy, after.open(protocol)) == (0, 0, 1)
    assert (closed.open(protocol), closed.connections(protocol)) == (0, 1)


class _Clock:
    """Stands in for the time module in trioserve.stats: the real time plus ``offset``."""

    def __init__(self, offset: float = 0.0, now: float | None = None) -> None:
        self.offset = offset
        self.now = now

    def time(self) -> float:
        return self.now if self.now is not None else time.time() + self.offset


@pytest.mark.parametrize(
    ("duration", "bucket"),
    [
        (0.0, 0.0005),
        (0.0005, 0.0005),  # a bound belongs to its own bucket (le: less or equal)
        (0.0007, 0.001),
        (0.005, 0.005),
        (7.0, 10.0),
        (61.0, float("inf")),
        (-3.0, 0.0005),  # the wall clock was set back: counted as 0
    ],
)
def test_duration_lands_in_its_histogram_bucket(
    duration: float, bucket: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trioserve.stats, "time", _Clock(now=0.0))
    stats = ServerStats()
    stats.request_done(1, 200, 0, -duration)  # exactly ``duration`` before "now"
    snapshot = stats.read()
    bounds = [*DURATION_BUCKETS, float("inf")]
    expected = [int(bound >= bucket) for bound in bounds]
    assert snapshot.duration_buckets("HTTP/2") == expected
    assert snapshot.duration_sum("HTTP/2") == max(duration, 0.0)
    assert snapshot.duration_buckets("HTTP/1.1") == [0] * len(bounds)


@both_protocols
async def test_served_requests_are_timed_from_their_head(
    http2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the server: requests that end 7 s (by the counters' clock) after their
    head arrived are in the 10 s bucket and not in the 5 s one."""
    protocol = protocol_of(http2)
    monkeypatch.setattr(trioserve.stats, "time", _Clock(offset=7.0))
    async with open_test_server(app) as server:
        async with server.connect(http2=http2) as client:
            for _ in range(3):
                await client.get("/status/200")
        await settled()
        snapshot = server.context.snapshot()
    buckets = dict(
        zip([*DURATION_BUCKETS, float("inf")], snapshot.duration_buckets(protocol), strict=True)
    )
    assert buckets[5.0] == 0
    assert buckets[10.0] == buckets[float("inf")] == 3
    assert 21.0 <= snapshot.duration_sum(protocol) < 22.0


# ---------------------------------------------------------------------------
# The Prometheus side
# ---------------------------------------------------------------------------


def scrape(collector: MetricsCollector) -> dict[str, Any]:
    """The collector's families as a scrape parses them: name -> family."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_collector_exposes_every_family_with_its_samples() -> None:
    async with open_test_server(app) as server:
        async with server.connect(http2=True) as client:
            await client.get("/status/404")
        await settled()
        families = scrape(MetricsCollector(server.context.snapshot))
    types = {name: family.type for name, family in families.items()}
    assert types == {
        "trioserve_requests": "counter",
        "trioserve_requests_failed": "counter",
        "trioserve_request_duration_seconds": "histogram",
        "trioserve_requests_in_flight": "gauge",
        "trioserve_app_threads_busy": "gauge",
        "trioserve_app_threads_limit": "gauge",
        "trioserve_workers": "gauge",
        "trioserve_connections": "counter",
        "trioserve_open_connections": "gauge",
        "trioserve_received_bytes": "counter",
        "trioserve_sent_bytes": "counter",
    }
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("trioserve_requests_total", (("protocol", "HTTP/2"), ("status", "4xx")))] == 1
    assert samples[("trioserve_requests_total", (("protocol", "HTTP/1.1"), ("status", "4xx")))] == 0
    assert samples[("trioserve_connections_total", (("protocol", "HTTP/2"),))] == 1
    assert samples[("trioserve_app_threads_limit", ())] == 40
    assert samples[("trioserve_request_duration_seconds_count", (("protocol", "HTTP/2"),))] == 1
    causes = {labels[0][1] for name, labels in samples if name == "trioserve_requests_failed_total"}
    assert causes == {cause.label for cause in Cause}


def test_registering_the_collector_does_not_read_the_counters() -> None:
    """describe() gives the families without samples, so registries that check names at
    registration (the default REGISTRY does) never call the source then."""

    def unreadable() -> Snapshot:
        raise AssertionError("read at registration")

    CollectorRegistry(auto_describe=True).register(MetricsCollector(unreadable))


def _docs_table(header: str) -> list[list[str]]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_the_docs_list_every_metric_and_every_cause() -> None:
    families = scrape(MetricsCollector(Snapshot))
    documented = {row[0]: row[1] for row in _docs_table("| metric | labels | meaning |")}
    exposed = {}
    for family in families.values():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        exposed[name] = ", ".join(sorted(f"`{label}`" for label in labels)).strip("`")
    assert documented == exposed
    causes = [row[0] for row in _docs_table("| cause | the request ended because |")]
    assert causes == [cause.label for cause in Cause]


# ---------------------------------------------------------------------------
# Shared memory (-w N): what the supervisor's and the worker's mappings see
# ---------------------------------------------------------------------------


def test_a_worker_counts_into_the_block_its_supervisor_reads() -> None:
    block = SharedStats()
    try:
        worker = attach_shared_stats(os.dup(block.fd))
        assert worker is not None
        worker.request_done(0, 200, Cause.PEER_RESET, time.time())
        worker.connection_opened(1)
        worker.publish(in_flight=2, threads_busy=1, threads_limit=40)
        seen = block.stats.read()
        worker.release()
    finally:
        block.close()
    assert seen.requests("HTTP/1.1", "2xx") == 1
    assert seen.failed(Cause.PEER_RESET) == 1
    assert (seen.in_flight, seen.threads_busy, seen.threads_limit) == (2, 1, 40)
    assert seen.open("HTTP/2") == 1
    retired = seen.retired()
    assert (retired.in_flight, retired.open("HTTP/2"), retired.workers) == (0, 0, 0)
    assert retired.requests("HTTP/1.1", "2xx") == 1
    total = retired + seen
    assert total.requests("HTTP/1.1", "2xx") == 2
    assert total.in_flight == 2


def test_gauges_are_never_published_below_zero() -> None:
    stats = ServerStats()
    stats.publish(in_flight=-1, threads_busy=2, threads_limit=4)
    snapshot = stats.read()
    assert (snapshot.in_flight, snapshot.threads_busy, snapshot.threads_limit) == (0, 2, 4)


def test_a_block_of_another_layout_or_no_block_is_refused(tmp_path: Path) -> None:
    block = SharedStats()
    try:
        block.stats.counts[0] += 1  # another layout's id
        assert attach_shared_stats(os.dup(block.fd)) is None
    finally:
        block.close()
    wrong_size = tmp_path / "not-a-block"
    wrong_size.write_bytes(b"\0" * (BUFFER_SIZE - 8))
    with open(wrong_size, "rb+") as file:
        assert attach_shared_stats(os.dup(file.fileno())) is None
    assert attach_shared_stats(987654) is None  # not open at all
