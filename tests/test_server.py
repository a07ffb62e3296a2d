"""The embedding API and listener/lifecycle behaviour, on real loopback sockets.

Every test starts trioserve in-process with ``serve_wsgi`` and talks to it with Python
clients only: trio sockets speaking a few lines of HTTP/1.1 (or HTTP/2 through the h2
library over ``trio.SSLStream``). Apps go through ``wsgiref.validate.validator`` and,
where the test asserts what the app saw, through ``trioserve.testing.AppProbe``.

Every test runs under an absolute ``trio.fail_after``. Nothing sleeps for timing: tests
wait for events, EOF, ``wait_all_tasks_blocked`` or app-thread signals. The only real
time spent is bounded and deliberate: a 0.5 s TLS handshake timeout, a 0.5 s graceful
timeout, and three 0.1 s accept retries.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
import trustme

from tests import apps
from tests.apps import Gate, whoami
from tests.helpers import has_ipv6_loopback, needs_ipv6, receive_until
from trioserve.config import Config, ConfigError
from trioserve.listeners import BindError
from trioserve.server import Server, serve_wsgi
from trioserve.testing import AppProbe

Environ = dict[str, Any]

# Absolute per-test limit (seconds): generous for a loaded machine, short enough that a
# hang is reported quickly.
QUICK = 15
# Idle and handshake timeouts long enough that only the test's own action closes things.
LONG = 600.0


# ---- apps ---------------------------------------------------------------------------


def _read_body(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Reads the body first: blocks in wsgi.input.read(n) while the client sends none."""
    body = environ["wsgi.input"].read(65536)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok" if body else b"no"]


read_body = validator(_read_body)


def forever_app() -> apps.Blocker:
    """A generator response that never ends on its own (one trio hop per chunk)."""
    return apps.Blocker(chunk=b"z" * 512)


# ---- clients ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


async def read_head(stream: trio.abc.Stream, buffer: bytearray) -> RawResponse:
    head = (await receive_until(stream, buffer, b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.rstrip("\r\n").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, b"")


async def read_response(stream: trio.abc.Stream, buffer: bytearray) -> RawResponse:
    """One Content-Length framed HTTP/1.1 response."""
    response = await read_head(stream, buffer)
    length = int(response.headers["content-length"])
    while len(buffer) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"EOF inside the body; got {bytes(buffer)!r}")
        buffer += data
    response.body = bytes(buffer[:length])
    del buffer[:length]
    return response


async def receive_to_eof(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def get(path: str = "/", *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\n" + connection + b"\r\n"


async def fetch(stream: trio.abc.Stream, path: str = "/") -> RawResponse:
    """One GET on an open keep-alive connection."""
    await stream.send_all(get(path))
    return await read_response(stream, bytearray())


async def fetch_once(host: str, port: int, path: str = "/") -> RawResponse:
    """A fresh connection, one GET, then close."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        return await fetch(stream, path)


async def fetch_unix(path: str) -> RawResponse:
    stream = await trio.open_unix_socket(path)
    async with stream:
        return await fetch(stream)


async def assert_refused(port: int, host: str = "127.0.0.1") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock, pytest.raises(ConnectionRefusedError):
        await sock.connect((host, port))


def free_port() -> int:
    """A port nothing listens on right now (bound and released: a small, loopback-only race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Can a listening socket be bound to 127.0.0.1:port (i.e. nobody else listens there)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners do
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def open_fds() -> set[int]:
    """This process's open descriptors (empty where /proc is missing: the check is skipped)."""
    if not os.path.isdir("/proc/self/fd"):
        return set()
    return {int(name) for name in os.listdir("/proc/self/fd")}


@contextmanager
def short_unix_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose socket paths fit sun_path (108 bytes)."""
    if len(os.fsencode(tmp_path / "server.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="ts-") as directory:
        yield Path(directory)


def tls_context(tls_ca: trustme.CA, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


async def open_tls(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    await stream.do_handshake()
    return stream


async def h2_get(stream: trio.abc.Stream, path: str = "/") -> tuple[int, bytes]:
    """One HTTP/2 GET with the h2 library (a client implementation independent of ours)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":path", path), (":scheme", "https")]
    conn.send_headers(1, [*headers, (":authority", "127.0.0.1")], end_stream=True)
    await stream.send_all(conn.data_to_send())
    status, body = 0, bytearray()
    while True:
        data = await stream.receive_some(65536)
        assert data, "EOF before the HTTP/2 response ended"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                return status, bytes(body)
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream reset: {event}")
        await stream.send_all(conn.data_to_send())


async def wait_thread_event(event: threading.Event) -> None:
    """Wait (off the event loop) until an app thread sets ``event``."""
    ok = await trio.to_thread.run_sync(event.wait, QUICK, abandon_on_cancel=True)
    assert ok, "the request never reached the app"


# =====================================================================================
# 1. Both spellings, one code path
# =====================================================================================


async def test_serve_wsgi_with_nursery_returns_server_once_listening(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0")
        assert isinstance(server, Server)
        # The server runs in the nursery we gave it, as one child task.
        assert any("serve_wsgi" in task.name for task in nursery.child_tasks)
        # Listening already: the very first request works, no retry loop.
        response = await fetch_once("127.0.0.1", server.port)
        assert response.status == 200
        assert json.loads(response.body)["wsgi.url_scheme"] == "http"


async def test_nursery_start_spelling_gives_server_and_returns_it_after_stop() -> None:
    with trio.fail_after(QUICK):
        returned: list[Server] = []

        async def run_server(*, task_status: trio.TaskStatus[Server]) -> None:
            # Exactly the documented partial, with its return value kept.
            run = functools.partial(serve_wsgi, whoami, bind="127.0.0.1:0")
            returned.append(await run(task_status=task_status))

        async with trio.open_nursery() as nursery:
            plain = await nursery.start(functools.partial(serve_wsgi, whoami, bind="127.0.0.1:0"))
            assert isinstance(plain, Server)
            assert (await fetch_once("127.0.0.1", plain.port)).status == 200

            server = await nursery.start(run_server)
            assert isinstance(server, Server)
            assert (await fetch_once("127.0.0.1", server.port)).status == 200
            assert returned == []  # still serving
            ports = (plain.port, server.port)
            await server.stop()
            await plain.stop()
        # The serve_wsgi task itself ended (the nursery exited without a cancel) and
        # returned the same Server it reported through task_status.
        assert returned == [server]
        await assert_refused(ports[0])
        await assert_refused(ports[1])


async def test_server_addresses_still_readable_after_stop(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0")
        before = (server.addresses, server.port, server.url)
        await server.stop()
        assert (server.addresses, server.port, server.url) == before


# =====================================================================================
# 2. Addresses
# =====================================================================================


async def test_port_zero_is_resolved(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0")
        [address] = server.addresses
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) == server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert (await fetch_once("127.0.0.1", server.port)).status == 200


async def test_several_binds_all_serve(nursery: trio.Nursery, tmp_path: Path) -> None:
    ipv6 = has_ipv6_loopback()
    with short_unix_dir(tmp_path) as directory, trio.fail_after(QUICK):
        path = str(directory / "server.sock")
        binds = ["127.0.0.1:0", *(["[::1]:0"] if ipv6 else []), f"unix:{path}"]
        server = await serve_wsgi(whoami, nursery, bind=binds)
        assert len(server.addresses) == len(binds)
        v4, *rest = server.addresses
        assert v4 == f"127.0.0.1:{server.port}"
        assert server.url == f"http://{v4}"
        assert rest[-1] == f"unix:{path}"
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        assert (await fetch_once("127.0.0.1", server.port)).status == 200
        if ipv6:
            v6 = rest[0]
            assert v6.startswith("[::1]:")
            v6_port = int(v6.rpartition(":")[2])
            assert v6_port != 0
            response = await fetch_once("::1", v6_port)
            assert response.status == 200
            assert json.loads(response.body)["REMOTE_ADDR"] == "::1"
        response = await fetch_unix(path)
        assert response.status == 200
        assert json.loads(response.body)["REMOTE_ADDR"] is None  # absent over unix sockets


async def test_all_interfaces_form(nursery: trio.Nursery) -> None:
    """``:0`` parses and binds every family; the addresses show the wildcard hosts."""
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind=":0")
        hosts = {
            address.rpartition(":")[0]: int(address.rpartition(":")[2])
            for address in server.addresses
        }
        assert "0.0.0.0" in hosts, server.addresses
        assert all(port != 0 for port in hosts.values())
        # Reached over loopback only.
        assert (await fetch_once("127.0.0.1", hosts["0.0.0.0"])).status == 200
        if "[::]" in hosts:
            assert (await fetch_once("::1", hosts["[::]"])).status == 200


@needs_ipv6
async def test_all_interfaces_port_zero_picks_a_port_per_family(nursery: trio.Nursery) -> None:
    """Documented: ':0' binds each address family to its own free port (trio's
    open_tcp_listeners); server.addresses lists each, and each one serves."""
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind=":0")
        assert len(server.addresses) >= 2
        for address in server.addresses:
            host, _, port = address.rpartition(":")
            assert int(port) != 0
            loopback = "::1" if host.startswith("[") else "127.0.0.1"
            assert (await fetch_once(loopback, int(port))).status == 200


async def test_stale_unix_socket_file_is_replaced(nursery: trio.Nursery, tmp_path: Path) -> None:
    with short_unix_dir(tmp_path) as directory, trio.fail_after(QUICK):
        path = str(directory / "stale.sock")
        # What a crashed earlier run leaves behind: a socket file nobody listens on.
        leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        leftover.bind(path)
        leftover.close()
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        server = await serve_wsgi(whoami, nursery, bind=f"unix:{path}")
        assert server.addresses == [f"unix:{path}"]
        assert (await fetch_unix(path)).status == 200


async def test_unix_path_that_is_a_regular_file_is_not_removed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with short_unix_dir(tmp_path) as directory, trio.fail_after(QUICK):
        path = directory / "precious.txt"
        path.write_text("not a socket")
        with pytest.raises(BindError, match="address already in use") as info:
            await serve_wsgi(whoami, nursery, bind=f"unix:{path}")
        assert str(path) in str(info.value)
        assert path.read_text() == "not a socket"


async def test_unix_socket_in_use_is_not_hijacked(nursery: trio.Nursery, tmp_path: Path) -> None:
    with short_unix_dir(tmp_path) as directory, trio.fail_after(QUICK):
        path = str(directory / "live.sock")
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with live:
            live.bind(path)
            live.listen()
            live.setblocking(False)
            with pytest.raises(BindError, match="address already in use"):
                await serve_wsgi(whoami, nursery, bind=f"unix:{path}")
            # The live server is still the one reachable at its path.
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with client:
                await client.connect(path)
                conn, _ = live.accept()  # BlockingIOError if the connection went elsewhere
                conn.close()


async def test_fd_adopts_a_bound_listening_socket(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            server = await serve_wsgi(whoami, nursery, bind=f"fd://{sock.fileno()}")
            assert server.addresses == [f"127.0.0.1:{port}"]
            assert server.port == port
            assert (await fetch_once("127.0.0.1", port)).status == 200
            await server.stop()
            await assert_refused(port)  # the server owns the descriptor and closed it
        finally:
            sock.detach()  # never close the number again: it may be reused by now


async def test_fd_adopts_a_bound_socket_not_yet_listening(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            server = await serve_wsgi(whoami, nursery, bind=f"fd://{sock.fileno()}")
            assert server.port == port
            assert (await fetch_once("127.0.0.1", port)).status == 200
            await server.stop()
        finally:
            sock.detach()


async def test_fd_that_is_a_udp_socket_is_refused(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            udp.bind(("127.0.0.1", 0))
            with pytest.raises(BindError, match=f"fd://{udp.fileno()}: not a stream socket"):
                await serve_wsgi(whoami, nursery, bind=f"fd://{udp.fileno()}")
            # Refused, not taken: the descriptor is still ours and still works.
            assert udp.getsockname()[0] == "127.0.0.1"


async def test_fd_that_is_not_a_socket_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(QUICK):
        fd = os.open(tmp_path / "plain-file", os.O_CREAT | os.O_RDWR)
        try:
            with pytest.raises(BindError, match=f"cannot bind fd://{fd}") as info:
                await serve_wsgi(whoami, nursery, bind=f"fd://{fd}")
            assert "\n" not in str(info.value)
            os.fstat(fd)  # still open: a refused descriptor is left to its owner
        finally:
            os.close(fd)


async def test_fd_that_is_an_unbound_unix_socket_is_refused(nursery: trio.Nursery) -> None:
    # Only AF_UNIX here: an unbound AF_INET socket would be listen()ed on 0.0.0.0 (see the
    # report: fd://N does not check that the socket is bound), and tests stay on loopback.
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = unbound.fileno()
    adopted = False

    async def adopt() -> None:
        nonlocal adopted
        server = await serve_wsgi(whoami, nursery, bind=f"fd://{fd}")
        adopted = True  # the server owns (and will close) the descriptor now
        await server.stop()

    try:
        with trio.fail_after(QUICK), pytest.raises(BindError, match=f"fd://{fd}"):
            await adopt()
    finally:
        if adopted:
            unbound.detach()
        else:
            unbound.close()


# =====================================================================================
# 3. Errors before anything is served
# =====================================================================================


async def test_address_in_use_raises_bind_error_and_closes_other_listeners(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(QUICK):
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            busy_port = busy.getsockname()[1]
            other_port = free_port()
            fds_before = open_fds()
            with pytest.raises(BindError) as info:
                # The free address is bound first; the busy one then fails.
                await serve_wsgi(
                    whoami,
                    nursery,
                    bind=[f"127.0.0.1:{other_port}", f"127.0.0.1:{busy_port}"],
                )
            assert isinstance(info.value, ConfigError)
            message = str(info.value)
            assert "address already in use" in message
            assert f"127.0.0.1:{busy_port}" in message
            assert "\n" not in message
            # The listener already bound for this server was closed, not leaked.
            assert port_is_free(other_port)
            assert open_fds() <= fds_before
            assert not nursery.child_tasks  # nothing is left running


async def test_tls_setup_error_closes_bound_listeners(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(QUICK):
        port = free_port()
        missing = str(tmp_path / "missing-cert.pem")
        with pytest.raises(ConfigError, match=r"missing-cert\.pem"):
            await serve_wsgi(
                whoami,
                nursery,
                bind=f"127.0.0.1:{port}",
                certfile=missing,
                keyfile=str(tmp_path / "key.pem"),
            )
        assert port_is_free(port)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"threads": 0}, "threads must be at least 1"),
        ({"bind": "x:y"}, "port must be a number"),
        ({"h2_max_frame_size": 100}, "h2-max-frame-size must be between"),
        ({"certfile": "cert.pem"}, "--certfile and --keyfile go together"),
        ({"keyfile": "key.pem"}, "--certfile and --keyfile go together"),
        ({"graceful_timeout": 0}, "graceful-timeout must be positive"),
        ({"bind": "127.0.0.1:70000"}, "port out of range"),
        ({"bind": []}, "at least one bind address"),
    ],
)
async def test_bad_config_raises_one_line_config_error(
    nursery: trio.Nursery, options: dict[str, Any], fragment: str
) -> None:
    with trio.fail_after(QUICK):
        with pytest.raises(ConfigError) as info:
            Config(**options)
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)
        # The same options given to serve_wsgi fail the same way, before binding.
        fds_before = open_fds()
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            await serve_wsgi(whoami, nursery, **options)
        assert open_fds() <= fds_before
        assert not nursery.child_tasks


def test_bad_bind_is_a_bind_error() -> None:
    with pytest.raises(BindError, match="'x:y'"):
        Config(bind=("127.0.0.1:0", "x:y"))


async def test_unreadable_certfile_names_the_file(
    nursery: trio.Nursery, tmp_path: Path, tls_cert_files: tuple[str, str, str]
) -> None:
    _, keyfile, _ = tls_cert_files
    missing = tmp_path / "nowhere" / "cert.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    with trio.fail_after(QUICK):
        for certfile in (missing, garbage):
            with pytest.raises(ConfigError) as info:
                await serve_wsgi(
                    whoami,
                    nursery,
                    bind="127.0.0.1:0",
                    certfile=str(certfile),
                    keyfile=keyfile,
                )
            assert str(certfile) in str(info.value)
            assert "\n" not in str(info.value)
        # An unreadable key file is named too.
        good_certfile, _, _ = tls_cert_files
        with pytest.raises(ConfigError, match=re.escape(str(missing))):
            await serve_wsgi(
                whoami, nursery, bind="127.0.0.1:0", certfile=good_certfile, keyfile=str(missing)
            )
        assert not nursery.child_tasks


def locked_copy(source: Path, target: Path) -> Path:
    """A copy of ``source`` that nobody (but root) may read."""
    target.write_bytes(source.read_bytes())
    target.chmod(0)
    return target


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="running as root: file permissions do not make a file unreadable",
)
async def test_certfile_without_read_permission_names_the_file(
    nursery: trio.Nursery, tmp_path: Path, tls_cert_files: tuple[str, str, str]
) -> None:
    certfile, keyfile, _ = tls_cert_files
    locked = locked_copy(Path(certfile), tmp_path / "locked-cert.pem")
    with trio.fail_after(QUICK), pytest.raises(ConfigError) as info:
        await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", certfile=str(locked), keyfile=keyfile)
    assert str(info.value) == f"cannot read TLS file {locked}: permission denied"


# =====================================================================================
# 4. TLS
# =====================================================================================


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tls_cert_files: tuple[str, str, str]) -> Server:
    certfile, keyfile, _ = tls_cert_files
    return await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", certfile=certfile, keyfile=keyfile)


async def test_tls_url_and_alpn_h2(tls_server: Server, tls_ca: trustme.CA) -> None:
    with trio.fail_after(QUICK):
        assert tls_server.url == f"https://127.0.0.1:{tls_server.port}"
        stream = await open_tls(tls_server.port, tls_context(tls_ca, ["h2", "http/1.1"]))
        async with stream:
            assert stream.selected_alpn_protocol() == "h2"
            status, body = await h2_get(stream, "/over-h2")
        assert status == 200
        environ = json.loads(body)
        assert environ["SERVER_PROTOCOL"] == "HTTP/2"
        assert environ["wsgi.url_scheme"] == "https"
        assert environ["PATH_INFO"] == "/over-h2"


@pytest.mark.parametrize("alpn", [["http/1.1"], None], ids=["http1.1", "no-alpn"])
async def test_tls_http11(tls_server: Server, tls_ca: trustme.CA, alpn: list[str] | None) -> None:
    with trio.fail_after(QUICK):
        stream = await open_tls(tls_server.port, tls_context(tls_ca, alpn))
        async with stream:
            assert stream.selected_alpn_protocol() == (alpn[0] if alpn else None)
            first = await fetch(stream, "/one")
            second = await fetch(stream, "/two")  # keep-alive over TLS
        for response, path in ((first, "/one"), (second, "/two")):
            assert response.status == 200
            environ = json.loads(response.body)
            assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
            assert environ["wsgi.url_scheme"] == "https"
            assert environ["PATH_INFO"] == path


@pytest.mark.parametrize(
    "sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "partial-hello"]
)
async def test_tls_handshake_timeout_drops_client(
    nursery: trio.Nursery, tls_cert_files: tuple[str, str, str], tls_ca: trustme.CA, sent: bytes
) -> None:
    certfile, keyfile, _ = tls_cert_files
    with trio.fail_after(QUICK):
        server = await serve_wsgi(
            whoami,
            nursery,
            bind="127.0.0.1:0",
            certfile=certfile,
            keyfile=keyfile,
            tls_handshake_timeout=0.5,
            keep_alive_timeout=LONG,
        )
        stalled = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stalled:
            began = trio.current_time()
            if sent:
                await stalled.send_all(sent)
            with trio.fail_after(5):  # bounded: the timeout is 0.5 s
                assert await receive_to_eof(stalled) == b""
            elapsed = trio.current_time() - began
        assert elapsed >= 0.4, f"dropped after {elapsed:.2f}s, before the handshake timeout"
        # The server itself is fine: a real client is served.
        good = await open_tls(server.port, tls_context(tls_ca, ["http/1.1"]))
        async with good:
            assert (await fetch(good)).status == 200


# =====================================================================================
# 5. Stop semantics
# =====================================================================================


async def test_stop_closes_idle_keep_alive_connection_promptly(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", keep_alive_timeout=LONG)
        port = server.port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            response = await fetch(stream)
            assert response.status == 200
            assert "connection" not in response.headers  # kept alive
            with trio.fail_after(3):  # nothing in flight: the stop should be immediate
                await server.stop(graceful_timeout=LONG)
            assert await receive_to_eof(stream) == b""
        await assert_refused(port)
        with trio.fail_after(1):
            await server.wait_stopped()  # returns at once once stopped


async def test_stop_waits_for_request_in_flight(nursery: trio.Nursery) -> None:
    gate = Gate(QUICK)
    try:
        with trio.fail_after(QUICK):
            server = await serve_wsgi(validator(gate), nursery, bind="127.0.0.1:0")
            port = server.port
            stopped = trio.Event()
            waiter_saw_stop = trio.Event()

            async def stop() -> None:
                await server.stop(graceful_timeout=QUICK)
                stopped.set()

            async def waiter() -> None:
                await server.wait_stopped()
                waiter_saw_stop.set()

            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(get("/slow"))
                await wait_thread_event(gate.started)
                nursery.start_soon(waiter)
                nursery.start_soon(stop)
                await trio.testing.wait_all_tasks_blocked()
                assert not stopped.is_set(), "stop() did not wait for the in-flight request"
                assert not waiter_saw_stop.is_set()
                await assert_refused(port)  # no new connections meanwhile
                gate.release.set()
                response = await read_response(stream, bytearray())
                assert response.status == 200
                assert response.body == b"finished after the stop began\n"
                assert response.headers.get("connection") == "close"
                assert await receive_to_eof(stream) == b""
            await stopped.wait()
            await waiter_saw_stop.wait()
    finally:
        gate.release.set()


@pytest.mark.parametrize("where", ["generator", "input-read"])
async def test_stop_cancels_app_after_graceful_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    blocker = forever_app()
    probe = AppProbe(validator(blocker) if where == "generator" else read_body)
    try:
        with trio.fail_after(QUICK):
            server = await serve_wsgi(probe, nursery, bind="127.0.0.1:0")
            port = server.port
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                if where == "generator":
                    await stream.send_all(get("/forever"))
                    head = await read_head(stream, bytearray())
                    assert head.status == 200
                else:
                    # Promise a body and never send it: the app waits in wsgi.input.read().
                    await stream.send_all(
                        b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n"
                    )
                record = await probe.wait_started()
                began = trio.current_time()
                with caplog.at_level(logging.WARNING, logger="trioserve.error"):
                    await server.stop(graceful_timeout=0.5)
                elapsed = trio.current_time() - began
                assert 0.4 <= elapsed < 5, elapsed
                await record.finished.wait()
                assert record.cancelled, "the app did not see trio.Cancelled"
                if where == "generator":
                    assert record.closed, "close() was not called"
                else:
                    assert isinstance(record.exception, trio.Cancelled)
                # The connection is gone (whatever partial response it got).
                with trio.fail_after(3):
                    await receive_to_eof(stream)
            assert any("Graceful shutdown timed out" in r.getMessage() for r in caplog.records)
            await assert_refused(port)
    finally:
        blocker.release.set()


async def test_cancelling_the_nursery_stops_at_once() -> None:
    blocker = forever_app()
    probe = AppProbe(validator(blocker))
    try:
        with trio.fail_after(QUICK):
            async with trio.open_nursery() as nursery:
                server = await serve_wsgi(probe, nursery, bind="127.0.0.1:0", graceful_timeout=LONG)
                port = server.port
                streams = []
                for _ in range(3):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    streams.append(stream)
                    await stream.send_all(get("/forever"))
                    assert (await read_head(stream, bytearray())).status == 200
                await probe.wait_started(3)
                idle = await trio.open_tcp_stream("127.0.0.1", port)  # a fourth, sending nothing
                began = trio.current_time()
                nursery.cancel_scope.cancel()
            # The nursery exited without waiting for the (huge) graceful timeout.
            assert trio.current_time() - began < 5
            for record in probe.records:
                await record.finished.wait()
                assert record.cancelled
                assert record.closed
            await trio.testing.wait_all_threads_completed()
            assert trio.testing.active_thread_count() == 0
            for stream in [*streams, idle]:
                with trio.fail_after(3):
                    await receive_to_eof_or_reset(stream)
                await stream.aclose()
            await assert_refused(port)
    finally:
        blocker.release.set()


async def receive_to_eof_or_reset(stream: trio.abc.Stream) -> None:
    try:
        await receive_to_eof(stream)
    except trio.BrokenResourceError:
        pass


async def test_wait_stopped_returns_after_cancellation() -> None:
    with trio.fail_after(QUICK):
        async with trio.open_nursery() as nursery:
            server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0")
            nursery.cancel_scope.cancel()
        with trio.fail_after(2):
            await server.wait_stopped()


async def test_cancellation_closes_every_listener() -> None:
    with trio.fail_after(QUICK):
        async with trio.open_nursery() as nursery:
            server = await serve_wsgi(whoami, nursery, bind=["127.0.0.1:0"] * 3)
            ports = [int(address.rpartition(":")[2]) for address in server.addresses]
            assert len(set(ports)) == 3
            nursery.cancel_scope.cancel()
        for port in ports:
            await assert_refused(port)


async def test_stop_twice_and_stop_with_nothing_open(nursery: trio.Nursery) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0")
        port = server.port
        with trio.fail_after(3):
            await server.stop(graceful_timeout=LONG)
            await server.stop()  # already stopped: returns at once
            await server.wait_stopped()
        await assert_refused(port)
        assert not nursery.child_tasks


# =====================================================================================
# 6. A request that arrives as a graceful stop begins
# =====================================================================================


# Rounds of the stop race below. With the bug, one round in four or five loses its request
# (measured: 71 of 300, 66 of 300, 114 of 400, 11 of 60), so all rounds passing by luck
# has a probability below 0.82**80, about 1e-7. Each round takes a few milliseconds.
STOP_RACE_ROUNDS = 80


async def test_request_sent_as_stop_begins_is_answered() -> None:
    """A client connects, sends a whole request, and the stop begins in the same step.

    No hooks: the client is a plain non-blocking socket, the request is written
    synchronously right after the connection completes, and ``stop_nowait`` follows
    without yielding. The request reached the server before its listener closed, so
    it must be answered (with ``Connection: close``). Which of the server's tasks runs
    first is up to trio's scheduler, so the round is repeated.
    """
    dropped: list[str] = []
    with trio.fail_after(QUICK):
        for round_number in range(STOP_RACE_ROUNDS):
            async with trio.open_nursery() as nursery:
                server = await serve_wsgi(
                    whoami, nursery, bind="127.0.0.1:0", keep_alive_timeout=LONG
                )
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                raw.setblocking(False)
                assert raw.connect_ex(("127.0.0.1", server.port)) in (0, errno.EINPROGRESS)
                await trio.lowlevel.wait_writable(raw)  # connected
                request = get(f"/round-{round_number}")
                assert raw.send(request) == len(request)
                server.stop_nowait(graceful_timeout=QUICK)
                client = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                async with client:
                    try:
                        response = await read_response(client, bytearray())
                    except (AssertionError, trio.BrokenResourceError) as exc:
                        dropped.append(f"round {round_number}: {exc}")
                    else:
                        assert response.status == 200
                        assert response.headers.get("connection") == "close"
                await server.wait_stopped()
    assert not dropped, f"{len(dropped)} of {STOP_RACE_ROUNDS} dropped, e.g. {dropped[:2]}"


async def test_connection_accepted_as_stop_begins_is_answered(nursery: trio.Nursery) -> None:
    """The same promise, for a second, narrower window: the hand-off after accept().

    trio's ``socket.accept`` yields once after the syscall. If the stop begins in that
    batch, ``_drain`` can close the listener, find no open connection, and cancel the
    server's nursery before the accept task starts ``serve_connection``; the accepted
    connection (with its request unread) is then closed. That ordering is legal but
    rare, so this test forces it: the listener's accept starts the stop right after the
    kernel accept and lets the rest of the server run before returning the connection.
    """
    with trio.fail_after(QUICK):
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        real_accept = listener.accept
        servers: list[Server] = []
        stopping = False

        async def accept_then_stop() -> trio.SocketStream:
            nonlocal stopping
            stream = await real_accept()
            if not stopping:
                stopping = True
                servers[0].stop_nowait(graceful_timeout=QUICK)
                with trio.CancelScope(shield=True):
                    await trio.testing.wait_all_tasks_blocked()
            return stream

        listener.accept = accept_then_stop  # type: ignore[method-assign]
        servers.append(await serve_wsgi(whoami, nursery, listeners=[listener]))
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            await client.send_all(get("/sent-before-the-stop"))
            try:
                response = await read_response(client, bytearray())
            except trio.BrokenResourceError as exc:
                pytest.fail(f"the request was dropped unanswered: {exc}")
            assert response.status == 200
        await servers[0].wait_stopped()


# =====================================================================================
# 7. A bad client does not disturb the others
# =====================================================================================


async def test_garbage_client_gets_400_while_good_client_keeps_going(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(QUICK):
        server = await serve_wsgi(whoami, nursery, bind="127.0.0.1:0", keep_alive_timeout=LONG)
        good = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with good:
            assert (await fetch(good, "/1")).status == 200

            bad = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with bad:
                await bad.send_all(b"\x01\x02 this is not HTTP \xff\r\n\r\n")
                assert (await fetch(good, "/2")).status == 200  # meanwhile
                response = await read_head(bad, bytearray())
                assert response.status == 400
                with trio.fail_after(3):
                    await receive_to_eof(bad)

            # A client that starts a request and never finishes it.
            stalled = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stalled:
                await stalled.send_all(b"GET /never-finished HTTP/1.1\r\nHost: te")
                # One that vanishes with a reset in the middle of its headers.
                rude = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                await rude.connect(("127.0.0.1", server.port))
                await rude.send(b"GET / HTTP/1.1\r\nHo")
                rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
                rude.close()
                for path in ("/3", "/4", "/5"):
                    response = await fetch(good, path)
                    assert response.status == 200
                    assert json.loads(response.body)["PATH_INFO"] == path


# =====================================================================================
# 8. The accept loop survives running out of descriptors
# =====================================================================================


async def test_accept_loop_survives_emfile(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(QUICK):
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        real_accept = listener.accept
        failures = 3
        attempts = 0

        async def accept_out_of_fds() -> trio.SocketStream:
            # Like a real EMFILE: a connection is waiting, but accept() cannot take it.
            nonlocal failures, attempts
            attempts += 1
            if failures:
                await trio.lowlevel.wait_readable(listener.socket)
                failures -= 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await real_accept()

        listener.accept = accept_out_of_fds  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="trioserve.error"):
            server = await serve_wsgi(whoami, nursery, listeners=[listener])
            response = await fetch_once("127.0.0.1", port)
            assert response.status == 200
            assert failures == 0
            errors = [r for r in caplog.records if "accept() failed" in r.getMessage()]
            assert len(errors) == 3
            assert all(r.levelno == logging.ERROR for r in errors)
            assert os.strerror(errno.EMFILE) in errors[0].getMessage()
            # And it keeps serving normally afterwards.
            for _ in range(3):
                assert (await fetch_once("127.0.0.1", server.port)).status == 200
            assert attempts >= 3 + 4
