"""Production limits: every timeout, the connection and in-flight caps, max-requests,
unix socket permissions and systemd socket activation.

Timeouts run on trio's autojump clock over in-memory connections: the clock
only jumps while every task is blocked, and the apps here block inside trio
(waiting for body data or for the client to read), never in plain Python.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import h2.errors
import pytest
import trio
import trio.testing

from tests import apps
from tests.apps import whoami
from trioserve import serve_wsgi
from trioserve.testing import AppProbe, open_test_client, open_test_server

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


# ---- request head (slowloris) ---------------------------------------------------------------


async def test_incomplete_request_head_gets_408_after_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(apps.hello, header_timeout=10, keep_alive_timeout=100) as client:
        start = trio.current_time()
        await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data = await read_until_closed(client.stream)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in data.lower()
    assert 10 <= trio.current_time() - start < 11


async def test_trickled_request_head_does_not_extend_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slowloris client sends a byte every few seconds: the deadline counts from the first."""
    received = b""

    async def trickle(client: Any) -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            await trio.sleep(2)
            try:
                await client.stream.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with (
        open_test_client(apps.hello, header_timeout=10) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(trickle, client)
        start = trio.current_time()
        received = await read_until_closed(client.stream)
        nursery.cancel_scope.cancel()
    assert received.startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start < 2 + 10 + 2


async def test_idle_keep_alive_and_header_timeouts_are_separate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(apps.hello, keep_alive_timeout=3, header_timeout=10) as client:
        assert (await client.get("/")).status == 200
        start = trio.current_time()
        assert await read_until_closed(client.stream) == b""  # idle: closed, no 408
        assert 3 <= trio.current_time() - start < 4


# ---- request body -------------------------------------------------------------------------


def body_reader(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = b""
    while chunk := environ["wsgi.input"].read(50):
        body += chunk
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"read %d" % len(body)]


@both_protocols
async def test_stalled_body_times_out_and_the_apps_read_raises(
    http2: bool, patient_clock: trio.testing.MockClock
) -> None:
    probe = AppProbe(body_reader)
    async with open_test_client(probe, http2=http2, body_timeout=20) as client:
        stream = await client.open_stream(
            "POST", "/", headers=[("Content-Length", "1000")], end=False
        )
        await stream.send(b"x" * 100)
        start = trio.current_time()
        record = await probe.wait_finished()
        response = await stream.read_response()
    assert record.cancelled  # the read raised instead of hanging
    assert bytes(record.body_read) == b"x" * 100
    assert 20 <= trio.current_time() - start < 21
    assert response.status == 408
    if not http2:
        assert response.header("Connection") == "close"


@both_protocols
async def test_a_slow_but_steady_upload_is_not_a_stall(
    http2: bool, patient_clock: trio.testing.MockClock
) -> None:
    async with open_test_client(body_reader, http2=http2, body_timeout=20) as client:
        stream = await client.open_stream(
            "POST", "/", headers=[("Content-Length", "50")], end=False
        )
        for _ in range(5):  # 10 bytes every 15 s: 60 s in all, never 20 s without progress
            await trio.sleep(15)
            await stream.send(b"y" * 10)
        await stream.end()
        response = await stream.read_response()
    assert response.status == 200
    assert response.body == b"read 50"


# ---- writing to a client that stopped reading --------------------------------------------------


@both_protocols
async def test_client_that_stops_reading_is_dropped_after_write_timeout(
    http2: bool, patient_clock: trio.testing.MockClock
) -> None:
    def endless(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        while True:
            yield b"z" * 65536

    probe = AppProbe(endless)
    # Big HTTP/2 windows: only the socket (not flow control) can stop the server.
    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30}
    async with open_test_client(
        probe, http2=http2, h2_settings=settings, write_timeout=30, pipe_capacity=65536
    ) as client:
        if http2:
            await client.open_window(2**30)  # the connection window too
        stream = await client.open_stream("GET", "/")
        await stream.receive_headers()
        client.pause_reading(socket=True)
        start = trio.current_time()
        record = await probe.wait_finished()
    assert record.cancelled
    assert record.closed
    assert 30 <= trio.current_time() - start < 35


@both_protocols
async def test_stream_stalled_on_flow_control_is_reset_after_write_timeout(
    http2: bool, patient_clock: trio.testing.MockClock
) -> None:
    """HTTP/2: the client keeps reading but never grants window; HTTP/1.1: it stops reading."""

    def endless(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        while True:
            yield b"z" * 65536

    probe = AppProbe(endless)
    async with open_test_client(probe, http2=http2, write_timeout=30) as client:
        stream = await client.open_stream("GET", "/")
        await stream.receive_headers()
        client.pause_reading()  # HTTP/2: no more credit; the windows run to zero
        start = trio.current_time()
        record = await probe.wait_finished()
        if http2:
            await stream.ended.wait()
            assert stream.reset_code == h2.errors.ErrorCodes.CANCEL
    assert record.cancelled
    assert record.closed
    assert 30 <= trio.current_time() - start < 35


# ---- HTTP/2 idle connection -----------------------------------------------------------------


async def test_idle_http2_connection_gets_goaway_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_test_client(apps.hello, http2=True, h2_idle_timeout=30) as client:
        assert (await client.get("/")).status == 200
        start = trio.current_time()
        await client.closed.wait()
    assert client.goaway_received is not None
    assert client.goaway_received.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert client.goaway_received.last_stream_id == 1  # the final GOAWAY names stream 1
    assert 30 <= trio.current_time() - start < 31


async def test_http2_connection_with_a_live_stream_is_not_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    token = trio.lowlevel.current_trio_token()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trio.from_thread.run(trio.sleep, 100, trio_token=token)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow"]

    async with open_test_client(slow, http2=True, h2_idle_timeout=30) as client:
        response = await client.get("/")
    assert response.body == b"slow"
    assert client.goaway_received is None


# ---- limits ---------------------------------------------------------------------------------


@both_protocols
async def test_requests_over_the_in_flight_limit_get_503_at_once(http2: bool) -> None:
    token = trio.lowlevel.current_trio_token()
    release = trio.Event()

    def waits(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            trio.from_thread.run(release.wait, trio_token=token)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    probe = AppProbe(waits)
    with trio.fail_after(10):
        async with (
            open_test_server(probe, max_requests_in_flight=1) as server,
            server.connect(http2=http2) as first,
            server.connect(http2=http2) as second,
        ):
            slow = await first.open_stream("GET", "/slow")
            await probe.wait_started()
            refused = await second.get("/other")
            assert refused.status == 503
            assert probe.find("/other") is None  # the app never ran for it
            release.set()
            assert (await slow.read_response()).status == 200
            assert (await second.get("/again")).status == 200


async def test_connections_over_the_cap_wait_in_the_backlog(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        server = await serve_wsgi(apps.hello, nursery, bind="127.0.0.1:0", max_connections=1)
        first = await trio.open_tcp_stream("127.0.0.1", server.port)
        await first.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await first.receive_some()).startswith(b"HTTP/1.1 200 ")
        # The kernel completes this connection, but trioserve does not accept it yet.
        second = await trio.open_tcp_stream("127.0.0.1", server.port)
        await second.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with trio.move_on_after(0.5):
            early = await second.receive_some()
            pytest.fail(f"answered while over the connection cap: {early!r}")
        await first.aclose()
        assert (await read_until_closed(second)).startswith(b"HTTP/1.1 200 ")
        await second.aclose()


async def test_max_requests_stops_the_server_gracefully(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", max_requests=3)
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()
        await server.wait_stopped()
        with pytest.raises(OSError, match=r"refused|connect"):
            await trio.open_tcp_stream("127.0.0.1", server.port)


# ---- binding -------------------------------------------------------------------------------


async def test_unix_socket_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = await serve_wsgi(apps.hello, nursery, bind=f"unix:{path}", unix_socket_mode="600")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await server.stop()


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """Pass a bound socket as fd 3 with LISTEN_FDS/LISTEN_PID, the way systemd does."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # LISTEN_PID must be the server's own pid: "exec" keeps the shell's $$.
    command = (
        f"export LISTEN_PID=$$ LISTEN_FDS=1; exec {sys.executable} -m trioserve"
        f" examples.hello:app --log-level info 3<&{fd}"
    )
    process = subprocess.Popen(
        ["bash", "-c", command],
        pass_fds=(fd,),
        cwd=Path(__file__).resolve().parent.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:  # ends at EOF if the server dies
            lines.append(line)
            if "Listening on" in line:
                break
        assert any("from systemd" in line for line in lines), lines
        assert any(f"127.0.0.1:{port}" in line for line in lines), lines
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := client.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b"Hello, world!\n")
    finally:
        process.terminate()
        process.wait(timeout=10)
        listener.close()
    assert process.returncode == 0
