"""Serving a WSGI app: listeners, the accept loops, and graceful shutdown.

Task tree of one server::

    serve_wsgi                    task_status.started(server) once listening
    └── nursery
        ├── DozingConnections.keep        dozing connections (idle, taskless)
        │   └── _serve x woken ones       (each until it closes or dozes again)
        ├── SocketWatch.watch             input on busy connections' sockets
        ├── _accept_task x listeners      (in the accept cancel scope)
        └── serve_connection x connections   (accepted=True: it counts itself out)

With ``metrics_bind``, a second server in the same nursery serves the
counters at ``/metrics`` (:mod:`trioserve.metrics`); it stops with this one.

Stopping has two speeds. :meth:`Server.stop` is graceful: stop accepting,
ask every connection to finish what it has (HTTP/1.1 answers its current
request with ``Connection: close``; HTTP/2 sends GOAWAY), wait up to
``graceful_timeout``, then cancel what is left. Cancelling the task that runs
``serve_wsgi`` is immediate: every stream is cancelled at once, and app threads
see ``trio.Cancelled`` at their next read or write.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
from typing import Any

import trio

from .config import Config, ConfigError
from .connection import CONNECTION_TASK
from .context import ServerContext, context_from_config
from .listeners import bind_listeners, format_sockname, remove_socket_files
from .opening import serve_connection
from .stats import ServerStats, Snapshot
from .wsgi import WSGIApp

LOGGER = logging.getLogger("trioserve.error")

# accept() failing with these means "out of descriptors or memory for now":
# wait and retry rather than crash (trio.serve_listeners does the same).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1


class Server:
    """A running server: where it listens, and how to stop it.

    Returned by ``await serve_wsgi(app, nursery, ...)`` and passed to
    ``task_status.started()`` by ``await nursery.start(serve_wsgi, app)``.
    """

    def __init__(self, config: Config, listeners: list[trio.SocketListener]) -> None:
        self.config = config
        self.listeners = listeners
        # Read once, while the sockets are open: still valid after stop().
        sockets = [listener.socket for listener in listeners]
        self._addresses = [format_sockname(sock) for sock in sockets]
        self._ports = [_port_of(sock) for sock in sockets]
        self._context: ServerContext | None = None  # set by serve_wsgi
        self._metrics: Server | None = None  # the /metrics server, with metrics_bind
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self._graceful_timeout = config.graceful_timeout

    @property
    def addresses(self) -> list[str]:
        """Bound addresses, e.g. ``["127.0.0.1:8000", "unix:/run/app.sock"]`` (port 0 resolved)."""
        return list(self._addresses)

    @property
    def port(self) -> int:
        """The first TCP port listened on (handy with ``bind=":0"`` in tests)."""
        for port in self._ports:
            if port is not None:
                return port
        raise RuntimeError("this server has no TCP listener")

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (or https) of the first TCP listener."""
        scheme = "https" if self.config.certfile else "http"
        for address in self.addresses:
            if not address.startswith("unix:"):
                return f"{scheme}://{address}"
        raise RuntimeError("this server has no TCP listener")

    @property
    def metrics_address(self) -> str | None:
        """Where ``/metrics`` is served (``config.metrics_bind``, port 0 resolved), if anywhere."""
        return self._metrics.addresses[0] if self._metrics is not None else None

    def snapshot(self) -> Snapshot:
        """What this server has counted, and its gauges now: a :class:`~trioserve.stats.Snapshot`.

        Reads plain integers: safe from any thread, e.g. as the source of a
        :class:`trioserve.metrics.MetricsCollector` in the embedder's registry.
        """
        assert self._context is not None, "set by serve_wsgi"
        return self._context.snapshot()

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (lingering ones included)."""
        return self._context.open_connections if self._context is not None else 0

    async def wait_connections_changed(self) -> None:
        """Block until a connection closes (see :attr:`open_connections`)."""
        if self._context is not None:
            await self._context.wait_connections_changed()

    def _max_requests_reached(self) -> None:
        LOGGER.info("Served max-requests (%d): stopping gracefully", self.config.max_requests)
        self.stop_nowait()

    def stop_nowait(self, graceful_timeout: float | None = None) -> None:
        """Begin a graceful stop without waiting for it to finish."""
        if graceful_timeout is not None:
            self._graceful_timeout = graceful_timeout
        self._stop_requested.set()

    async def stop(self, graceful_timeout: float | None = None) -> None:
        """Stop gracefully and wait until every connection is closed.

        Args:
          graceful_timeout: seconds in-flight requests get to finish before
            they are cancelled (default: ``config.graceful_timeout``).
        """
        self.stop_nowait(graceful_timeout)
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Block until the server has stopped (by :meth:`stop` or cancellation)."""
        await self._stopped.wait()


def _port_of(sock: trio.socket.SocketType) -> int | None:
    name = sock.getsockname()
    return int(name[1]) if isinstance(name, tuple) else None


async def serve_wsgi(
    app: WSGIApp,
    nursery: trio.Nursery | None = None,
    *,
    config: Config | None = None,
    listeners: list[trio.SocketListener] | None = None,
    stats: ServerStats | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> Server:
    """Serve ``app`` (a WSGI callable) over HTTP/1.1 and HTTP/2.

    Two spellings, one code path::

        server = await serve_wsgi(app, nursery, bind="127.0.0.1:0")   # returns once listening
        server = await nursery.start(serve_wsgi, app)                 # the trio idiom

    With ``nursery`` given, the server runs inside that nursery and this call
    returns the :class:`Server` as soon as it listens. Without it, this call
    serves until the server is stopped (then returns the Server) or cancelled,
    and reports the Server through ``task_status`` once listening.

    Args:
      app: the WSGI application.
      nursery: run the server in this nursery and return at once.
      config: a :class:`Config`; ``options`` override its fields
        (``bind="127.0.0.1:0"``, ``threads=8``, ...).
      listeners: already-bound listeners to serve instead of ``config.bind``
        (for worker processes and socket activation).
      stats: count into these counters (a worker's shared memory block)
        rather than new ones; see :meth:`Server.snapshot`.

    Resource handling:
      Listeners (``metrics_bind``'s too) are bound before the server reports
      itself started and are closed when it stops. Each app call holds one token of the server's
      own ``CapacityLimiter(config.threads)``.

    Error handling:
      Binding and TLS setup errors raise :class:`~trioserve.config.ConfigError`
      (:class:`~trioserve.listeners.BindError` for addresses) before anything
      is served. Errors from clients or from the app are logged and contained
      to their request or connection; they never stop the server.
    """
    if nursery is not None:
        run = functools.partial(
            serve_wsgi, app, config=config, listeners=listeners, stats=stats, **options
        )
        started: Server = await nursery.start(run)
        return started
    config = (config or Config()).replace(**options) if options else (config or Config())
    ctx = context_from_config(app, config, stats)  # TLS files are read here, before binding
    bound = await bind_listeners(config) if listeners is None else list(listeners)
    try:
        metrics_listeners = await _bind_metrics(config)
    except BaseException:
        if listeners is None:
            _close(bound)
        raise
    server = Server(config, bound)
    server._context = ctx
    if config.max_requests:
        # Jitter keeps the workers of one supervisor from all restarting at once.
        ctx.max_requests = config.max_requests + random.randint(0, config.max_requests_jitter)
        ctx.on_max_requests = server._max_requests_reached
    try:
        async with trio.open_nursery() as server_nursery:
            await server_nursery.start(ctx.dozing.keep, CONNECTION_TASK)
            await server_nursery.start(ctx.readiness.watch)
            if metrics_listeners:
                server._metrics = await _start_metrics(server_nursery, ctx, metrics_listeners)
            for listener in bound:
                server_nursery.start_soon(_accept_task, listener, ctx, server_nursery)
            task_status.started(server)
            await server._stop_requested.wait()
            await _drain(server, ctx, bound)
            server_nursery.cancel_scope.cancel()
    finally:
        try:
            # Shielded, so a cancelled server still closes every listener
            # (closing a listening socket does no network I/O: it cannot hang).
            with trio.CancelScope(shield=True):
                for listener in bound:
                    await trio.aclose_forcefully(listener)
            remove_socket_files(bound)
        finally:
            server._stopped.set()
    return server


async def _bind_metrics(config: Config) -> list[trio.SocketListener]:
    if config.metrics_bind is None:
        return []
    from .metrics import bind_metrics  # prometheus_client: imported only when asked for

    return await bind_metrics(config)


async def _start_metrics(
    nursery: trio.Nursery, ctx: ServerContext, listeners: list[trio.SocketListener]
) -> Server:
    from .metrics import serve_metrics

    async def read() -> Snapshot:
        return ctx.snapshot()

    started: Server = await nursery.start(serve_metrics, read, listeners)
    return started


def _close(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        listener.socket.close()
    remove_socket_files(listeners)


async def _drain(server: Server, ctx: ServerContext, listeners: list[trio.SocketListener]) -> None:
    """Graceful part of a stop: let connections finish, up to the timeout."""
    # Closing the listeners ends the accept tasks (accept() raises ClosedResourceError).
    for listener in listeners:
        await trio.aclose_forcefully(listener)
    ctx.start_shutdown()
    with trio.move_on_after(server._graceful_timeout) as timeout:
        # An accept task may hold a connection it has not counted yet (accept()
        # checkpoints after the syscall): wait for those tasks to end first.
        while ctx.accepting or ctx.open_connections:
            await ctx.wait_connections_changed()
    if timeout.cancelled_caught:
        LOGGER.warning(
            "Graceful shutdown timed out after %.1fs: cancelling %d connection(s)",
            server._graceful_timeout,
            len(ctx.connections),
        )


async def _accept_task(
    listener: trio.abc.Listener[Any], ctx: ServerContext, nursery: trio.Nursery
) -> None:
    ctx.accepting += 1
    try:
        await _accept_loop(listener, ctx, nursery)
    finally:
        ctx.accepting -= 1
        ctx.connections_changed()


async def _accept_loop(
    listener: trio.abc.Listener[Any], ctx: ServerContext, nursery: trio.Nursery
) -> None:
    max_connections = ctx.config.max_connections
    while True:
        while max_connections and ctx.open_connections >= max_connections:
            # At the cap: leave new connections in the kernel's backlog until
            # one closes, rather than accepting and dropping them.
            await ctx.wait_connections_changed()
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                LOGGER.error("accept() failed: %s; retrying in %.1fs", exc, _ACCEPT_RETRY_DELAY)
                await trio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            raise
        except trio.ClosedResourceError:
            return
        # Counted here, before the task runs, so a stop that begins now
        # waits for this connection instead of cancelling it unseen.
        ctx.open_connections += 1
        nursery.start_soon(
            functools.partial(serve_connection, stream, ctx, accepted=True),
            name=CONNECTION_TASK,
        )


__all__ = ["ConfigError", "Server", "serve_wsgi"]
