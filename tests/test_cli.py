"""The ``trioserve`` command as a user sees it: a real subprocess, real sockets, real signals.

Every command runs from the repository root (so ``examples.hello:app`` and
``tests.cli_targets:...`` import) with ``python -m trioserve`` unless a test
says otherwise. A running server announces its address only in its log line
``Listening on http://127.0.0.1:PORT`` on stderr, so :func:`serving` reads
stderr until that line appears. Every process a test starts is killed in a
``finally`` if it is still running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from trioserve.config import Config, options

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20  # seconds: the absolute limit for any one step that could hang
MODULE = (sys.executable, "-m", "trioserve")


# ---------------------------------------------------------------------------
# Running the command
# ---------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra)
    return env


async def run_cli(
    *args: str, cwd: Path = ROOT, command: Sequence[str] = MODULE, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """Run the command to completion (it is killed if it outlives TIMEOUT)."""
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [*command, *args],
            cwd=cwd,
            env=_env(**env),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def error_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode(errors="replace").splitlines()


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], status: int | None) -> str:
    """The process failed with exactly one ``trioserve: error:`` line and no traceback."""
    lines = error_lines(result)
    assert "Traceback" not in result.stderr.decode(errors="replace"), lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("trioserve: error: "), lines
    if status is None:
        assert result.returncode != 0
    else:
        assert result.returncode == status, (result.returncode, lines)
    assert result.stdout == b""
    return lines[0]


@dataclasses.dataclass(eq=False)
class RunningCLI:
    """A server process whose stdout and stderr are read line by line as they come."""

    process: trio.Process
    stdout: list[str] = dataclasses.field(default_factory=list)
    stderr: list[str] = dataclasses.field(default_factory=list)
    addresses: list[str] = dataclasses.field(default_factory=list)
    _changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    _eof: dict[str, trio.Event] = dataclasses.field(
        default_factory=lambda: {"stdout": trio.Event(), "stderr": trio.Event()}
    )

    async def _pump(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        lines: list[str] = getattr(self, name)
        pending = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            pending += data
            *complete, pending = pending.split(b"\n")
            lines.extend(line.decode(errors="replace") for line in complete)
            self._notify()
        if pending:
            lines.append(pending.decode(errors="replace"))
        self._eof[name].set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_line(
        self, pattern: str, *, stream: str = "stderr", nth: int = 1, timeout: float = TIMEOUT
    ) -> re.Match[str]:
        """The ``nth`` line of ``stream`` matching ``pattern``, once it has been printed."""
        lines: list[str] = getattr(self, stream)
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                matches = [m for m in map(regex.search, lines) if m]
                if len(matches) >= nth:
                    return matches[nth - 1]
                if self._eof[stream].is_set():
                    raise AssertionError(
                        f"{stream} ended without a line matching {pattern!r}:\n" + "\n".join(lines)
                    )
                await self._changed.wait()

    async def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """Wait for the process to exit and for all its output; return the exit status."""
        with trio.fail_after(timeout):
            returncode = await self.process.wait()
            for eof in self._eof.values():
                await eof.wait()
        return returncode

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def url(self) -> str:
        return self.addresses[0]


async def kill(cli: RunningCLI) -> None:
    """The default end of :func:`serving`: kill the process and wait for it."""
    if cli.process.returncode is None:
        cli.process.kill()
    with trio.move_on_after(TIMEOUT):
        await cli.process.wait()


@asynccontextmanager
async def serving(
    *args: str,
    command: Sequence[str] = MODULE,
    cwd: Path = ROOT,
    listeners: int = 1,
    stop: Callable[[RunningCLI], Awaitable[None]] = kill,
    log_stream: str = "stderr",
) -> AsyncIterator[RunningCLI]:
    """Start the command, wait for its ``Listening on`` line(s) on ``log_stream``, and
    always ``stop`` it at the end (by default: kill it)."""
    process = await trio.lowlevel.open_process(
        [*command, *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cli = RunningCLI(process)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(cli._pump, "stdout", process.stdout)
            nursery.start_soon(cli._pump, "stderr", process.stderr)
            try:
                for line in range(1, listeners + 1):
                    match = await cli.wait_for_line(
                        r"Listening on ([^\s\"]+)", nth=line, stream=log_stream
                    )
                    cli.addresses.append(match.group(1))
                yield cli
            finally:
                with trio.CancelScope(shield=True):
                    await stop(cli)
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:  # pragma: no cover - only if waiting above timed out
            process.kill()
        with trio.CancelScope(shield=True):
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
        # shown by pytest when the test fails
        print("--- server stderr ---", *cli.stderr, "--- server stdout ---", *cli.stdout, sep="\n")


# ---------------------------------------------------------------------------
# A small HTTP/1.1 client (h11 over a trio stream), TCP, TLS or unix socket
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    http_version: str


async def connect(address: str, ssl_context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """A stream to ``http://HOST:PORT``, ``https://HOST:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        return await trio.open_unix_socket(address[len("unix:") :])
    match = re.fullmatch(r"(https?)://([\d.]+):(\d+)", address)
    assert match, address
    scheme, host, port = match.group(1), match.group(2), int(match.group(3))
    if scheme == "https":
        assert ssl_context is not None
        return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    return await trio.open_tcp_stream(host, port)


class HTTPClient:
    """HTTP/1.1 requests on one connection; a body can be sent in pieces."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        keep_alive: bool = False,
    ) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        fields = [("Host", "localhost"), *headers]
        if not keep_alive:
            fields.append(("Connection", "close"))
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=fields))
        )

    async def send_body(self, data: bytes, *, end: bool = False) -> None:
        out = self.conn.send(h11.Data(data=data)) if data else b""
        if end:
            out += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)

    async def read_response(self) -> Response:
        status, headers, body, version = 0, {}, b"", ""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"no complete response: {exc}") from exc
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            elif isinstance(event, h11.Response):
                status = event.status_code
                version = event.http_version.decode()
                headers = {name.decode().lower(): value.decode() for name, value in event.headers}
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, body, version)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("connection closed before the response ended")

    async def wait_closed_by_server(self) -> None:
        """Read until the server closes the connection (nothing else may arrive)."""
        while data := await self.stream.receive_some(65536):
            raise AssertionError(f"unexpected data from the server: {data!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def request(
    address: str,
    target: str = "/",
    *,
    method: str = "GET",
    body: bytes = b"",
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    with trio.fail_after(TIMEOUT):
        client = HTTPClient(await connect(address, ssl_context))
        try:
            headers = [("Content-Length", str(len(body)))] if body or method == "POST" else []
            await client.send_head(method, target, headers)
            await client.send_body(body, end=True)
            return await client.read_response()
        finally:
            await client.aclose()


# ---------------------------------------------------------------------------
# Errors before serving: one line, the right exit status, no traceback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "no_such_module_xyz:app",
        "examples.no_such_module:app",
        "examples.hello.not_a_submodule:app",
    ],
)
async def test_module_not_found(spec: str) -> None:
    result = await run_cli(spec, "-b", "127.0.0.1:0")
    line = assert_one_line_error(result, 2)
    module = spec.partition(":")[0]
    assert repr(module) in line
    assert "no such module" in line


@pytest.mark.parametrize(
    ("spec", "missing"),
    [
        ("examples.hello:nope", "nope"),
        ("tests.cli_targets:holder.inner.nope", "holder.inner.nope"),
        ("tests.cli_targets:holder.nope.app", "holder.nope"),
        ("examples.hello", "application"),  # ATTR defaults to "application"
    ],
)
async def test_attribute_missing(spec: str, missing: str) -> None:
    result = await run_cli(spec, "-b", "127.0.0.1:0")
    line = assert_one_line_error(result, 2)
    assert missing in line


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["tests.cli_targets:not_callable"], "not_callable"),
        (["tests.cli_targets:not_callable", "--factory"], "not_callable"),
        (["tests.cli_targets:bad_factory", "--factory"], "bad_factory"),
    ],
    ids=["plain", "factory", "factory-result"],
)
async def test_not_callable(args: list[str], mentions: str) -> None:
    result = await run_cli(*args, "-b", "127.0.0.1:0")
    line = assert_one_line_error(result, 2)
    assert mentions in line
    assert "callable" in line


@pytest.mark.parametrize("spec", ["bad-name:app", "examples.hello:app()", ":app"])
async def test_malformed_app_spec(spec: str) -> None:
    result = await run_cli(spec, "-b", "127.0.0.1:0")
    assert_one_line_error(result, 2)


async def test_module_raising_on_import_shows_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "boom_app.py").write_text('raise RuntimeError("boom while importing")\n')
    result = await run_cli("boom_app:app", "-b", "127.0.0.1:0", cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" in stderr
    assert 'boom_app.py", line 1' in stderr
    assert "RuntimeError: boom while importing" in stderr


async def test_missing_dependency_of_the_app_is_one_line_naming_it(tmp_path: Path) -> None:
    # The module exists; a package it imports is not installed (like
    # examples.flask_app without Flask): one line naming the missing package, exit 2.
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency_xyz\napp = None\n")
    result = await run_cli("needs_dep:app", "-b", "127.0.0.1:0", cwd=tmp_path)
    line = assert_one_line_error(result, 2)
    assert line == (
        "trioserve: error: cannot import module 'needs_dep': it needs"
        " 'not_installed_dependency_xyz', which is not installed"
        " (--log-level debug shows the traceback)"
    )


async def test_missing_dependency_traceback_at_log_level_debug(tmp_path: Path) -> None:
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency_xyz\napp = None\n")
    result = await run_cli(
        "needs_dep:app", "-b", "127.0.0.1:0", "--log-level", "debug", cwd=tmp_path
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" in stderr
    assert 'needs_dep.py", line 1' in stderr
    assert "No module named 'not_installed_dependency_xyz'" in stderr
    assert stderr.splitlines()[-1].startswith("trioserve: error: cannot import module 'needs_dep'")


async def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("examples.hello:app", "-b", f"127.0.0.1:{port}")
    line = assert_one_line_error(result, 1)
    assert "address already in use" in line
    assert str(port) in line


@pytest.mark.parametrize(
    ("args", "status", "mentions"),
    [
        (["--threads", "0"], 2, "threads"),
        (["--keep-alive-timeout", "-1"], 2, "keep-alive-timeout"),
        (["--graceful-timeout", "0"], 2, "graceful-timeout"),
        (["--log-level", "loud"], 2, "loud"),
        (["--h2-max-frame-size", "100"], 2, "h2-max-frame-size"),
        (["--max-header-size", "10"], 2, "max-header-size"),
        (["--gc-threshold", "-1"], 2, "gc-threshold"),
        (["-b", "127.0.0.1:notaport"], None, "notaport"),
        (["-b", "127.0.0.1:70000"], None, "out of range"),
        (["-b", "unix:"], None, "no path"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_invalid_values(args: list[str], status: int | None, mentions: str) -> None:
    bind = [] if "-b" in args else ["-b", "127.0.0.1:0"]
    result = await run_cli("examples.hello:app", *bind, *args)
    line = assert_one_line_error(result, status)
    assert mentions in line


async def test_malformed_bind_is_a_bad_flag() -> None:
    # cli.py's docstring: "exit status 2 (bad flags, app not importable) or 1 (cannot bind,
    # unreadable certificate)". "notaport" is never bound: it is a bad flag value.
    result = await run_cli("examples.hello:app", "-b", "127.0.0.1:notaport")
    assert_one_line_error(result, 2)


async def test_argparse_type_error_exits_2() -> None:
    result = await run_cli("examples.hello:app", "-b", "127.0.0.1:0", "--threads", "many")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()
    assert error_lines(result)[-1].startswith("trioserve: error: argument --threads")


# ---- TLS options ------------------------------------------------------------


async def test_certfile_without_keyfile(tls_cert_files: tuple[str, str, str]) -> None:
    certfile, _, _ = tls_cert_files
    result = await run_cli("examples.hello:app", "-b", "127.0.0.1:0", "--certfile", certfile)
    line = assert_one_line_error(result, 2)
    assert "--certfile and --keyfile" in line


async def test_keyfile_without_certfile(tls_cert_files: tuple[str, str, str]) -> None:
    _, keyfile, _ = tls_cert_files
    result = await run_cli("examples.hello:app", "-b", "127.0.0.1:0", "--keyfile", keyfile)
    line = assert_one_line_error(result, 2)
    assert "--certfile and --keyfile" in line


def _bad_tls_files(kind: str, tmp_path: Path, certfile: str, keyfile: str) -> tuple[str, str]:
    if kind == "missing-cert":
        return str(tmp_path / "missing-cert.pem"), keyfile
    if kind == "missing-key":
        return certfile, str(tmp_path / "missing-key.pem")
    if kind == "directory":
        return str(tmp_path), keyfile
    if kind == "not-pem":
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("this is not a certificate\n")
        return str(garbage), keyfile
    if kind == "unreadable":
        unreadable = tmp_path / "unreadable.pem"
        shutil.copy(certfile, unreadable)
        unreadable.chmod(0)
        return str(unreadable), keyfile
    if kind == "key-mismatch":
        return certfile, certfile  # a certificate is not a private key
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing-cert",
        "missing-key",
        "directory",
        "not-pem",
        "key-mismatch",
        pytest.param(
            "unreadable",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file"),
        ),
    ],
)
async def test_unusable_tls_files(
    kind: str, tmp_path: Path, tls_cert_files: tuple[str, str, str]
) -> None:
    certfile, keyfile = _bad_tls_files(kind, tmp_path, *tls_cert_files[:2])
    result = await run_cli(
        "examples.hello:app", "-b", "127.0.0.1:0", "--certfile", certfile, "--keyfile", keyfile
    )
    line = assert_one_line_error(result, 1)
    assert "TLS" in line


@pytest.mark.parametrize("kind", ["missing-cert", "missing-key"])
async def test_missing_tls_file_is_named(
    kind: str, tmp_path: Path, tls_cert_files: tuple[str, str, str]
) -> None:
    certfile, keyfile = _bad_tls_files(kind, tmp_path, *tls_cert_files[:2])
    missing = certfile if kind == "missing-cert" else keyfile
    result = await run_cli(
        "examples.hello:app", "-b", "127.0.0.1:0", "--certfile", certfile, "--keyfile", keyfile
    )
    line = assert_one_line_error(result, 1)
    assert "None" not in line
    assert missing in line


# ---------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------


def _expected_flags(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


def _default_text(field: dataclasses.Field[Any]) -> str:
    default = getattr(Config(), field.name)
    if isinstance(default, tuple):
        return " ".join(default)
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    if default == "":
        return "''"
    return str(default)


def _help_entries(text: str) -> dict[str, str]:
    """Map every flag in argparse's options section to its (whitespace-joined) entry."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("options:"))
    entries: list[list[str]] = []
    for line in lines[start + 1 :]:
        if re.match(r"  -", line):
            entries.append([line])
        elif line.startswith("    ") and entries:
            entries[-1].append(line)
        elif line.strip():
            break
    result: dict[str, str] = {}
    for entry in entries:
        joined = " ".join(" ".join(entry).split())
        invocation = entry[0].strip().split("  ")[0]
        for flag in re.findall(r"(?:^|, )(--?[\w-]+)", invocation):
            result[flag] = joined
    return result


async def _help_text(command: Sequence[str] = MODULE) -> str:
    # A wide terminal keeps each option's help on as few lines as argparse allows.
    result = await run_cli("--help", command=command, COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout.decode()


async def test_help_lists_every_config_field_with_its_default() -> None:
    text = await _help_text()
    assert text.startswith("usage: trioserve")
    entries = _help_entries(text)
    assert len(options()) >= 20
    for field in options():
        for flag in _expected_flags(field):
            assert flag in entries, f"{flag} ({field.name}) is not in --help"
            entry = entries[flag]
            assert field.metadata["help"].replace("%%", "%").split("(")[0].strip() in entry
            assert f"(default: {_default_text(field)})" in entry, entry
        if field.type == "bool" or isinstance(getattr(Config(), field.name), bool):
            negated = "--no-" + field.name.replace("_", "-")
            assert negated in entries, f"{negated} is not in --help"


async def test_help_shows_each_default_once() -> None:
    entries = _help_entries(await _help_text())
    for field in options():
        entry = entries[_expected_flags(field)[-1]]
        assert entry.count("(default:") == 1, entry
        assert f"(default: {_default_text(field)})" in entry, entry


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


def _console_script() -> list[str]:
    script = shutil.which("trioserve", path=str(Path(sys.executable).parent))
    assert script is not None, "the trioserve console script is not installed next to python"
    return [script]


LAUNCHERS = {"python-m": lambda: list(MODULE), "console-script": _console_script}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serves_until_signal(launcher: str, signum: signal.Signals) -> None:
    command = LAUNCHERS[launcher]()
    async with serving("examples.hello:app", "-b", "127.0.0.1:0", command=command) as cli:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", cli.url)
        assert not cli.url.endswith(":0")
        for _ in range(2):
            response = await request(cli.url)
            assert response.status == 200
            assert response.body == b"Hello, world!\n"
            assert response.headers["server"] == "trioserve"
        cli.send_signal(signum)
        await cli.wait_for_line(f"Received {signum.name}: finishing in-flight requests")
        assert await cli.wait_exit(timeout=10) == 0
    assert not any("Traceback" in line for line in cli.stderr), cli.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serving_processes_tune_the_garbage_collector_unless_told_not_to(
    workers: str,
) -> None:
    """--gc-threshold (7000 by default) in the process that serves, one or a worker;
    0 leaves Python's own threshold and freezes nothing."""
    # Python's own settings, as a fresh interpreter has them (3.13 starts at 2000, and
    # 3.12 with some objects frozen already).
    fresh = await trio.run_process(
        [
            sys.executable,
            "-c",
            "import gc, json; print(json.dumps({'threshold': gc.get_threshold()[0],"
            " 'frozen': gc.get_freeze_count()}))",
        ],
        capture_stdout=True,
    )
    pythons = json.loads(fresh.stdout)
    seen = {}
    for given in ([], ["--gc-threshold", "0"], ["--gc-threshold", "5000"]):
        async with serving(
            "tests.cli_targets:gc_settings", "-b", "127.0.0.1:0", "-w", workers, *given
        ) as cli:
            response = await request(cli.url)
        assert response.status == 200
        seen[" ".join(given) or "default"] = json.loads(response.body)
    assert seen["default"]["threshold"] == 7000
    assert seen["default"]["frozen"] > pythons["frozen"] + 1000  # modules, app, server
    assert seen["--gc-threshold 0"] == pythons
    assert seen["--gc-threshold 5000"]["threshold"] == 5000


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_command_runs_apps_in_batch_threads_unless_told_not_to(workers: str) -> None:
    """--app-thread-scheduling auto (the default) is batch when the command serves,
    one process or a worker; normal leaves the threads as the process had them. The
    process starts under the default policy here: a child inherits its parent's, and
    this test's may have been spawned from a thread an earlier test made batch."""
    command = [
        sys.executable,
        "-c",
        "import os, runpy; os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0));"
        " runpy.run_module('trioserve', run_name='__main__', alter_sys=True)",
    ]
    seen = {}
    for given in ([], ["--app-thread-scheduling", "normal"], ["--app-thread-scheduling", "batch"]):
        async with serving(
            "tests.cli_targets:thread_policy",
            "-b",
            "127.0.0.1:0",
            "-w",
            workers,
            *given,
            command=command,
        ) as cli:
            response = await request(cli.url)
        assert response.status == 200
        seen[" ".join(given) or "default"] = response.body.decode()
    assert seen == {
        "default": "batch",
        "--app-thread-scheduling normal": "other",
        "--app-thread-scheduling batch": "batch",
    }


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
async def test_help_from_each_launcher(launcher: str) -> None:
    text = await _help_text(LAUNCHERS[launcher]())
    assert "--graceful-timeout" in text


async def open_idle_connection(url: str) -> HTTPClient:
    """A keep-alive connection the server has served one request on, now idle.

    A graceful stop closes idle connections in the same step in which it tells
    busy ones to finish, so this connection being closed means the shutdown
    has reached every connection.
    """
    idle = HTTPClient(await connect(url))
    await idle.send_head("GET", "/", keep_alive=True)
    await idle.send_body(b"", end=True)
    response = await idle.read_response()
    assert response.status == 200
    assert "close" not in response.headers.get("connection", "")
    return idle


async def release_fifo(path: Path, message: bytes) -> None:
    """Write ``message`` to the FIFO (opening blocks until the app opens it) and close it."""

    def write() -> None:
        with open(path, "wb") as fifo:
            fifo.write(message)

    try:
        await trio.to_thread.run_sync(write, abandon_on_cancel=True)
    except BaseException:
        # Unblock the writer thread if the app never opened the FIFO.
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        raise


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_request_in_flight_finishes_after_signal(
    signum: signal.Signals, tmp_path: Path
) -> None:
    fifo = tmp_path / "release.fifo"
    os.mkfifo(fifo)
    async with serving("tests.cli_targets:wait_for_fifo", "-b", "127.0.0.1:0") as cli:
        with trio.fail_after(TIMEOUT):
            idle = await open_idle_connection(cli.url)
            client = HTTPClient(await connect(cli.url))
            try:
                await client.send_head("POST", f"/work?fifo={fifo}", [("Content-Length", "4")])
                await client.send_body(b"data", end=True)
                await cli.wait_for_line("cli_targets: wait_for_fifo started")
                cli.send_signal(signum)
                await cli.wait_for_line(f"Received {signum.name}: finishing in-flight requests")
                await idle.wait_closed_by_server()  # the graceful stop is under way
                await release_fifo(fifo, b"the test")
                response = await client.read_response()
            finally:
                await client.aclose()
                await idle.aclose()
        assert response.status == 200
        assert response.body == b"released by the test"
        assert response.headers["connection"] == "close"
        assert await cli.wait_exit(timeout=10) == 0
    assert not any("Traceback" in line for line in cli.stderr), cli.stderr


async def test_request_body_still_read_during_graceful_stop() -> None:
    async with serving(
        "tests.cli_targets:slow_upload", "-b", "127.0.0.1:0", "--graceful-timeout", "3"
    ) as cli:
        with trio.fail_after(TIMEOUT):
            idle = await open_idle_connection(cli.url)
            client = HTTPClient(await connect(cli.url))
            try:
                await client.send_head("POST", "/upload", [("Content-Length", "10")])
                await client.send_body(b"12345")
                await cli.wait_for_line("cli_targets: slow_upload started")
                cli.send_signal(signal.SIGTERM)
                await idle.wait_closed_by_server()  # the graceful stop is under way
                # The request is in flight; the rest of its body must still get through.
                await client.send_body(b"67890", end=True)
                response = await client.read_response()
            finally:
                await client.aclose()
                await idle.aclose()
        assert response.status == 200
        assert response.body == b"received 10 bytes: 1234567890"
        assert await cli.wait_exit(timeout=10) == 0


async def test_second_sigint_stops_at_once() -> None:
    async with serving(
        "tests.cli_targets:slow_upload", "-b", "127.0.0.1:0", "--graceful-timeout", "600"
    ) as cli:
        with trio.fail_after(TIMEOUT):
            client = HTTPClient(await connect(cli.url))
            try:
                await client.send_head("POST", "/upload", [("Content-Length", "10")])
                await client.send_body(b"123")  # and never the rest
                await cli.wait_for_line("cli_targets: slow_upload started")
                cli.send_signal(signal.SIGINT)
                await cli.wait_for_line("Received SIGINT: finishing in-flight requests")
                cli.send_signal(signal.SIGINT)
                await cli.wait_for_line("Received SIGINT again: stopping now")
                # The graceful timeout is 10 minutes; "at once" means well within it.
                returncode = await cli.wait_exit(timeout=10)
                # The unfinished request got no response: its connection just went away.
                with pytest.raises((AssertionError, trio.BrokenResourceError)):
                    await client.read_response()
            finally:
                await client.aclose()
        assert returncode == 0


async def test_graceful_timeout_cancels_what_is_left() -> None:
    async with serving(
        "tests.cli_targets:slow_upload", "-b", "127.0.0.1:0", "--graceful-timeout", "0.5"
    ) as cli:
        with trio.fail_after(TIMEOUT):
            client = HTTPClient(await connect(cli.url))
            try:
                await client.send_head("POST", "/upload", [("Content-Length", "10")])
                await client.send_body(b"123")
                await cli.wait_for_line("cli_targets: slow_upload started")
                cli.send_signal(signal.SIGTERM)
                await cli.wait_for_line(r"Graceful shutdown timed out after 0\.5s")
                assert await cli.wait_exit(timeout=10) == 0
            finally:
                await client.aclose()


async def test_factory() -> None:
    async with serving("tests.cli_targets:factory", "--factory", "-b", "127.0.0.1:0") as cli:
        response = await request(cli.url)
        assert response.status == 200
        assert response.body == b"made by the factory\n"


@pytest.mark.parametrize(
    ("spec", "body"),
    [
        ("tests.cli_targets:holder.inner.app", b"found through holder.inner.app\n"),
        ("tests.cli_targets", b"default attribute\n"),
    ],
    ids=["dotted", "default-attribute"],
)
async def test_attribute_paths(spec: str, body: bytes) -> None:
    async with serving(spec, "-b", "127.0.0.1:0") as cli:
        response = await request(cli.url)
        assert response.status == 200
        assert response.body == body


async def test_unix_socket_and_tcp_together(tmp_path: Path) -> None:
    path = tmp_path / "trioserve.sock"
    async with serving(
        "examples.hello:app", "-b", f"unix:{path}", "-b", "127.0.0.1:0", listeners=2
    ) as cli:
        assert sorted(cli.addresses, key=lambda a: a.startswith("http"))[0] == f"unix:{path}"
        for address in cli.addresses:
            response = await request(address)
            assert response.status == 200, address
            assert response.body == b"Hello, world!\n"


async def test_unix_socket_with_curl(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    path = tmp_path / "trioserve.sock"
    async with serving("examples.hello:app", "-b", f"unix:{path}") as cli:
        assert cli.url == f"unix:{path}"
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [curl, "-sS", "--max-time", "10", "--unix-socket", str(path), "http://x/"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"Hello, world!\n"


CLF = re.compile(
    r'(?P<host>\S+) - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "(?P<request>[^"]*)" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)


async def test_access_log_to_stdout() -> None:
    async with serving("examples.hello:app", "-b", "127.0.0.1:0", "--access-log", "-") as cli:
        targets = ["/", "/some/path?x=1&y=2", "/third"]
        for n, target in enumerate(targets):
            response = await request(cli.url, target)
            assert response.status == 200
            await cli.wait_for_line(re.escape(f'"GET {target} HTTP/1.1"'), stream="stdout")
            assert len(cli.stdout) == n + 1, cli.stdout
        for line, target in zip(cli.stdout, targets, strict=True):
            match = CLF.fullmatch(line)
            assert match, line
            assert match["host"] == "127.0.0.1"
            assert match["request"] == f"GET {target} HTTP/1.1"
            assert match["status"] == "200"
            assert match["bytes"] == "14"
        # the error log stays on stderr
        assert not any("Listening" in line for line in cli.stdout)


async def test_access_log_to_file(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with serving("examples.hello:app", "-b", "127.0.0.1:0", "--access-log", str(log)) as cli:
        response = await request(cli.url, "/logged", method="POST", body=b"abc")
        assert response.status == 200
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    match = CLF.fullmatch(lines[0])
    assert match, lines
    assert match["request"] == "POST /logged HTTP/1.1"
    assert cli.stdout == []


@pytest.mark.parametrize("root_path", ["/api", "/api/"])
async def test_root_path(root_path: str) -> None:
    async with serving(
        "tests.cli_targets:environ_echo", "-b", "127.0.0.1:0", "--root-path", root_path
    ) as cli:
        cases = {
            "/api/items?x=1": ("/api", "/items", "x=1"),
            "/api/a%20b/c": ("/api", "/a b/c", ""),
            "/api": ("/api", "", ""),
        }
        for target, (script_name, path_info, query) in cases.items():
            response = await request(cli.url, target)
            assert response.status == 200
            environ = json.loads(response.body)
            assert environ["SCRIPT_NAME"] == script_name, target
            assert environ["PATH_INFO"] == path_info, target
            assert environ["QUERY_STRING"] == query, target


async def test_tls(
    tls_cert_files: tuple[str, str, str], client_ssl_context: ssl.SSLContext
) -> None:
    certfile, keyfile, _ = tls_cert_files
    async with serving(
        "tests.cli_targets:environ_echo",
        "-b",
        "127.0.0.1:0",
        "--certfile",
        certfile,
        "--keyfile",
        keyfile,
    ) as cli:
        assert cli.url.startswith("https://127.0.0.1:")
        response = await request(cli.url, "/secure", ssl_context=client_ssl_context)
        assert response.status == 200
        assert json.loads(response.body)["PATH_INFO"] == "/secure"
