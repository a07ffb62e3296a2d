"""What every connection of one server shares: its Config, its app, its counters.

:class:`ServerContext` holds the :class:`~trioserve.config.Config` itself (every
option and its default live there, once) plus what is built from it at start
(the thread limiter, the TLS context, the trusted-proxy list, the access log)
and what the server counts while it runs (connections, requests in flight, and
the counters of :mod:`trioserve.stats` behind the metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from .accesslog import FinishedRequest, access_log_for
from .app_threads import AppCaller, app_caller, app_thread_limiter
from .config import Config
from .dozing import DOZE_AFTER, DozingConnections
from .http1 import HTTP1Connection
from .http2 import HTTP2Connection
from .proxy import AllowList, parse_allow_list
from .readiness import SocketWatch
from .spill import SpillBudget
from .stats import ServerStats, Snapshot
from .tls import make_ssl_context
from .wsgi import WSGIApp

# On a graceful stop, a connection still in its TLS handshake or waiting for
# its first bytes gets this long to send a request (one that was accepted just
# before the stop is probably sending it right now); a silent one is closed.
SHUTDOWN_FIRST_BYTES_GRACE = 1.0


class Stoppable(Protocol):
    """A connection as the server sees it: something a graceful stop must reach."""

    def start_shutdown(self) -> None: ...


@dataclass(eq=False)
class ServerContext:
    """The state one server's connections share (see module docstring)."""

    app: WSGIApp
    config: Config
    limiter: trio.CapacityLimiter
    ssl_context: ssl.SSLContext | None = None
    forwarding: AllowList = dataclasses.field(default_factory=AllowList)
    root_path: str = ""  # config.root_path without a trailing slash
    server_header: bytes | None = b"trioserve"  # None: send no Server header
    access_log: Callable[[FinishedRequest], None] | None = None
    # This worker stops gracefully after serving so many (config.max_requests
    # plus this worker's jitter); 0: never.
    max_requests: int = 0
    on_max_requests: Callable[[], None] | None = None
    requests_in_flight: int = 0
    requests_served: int = 0
    connections: set[Stoppable] = dataclasses.field(default_factory=set)  # live drivers
    shutting_down: bool = False
    open_connections: int = 0  # accepted and not yet closed (counted by the accept loop)
    accepting: int = 0  # accept tasks still running
    # Cancel scopes of connections still in their TLS handshake or waiting for
    # their first bytes: a graceful stop shortens these to the first-bytes grace.
    opening: set[trio.CancelScope] = dataclasses.field(default_factory=set)
    _connections_changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    # Idle HTTP/1.1 connections waiting without tasks, and their keep-alive
    # time (the server runs its keeper; without it no connection dozes).
    dozing: DozingConnections = dataclasses.field(default_factory=DozingConnections)
    # Busy connections' plain sockets, watched for input on one edge-triggered
    # epoll (the server runs its watcher; without it readers wait through trio).
    readiness: SocketWatch = dataclasses.field(default_factory=SocketWatch)
    spill_budget: SpillBudget = dataclasses.field(default_factory=lambda: SpillBudget(0))
    stats: ServerStats = dataclasses.field(default_factory=ServerStats)

    def snapshot(self) -> Snapshot:
        """The counters now, with the gauges read now (and published in ``stats``)."""
        limiter = self.limiter
        self.stats.publish(
            self.requests_in_flight, limiter.borrowed_tokens, int(limiter.total_tokens)
        )
        return self.stats.read()

    @functools.cached_property
    def thread_limiter(self) -> trio.CapacityLimiter:
        """What app calls pass to ``to_thread.run_sync``: ``limiter``, as the policy wants it."""
        return app_thread_limiter(self.limiter, self.config.app_thread_scheduling)

    @functools.cached_property
    def call_app(self) -> AppCaller:
        """What app calls run in their thread: ``wsgi.call_app`` under the thread policy."""
        return app_caller(self.config.app_thread_scheduling)

    @functools.cached_property
    def idle_floor(self) -> float:
        """The least time from a connection turning idle to its reader's idle deadline."""
        config = self.config
        return min(DOZE_AFTER, config.keep_alive_timeout, config.h2_idle_timeout)

    @functools.cached_property
    def trio_token(self) -> trio.lowlevel.TrioToken:
        """The run's token: app threads push response chunks through it."""
        return trio.lowlevel.current_trio_token()

    def start_shutdown(self) -> None:
        """Graceful stop: every connection finishes what it has, then closes."""
        self.shutting_down = True
        deadline = trio.current_time() + SHUTDOWN_FIRST_BYTES_GRACE
        for scope in self.opening:
            scope.deadline = min(scope.deadline, deadline)
        for conn in list(self.connections):
            conn.start_shutdown()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.connections_changed()

    def connections_changed(self) -> None:
        self._connections_changed.set()
        self._connections_changed = trio.Event()

    async def wait_connections_changed(self) -> None:
        await self._connections_changed.wait()

    def new_http1(self, *, allow_h2c_upgrade: bool) -> HTTP1Connection:
        config = self.config
        return HTTP1Connection(
            max_header_size=config.max_header_size,
            max_request_line_size=config.max_request_line_size,
            max_header_count=config.max_header_count,
            max_body_size=config.max_request_body_size,
            allow_h2c_upgrade=allow_h2c_upgrade,
            parser=config.http1_parser,
        )

    def new_http2(self) -> HTTP2Connection:
        config = self.config
        return HTTP2Connection(
            max_concurrent_streams=config.h2_max_concurrent_streams,
            initial_window_size=config.h2_initial_window_size,
            max_frame_size=config.h2_max_frame_size,
            max_header_list_size=config.h2_max_header_list_size,
            max_body_size=config.max_request_body_size,
            max_header_count=config.max_header_count,
            max_path_length=config.max_request_line_size,
        )


def context_from_config(
    app: WSGIApp, config: Config, stats: ServerStats | None = None
) -> ServerContext:
    """The state every connection of a server shares, built from ``config``.

    TLS files are read here, so a bad certificate fails before anything binds.
    The server counts into ``stats`` (a worker's shared block), else into its own.
    """
    ssl_context = None
    if config.certfile:
        ssl_context = make_ssl_context(config)
    return ServerContext(
        app=app,
        config=config,
        limiter=trio.CapacityLimiter(config.threads),
        ssl_context=ssl_context,
        forwarding=parse_allow_list(config.forwarded_allow_ips),
        root_path=config.root_path.rstrip("/"),
        server_header=config.server_header.encode("latin-1") or None,
        access_log=access_log_for(config),
        spill_budget=SpillBudget(config.max_spill_total),
        stats=stats if stats is not None else ServerStats(),
    )
