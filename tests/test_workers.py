"""``--workers N``: the supervisor and its worker processes, as real processes on loopback.

Each test starts ``python -m trioserve ... -w N`` and reads its stderr (parent and
workers share it) with :class:`tests.test_cli.RunningCLI`. The parent logs
``Listening on ADDRESS`` once it has bound (workers inherit those sockets, so
port 0 means one port for all), ``Started worker PID``, ``Worker PID is
serving`` and each exit. Most tests serve ``pidapp`` (written into a temporary
directory): it answers with the pid of the worker that served the request, so a
test sees which worker answered; ``?sleep=S`` makes it slow, ``?gate=NAME``
holds it until the test releases it (:func:`gate`), ``?id=X`` makes it log
``pidapp: in flight X``, and it raises on import while a file ``BROKEN`` sits next
to it.

Every step has a time limit, and everything a test started is stopped in a
``finally``: the supervisor by signals (then SIGKILL), its workers by pid if
they outlived it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.test_cli import (
    MODULE,
    ROOT,
    TIMEOUT,
    RunningCLI,
    assert_one_line_error,
    connect,
    run_cli,
    serving,
)
from trioserve import workers
from trioserve.cli import build_parser, config_from_args

TEST_TIMEOUT = 45  # seconds: the limit for any one test

PIDAPP = '''\
"""Answers with the worker's pid (tests/test_workers.py)."""
import os
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

HERE = os.path.dirname(os.path.abspath(__file__))

if os.path.exists(os.path.join(HERE, "BROKEN")):
    raise RuntimeError("pidapp: this deploy is broken")


def say(line):
    os.write(2, f"pidapp: {line}\\n".encode())  # one write: lines of two workers never mix


say(f"imported by {os.getpid()}")


def _app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    if "id" in query:
        say(f"in flight {query['id'][0]}")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    received = b""
    while len(received) < length:
        chunk = environ["wsgi.input"].read(length - len(received))
        if not chunk:
            break
        received += chunk
    if "gate" in query:  # a FIFO the test holds open: wait for its byte
        with open(os.path.join(HERE, query["gate"][0]), "rb", buffering=0) as gate:
            gate.read(1)
    time.sleep(float(query.get("sleep", ["0"])[0]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = validator(_app)
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "pidapp.py").write_text(PIDAPP)
    return tmp_path


@contextlib.contextmanager
def gate(app_dir: Path, name: str) -> Iterator[Callable[[int], object]]:
    """A FIFO ``name`` next to pidapp, on which ``?gate=NAME`` requests wait; yields
    ``release(n)``, which lets n of them go.

    The test holds the FIFO open for reading and writing (Linux: that never blocks), so
    the app's open returns at once and its one-byte read waits until released; a request
    is held for as long as the test needs, not for a guessed time."""
    path = app_dir / name
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        yield lambda n: os.write(fd, b"x" * n)
    finally:
        os.close(fd)  # a request still waiting reads the end of the FIFO and goes on


# ---------------------------------------------------------------------------
# Running a supervisor
# ---------------------------------------------------------------------------


def matches(cli: RunningCLI, pattern: str) -> list[re.Match[str]]:
    regex = re.compile(pattern)
    return [m for m in map(regex.search, cli.stderr) if m]


def started_pids(cli: RunningCLI) -> list[int]:
    return [int(m.group(1)) for m in matches(cli, r"Started worker (\d+)")]


def ready_pids(cli: RunningCLI) -> list[int]:
    return [int(m.group(1)) for m in matches(cli, r"Worker (\d+) is serving")]


def exited_pids(cli: RunningCLI) -> set[int]:
    return {int(m.group(1)) for m in matches(cli, r"Worker (\d+) (?:exited|died|failed)")}


async def wait_ready(cli: RunningCLI, count: int) -> list[int]:
    """Wait until ``count`` workers in all have reported ready; their pids, in order."""
    await cli.wait_for_line(r"Worker \d+ is serving", nth=count)
    return ready_pids(cli)


def _is_our_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"trioserve" in cmdline and b"--workers=1" in cmdline


async def _stop(cli: RunningCLI) -> None:
    """Stop the supervisor and every worker it started, whatever state they are in."""
    process = cli.process
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(0.5):
            await process.wait()
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)  # the second one: workers stop now, then SIGKILL
        with trio.move_on_after(workers.IMMEDIATE_GRACE + 5):
            await process.wait()
    if process.returncode is None:  # pragma: no cover - the supervisor is stuck
        process.kill()
        await process.wait()
    # Workers normally end with the supervisor; any left (the supervisor was
    # killed) stop when they see it gone. Kill what is still there by pid.
    for pid in set(started_pids(cli)) - exited_pids(cli):
        with trio.move_on_after(3):
            while _is_our_worker(pid):  # noqa: ASYNC110 - another process's state: poll it
                await trio.sleep(0.01)  # a polling interval, bounded by move_on_after(3)
        if _is_our_worker(pid):  # pragma: no cover
            os.kill(pid, signal.SIGKILL)


# Supervisors started by supervising() and not yet cleaned up. If the test run itself
# is cut short (pytest-timeout interrupting a hung test can end the session before
# trio's cleanup runs), what is left would outlive the run: the atexit hook kills it.
_LEFT_RUNNING: set[RunningCLI] = set()


@atexit.register
def _kill_left_running() -> None:  # pragma: no cover - only after an aborted run
    for cli in _LEFT_RUNNING:
        for pid in {cli.process.pid, *started_pids(cli)}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


async def _stop_and_wait_for_workers(cli: RunningCLI) -> None:
    await _stop(cli)
    # The workers hold stderr too: its end means they are all gone.
    with trio.move_on_after(TIMEOUT):
        await cli._eof["stderr"].wait()


@asynccontextmanager
async def supervising(
    *args: str, cwd: Path, listeners: int = 1, ready: int = 2
) -> AsyncIterator[RunningCLI]:
    """Start ``python -m trioserve ARGS``, wait for its addresses and ``ready`` workers."""
    started: RunningCLI | None = None
    try:
        async with serving(
            *args, cwd=cwd, listeners=listeners, stop=_stop_and_wait_for_workers
        ) as cli:
            started = cli
            _LEFT_RUNNING.add(cli)
            if ready:
                await wait_ready(cli, ready)
            yield cli
    finally:
        if started is not None and started.process.returncode is not None:
            _LEFT_RUNNING.discard(started)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One GET on a fresh connection, classified."""

    at: float  # trio.current_time() when it started
    status: int = 0
    body: bytes = b""
    error: str = ""  # empty: a complete response arrived
    received: int = 0  # response bytes that arrived before the error

    @property
    def pid(self) -> int:
        assert not self.error, self
        assert self.status == 200, self
        return int(self.body)


async def fetch(address: str, target: str = "/") -> Result:
    """GET ``target`` with ``Connection: close`` and read until the server closes."""
    result = Result(at=trio.current_time())
    data = b""
    try:
        with trio.fail_after(TIMEOUT):
            stream = await connect(address)
            async with stream:
                request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                await stream.send_all(request.encode())
                while chunk := await stream.receive_some(65536):
                    data += chunk
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        result.error, result.received = repr(exc), len(data)
        return result
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = dict(field.lower().split(": ", 1) for field in fields if ": " in field)
    length = headers.get("content-length")
    if not status_line.startswith("HTTP/1.1 ") or length is None or len(body) != int(length):
        result.error, result.received = f"incomplete response: {data!r}", len(data)
        return result
    result.status, result.body = int(status_line.split()[1]), body
    return result


@dataclasses.dataclass
class Load:
    """Client tasks looping GETs on fresh connections until ``stop`` is set."""

    address: str
    target: str = "/"
    results: list[Result] = dataclasses.field(default_factory=list)
    stop: trio.Event = dataclasses.field(default_factory=trio.Event)
    _changed: trio.Event = dataclasses.field(default_factory=trio.Event)

    async def client(self) -> None:
        while not self.stop.is_set():
            result = await fetch(self.address, self.target)
            self.results.append(result)
            self._changed.set()
            self._changed = trio.Event()
            if result.error:
                # Do not spin on a refused connection (another process, restarting): a
                # polling interval until the next fetch, not a timing assumption.
                await trio.sleep(0.01)

    def ok(self, since: float = -1.0) -> list[Result]:
        return [r for r in self.results if not r.error and r.status == 200 and r.at >= since]

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.error or r.status != 200]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not condition():
                await self._changed.wait()

    async def wait_ok(self, count: int, since: float = -1.0) -> None:
        await self.wait_until(lambda: len(self.ok(since)) >= count)


@asynccontextmanager
async def load(address: str, target: str = "/", clients: int = 4) -> AsyncIterator[Load]:
    running = Load(address, target)
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(running.client)
        try:
            yield running
        finally:
            running.stop.set()


async def pids_answering(address: str, expected: set[int], target: str = "/") -> set[int]:
    """Send requests (4 at a time) until every pid in ``expected`` has answered one."""
    seen: set[int] = set()
    with trio.fail_after(TIMEOUT):
        while not expected <= seen:
            results: list[Result] = []

            async def one() -> None:
                results.append(await fetch(address, target))  # noqa: B023

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            seen.update(result.pid for result in results)
    return seen


# ---------------------------------------------------------------------------
# The worker command line
# ---------------------------------------------------------------------------


def test_worker_command_keeps_every_option_but_bind_and_workers(tmp_path: Path) -> None:
    config_file = tmp_path / "trioserve.toml"
    config_file.write_text('server_header = "from-file"\nthreads = 3\nmax_requests = 9\n')
    argv = [
        "pidapp:app",
        "-w",
        "3",
        "-b",
        "127.0.0.1:0",
        "--bind=unix:/tmp/x.sock",
        f"--config={config_file}",
        "--threads",
        "7",
        "--no-proxy-protocol",
        "--factory",
        "--forwarded-allow-ips",
        "10.0.0.0/8",
        "--forwarded-allow-ips=unix",
        "--access-log",
        "-",
        "--graceful-timeout",
        "2.5",
        "--server-header=-dash-",
        "--unix-socket-mode",
        "600",
        "--pid",
        str(tmp_path / "trioserve.pid"),
        "--umask",
        "027",
    ]
    parent = config_from_args(build_parser().parse_args(argv))
    command = workers.worker_command(parent, "pidapp:app", ["fd://5", "fd://6"])
    assert command[:3] == list(MODULE)
    worker_args = build_parser().parse_args(command[3:])
    worker = config_from_args(worker_args)
    assert worker_args.app == "pidapp:app"
    assert worker_args.config is None  # the supervisor read the file; its values are flags
    assert worker.bind == ("fd://5", "fd://6")
    assert worker.workers == 1
    assert parent.workers == 3
    # What only the supervisor does (the pid file, the umask) is not repeated by workers.
    assert (worker.pid, worker.umask) == (None, None)
    assert worker == parent.replace(bind=("fd://5", "fd://6"), workers=1, pid=None, umask=None)
    assert worker.threads == 7  # the flag, over the file
    assert worker.max_requests == 9  # from the file
    assert worker.server_header == "-dash-"


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


async def test_two_workers_share_tcp_and_unix_sockets_and_only_workers_import_the_app(
    app_dir: Path,
) -> None:
    path = app_dir / "w.sock"
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising(
            "pidapp:app", "-w", "2", "-b", "127.0.0.1:0", "-b", f"unix:{path}",
            cwd=app_dir, listeners=2,
        ) as cli:  # fmt: skip
            tcp, unix = cli.addresses
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", tcp)
            assert not tcp.endswith(":0")
            assert unix == f"unix:{path}"
            pids = set(started_pids(cli))
            assert len(pids) == 2
            assert set(ready_pids(cli)) == pids
            assert cli.process.pid not in pids
            for address in (tcp, unix):
                assert await pids_answering(address, pids) == pids, address
            importers = {int(m.group(1)) for m in matches(cli, r"pidapp: imported by (\d+)")}
            assert importers == pids  # never the supervisor
            cli.send_signal(signal.SIGTERM)
            assert await cli.wait_exit() == 0
            assert exited_pids(cli) == pids
            assert "Traceback" not in "\n".join(cli.stderr)


async def test_killed_worker_is_replaced_while_requests_keep_succeeding(app_dir: Path) -> None:
    clients = 4
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "-w", "2", "-b", "127.0.0.1:0", cwd=app_dir) as cli:
            victim, survivor = ready_pids(cli)
            async with load(cli.url, "/?sleep=0.01", clients=clients) as running:
                await running.wait_ok(20)
                killed_at = trio.current_time()
                os.kill(victim, signal.SIGKILL)
                await cli.wait_for_line(
                    rf"Worker {victim} died \(killed by SIGKILL\) after [\d.]+s:"
                    r" starting a new one in 0\.1s"
                )
                (replacement,) = set(await wait_ready(cli, 3)) - {victim, survivor}
                replaced_at = trio.current_time()
                await running.wait_until(
                    lambda: replacement in {r.pid for r in running.ok(replaced_at)}
                )
                await running.wait_ok(20, since=replaced_at)
            failures = running.failures()
            # Only requests the killed worker had already accepted can fail: at most
            # one per client, all started before the replacement was serving.
            assert len(failures) <= clients, failures
            assert all(killed_at - 1 <= f.at < replaced_at for f in failures), failures
            assert victim not in {r.pid for r in running.ok(replaced_at)}


@pytest.mark.parametrize(
    "everyone",
    [
        pytest.param(False, id="to-the-supervisor"),
        # systemd's default KillMode=control-group: every process of the service gets
        # SIGTERM at once. Each worker then has a SIGTERM of its own plus the
        # supervisor's request to stop: still one graceful stop, not two signals.
        pytest.param(True, id="to-every-process"),
    ],
)
async def test_sigterm_lets_a_slow_request_finish_and_exits_0(
    app_dir: Path, everyone: bool
) -> None:
    graceful_timeout = 10
    with trio.fail_after(TEST_TIMEOUT), gate(app_dir, "slow-gate") as release:
        async with supervising(
            "pidapp:app", "-w", "2", "-b", "127.0.0.1:0",
            "--graceful-timeout", str(graceful_timeout), cwd=app_dir,
        ) as cli:  # fmt: skip
            async with trio.open_nursery() as nursery:
                results: list[Result] = []

                async def slow() -> None:
                    results.append(await fetch(cli.url, "/?gate=slow-gate&id=slow"))

                nursery.start_soon(slow)
                await cli.wait_for_line("pidapp: in flight slow")
                signalled_at = trio.current_time()
                cli.send_signal(signal.SIGTERM)
                if everyone:
                    for pid in ready_pids(cli):
                        os.kill(pid, signal.SIGTERM)
                await cli.wait_for_line("Received SIGTERM: stopping the workers gracefully")
                if not everyone:
                    await cli.wait_for_line("Supervisor: stop gracefully", nth=2)
                # (With a SIGTERM of their own as well, the order in which each worker
                # hears the two is up to the kernel; the refused connect below is the
                # sign that every process has let go of the socket.)
                # Both workers and the supervisor have let go of the socket: refused.
                with trio.fail_after(TIMEOUT):
                    while True:
                        try:
                            stream = await connect(cli.url)
                        except OSError:
                            break
                        await stream.aclose()
                        # Polling the other processes' sockets, bounded by TIMEOUT: a
                        # polling interval, not a timing assumption.
                        await trio.sleep(0.01)
                # The request has been in flight all along: let it finish now.
                release(1)
            assert await cli.wait_exit(timeout=graceful_timeout) == 0
            assert trio.current_time() - signalled_at < graceful_timeout
            (result,) = results
            assert result.status == 200, result
            assert "timed out" not in "\n".join(cli.stderr)
            assert not matches(cli, "Supervisor: stop now|Received SIGTERM again")


async def test_sigterm_drains_every_in_flight_request_under_load(app_dir: Path) -> None:
    clients = 6
    with trio.fail_after(TEST_TIMEOUT), gate(app_dir, "drain-gate") as release:
        # --max-connections 3: each worker takes three of the six, so both drain.
        async with supervising(
            "pidapp:app", "-w", "2", "-b", "127.0.0.1:0", "--max-connections", "3",
            cwd=app_dir,
        ) as cli:  # fmt: skip
            results: list[Result] = []

            async def client(n: int) -> None:
                results.append(await fetch(cli.url, f"/?gate=drain-gate&id=client{n}"))

            async with trio.open_nursery() as nursery:
                for n in range(clients):
                    nursery.start_soon(client, n)
                for n in range(clients):
                    await cli.wait_for_line(f"pidapp: in flight client{n}$")
                cli.send_signal(signal.SIGTERM)
                # Both workers are stopping while every request is still held: release them.
                await cli.wait_for_line("Supervisor: stop gracefully", nth=2)
                release(clients)
            assert await cli.wait_exit() == 0
    assert len(results) == clients
    assert [r.error for r in results if r.error] == []
    assert {r.status for r in results} == {200}
    assert len({r.pid for r in results}) == 2  # both workers drained


async def test_second_sigterm_stops_at_once(app_dir: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising(
            "pidapp:app", "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "600",
            cwd=app_dir,
        ) as cli:  # fmt: skip
            stream = await connect(cli.url)
            async with stream:
                # A body that never completes: the request stays in flight for good.
                await stream.send_all(
                    b"POST /?id=stuck HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n123"
                )
                await cli.wait_for_line("pidapp: in flight stuck")
                cli.send_signal(signal.SIGTERM)
                await cli.wait_for_line("Supervisor: stop gracefully", nth=2)
                cli.send_signal(signal.SIGTERM)
                await cli.wait_for_line("Received SIGTERM again: stopping the workers now")
                # "At once": well within the 600 s graceful timeout, without SIGKILL.
                assert await cli.wait_exit(timeout=workers.IMMEDIATE_GRACE) == 0
                assert not matches(cli, "did not stop in time")
                # The request never got a response: its connection just went away.
                try:
                    data = await stream.receive_some()
                except trio.BrokenResourceError:
                    data = b""
                assert data == b""


async def test_sighup_replaces_workers_without_failing_a_request(app_dir: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "-w", "2", "-b", "127.0.0.1:0", cwd=app_dir) as cli:
            old = set(ready_pids(cli))
            async with load(cli.url, "/?sleep=0.02", clients=4) as running:
                await running.wait_ok(20)
                cli.send_signal(signal.SIGHUP)
                await cli.wait_for_line("Received SIGHUP: starting 2 new workers")
                new = set(await wait_ready(cli, 4)) - old
                assert len(new) == 2
                await cli.wait_for_line(r"New workers are ready: stopping 2 old worker\(s\)")
                for pid in old:
                    await cli.wait_for_line(rf"Worker {pid} exited \(exit status 0\)")
                swapped_at = trio.current_time()
                await running.wait_ok(20, since=swapped_at)
            assert running.failures() == []
            assert {r.pid for r in running.ok(swapped_at)} <= new
            assert len(running.ok()) >= 40
            # The new workers imported the app themselves.
            importers = {int(m.group(1)) for m in matches(cli, r"pidapp: imported by (\d+)")}
            assert importers == old | new


async def test_max_requests_recycles_workers_and_no_request_fails(app_dir: Path) -> None:
    limit = 5
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising(
            "pidapp:app", "-w", "2", "-b", "127.0.0.1:0",
            "--max-requests", str(limit), "--max-requests-jitter", "0", cwd=app_dir,
        ) as cli:  # fmt: skip
            results = [await fetch(cli.url) for _ in range(25)]
            assert [r.error for r in results if r.error] == []
            served = collections.Counter(r.pid for r in results)
            # 25 requests, at most 5 (see below) each: at least 4 workers took part.
            assert len(served) >= 4, served
            # A worker stops accepting once it has served 5; one more connection may
            # slip in before its listener closes (it is then served, not dropped).
            assert max(served.values()) <= limit + 1, served
            recycled = matches(cli, r"Worker (\d+) exited \(exit status 0\) after [\d.]+s \(max-")
            assert len(recycled) >= 2
            assert len(matches(cli, rf"Served max-requests \({limit}\)")) >= 2
            assert not matches(cli, r"ERROR")


async def test_supervisor_reports_a_bind_error_once_before_starting_workers() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("examples.hello:app", "-w", "2", "-b", f"127.0.0.1:{port}")
    line = assert_one_line_error(result, 1)
    assert "address already in use" in line


async def test_supervisor_reports_unreadable_tls_files_once(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    result = await run_cli(
        "examples.hello:app", "-w", "2", "-b", "127.0.0.1:0",
        "--certfile", missing, "--keyfile", missing,
    )  # fmt: skip
    line = assert_one_line_error(result, 1)
    assert f"cannot read TLS file {missing}" in line


RETRY = r"Worker \d+ failed to boot \(exit status 1\) after [\d.]+s: .* in ([\d.]+)s"


@pytest.mark.parametrize(
    ("module", "status", "expected"),
    [
        ("no_such_module_xyz", 2, "trioserve: error: cannot import module 'no_such_module_xyz'"),
        ("boom_app", 1, "RuntimeError: boom while importing"),
    ],
)
async def test_workers_that_cannot_boot_at_startup_stop_the_supervisor(
    tmp_path: Path, module: str, status: int, expected: str
) -> None:
    (tmp_path / "boom_app.py").write_text('raise RuntimeError("boom while importing")\n')
    result = await run_cli(f"{module}:app", "-w", "2", "-b", "127.0.0.1:0", cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == status, stderr
    assert expected in stderr
    assert re.search(
        rf"Worker \d+ failed to boot \(exit status {status}\) before any worker was serving",
        stderr,
    )
    # The supervisor started two workers and nothing else.
    assert len(re.findall(r"Started worker", stderr)) == 2


async def test_broken_deploy_is_retried_with_growing_delays_while_a_worker_serves(
    app_dir: Path,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "-w", "2", "-b", "127.0.0.1:0", cwd=app_dir) as cli:
            victim, survivor = ready_pids(cli)
            (app_dir / "BROKEN").touch()
            os.kill(victim, signal.SIGKILL)
            await cli.wait_for_line(RETRY, nth=3)
            # The survivor serves all along.
            assert {(await fetch(cli.url)).pid for _ in range(5)} == {survivor}
            first = matches(cli, rf"Worker {victim} died \(killed by SIGKILL\).* in ([\d.]+)s")
            delays = [float(m.group(1)) for m in first + matches(cli, RETRY)]
            assert delays[:4] == [0.1, 0.2, 0.4, 0.8], delays
            assert matches(cli, "RuntimeError: pidapp: this deploy is broken")
            # Fixed: the next attempt boots, and serves.
            (app_dir / "BROKEN").unlink()
            (replacement,) = set(await wait_ready(cli, 3)) - {victim, survivor}
            assert await pids_answering(cli.url, {replacement, survivor}) == {
                replacement,
                survivor,
            }
            cli.send_signal(signal.SIGTERM)
            assert await cli.wait_exit() == 0


async def test_reload_with_broken_code_keeps_the_old_workers_serving(app_dir: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "-w", "2", "-b", "127.0.0.1:0", cwd=app_dir) as cli:
            old = set(ready_pids(cli))
            (app_dir / "BROKEN").touch()
            async with load(cli.url, "/?sleep=0.01", clients=2) as running:
                cli.send_signal(signal.SIGHUP)
                await cli.wait_for_line(RETRY, nth=2)
                assert not matches(cli, "New workers are ready")
                await running.wait_ok(20)
                assert {r.pid for r in running.ok()} == old  # the old code still serves
                (app_dir / "BROKEN").unlink()
                await cli.wait_for_line(r"New workers are ready: stopping 2 old worker\(s\)")
                for pid in old:
                    await cli.wait_for_line(rf"Worker {pid} exited \(exit status 0\)")
                swapped_at = trio.current_time()
                await running.wait_ok(10, since=swapped_at)
            assert running.failures() == []
            assert not {r.pid for r in running.ok(swapped_at)} & old


async def test_sigttin_and_sigttou_with_options_from_a_config_file(app_dir: Path) -> None:
    (app_dir / "trioserve.toml").write_text('workers = 2\nbind = "127.0.0.1:0"\n')
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "--config", "trioserve.toml", cwd=app_dir) as cli:
            first = started_pids(cli)
            cli.send_signal(signal.SIGTTIN)
            await cli.wait_for_line("Received SIGTTIN: 3 workers")
            (added,) = set(await wait_ready(cli, 3)) - set(first)
            assert await pids_answering(cli.url, {*first, added}) == {*first, added}
            cli.send_signal(signal.SIGTTOU)
            fewer = r"Stopping worker (\d+) gracefully \(one worker fewer\)"
            stopped = int((await cli.wait_for_line(fewer)).group(1))
            assert stopped in first  # one of the oldest (the first two start together)
            await cli.wait_for_line(rf"Worker {stopped} exited \(exit status 0\)")
            cli.send_signal(signal.SIGTERM)
            assert await cli.wait_exit() == 0
    assert len(started_pids(cli)) == 3


async def test_workers_stop_when_the_supervisor_is_killed(app_dir: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising("pidapp:app", "-w", "2", "-b", "127.0.0.1:0", cwd=app_dir) as cli:
            pids = ready_pids(cli)
            cli.process.kill()
            await cli.process.wait()
            await cli.wait_for_line("The supervisor process is gone: stopping gracefully", nth=2)
            # Both workers exited: they were the last holders of stderr.
            with trio.fail_after(TIMEOUT):
                await cli._eof["stderr"].wait()
            assert not any(_is_our_worker(pid) for pid in pids)


# ---------------------------------------------------------------------------
# Issue 4's "done" check, with examples.hello:app
# ---------------------------------------------------------------------------


async def test_done_check_hello_on_tcp_and_unix_survives_a_kill_and_drains(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.sock"
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising(
            "examples.hello:app", "-w", "2", "-b", "127.0.0.1:0", "-b", f"unix:{path}",
            cwd=ROOT, listeners=2,
        ) as cli:  # fmt: skip
            tcp, unix = cli.addresses
            victim, _ = ready_pids(cli)
            async with load(tcp) as on_tcp, load(unix) as on_unix:
                await on_tcp.wait_ok(10)
                await on_unix.wait_ok(10)
                os.kill(victim, signal.SIGKILL)
                await wait_ready(cli, 3)
                replaced_at = trio.current_time()
                await on_tcp.wait_ok(20, since=replaced_at)
                await on_unix.wait_ok(20, since=replaced_at)
                cli.send_signal(signal.SIGTERM)
                assert await cli.wait_exit() == 0
            for running in (on_tcp, on_unix):
                assert {r.body for r in running.ok()} == {b"Hello, world!\n"}
                # Before the stop: only requests the killed worker held (one per client).
                before_stop = [f for f in running.failures() if f.at < replaced_at]
                assert len(before_stop) <= 4, before_stop
                # During the stop, a request either got its whole response or was
                # refused (or reset while queued, unaccepted) without a byte of one:
                # never a partial or broken response.
                assert all(f.received == 0 and f.status == 0 for f in running.failures())
