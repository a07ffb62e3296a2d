"""Idle HTTP/1.1 connections doze: their tasks end until the next request (DOZE_AFTER).

Real sockets (dozing waits on the socket itself, so in-memory streams never
doze) and trio's MockClock moved by hand: time passes only when a test jumps
it, after every task has gone quiet, so "idle for DOZE_AFTER" is exact.
"""

from __future__ import annotations

import select
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from wsgiref.validate import validator

import pytest
import trio
import trio.testing

from tests import apps
from trioserve.connection import CONNECTION_TASK, DOZE_AFTER, Connection
from trioserve.dozing import BUSY_RECHECK
from trioserve.http1 import HTTP1Connection
from trioserve.server import Server, serve_wsgi

KEEP_ALIVE = 5.0
REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
CONNECTION_TASKS = ("_reader_task", "_sender_task", "_request_task")


def task_names() -> Iterator[str]:
    """Every live task's function name, from the root down."""
    tasks = [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        assert task is not None
        yield task.coro.cr_code.co_name
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)


def connection_tasks() -> list[str]:
    return [name for name in task_names() if name in CONNECTION_TASKS]


@asynccontextmanager
async def served(app: Any = apps.hello, **options: Any) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        options.setdefault("keep_alive_timeout", KEEP_ALIVE)
        server = await serve_wsgi(app, nursery, bind="127.0.0.1:0", **options)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def the_connection(server: Server) -> Connection:
    assert server._context is not None
    [conn] = server._context.connections
    return conn


async def get(stream: trio.SocketStream) -> bytes:
    """Send a GET and read its whole response (hello's body ends it)."""
    await stream.send_all(REQUEST)
    response = b""
    while not response.endswith(b"Hello, world!\n"):
        data = await stream.receive_some()
        assert data, response
        response += data
    return response


async def settled(server: Server) -> None:
    """Wait until no request is in progress and every task waits.

    The validator's iterator delivers the body before the app's thread has
    returned (close() is still to come), so the client can have its whole
    response while the request is still running.
    """
    assert server._context is not None
    for _ in range(100_000):  # a bound in steps: under the mock clock no deadline passes
        await trio.testing.wait_all_tasks_blocked()
        if not any(conn.streams for conn in server._context.connections):
            return
    raise AssertionError("a request never finished")


async def all_closed(server: Server) -> None:
    """Wait until the server holds no connection, without letting any time pass."""
    for _ in range(1_000):
        if not server.open_connections:
            return
        await trio.testing.wait_all_tasks_blocked()
    raise AssertionError("a connection is still open")


async def receive_promptly(stream: trio.SocketStream) -> bytes:
    """The next bytes (b"" at EOF), which must come with no mock time passing."""
    for _ in range(1_000):
        await trio.testing.wait_all_tasks_blocked()
        # The kernel's side of a loopback write, waited on as a condition.
        ready, _, _ = select.select([stream.socket.fileno()], [], [], 0.01)
        if ready:
            return await stream.receive_some()
    raise AssertionError("nothing came")


async def quiet_for(server: Server, clock: trio.testing.MockClock, seconds: float) -> None:
    """Let every request finish and every task settle, let ``seconds`` pass, settle again."""
    await settled(server)
    clock.jump(seconds)
    await settled(server)


async def dozing_connection(
    server: Server, clock: trio.testing.MockClock
) -> tuple[trio.SocketStream, Connection]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
    conn = the_connection(server)
    await quiet_for(server, clock, DOZE_AFTER + 0.001)
    assert conn.dozing
    return stream, conn


async def test_an_idle_connection_dozes_and_wakes_for_its_next_request(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with served() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        conn = the_connection(server)
        await quiet_for(server, mock_clock, DOZE_AFTER / 2)
        assert not conn.dozing  # not idle long enough yet
        assert sorted(connection_tasks()) == sorted(CONNECTION_TASKS)
        await quiet_for(server, mock_clock, DOZE_AFTER / 2 + 0.001)
        assert conn.dozing
        assert connection_tasks() == []
        assert connection_tasks_of("serve_connection") == []  # nor the connection's own
        for _ in range(3):  # and again: each idle spell gets its doze
            assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
            assert the_connection(server) is conn  # the same connection, woken
            assert not conn.dozing
            await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
            assert conn.dozing


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_dozing_connection_holds_no_parser_nor_streams_table(
    parser: str, mock_clock: trio.testing.MockClock
) -> None:
    """What the next request builds again anyway is dropped while dozing (an idle
    connection's memory): llhttp's parser, and the table a dict keeps after its
    last key goes. The next request on it is parsed as well as the first."""
    if parser == "httptools":
        pytest.importorskip("httptools")
    async with served(http1_parser=parser) as server:
        stream, conn = await dozing_connection(server, mock_clock)
        proto = conn.proto
        assert isinstance(proto, HTTP1Connection)
        assert proto.parser_name == parser
        assert getattr(proto._parser, "_parser", None) is None
        assert sys.getsizeof(conn.streams) == sys.getsizeof({})
        for _ in range(2):
            assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
            await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
            assert conn.dozing
            assert getattr(proto._parser, "_parser", None) is None


async def test_a_dozing_connection_still_closes_after_the_keep_alive_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with served() as server:
        stream, _ = await dozing_connection(server, mock_clock)
        await quiet_for(server, mock_clock, KEEP_ALIVE - DOZE_AFTER - 0.01)
        assert server.open_connections == 1
        await quiet_for(server, mock_clock, 0.02)
        assert await receive_promptly(stream) == b""  # a clean close (FIN), not a reset
        await stream.aclose()  # the end of the server's lingering close
        await all_closed(server)


async def busy_for(
    server: Server, clock: trio.testing.MockClock, stream: trio.SocketStream, seconds: float
) -> list[trio.CancelScope]:
    """A request every DOZE_AFTER / 2 for ``seconds``: the reader's cancel scopes seen."""
    scopes: list[trio.CancelScope] = []  # (held: an id could be reused)
    for _ in range(round(seconds / (DOZE_AFTER / 2))):
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        await quiet_for(server, clock, DOZE_AFTER / 2)
        conn = the_connection(server)
        assert not conn.dozing
        scope = conn._read_scope
        assert scope is not None
        if not any(scope is seen for seen in scopes):
            scopes.append(scope)
    return scopes


async def test_a_busy_connections_reader_is_woken_once_a_busy_recheck(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A reader's deadline that finds the connection busy (requests came since it was
    set) costs a cancelled wait and a new cancel scope: after one, the doze deadline
    stays at least BUSY_RECHECK away, instead of one DOZE_AFTER after each request."""
    async with served() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        scopes = await busy_for(server, mock_clock, stream, 3 * BUSY_RECHECK)
        # (Before BUSY_RECHECK: 47 scopes in these 60 requests.)
        assert len(scopes) <= 4
        # Idle now: it dozes all the same, once BUSY_RECHECK is up at the latest.
        conn = the_connection(server)
        await quiet_for(server, mock_clock, BUSY_RECHECK + 0.001)
        assert conn.dozing
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        await stream.aclose()


async def test_a_connection_idle_after_being_busy_still_closes_at_its_keep_alive_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A keep-alive time shorter than BUSY_RECHECK is kept to the letter after a busy
    spell (the connection could not doze before then anyway: closing comes first)."""
    keep_alive = BUSY_RECHECK / 2
    async with served(keep_alive_timeout=keep_alive) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await busy_for(server, mock_clock, stream, 3 * BUSY_RECHECK)
        await quiet_for(server, mock_clock, keep_alive - DOZE_AFTER / 2 - 0.01)
        assert server.open_connections == 1
        await quiet_for(server, mock_clock, 0.02)
        assert await receive_promptly(stream) == b""
        await stream.aclose()
        await all_closed(server)


def connection_tasks_of(function: str) -> list[trio.lowlevel.Task]:
    """The live tasks that run ``function``."""
    tasks = [trio.lowlevel.current_root_task()]
    found = []
    while tasks:
        task = tasks.pop()
        assert task is not None
        if task.coro.cr_code.co_name == function:
            found.append(task)
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return found


async def test_a_dozing_connection_has_no_task(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Its task ends and the server's keeper (trioserve.dozing) watches its socket
    and its keep-alive time: a task and its frames would be about 3 KB of every
    idle connection, a cancel scope for the keep-alive time 900 bytes more. Its
    request starts a task again, in the keeper's nursery."""
    async with served() as server:
        assert server._context is not None
        dozing = server._context.dozing
        stream, conn = await dozing_connection(server, mock_clock)
        assert len(dozing) == 1
        assert connection_tasks_of("serve_connection") == []
        assert connection_tasks_of("_serve") == []
        assert server.open_connections == 1
        assert the_connection(server) is conn
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        assert len(dozing) == 0  # woken by its request: off the list
        [task] = connection_tasks_of("_serve")
        assert task.name is CONNECTION_TASK
        assert not conn.dozing


async def test_a_hard_stop_closes_dozing_connections(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Cancelling the server cancels its keeper, which wakes every dozing
    connection to close: none is left open, nor counted as open."""
    async with trio.open_nursery() as nursery:
        server = await serve_wsgi(
            apps.hello, nursery, bind="127.0.0.1:0", keep_alive_timeout=KEEP_ALIVE
        )
        ctx = server._context
        assert ctx is not None
        first, _ = await dozing_connection(server, mock_clock)
        second = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(second)).startswith(b"HTTP/1.1 200 ")
        await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
        assert len(ctx.dozing) == 2
        nursery.cancel_scope.cancel()
    assert ctx.open_connections == 0
    assert not ctx.connections
    assert len(ctx.dozing) == 0
    for stream in (first, second):
        assert await receive_promptly(stream) == b""


async def test_idle_connections_share_what_they_can(
    mock_clock: trio.testing.MockClock,
) -> None:
    """What every connection would otherwise hold a copy of for its whole life: the
    task's name (trio formats one per task unless given one), and the address
    strings of the environ (the server's, and the client host's, are the same for
    many connections)."""
    async with served() as server:
        assert server._context is not None
        first, _ = await dozing_connection(server, mock_clock)
        second = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(second)).startswith(b"HTTP/1.1 200 ")
        [task] = connection_tasks_of("serve_connection")  # the second's, as accepted
        assert task.name is CONNECTION_TASK
        await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
        a, b = (conn.info for conn in server._context.connections)
        assert a.server_name is b.server_name
        assert a.server_port is b.server_port
        assert a.client_addr is b.client_addr
        assert a.client_port != b.client_port
        for stream in (first, second):
            await stream.aclose()


async def test_dozing_connections_close_each_at_its_own_keep_alive_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with served() as server:
        first, _ = await dozing_connection(server, mock_clock)
        await quiet_for(server, mock_clock, 1)
        second = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(second)).startswith(b"HTTP/1.1 200 ")
        await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
        assert server._context is not None
        assert len(server._context.dozing) == 2
        # The first's keep-alive time ends 1 + DOZE_AFTER before the second's.
        await quiet_for(server, mock_clock, KEEP_ALIVE - 1 - 2 * DOZE_AFTER - 0.01)
        assert server.open_connections == 2
        await quiet_for(server, mock_clock, 0.02)
        assert await receive_promptly(first) == b""
        await first.aclose()
        for _ in range(1_000):
            if server.open_connections == 1:
                break
            await trio.testing.wait_all_tasks_blocked()
        assert server.open_connections == 1
        await quiet_for(server, mock_clock, 1 + DOZE_AFTER - 0.02)
        assert server.open_connections == 1
        await quiet_for(server, mock_clock, 0.02)
        assert await receive_promptly(second) == b""
        await second.aclose()
        await all_closed(server)


async def test_without_the_keeper_a_connection_keeps_its_tasks_and_its_keep_alive(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Only a server that runs the keeper lets connections doze (one built from
    parts, serve_connection on a ServerContext, does not): the reader keeps the
    keep-alive time then, as for any busy connection."""
    async with served() as server:
        assert server._context is not None
        server._context.dozing.running = False
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        conn = the_connection(server)
        await quiet_for(server, mock_clock, DOZE_AFTER * 2)
        assert not conn.dozing
        assert sorted(connection_tasks()) == sorted(CONNECTION_TASKS)
        await quiet_for(server, mock_clock, KEEP_ALIVE - DOZE_AFTER * 2 + 0.01)
        assert await receive_promptly(stream) == b""
        await stream.aclose()
        await all_closed(server)


async def test_a_graceful_stop_closes_a_dozing_connection_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with served() as server:
        stream, _ = await dozing_connection(server, mock_clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.stop)  # no graceful_timeout passes: mock time
            assert await receive_promptly(stream) == b""
            await stream.aclose()
        assert not server.open_connections


async def test_an_aborted_dozing_connection_is_dropped(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Closed without the lingering close (which would wait for the client's end)."""
    async with served() as server:
        stream, conn = await dozing_connection(server, mock_clock)
        conn.abort()
        await all_closed(server)
        assert await stream.receive_some() == b""


async def test_an_abort_while_the_tasks_end_for_a_doze_drops_the_connection(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """abort() right as the connection decides to doze, before its tasks have
    ended: it must not go on to doze (nor close politely, which would wait on
    the client)."""
    decided: list[Connection] = []
    may_doze = Connection._may_doze

    def may_doze_then_abort(conn: Connection) -> bool:
        ready = may_doze(conn)
        if ready:
            decided.append(conn)
            conn.abort()
        return ready

    monkeypatch.setattr(Connection, "_may_doze", may_doze_then_abort)
    async with served() as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        assert (await get(stream)).startswith(b"HTTP/1.1 200 ")
        await quiet_for(server, mock_clock, DOZE_AFTER + 0.001)
        await all_closed(server)
        assert decided
        assert await receive_promptly(stream) == b""


async def test_a_client_closing_a_dozing_connection_ends_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with served() as server:
        stream, _ = await dozing_connection(server, mock_clock)
        await stream.send_eof()
        assert await receive_promptly(stream) == b""
        await all_closed(server)


# Under the stream's high water (so the request finishes with it queued), and
# more than a connection whose client reads nothing can take in.
BIG = 400 * 1024


def _big(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(BIG))])
    return [b"x" * BIG]


async def test_a_connection_with_its_response_unread_does_not_doze(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The request is done, but its response is still going out (the client reads
    nothing): the connection keeps its tasks, and the write timeout is in charge."""
    async with served(validator(_big)) as server:
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        stream = trio.SocketStream(sock)
        await stream.send_all(REQUEST)
        await quiet_for(server, mock_clock, 0)
        conn = the_connection(server)
        await quiet_for(server, mock_clock, DOZE_AFTER * 2)
        assert not conn.dozing
        assert sorted(connection_tasks()) == sorted(CONNECTION_TASKS)
        received = 0
        while received < BIG:  # and it all arrives
            received += len(await stream.receive_some())


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2-tls"])
async def test_http2_connections_never_doze(
    tls: bool, mock_clock: trio.testing.MockClock, tls_cert_files: tuple[str, str, str]
) -> None:
    import h2.config
    import h2.connection

    options: dict[str, Any] = {}
    if tls:
        certfile, keyfile, _ = tls_cert_files
        options.update(certfile=certfile, keyfile=keyfile)
    async with served(**options) as server:
        raw: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        if tls:
            import ssl

            context = ssl.create_default_context(cafile=tls_cert_files[2])
            context.set_alpn_protocols(["h2"])
            raw = trio.SSLStream(raw, context, server_hostname="localhost")
        client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        client.initiate_connection()
        client.send_headers(
            1,
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
            end_stream=True,
        )
        await raw.send_all(client.data_to_send())
        ended = False
        while not ended:
            data = await raw.receive_some()
            assert data
            ended = any(
                isinstance(event, h2.events.StreamEnded) for event in client.receive_data(data)
            )
            await raw.send_all(client.data_to_send())
        conn = the_connection(server)
        await quiet_for(server, mock_clock, DOZE_AFTER * 2)
        assert not conn.dozing
        assert "_reader_task" in connection_tasks()
