"""Prometheus metrics: the server's counters as metric families, served at ``/metrics``.

This module is the only one that imports prometheus_client (the ``metrics``
extra), and it is imported only when metrics are asked for. The counting
itself is :mod:`trioserve.stats`: plain integers, updated once per request,
connection and socket operation. Here, at scrape time, a
:class:`MetricsCollector` turns a :class:`~trioserve.stats.Snapshot` into
metric families; nothing of prometheus_client runs on the request path.

``--metrics-bind ADDRESS`` runs a second, small trioserve server in the same
trio program (:func:`serve_metrics`), with its own listener, thread limiter and
counters, so scrapes are never counted in the app's metrics and never wait for
an app thread. It runs in the one process, or, with ``-w N``, in the
supervisor, which sums its workers (see :mod:`trioserve.workers`).

Embedders who run their own registry register a collector over their server::

    from prometheus_client import REGISTRY
    from trioserve.metrics import MetricsCollector

    server = await serve_wsgi(app, nursery, bind="127.0.0.1:8000")
    REGISTRY.register(MetricsCollector(server.snapshot))

The metrics (README, "Metrics", says the same for users):

* ``trioserve_requests_total{protocol, status}``: requests by protocol
  ("HTTP/1.1", "HTTP/2") and status class ("2xx".."5xx"; "none" when no
  response head went out);
* ``trioserve_requests_failed_total{cause}``: requests that ended without the
  app's complete response, by :class:`~trioserve.stats.Cause`;
* ``trioserve_request_duration_seconds{protocol}``: a histogram, from the
  request head's arrival to the end of its stream (its response queued);
* ``trioserve_requests_in_flight``, ``trioserve_app_threads_busy``,
  ``trioserve_app_threads_limit``, ``trioserve_workers``: gauges;
* ``trioserve_connections_total{protocol}`` and
  ``trioserve_open_connections{protocol}``: connections past their opening
  phase (TLS handshake, protocol choice);
* ``trioserve_received_bytes_total{protocol}`` and
  ``trioserve_sent_bytes_total{protocol}``: HTTP bytes (after TLS decryption).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

import trio
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from .config import Config
from .listeners import BindError, bind_failure, bind_listeners, format_sockname
from .server import Server, serve_wsgi
from .stats import DURATION_BUCKETS, PROTOCOLS, STATUS_CLASSES, Cause, Snapshot
from .wsgi import WSGIApp

LOGGER = logging.getLogger("trioserve.error")

PATH = "/metrics"

# Threads of the metrics server: a scrape takes one briefly (with -w N, up to
# PUBLISH_TIMEOUT while the workers answer), and Prometheus scrapes one at a time.
METRICS_THREADS = 2

_BOUNDS = [*(f"{bound:g}" for bound in DURATION_BUCKETS), "+Inf"]
_ByProtocol = Callable[[Snapshot, str], int]


class MetricsCollector:
    """A prometheus_client collector over ``source``, a callable returning a Snapshot.

    ``source`` is called once per scrape, in the scraping thread (for a
    :class:`~trioserve.Server`, ``server.snapshot`` reads plain integers and
    is safe to call from any thread).
    """

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return families(self._source())

    def describe(self) -> Iterable[Metric]:
        """The families without samples: registering never calls ``source``."""
        return families(None)


def families(snapshot: Snapshot | None) -> list[Metric]:
    """The metric families of ``snapshot`` (None: the families alone, with no samples)."""
    return list(_families(snapshot))


def _families(s: Snapshot | None) -> Iterator[Metric]:
    metric = CounterMetricFamily(
        "trioserve_requests",
        "Requests by protocol and status class (none: ended without a response)",
        labels=["protocol", "status"],
    )
    if s is not None:
        for protocol in PROTOCOLS:
            for status in STATUS_CLASSES:
                metric.add_metric([protocol, status], s.requests(protocol, status))
    yield metric

    metric = CounterMetricFamily(
        "trioserve_requests_failed",
        "Requests that ended without the app's complete response, by cause",
        labels=["cause"],
    )
    if s is not None:
        for cause in Cause:
            metric.add_metric([cause.label], s.failed(cause))
    yield metric

    histogram = HistogramMetricFamily(
        "trioserve_request_duration_seconds",
        "Time from a request's head to the end of its stream (its response queued)",
        labels=["protocol"],
    )
    if s is not None:
        for protocol in PROTOCOLS:
            counts = s.duration_buckets(protocol)
            histogram.add_metric(
                [protocol], list(zip(_BOUNDS, counts, strict=True)), s.duration_sum(protocol)
            )
    yield histogram

    for name, text, value in (
        ("trioserve_requests_in_flight", "Requests being served now", "in_flight"),
        ("trioserve_app_threads_busy", "App threads running the app now", "threads_busy"),
        ("trioserve_app_threads_limit", "App threads the workers may run at once", "threads_limit"),
        ("trioserve_workers", "Processes serving requests (worker processes with -w N)", "workers"),
    ):
        yield GaugeMetricFamily(name, text, None if s is None else getattr(s, value))

    per_protocol: list[tuple[CounterMetricFamily | GaugeMetricFamily, _ByProtocol]] = [
        (
            CounterMetricFamily(
                "trioserve_connections",
                "Connections served, by protocol (an h2c upgrade counts for both)",
                labels=["protocol"],
            ),
            Snapshot.connections,
        ),
        (
            GaugeMetricFamily(
                "trioserve_open_connections",
                "Connections open now, by protocol",
                labels=["protocol"],
            ),
            Snapshot.open,
        ),
        (
            CounterMetricFamily(
                "trioserve_received_bytes",
                "HTTP bytes received (after TLS decryption), by protocol",
                labels=["protocol"],
            ),
            Snapshot.received_bytes,
        ),
        (
            CounterMetricFamily(
                "trioserve_sent_bytes",
                "HTTP bytes sent (before TLS encryption), by protocol",
                labels=["protocol"],
            ),
            Snapshot.sent_bytes,
        ),
    ]
    for family, read in per_protocol:
        if s is not None:
            for protocol in PROTOCOLS:
                family.add_metric([protocol], read(s, protocol))
        yield family


def metrics_app(source: Callable[[], Snapshot]) -> WSGIApp:
    """A WSGI app serving ``source``'s metrics at ``/metrics`` (404 elsewhere)."""
    registry = CollectorRegistry()
    registry.register(MetricsCollector(source))
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            body = f"Not found: metrics are at {PATH}\n".encode()
            headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            start_response("404 Not Found", headers)
            return [body]
        result: Iterable[bytes] = exposition(environ, start_response)
        return result

    return app


async def bind_metrics(config: Config) -> list[trio.SocketListener]:
    """Bind ``config.metrics_bind`` (with the app's backlog and unix socket mode).

    Raises:
      BindError: the address cannot be bound; the message names --metrics-bind.
    """
    assert config.metrics_bind is not None
    metrics_config = Config(
        bind=(config.metrics_bind,),
        backlog=config.backlog,
        unix_socket_mode=config.unix_socket_mode,
    )
    try:
        return await bind_listeners(metrics_config)
    except BindError as exc:
        raise bind_failure(f"--metrics-bind: {exc}") from None


async def serve_metrics(
    read: Callable[[], Awaitable[Snapshot]],
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on ``listeners`` until cancelled; ``read`` runs in trio per scrape.

    A trioserve server of its own (threads, limiter, counters), so scrapes
    never count as the app's requests nor wait for the app's threads.
    """
    address = format_sockname(listeners[0].socket)
    config = Config(bind=(address,), threads=METRICS_THREADS)

    def source() -> Snapshot:
        # In the metrics server's app thread: read in trio, so that the
        # snapshot is taken between two requests, never in the middle of one.
        return trio.from_thread.run(read)

    where = address if address.startswith("unix:") else f"http://{address}{PATH}"
    LOGGER.info("Serving metrics at %s", where)
    await serve_wsgi(
        metrics_app(source), config=config, listeners=listeners, task_status=task_status
    )
