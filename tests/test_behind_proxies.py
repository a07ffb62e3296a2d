"""trioserve behind real proxies: HAProxy (PROXY protocol v2) and nginx (X-Forwarded-*, Forwarded).

The proxies are Debian's ``haproxy`` and ``nginx`` packages (``.ci/run`` installs both, so CI
never skips); a test whose program is missing is skipped, naming it. Everything runs on
loopback as the current user: each test writes a minimal config into ``tmp_path`` (pid file,
logs and temporary directories included, nothing under /etc or /var), starts the proxy in the
foreground as a child process, waits until it is ready, and stops it by PID in a ``finally``.
trioserve runs in-process (``serve_wsgi`` in the pytest-trio nursery).

To tell the client's address from the proxy's, clients connect *from* 127.0.0.2 (any
127.0.0.0/8 address is local on Linux) while the proxies reach trioserve from 127.0.0.1; the
client's source port comes from its own socket (``getsockname()``, or curl's
``%{local_port}``). docs/deployment/proxies.md quotes these configurations.

Ports: a proxy's port is found by binding port 0 and closing the socket just before the proxy
starts. Another process could take the port in between (a tiny race); the proxy then fails to
bind and exits, and is started once more on a new port. Ready means the proxy itself reports
that it bound its ports (nginx writes its pid file only after that; HAProxy's stats socket
answers with its PID only then), so a process that took the port cannot pass for the proxy,
and then a TCP connect to the port succeeds; both are polled.

Every test runs under an absolute ``trio.fail_after``; nothing sleeps for timing.

One test guards a fixed bug: a malformed ``Forwarded`` header from a trusted proxy made
trioserve fall back to ``X-Forwarded-For``, which such a proxy passes through from the client.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from wsgiref.validate import validator

import h11
import pytest
import trio

from tests.helpers import has_ipv6_loopback
from trioserve import serve_wsgi
from trioserve.listeners import open_listeners, parse_bind
from trioserve.server import Server

TestFunction = TypeVar("TestFunction", bound=Callable[..., Any])
Environ = dict[str, Any]

QUICK = 20  # seconds: the absolute limit of every test here
CLIENT = "127.0.0.2"  # where clients connect from; proxies reach trioserve from 127.0.0.1
OTHER_CLIENT = "127.0.0.3"


# Debian installs both proxies in /usr/sbin, which is not on an ordinary user's PATH.
SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])


def find_program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def needs(*programs: str) -> Callable[[TestFunction], TestFunction]:
    """Mark a test ``external``; skip it, naming what is missing, if a program is absent."""
    missing = [program for program in programs if find_program(program) is None]
    reason = (
        f"{', '.join(missing)} not installed (Debian: apt install {' '.join(missing)});"
        " .ci/run installs it"
    )

    def decorate(test: TestFunction) -> TestFunction:
        marked: TestFunction = pytest.mark.skipif(bool(missing), reason=reason)(
            pytest.mark.external(test)
        )
        return marked

    return decorate


# ---- apps (each through wsgiref.validate.validator) ------------------------------------------

ECHOED = (
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "wsgi.url_scheme",
    "HTTP_HOST",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "PATH_INFO",
    "HTTP_FORWARDED",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
)


class EnvironEcho:
    """Answers with the environ keys above as JSON (absent keys as null); records every call."""

    def __init__(self) -> None:
        self.seen: list[Environ] = []
        self.app = validator(self._app)

    def _app(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        echoed = {key: environ.get(key) for key in ECHOED}
        self.seen.append(echoed)
        body = json.dumps(echoed).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]


class StreamingApp:
    """``GET``: yields ``first``, then waits for ``release`` before yielding ``second``.

    ``POST``: reads ``first_size`` body bytes, sets ``got_first``, reads the rest, and
    answers with the sizes and the SHA-256 of the whole body.
    """

    first = b"first chunk\n"
    second = b"second chunk\n"

    def __init__(self, first_size: int = 0) -> None:
        self.release = threading.Event()
        self.got_first = threading.Event()
        self.first_size = first_size
        self.app = validator(self._app)

    def _app(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            body = environ["wsgi.input"].read(self.first_size)
            self.got_first.set()
            while chunk := environ["wsgi.input"].read(65536):
                body += chunk
            answer = {
                "first": self.first_size,
                "total": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "transfer_encoding": environ.get("HTTP_TRANSFER_ENCODING"),
                "content_length": environ.get("CONTENT_LENGTH"),
            }
            data = json.dumps(answer).encode()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
            )
            return [data]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return self._generate()

    def _generate(self) -> Iterator[bytes]:
        yield self.first
        if not self.release.wait(QUICK):
            raise RuntimeError("the test never released the second chunk")
        yield self.second


@contextlib.contextmanager
def short_unix_path(directory: Path, name: str = "s.sock") -> Iterator[str]:
    """A unix socket path in ``directory``, or in a short temporary one if that is too long."""
    path = directory / name
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="ts-") as short:
        yield os.path.join(short, name)


# ---- running a proxy ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (see the module docstring for the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def stop_process(process: trio.Process) -> None:
    """SIGTERM by PID (both proxies stop at once on it), SIGKILL if still alive after 5 s."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def accepts_connections(port: int) -> bool:
    try:
        probe = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await probe.aclose()
    return True


@dataclass
class Proxy:
    """A running proxy: the port it listens on, and HAProxy's stats socket."""

    port: int
    process: trio.Process
    stats_socket: str = ""


OwnsPort = Callable[[trio.Process], Awaitable[bool]]


@contextlib.asynccontextmanager
async def run_proxy(
    name: str, workdir: Path, start: Callable[[int], list[str]], started: OwnsPort
) -> AsyncIterator[Proxy]:
    """Run ``start(port)`` (which writes the config and returns the command) on a free port.

    Ready means: ``started(process)`` (the proxy itself says it has bound its ports; so a
    process that took the port in the meantime cannot pass for it) and then a TCP connect
    to the port succeeds, both polled. If the proxy exits because the port was taken in
    between, it is started once more on another port. Stopped by PID on exit.
    """
    for attempt in (1, 2):
        port = free_port()
        command = start(port)
        log = workdir / f"{name}-{attempt}.log"
        with log.open("wb") as output:
            process = await trio.lowlevel.open_process(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        try:
            while process.poll() is None:
                if await started(process) and await accepts_connections(port):
                    yield Proxy(port, process)
                    return
                # Polling an external process until it listens; every caller runs this under
                # fail_after(QUICK): a polling interval, not a timing assumption.
                await trio.sleep(0.01)
        finally:
            await stop_process(process)
        text = log.read_text(errors="replace")
        if attempt == 2 or "in use" not in text:
            pytest.fail(f"{name} exited with status {process.returncode}:\n{text}")


# ---- HAProxy -------------------------------------------------------------------------------------


def haproxy_config(
    workdir: Path,
    port: int,
    upstream: int,
    stats_socket: str,
    *,
    mode: str,
    server_options: str = "",
    backend_lines: Iterable[str] = (),
    ipv6_port: bool = False,
) -> Path:
    """A minimal haproxy.cfg: one frontend on 127.0.0.1:port, one trioserve backend with
    ``send-proxy-v2``; a stats socket for readiness and health-check results."""
    binds = [f"bind 127.0.0.1:{port}"]
    if ipv6_port:
        binds.append(f"bind [::1]:{port}")
    lines = [
        "global",
        "    maxconn 256",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        f"    mode {mode}",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "frontend public",
        *(f"    {bind}" for bind in binds),
        "    default_backend trioserve",
        "backend trioserve",
        *(f"    {line}" for line in backend_lines),
        f"    server app 127.0.0.1:{upstream} send-proxy-v2 {server_options}".rstrip(),
    ]
    path = workdir / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


async def haproxy_command(stats_socket: str, command: bytes) -> str:
    """One command on HAProxy's stats socket (it answers, then closes)."""
    stream = await trio.open_unix_socket(stats_socket)
    async with stream:
        await stream.send_all(command + b"\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data.decode()


@contextlib.asynccontextmanager
async def haproxy(workdir: Path, upstream: int, **options: Any) -> AsyncIterator[Proxy]:
    """Run ``haproxy -f haproxy.cfg -db`` (foreground) in front of trioserve on ``upstream``."""
    with short_unix_path(workdir, "haproxy.sock") as stats_socket:

        def start(port: int) -> list[str]:
            config = haproxy_config(workdir, port, upstream, stats_socket, **options)
            return [find_program("haproxy") or "haproxy", "-f", str(config), "-db"]

        async def started(process: trio.Process) -> bool:
            # HAProxy binds every listener (stats socket included) before serving any, and
            # exits if one fails: a stats socket answering with our PID means the port is ours.
            try:
                info = await haproxy_command(stats_socket, b"show info")
            except OSError:
                return False
            return f"\nPid: {process.pid}\n" in info

        async with run_proxy("haproxy", workdir, start, started) as proxy:
            proxy.stats_socket = stats_socket
            yield proxy


async def haproxy_stats(proxy: Proxy) -> dict[str, str]:
    """The stats row of backend server ``trioserve/app`` (status, check_status, ...)."""
    text = (await haproxy_command(proxy.stats_socket, b"show stat")).lstrip("# ")
    for row in csv.DictReader(text.splitlines()):
        if row["pxname"] == "trioserve" and row["svname"] == "app":
            return dict(row)
    raise AssertionError(f"no trioserve/app row in: {text}")


# ---- nginx ---------------------------------------------------------------------------------------

X_FORWARDED = (
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Forwarded-Proto $scheme;",
    "proxy_set_header X-Forwarded-Host $host;",
    # trioserve prefers Forwarded when both arrive, so a proxy that sets only
    # X-Forwarded-* must drop a client's own Forwarded (an empty value: not sent).
    'proxy_set_header Forwarded "";',
)

# RFC 7239: an IPv6 node must be quoted and bracketed, an IPv4 one may be a bare token.
FORWARDED_MAP = (
    "map $remote_addr $forwarded_for {",
    '    ~:      "\\"[$remote_addr]\\"";',
    "    default $remote_addr;",
    "}",
)
FORWARDED = (
    'proxy_set_header Forwarded "for=$forwarded_for;proto=$scheme;host=\\"$host\\"";',
    'proxy_set_header X-Forwarded-For "";',  # an empty value: nginx does not send the header
)


def nginx_config(
    workdir: Path,
    port: int,
    upstream: str,
    *,
    forwarding: Iterable[str] = X_FORWARDED,
    http_lines: Iterable[str] = (),
    ipv6_port: bool = False,
) -> Path:
    """A minimal nginx.conf: runs in the foreground as the current user with every file it
    writes under ``workdir``; proxies 127.0.0.1:port to ``upstream`` (``HOST:PORT`` or
    ``unix:PATH``) over keep-alive HTTP/1.1, request bodies unbuffered."""
    user = []
    if os.geteuid() == 0:
        # Workers would otherwise switch to "nobody", who cannot enter pytest's tmp_path.
        user = ["user root;"]
    listen = [f"listen 127.0.0.1:{port};"]
    if ipv6_port:
        listen.append(f"listen [::1]:{port};")
    lines = [
        *user,
        "daemon off;",
        "worker_processes 1;",
        f"pid {workdir}/nginx.pid;",
        f"error_log {workdir}/nginx-error.log info;",
        "events { worker_connections 64; }",
        "http {",
        f"    access_log {workdir}/nginx-access.log;",
        f"    client_body_temp_path {workdir}/client_body;",
        f"    proxy_temp_path {workdir}/proxy;",
        f"    fastcgi_temp_path {workdir}/fastcgi;",
        f"    uwsgi_temp_path {workdir}/uwsgi;",
        f"    scgi_temp_path {workdir}/scgi;",
        *(f"    {line}" for line in http_lines),
        "    upstream trioserve {",
        f"        server {upstream};",
        "        keepalive 8;",
        "        keepalive_timeout 4s;  # below trioserve's --keep-alive-timeout (5 s)",
        "    }",
        "    server {",
        *(f"        {line}" for line in listen),
        "        client_max_body_size 100m;",
        "        location / {",
        "            proxy_pass http://trioserve;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        *(f"            {line}" for line in forwarding),
        "            proxy_request_buffering off;",
        "        }",
        "    }",
        "}",
    ]
    path = workdir / "nginx.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def nginx(
    workdir: Path, upstream: str, **options: Any
) -> contextlib.AbstractAsyncContextManager[Proxy]:
    """Run nginx (``daemon off``) in front of trioserve at ``upstream``."""

    def start(port: int) -> list[str]:
        config = nginx_config(workdir, port, upstream, **options)
        error_log = str(workdir / "nginx-error.log")
        executable = find_program("nginx") or "nginx"
        return [executable, "-p", str(workdir), "-c", str(config), "-e", error_log]

    async def started(process: trio.Process) -> bool:
        # nginx writes its pid file only after it has opened its listening sockets.
        try:
            return (workdir / "nginx.pid").read_text().strip() == str(process.pid)
        except FileNotFoundError:
            return False

    return run_proxy("nginx", workdir, start, started)


async def serve_counting_connections(
    app: Any, nursery: trio.Nursery, bind: str, **options: Any
) -> tuple[Server, list[int]]:
    """serve_wsgi on ``bind``; the list's one item counts the connections it accepted."""
    accepted = [0]
    listeners = await open_listeners(parse_bind(bind), backlog=128)
    for listener in listeners:
        real_accept = listener.accept

        async def accept(real_accept: Any = real_accept) -> trio.SocketStream:
            stream: trio.SocketStream = await real_accept()
            accepted[0] += 1
            return stream

        listener.accept = accept  # type: ignore[method-assign]
    server = await serve_wsgi(app, nursery, listeners=listeners, **options)
    return server, accepted


# ---- an HTTP/1.1 client that knows its own address ----------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTP/1.1 over one TCP connection made from ``source`` (h11 does the parsing)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        host, port = stream.socket.getsockname()[:2]
        self.address, self.port = str(host), str(port)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, port: int, source: str = CLIENT, host: str = "127.0.0.1"
    ) -> AsyncIterator[Client]:
        stream = await trio.open_tcp_stream(host, port, local_address=source)
        async with stream:
            yield cls(stream)

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def start(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        await self.send(h11.Request(method=method, target=target, headers=headers))

    async def read_head(self) -> h11.Response:
        event = await self.next_event()
        assert isinstance(event, h11.Response), event
        return event

    async def read_response(self) -> Response:
        head = await self.read_head()
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        headers = {name.decode().lower(): value.decode() for name, value in head.headers}
        return Response(head.status_code, headers, body)

    async def get(
        self,
        target: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        host: str = "app.example.com",
    ) -> Response:
        await self.start("GET", target, [("Host", host), *headers])
        await self.send(h11.EndOfMessage())
        return await self.read_response()


@dataclass
class CurlTransfer:
    body: Any  # the JSON the app answered
    local_ip: str  # curl's own end of the connection
    local_port: str
    http_version: str


async def curl(*args: str) -> list[CurlTransfer]:
    """Run curl from CLIENT; one CurlTransfer per URL (the apps answer JSON on one line)."""
    result = await trio.run_process(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--interface",
            CLIENT,
            "-w",
            "\\n%{local_ip} %{local_port} %{http_version}\\n",
            *args,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    return [
        CurlTransfer(json.loads(body), *summary.split())
        for body, summary in zip(lines[::2], lines[1::2], strict=True)
    ]


# ---- HAProxy: PROXY protocol v2 ------------------------------------------------------------


@needs("haproxy")
@pytest.mark.parametrize(
    ("source", "server_options"),
    [
        (CLIENT, ""),
        # TLVs after the addresses (a CRC32C checksum, the unique id): skipped, not misread.
        (CLIENT, "proxy-v2-options crc32c,unique-id"),
        ("::1", ""),  # PROXY v2 TCP6: an IPv6 client in front of an IPv4 hop
    ],
    ids=["tcp4", "tcp4-tlvs", "tcp6"],
)
async def test_haproxy_tcp_mode_passes_the_client_address(
    source: str, server_options: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The classic NLB-like setup: a layer-4 proxy, PROXY v2 in front of the stream."""
    if source == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        # Trust HAProxy only: by default ::1 would be trusted too, and a client at ::1 would
        # be believed when it sent X-Forwarded-For (its address comes from the PROXY header).
        server = await serve_wsgi(
            echo.app,
            nursery,
            bind="127.0.0.1:0",
            proxy_protocol=True,
            forwarded_allow_ips=["127.0.0.1"],
        )
        backend_lines = (
            ['unique-id-format "%{+X}o\\ %ci:%cp"'] if "unique-id" in server_options else []
        )
        async with haproxy(
            tmp_path,
            server.port,
            mode="tcp",
            server_options=server_options,
            backend_lines=backend_lines,
            ipv6_port=source == "::1",
        ) as proxy:
            host = "::1" if source == "::1" else "127.0.0.1"
            async with Client.connect(proxy.port, source=source, host=host) as client:
                # A client's own X-Forwarded-For is not believed: the client is not a proxy.
                first = (await client.get("/", [("X-Forwarded-For", "6.6.6.6")])).json()
                second = (await client.get("/again")).json()  # keep-alive: same connection
    for seen in (first, second):
        assert seen["REMOTE_ADDR"] == client.address == source
        assert seen["REMOTE_PORT"] == client.port
        assert seen["HTTP_X_FORWARDED_FOR"] is None
        assert seen["wsgi.url_scheme"] == "http"
        assert seen["HTTP_HOST"] == "app.example.com"


@needs("haproxy")
async def test_proxy_protocol_server_refuses_trusted_peers_without_the_header(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Next to a working HAProxy path, a direct request from a trusted address (127.0.0.1)
    is closed unanswered; one from an address outside --forwarded-allow-ips is not a proxy,
    so no header is expected of it and it is served with its own address."""
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0", proxy_protocol=True)
        async with (
            haproxy(tmp_path, server.port, mode="tcp") as proxy,
            Client.connect(proxy.port) as client,
        ):
            assert (await client.get()).json()["REMOTE_ADDR"] == CLIENT
        stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address="127.0.0.1")
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some():
                    data += chunk
        assert data == b""
        async with Client.connect(server.port, source=CLIENT) as direct:
            seen = (await direct.get()).json()
    assert seen["REMOTE_ADDR"] == CLIENT
    assert seen["REMOTE_PORT"] == direct.port
    assert len(echo.seen) == 2  # the refused request never reached the app


@needs("haproxy", "curl")
@pytest.mark.parametrize(
    "h2c", ["--http2-prior-knowledge", "--http2"], ids=["prior-knowledge", "upgrade"]
)
async def test_haproxy_tcp_mode_h2c(h2c: str, nursery: trio.Nursery, tmp_path: Path) -> None:
    """Cleartext HTTP/2 through a layer-4 HAProxy: prior knowledge, and ``Upgrade: h2c``
    (whose first request travels as HTTP/1.1, the second as an HTTP/2 stream)."""
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0", proxy_protocol=True)
        async with haproxy(tmp_path, server.port, mode="tcp") as proxy:
            urls = [f"http://127.0.0.1:{proxy.port}/first"]
            if h2c == "--http2":
                # (Two URLs with prior knowledge would trip curl 7.88's own connection-reuse
                # bug, curl/curl#10634, fixed in curl 8.0: Debian 12 ships 7.88.)
                urls.append(f"http://127.0.0.1:{proxy.port}/second")
            transfers = await curl(h2c, *urls)
    assert {transfer.local_port for transfer in transfers} == {transfers[0].local_port}
    for transfer in transfers:
        assert transfer.http_version == "2"
        assert transfer.local_ip == CLIENT
        assert transfer.body["REMOTE_ADDR"] == CLIENT
        assert transfer.body["REMOTE_PORT"] == transfer.local_port
    assert transfers[-1].body["SERVER_PROTOCOL"] == "HTTP/2"


@needs("haproxy", "curl")
@pytest.mark.parametrize(("flag", "version"), [("--http2", "2"), ("--http1.1", "1.1")])
async def test_haproxy_tls_passthrough(
    flag: str,
    version: str,
    nursery: trio.Nursery,
    tmp_path: Path,
    tls_cert_files: tuple[str, str, str],
) -> None:
    """HAProxy forwards the TLS bytes untouched after the PROXY header; trioserve terminates
    TLS (ALPN picks h2) and still sees the client's address."""
    certfile, keyfile, cafile = tls_cert_files
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(
            echo.app,
            nursery,
            bind="127.0.0.1:0",
            proxy_protocol=True,
            certfile=certfile,
            keyfile=keyfile,
        )
        async with haproxy(tmp_path, server.port, mode="tcp") as proxy:
            url = f"https://127.0.0.1:{proxy.port}"
            transfers = await curl(flag, "--cacert", cafile, f"{url}/first", f"{url}/second")
    assert transfers[0].local_port == transfers[1].local_port  # one connection
    for transfer in transfers:
        assert transfer.http_version == version
        assert transfer.local_ip == CLIENT
        seen = transfer.body
        assert seen["SERVER_PROTOCOL"] == f"HTTP/{version}"
        assert seen["wsgi.url_scheme"] == "https"
        assert (seen["REMOTE_ADDR"], seen["REMOTE_PORT"]) == (CLIENT, transfer.local_port)


@needs("haproxy")
@pytest.mark.parametrize("backend_proto", ["h1", "h2"])
async def test_haproxy_http_mode(backend_proto: str, nursery: trio.Nursery, tmp_path: Path) -> None:
    """Layer-7 HAProxy with ``send-proxy-v2``, speaking HTTP/1.1 or (``proto h2``) HTTP/2 to
    trioserve. A backend connection that carries a PROXY header belongs to one client
    connection, so two clients in a row each get their own address."""
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0", proxy_protocol=True)
        options = "proto h2" if backend_proto == "h2" else ""
        async with haproxy(tmp_path, server.port, mode="http", server_options=options) as proxy:
            results = []
            for source in (CLIENT, OTHER_CLIENT, CLIENT):
                async with Client.connect(proxy.port, source=source) as client:
                    first = (await client.get("/", [("X-Forwarded-For", "6.6.6.6")])).json()
                    second = (await client.get("/again")).json()
                results.append((client, first, second))
    for client, first, second in results:
        for seen in (first, second):
            assert (seen["REMOTE_ADDR"], seen["REMOTE_PORT"]) == (client.address, client.port)
            assert seen["HTTP_X_FORWARDED_FOR"] is None
            assert seen["HTTP_HOST"] == "app.example.com"
            assert seen["SERVER_PROTOCOL"] == ("HTTP/2" if backend_proto == "h2" else "HTTP/1.1")


@needs("haproxy")
@pytest.mark.parametrize("check", ["httpchk", "tcp"])
async def test_haproxy_health_checks_send_local(
    check: str, nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Health checks of a ``send-proxy-v2`` server start with a PROXY v2 LOCAL header, which
    trioserve accepts (the request keeps the real peer, HAProxy's 127.0.0.1); the server stays
    UP, client traffic is unaffected, and trioserve logs no invalid PROXY header."""
    caplog.set_level(logging.DEBUG, logger="trioserve")
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0", proxy_protocol=True)
        mode, backend_lines = (
            ("http", ["option httpchk GET /health"]) if check == "httpchk" else ("tcp", [])
        )
        async with haproxy(
            tmp_path,
            server.port,
            mode=mode,
            server_options="check inter 100ms fall 2 rise 1",
            # Without "timeout check", HAProxy gives a check's answer only "inter" (100 ms)
            # to arrive, and one slow answer on a loaded CI machine counts as a failed check.
            # A check that never gets an answer still fails the test: no later check runs.
            backend_lines=[*backend_lines, "timeout check 10s"],
        ) as proxy:
            expected = "L7OK" if check == "httpchk" else "L4OK"
            # Wait for three completed checks (the first may have run before the app existed:
            # trioserve listened first, so it cannot have failed, but wait for fresh ones).
            while True:
                stats = await haproxy_stats(proxy)
                checks = sum(1 for seen in echo.seen if seen["PATH_INFO"] == "/health")
                if stats["check_status"] == expected and (check == "tcp" or checks >= 3):
                    break
                # Polling an external process (HAProxy's stats socket) for a condition,
                # bounded by fail_after(QUICK): a polling interval, not a timing assumption.
                await trio.sleep(0.01)
            async with Client.connect(proxy.port) as client:
                seen = (await client.get()).json()
            stats = await haproxy_stats(proxy)
    check_fields = {key: stats.get(key) for key in ("status", "chkfail", "check_status")}
    check_fields.update((key, stats.get(key)) for key in ("check_duration", "last_chk"))
    assert stats["status"] == "UP", check_fields
    assert stats["chkfail"] == "0", check_fields
    assert (seen["REMOTE_ADDR"], seen["REMOTE_PORT"]) == (client.address, client.port)
    for health in (seen for seen in echo.seen if seen["PATH_INFO"] == "/health"):
        assert health["REMOTE_ADDR"] == "127.0.0.1"  # LOCAL: the connection's own peer
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "PROXY" in message], messages
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# ---- nginx: X-Forwarded-* and Forwarded -----------------------------------------------------


@needs("nginx")
@pytest.mark.parametrize("upstream", ["tcp", "unix"])
@pytest.mark.parametrize("proto", ["$scheme", "https"], ids=["proto-scheme", "proto-https"])
async def test_nginx_x_forwarded(
    upstream: str, proto: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """nginx adds X-Forwarded-For/-Proto/-Host; trioserve (trusting 127.0.0.1 and unix peers
    by default) applies them. A client's own X-Forwarded-For is appended to by nginx, and the
    spoofed part left of the real client is ignored; -Proto and -Host are overwritten, and a
    client's own Forwarded is dropped by the documented config. Both clients' requests travel
    over one keep-alive upstream connection."""
    echo = EnvironEcho()
    forwarding = [line for line in X_FORWARDED if "Proto" not in line]
    forwarding.append(f"proxy_set_header X-Forwarded-Proto {proto};")
    with trio.fail_after(QUICK), short_unix_path(tmp_path) as path:
        bind = f"unix:{path}" if upstream == "unix" else "127.0.0.1:0"
        server, accepted = await serve_counting_connections(echo.app, nursery, bind)
        target = f"unix:{path}" if upstream == "unix" else f"127.0.0.1:{server.port}"
        async with nginx(tmp_path, target, forwarding=forwarding) as proxy:
            spoof = [
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Proto", "gopher"),
                ("X-Forwarded-Host", "evil.example"),
                ("Forwarded", "for=6.6.6.7;proto=gopher;host=evil.example"),
            ]
            async with Client.connect(proxy.port, source=CLIENT) as client:
                spoofed = (await client.get("/", spoof)).json()
                plain = (await client.get("/again")).json()
            # Another client, over the same keep-alive upstream connection.
            async with Client.connect(proxy.port, source=OTHER_CLIENT) as other:
                another = (await other.get("/other", host="www.example.com")).json()
    assert accepted == [1], "nginx did not keep its upstream connection alive"
    scheme = "https" if proto == "https" else "http"
    for seen in (spoofed, plain, another):
        assert seen["REMOTE_PORT"] is None  # X-Forwarded-For carries no port
        assert seen["wsgi.url_scheme"] == scheme
        assert seen["SERVER_PORT"] == ("443" if scheme == "https" else "80")
    assert spoofed["REMOTE_ADDR"] == plain["REMOTE_ADDR"] == CLIENT
    assert another["REMOTE_ADDR"] == OTHER_CLIENT
    assert spoofed["HTTP_X_FORWARDED_FOR"] == f"6.6.6.6, {CLIENT}"  # appended to, not replaced
    assert plain["HTTP_X_FORWARDED_FOR"] == CLIENT
    assert spoofed["HTTP_FORWARDED"] is None
    assert spoofed["HTTP_HOST"] == spoofed["SERVER_NAME"] == "app.example.com"
    assert another["HTTP_HOST"] == another["SERVER_NAME"] == "www.example.com"


@needs("nginx")
@pytest.mark.parametrize("upstream", ["tcp", "unix"])
async def test_nginx_outside_forwarded_allow_ips_is_not_believed(
    upstream: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With --forwarded-allow-ips not naming nginx, its forwarding headers are removed and the
    app sees the connection's real peer: nginx's 127.0.0.1, or no address over a unix socket."""
    echo = EnvironEcho()
    with trio.fail_after(QUICK), short_unix_path(tmp_path) as path:
        bind = f"unix:{path}" if upstream == "unix" else "127.0.0.1:0"
        server = await serve_wsgi(echo.app, nursery, bind=bind, forwarded_allow_ips=["10.0.0.0/8"])
        target = f"unix:{path}" if upstream == "unix" else f"127.0.0.1:{server.port}"
        async with nginx(tmp_path, target) as proxy, Client.connect(proxy.port) as client:
            seen = (await client.get("/", [("X-Forwarded-For", "6.6.6.6")])).json()
    if upstream == "tcp":
        assert seen["REMOTE_ADDR"] == "127.0.0.1"
        assert seen["REMOTE_PORT"] not in (None, client.port)
    else:
        assert seen["REMOTE_ADDR"] is None
    assert seen["wsgi.url_scheme"] == "http"
    assert seen["HTTP_HOST"] == "trioserve"  # what nginx sent upstream: the upstream's name
    for key in ECHOED:
        if "FORWARDED" in key:
            assert seen[key] is None, key


@needs("nginx")
async def test_nginx_rfc7239_forwarded(nursery: trio.Nursery, tmp_path: Path) -> None:
    """nginx builds ``Forwarded`` with a map that quotes IPv6 nodes, and overwrites whatever
    the client sent; X-Forwarded-For is cleared (set to "" so nginx drops it)."""
    ipv6 = has_ipv6_loopback()
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0")
        async with nginx(
            tmp_path,
            f"127.0.0.1:{server.port}",
            forwarding=FORWARDED,
            http_lines=FORWARDED_MAP,
            ipv6_port=ipv6,
        ) as proxy:
            spoof = [("Forwarded", "for=6.6.6.6;proto=https"), ("X-Forwarded-For", "7.7.7.7")]
            async with Client.connect(proxy.port) as client:
                v4 = (await client.get("/", spoof)).json()
            v6 = None
            if ipv6:
                async with Client.connect(proxy.port, source="::1", host="::1") as client6:
                    v6 = (await client6.get("/", spoof)).json()
    assert v4["HTTP_FORWARDED"] == f'for={CLIENT};proto=http;host="app.example.com"'
    assert v4["HTTP_X_FORWARDED_FOR"] is None
    assert v4["REMOTE_ADDR"] == CLIENT
    assert v4["wsgi.url_scheme"] == "http"
    assert v4["HTTP_HOST"] == "app.example.com"
    if v6 is not None:
        assert v6["HTTP_FORWARDED"] == 'for="[::1]";proto=http;host="app.example.com"'
        assert v6["REMOTE_ADDR"] == "::1"


@needs("nginx")
async def test_nginx_appended_forwarded_cannot_be_broken_by_the_client(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An nginx that *appends* its element to the client's Forwarded header (and leaves
    X-Forwarded-For alone, since it does not use it). A client sends a Forwarded header
    that makes the combined value unparsable, plus an X-Forwarded-For of its choosing.
    Whatever trioserve makes of the broken header, it must not believe the client."""
    append = (
        "map $http_forwarded $proxy_add_forwarded {",
        '    ""      "for=$remote_addr;proto=$scheme";',
        '    default "$http_forwarded, for=$remote_addr;proto=$scheme";',
        "}",
    )
    echo = EnvironEcho()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(echo.app, nursery, bind="127.0.0.1:0")
        async with (
            nginx(
                tmp_path,
                f"127.0.0.1:{server.port}",
                forwarding=["proxy_set_header Forwarded $proxy_add_forwarded;"],
                http_lines=append,
            ) as proxy,
            Client.connect(proxy.port) as client,
        ):
            honest = (await client.get("/", [("Forwarded", "for=6.6.6.6")])).json()
            broken = (
                await client.get("/", [("Forwarded", "oops"), ("X-Forwarded-For", "6.6.6.6")])
            ).json()
    # Appending works as designed: the element nginx added wins over the client's.
    assert honest["HTTP_FORWARDED"] == f"for=6.6.6.6, for={CLIENT};proto=http"
    assert honest["REMOTE_ADDR"] == CLIENT
    assert broken["HTTP_FORWARDED"] == f"oops, for={CLIENT};proto=http"
    assert broken["REMOTE_ADDR"] in (CLIENT, "127.0.0.1")  # today: "6.6.6.6"


@needs("nginx")
async def test_nginx_streams_the_response(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A chunk the app yields reaches the client while the app is still running (the app
    waits for the client to have it before it yields the next). nginx's default
    ``proxy_buffering on`` passes chunks on as they arrive; it only lets nginx absorb a
    slow client (``proxy_buffering off`` would make the app wait for that client instead)."""
    app = StreamingApp()
    with trio.fail_after(QUICK):
        server = await serve_wsgi(app.app, nursery, bind="127.0.0.1:0")
        async with (
            nginx(tmp_path, f"127.0.0.1:{server.port}") as proxy,
            Client.connect(proxy.port) as client,
        ):
            await client.start("GET", "/stream", [("Host", "app.example.com")])
            await client.send(h11.EndOfMessage())
            try:
                head = await client.read_head()
                assert head.status_code == 200
                received = b""
                while received != app.first:
                    event = await client.next_event()
                    assert isinstance(event, h11.Data), event
                    received += event.data
            finally:
                app.release.set()  # never leave the app thread waiting
            while not isinstance(event := await client.next_event(), h11.EndOfMessage):
                received += event.data
            again = await client.get("/stream-done")  # the connection is still usable
            assert again.status == 200
    assert received == app.first + app.second


@needs("nginx")
async def test_nginx_streams_a_chunked_upload(nursery: trio.Nursery, tmp_path: Path) -> None:
    """With ``proxy_request_buffering off`` and HTTP/1.1 upstream, a chunked upload reaches the
    app as it arrives: the app has read the first part before the client sends the rest."""
    first, rest = os.urandom(100_000), os.urandom(300_000)
    app = StreamingApp(first_size=len(first))
    with trio.fail_after(QUICK):
        server = await serve_wsgi(app.app, nursery, bind="127.0.0.1:0")
        async with (
            nginx(tmp_path, f"127.0.0.1:{server.port}") as proxy,
            Client.connect(proxy.port) as client,
        ):
            headers = [("Host", "app.example.com"), ("Transfer-Encoding", "chunked")]
            await client.start("POST", "/upload", headers)
            await client.send(h11.Data(data=first))
            got_first = await trio.to_thread.run_sync(
                app.got_first.wait, QUICK, abandon_on_cancel=True
            )
            assert got_first, "the app never got the first part"
            await client.send(h11.Data(data=rest[:150_000]))
            await client.send(h11.Data(data=rest[150_000:]))
            await client.send(h11.EndOfMessage())
            response = await client.read_response()
    assert response.status == 200
    answer = response.json()
    assert answer["total"] == len(first) + len(rest)
    assert answer["sha256"] == hashlib.sha256(first + rest).hexdigest()
    assert answer["transfer_encoding"] == "chunked"  # nginx passed the chunked body on
    assert answer["content_length"] is None
