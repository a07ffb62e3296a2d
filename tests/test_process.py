"""Process control through the CLI: --version, --pid, --chdir, --umask, --user/--group,
bind errors in words, and the unix socket file removed on stop.

Real processes (tests/test_cli.py's helpers), requests with curl and the h11 client.
This machine runs the tests as root, so ``--user nobody`` really binds as root and then
serves as nobody; refusing ``--user`` to a non-root user is checked in process, with
``os.geteuid`` made to answer 1000.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.test_cli import assert_one_line_error, request, run_cli, serving
from trioserve import cli

APP = "examples.hello:app"

UIDAPP = '''\
"""Answers with the uid, gid and groups it runs as (tests/test_process.py)."""
import os
from wsgiref.validate import validator


def _app(environ, start_response):
    body = f"{os.getuid()} {os.getgid()} {sorted(os.getgroups())}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = validator(_app)
'''

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


# ---- --version ---------------------------------------------------------------------------------


async def test_version() -> None:
    result = await run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.decode() == f"trioserve {importlib.metadata.version('trioserve')}\n"
    assert result.stderr == b""


# ---- --pid -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_pid_file_names_the_server_and_is_removed_on_exit(
    tmp_path: Path, workers: str
) -> None:
    pid_file = tmp_path / "trioserve.pid"
    async with serving(APP, "-b", "127.0.0.1:0", "-w", workers, "--pid", str(pid_file)) as cli:
        assert (await request(cli.url)).status == 200
        # With -w 2 the supervisor's pid: the process to send signals to.
        assert pid_file.read_text() == f"{cli.process.pid}\n"
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    assert not pid_file.exists()


async def test_pid_file_rewritten_by_someone_else_is_left_alone(tmp_path: Path) -> None:
    pid_file = tmp_path / "trioserve.pid"
    async with serving(APP, "-b", "127.0.0.1:0", "--pid", str(pid_file)) as cli:
        pid_file.write_text("12345\n")  # a newer server took the file over
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    assert pid_file.read_text() == "12345\n"


async def test_pid_file_that_cannot_be_written() -> None:
    result = await run_cli(APP, "-b", "127.0.0.1:0", "--pid", "/nonexistent/dir/trioserve.pid")
    assert assert_one_line_error(result, 2) == (
        "trioserve: error: --pid /nonexistent/dir/trioserve.pid: cannot write it:"
        " No such file or directory"
    )


# ---- --chdir, --umask --------------------------------------------------------------------------


async def test_chdir_imports_the_app_there_and_relative_paths_start_there(tmp_path: Path) -> None:
    (tmp_path / "chdir_target_app.py").write_text(UIDAPP)
    args = ("-b", "127.0.0.1:0", "--chdir", str(tmp_path), "--access-log", "access.log")
    async with serving("chdir_target_app:app", *args) as cli:
        response = await request(cli.url, "/here")
        assert response.status == 200
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    assert '"GET /here HTTP/1.1" 200' in (tmp_path / "access.log").read_text()


async def test_chdir_to_a_missing_directory() -> None:
    result = await run_cli(APP, "--chdir", "/nonexistent/dir")
    assert assert_one_line_error(result, 2) == (
        "trioserve: error: --chdir /nonexistent/dir: No such file or directory"
    )


async def test_umask_applies_to_the_files_and_sockets_the_server_creates(tmp_path: Path) -> None:
    log, sock = tmp_path / "access.log", tmp_path / "s.sock"
    args = ("-b", f"unix:{sock}", "--access-log", str(log), "--umask", "027")
    async with serving(APP, *args) as cli:
        assert (await request(cli.url)).status == 200
        socket_mode = stat.S_IMODE(sock.stat().st_mode)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert socket_mode == 0o750


@pytest.mark.parametrize("mask", ["999", "rwx", "1777"])
async def test_bad_umask(mask: str) -> None:
    result = await run_cli(APP, "--umask", mask)
    assert assert_one_line_error(result, 2) == (
        f"trioserve: error: umask must be octal, e.g. 027: {mask!r}"
    )


# ---- --user, --group ---------------------------------------------------------------------------


@pytest.fixture
def world_readable_app() -> Iterator[Path]:
    """A directory nobody can read, holding uidapp.py (pytest's tmp_path is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="trioserve-user-"))
    try:
        directory.chmod(0o755)
        (directory / "uidapp.py").write_text(UIDAPP)
        (directory / "uidapp.py").chmod(0o644)
        yield directory
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


# The app is imported after the switch, so its imports must be readable by the new user.
# Here the interpreter lives under /root (pyenv), which nobody cannot read: the command
# imports wsgiref.validate (the app's one import outside the package) before it starts.
AS_ANOTHER_USER = (
    sys.executable,
    "-c",
    "import sys, wsgiref.validate, trioserve.cli; sys.argv[0] = 'trioserve';"
    " sys.exit(trioserve.cli.main())",
)


def free_privileged_port() -> int:
    """A loopback port below 1024 that nothing listens on (only root may bind it)."""
    for port in range(1023, 600, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def process_uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [
        int(uid)
        for uid in next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    ]


@needs_root
async def test_user_binds_as_root_then_serves_as_the_user(world_readable_app: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    port = free_privileged_port()
    async with serving(
        "uidapp:app", "-b", f"127.0.0.1:{port}", "--user", "nobody",
        command=AS_ANOTHER_USER, cwd=world_readable_app,
    ) as cli:  # fmt: skip
        assert cli.url == f"http://127.0.0.1:{port}"
        response = await request(cli.url)
        uids = process_uids(cli.process.pid)
    assert response.body.decode() == f"{nobody.pw_uid} {nobody.pw_gid} [{nobody.pw_gid}]"
    assert uids == [nobody.pw_uid] * 4  # real, effective, saved, filesystem: no way back


@needs_root
async def test_group_alone_switches_the_group_only(world_readable_app: Path) -> None:
    nogroup = pwd.getpwnam("nobody").pw_gid
    async with serving(
        "uidapp:app", "-b", "127.0.0.1:0", "--group", str(nogroup),
        command=AS_ANOTHER_USER, cwd=world_readable_app,
    ) as cli:  # fmt: skip
        response = await request(cli.url)
    assert response.body.decode() == f"0 {nogroup} [{nogroup}]"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--user", "nobody"], "--user nobody: only root can switch to another user"),
        (["--group", "nogroup"], "--group nogroup: only root can switch to another group"),
    ],
)
def test_user_and_group_need_root(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main([APP, "-b", "127.0.0.1:0", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"trioserve: error: {message} (trioserve runs as uid 1000)\n"
    assert captured.out == ""


@needs_root
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--user", "no_such_user_xyz"], "--user no_such_user_xyz: no such user"),
        (["--group", "no_such_group_xyz"], "--group no_such_group_xyz: no such group"),
        (["--user", "4000000"], "--user 4000000: no such user"),
    ],
)
async def test_unknown_user_or_group(flags: list[str], message: str) -> None:
    result = await run_cli(APP, "-b", "127.0.0.1:0", *flags)
    assert assert_one_line_error(result, 2) == f"trioserve: error: {message}"


# ---- bind errors in words ----------------------------------------------------------------------


async def test_unresolvable_host() -> None:
    result = await run_cli(APP, "-b", "nosuchhost.invalid:8000")
    line = assert_one_line_error(result, 1)
    prefix = "trioserve: error: cannot bind nosuchhost.invalid:8000: cannot resolve host"
    assert line.startswith(prefix + " 'nosuchhost.invalid' ("), line
    assert "unknown error" not in line.lower()


async def test_address_of_another_machine() -> None:
    result = await run_cli(APP, "-b", "192.0.2.1:8000")  # TEST-NET-1: never ours
    assert assert_one_line_error(result, 1) == (
        "trioserve: error: cannot bind 192.0.2.1:8000: no interface of this machine has that"
        " address"
    )


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        (
            "http://127.0.0.1:8000",
            "bind address 'http://127.0.0.1:8000': give HOST:PORT without http://"
            " (the scheme follows from --certfile)",
        ),
        ("127.0.0.1/8:80", "bind address '127.0.0.1/8:80': '127.0.0.1/8' is not a host name or IP"
         " address"),
    ],
)  # fmt: skip
async def test_malformed_bind_address_in_words(bind: str, message: str) -> None:
    result = await run_cli(APP, "-b", bind)
    assert assert_one_line_error(result, 2) == f"trioserve: error: {message}"


# ---- the unix socket file ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_unix_socket_file_is_removed_on_stop(tmp_path: Path, workers: str) -> None:
    path = tmp_path / "app.sock"
    async with serving(APP, "-b", f"unix:{path}", "-w", workers) as cli:
        assert (await request(cli.url)).status == 200
        assert path.is_socket()
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    assert not path.exists()


async def test_unix_socket_file_taken_over_by_another_server_is_left(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX) as newer:
        async with serving(APP, "-b", f"unix:{path}") as cli:
            path.unlink()
            newer.bind(str(path))  # a newer server's socket at the same path
            cli.send_signal(signal.SIGTERM)
            assert await cli.wait_exit() == 0
        assert path.is_socket()


async def test_unix_socket_file_is_removed_when_serve_wsgi_stops(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from tests.apps import hello
    from trioserve import serve_wsgi

    path = tmp_path / "embedded.sock"
    server = await serve_wsgi(hello, nursery, bind=f"unix:{path}")
    assert path.is_socket()
    await server.stop()
    assert not path.exists()
