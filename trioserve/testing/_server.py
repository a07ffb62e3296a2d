"""Servers without sockets: TestServer, open_test_server() and open_test_client()."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..config import Config
from ..context import ServerContext, context_from_config
from ..opening import serve_connection
from ..wsgi import ConnectionInfo, WSGIApp
from ._client import TestClient, new_client
from ._pipe import DEFAULT_PIPE_CAPACITY, memory_connection


class TestServer:
    """A trioserve server without sockets: each :meth:`connect` is a new connection.

    All connections share the server's state, thread limiter included, as the
    connections of a real server do.
    """

    __test__ = False

    def __init__(self, ctx: ServerContext, nursery: trio.Nursery) -> None:
        self.context = ctx
        self._nursery = nursery
        self._next_port = 50000

    @asynccontextmanager
    async def connect(
        self,
        *,
        http2: bool = False,
        h2_settings: dict[int, int] | None = None,
        pipe_capacity: int = DEFAULT_PIPE_CAPACITY,
        client_addr: tuple[str, int] | None = None,
        record_frames: bool = False,
    ) -> AsyncIterator[TestClient]:
        """Open a connection and yield its client.

        Args:
          http2: speak HTTP/2 (prior knowledge) instead of HTTP/1.1.
          h2_settings: the client's HTTP/2 SETTINGS, e.g.
            ``{h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}`` for a zero window.
          pipe_capacity: bytes buffered per direction before a writer blocks.
          client_addr: REMOTE_ADDR/REMOTE_PORT as the app sees them.
          record_frames: keep a :class:`FrameInfo` per HTTP/2 frame received
            in ``client.frames``.

        On exit the connection is closed (abruptly if the block raised) and the
        server side finishes, every app thread it started included.
        """
        if client_addr is None:
            client_addr = ("127.0.0.1", self._next_port)
            self._next_port += 1
        client_end, server_end = memory_connection(pipe_capacity)
        info = ConnectionInfo(
            scheme="http",
            server_name="testserver",
            server_port="80",
            client_addr=client_addr[0],
            client_port=str(client_addr[1]),
            root_path=self.context.root_path,
            forwarding=self.context.forwarding,
        )
        client = new_client(
            client_end, http2=http2, authority="testserver", record_frames=record_frames
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_end, self.context, info)
            await client._start(nursery, h2_settings)
            try:
                yield client
            except BaseException:
                client.stream.abort()  # cancel whatever the server still runs for us
                raise
            else:
                await client.stream.aclose()
                nursery.cancel_scope.cancel()  # the client's own tasks


@asynccontextmanager
async def open_test_server(
    app: WSGIApp, *, config: Config | None = None, **options: Any
) -> AsyncIterator[TestServer]:
    """A server for ``app`` that clients reach with ``server.connect()``; see TestServer."""
    config = (config or Config()).replace(**options) if options else (config or Config())
    async with trio.open_nursery() as nursery:
        yield TestServer(context_from_config(app, config), nursery)


@asynccontextmanager
async def open_test_client(
    app: WSGIApp,
    *,
    config: Config | None = None,
    http2: bool = False,
    h2_settings: dict[int, int] | None = None,
    pipe_capacity: int = DEFAULT_PIPE_CAPACITY,
    client_addr: tuple[str, int] = ("127.0.0.1", 50000),
    record_frames: bool = False,
    **options: Any,
) -> AsyncIterator[TestClient]:
    """Serve ``app`` over one in-memory connection and yield a client for it.

    The same as ``open_test_server(app, ...)`` followed by one
    ``server.connect(...)``; see :meth:`TestServer.connect` for the
    arguments. ``config`` and ``options`` configure the server
    (``threads=1``, ``h2_initial_window_size=...``).
    """
    async with (
        open_test_server(app, config=config, **options) as server,
        server.connect(
            http2=http2,
            h2_settings=h2_settings,
            pipe_capacity=pipe_capacity,
            client_addr=client_addr,
            record_frames=record_frames,
        ) as client,
    ):
        yield client
