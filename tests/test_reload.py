"""``--reload`` as a developer uses it: edit a file, the next request sees the new code.

Each test starts ``python -m trioserve --reload`` in a temporary directory holding
``rapp.py`` (answers ``VERSION``), edits files, and waits for what should follow:
a log line, or an answer with the new version (polled, bounded by TIMEOUT). No test
sleeps to let the watcher notice; they wait for its effect.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import trio

from tests.test_cli import TIMEOUT, RunningCLI, assert_one_line_error, request, run_cli, serving
from trioserve import cli

pytest.importorskip("watchfiles", reason="--reload needs watchfiles (the reload extra)")

RAPP = '''\
"""Answers its version (tests/test_reload.py)."""
from wsgiref.validate import validator


def _app(environ, start_response):
    body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


VERSION = "{version}"
app = validator(_app)
'''

RESTART = r"\[INFO\] (.+) changed: restarting the worker$"
NOT_A_LOG_LINE = re.compile(r"^\[[^]]+\] \[\d+\] \[(INFO|WARNING|ERROR|CRITICAL)\] ")


def write_app(directory: Path, version: str, extra: str = "") -> None:
    (directory / "rapp.py").write_text(RAPP.format(version=version) + extra)


async def wait_for_answer(url: str, expected: str) -> None:
    """Poll until the server answers ``expected`` (an old worker may answer meanwhile)."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                body = (await request(url)).body.decode()
            except (OSError, AssertionError, trio.BrokenResourceError):
                body = None  # between workers: the listening socket stays, a request may fail
            if body == expected:
                return
            # Polling the server subprocess for a condition, bounded by TIMEOUT: a polling
            # interval, not a timing assumption.
            await trio.sleep(0.01)


def log_lines(cli: RunningCLI) -> list[str]:
    """The supervisor's and workers' log lines at INFO or above, in order."""
    return [line for line in cli.stderr if NOT_A_LOG_LINE.match(line)]


async def stop(cli: RunningCLI) -> None:
    cli.send_signal(signal.SIGTERM)
    assert await cli.wait_exit() == 0


async def test_each_change_restarts_the_worker_with_one_log_line(tmp_path: Path) -> None:
    write_app(tmp_path, "v1")
    async with serving("rapp:app", "-b", "127.0.0.1:0", "--reload", cwd=tmp_path) as cli:
        await wait_for_answer(cli.url, "v1")
        write_app(tmp_path, "v2")
        assert (await cli.wait_for_line(RESTART)).group(1) == "rapp.py"
        await wait_for_answer(cli.url, "v2")
        write_app(tmp_path, "v3")
        await cli.wait_for_line(RESTART, nth=2)
        await wait_for_answer(cli.url, "v3")
        await stop(cli)
    lines = log_lines(cli)
    watching = next(i for i, line in enumerate(lines) if "(--reload)" in line)
    stopping = next(i for i, line in enumerate(lines) if "Received SIGTERM" in line)
    between = lines[watching + 1 : stopping]
    # One line per restart: starting and stopping workers is routine under --reload.
    assert [re.search(RESTART, line) is not None for line in between] == [True, True], between


async def test_broken_change_keeps_the_server_up_and_shows_the_error_until_fixed(
    tmp_path: Path,
) -> None:
    write_app(tmp_path, "v1")
    async with serving("rapp:app", "-b", "127.0.0.1:0", "--reload", cwd=tmp_path) as cli:
        await wait_for_answer(cli.url, "v1")
        write_app(tmp_path, "v2", extra="syntax error(\n")
        await cli.wait_for_line(r"\[ERROR\] Worker \d+ failed to boot \(exit status 1\): waiting")
        assert any(line.startswith("SyntaxError: ") for line in cli.stderr), cli.stderr
        # The last code that worked still answers while the file is broken.
        assert (await request(cli.url)).body == b"v1"
        write_app(tmp_path, "v3")
        await wait_for_answer(cli.url, "v3")
        await stop(cli)
    # Not retried in a loop meanwhile: one failure, reported once.
    assert len([line for line in cli.stderr if "failed to boot" in line]) == 1


async def test_app_broken_at_start_is_served_once_fixed(tmp_path: Path) -> None:
    (tmp_path / "rapp.py").write_text("import no_such_package_xyz\n")
    async with serving("rapp:app", "-b", "127.0.0.1:0", "--reload", cwd=tmp_path) as cli:
        await cli.wait_for_line(r"failed to boot \(exit status 2\): waiting for a change")
        assert any(
            "it needs 'no_such_package_xyz', which is not installed" in line for line in cli.stderr
        )
        assert cli.process.returncode is None  # the supervisor waits for a fix
        write_app(tmp_path, "fixed")
        await wait_for_answer(cli.url, "fixed")


async def test_reload_dir_limits_what_is_watched(tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    write_app(tmp_path, "v1")
    args = ("-b", "127.0.0.1:0", "--reload", "--reload-dir", "watched")
    async with serving("rapp:app", *args, cwd=tmp_path) as cli:
        await wait_for_answer(cli.url, "v1")
        write_app(tmp_path, "v2")  # not under --reload-dir: no restart by itself
        (watched / "notes.txt").write_text("not Python: no restart\n")
        (watched / "helper.py").write_text("X = 1\n")
        # The restart names only the watched Python file, and loads the new rapp.py too.
        assert (await cli.wait_for_line(RESTART)).group(1) == "watched/helper.py"
        await wait_for_answer(cli.url, "v2")


async def test_reload_with_two_workers(tmp_path: Path) -> None:
    write_app(tmp_path, "v1")
    args = ("-b", "127.0.0.1:0", "--reload", "-w", "2")
    async with serving("rapp:app", *args, cwd=tmp_path) as cli:
        await wait_for_answer(cli.url, "v1")
        write_app(tmp_path, "v2")
        await cli.wait_for_line(r"\[INFO\] rapp.py changed: restarting 2 workers$")
        await wait_for_answer(cli.url, "v2")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reload-dir", "examples"], "--reload-dir needs --reload"),
        (["--reload", "--reload-dir", "/no/dir"], "--reload-dir /no/dir: not a directory"),
    ],
)  # fmt: skip
async def test_bad_reload_options(flags: list[str], message: str) -> None:
    result = await run_cli("examples.hello:app", "-b", "127.0.0.1:0", *flags)
    assert assert_one_line_error(result, 2) == f"trioserve: error: {message}"


def test_reload_without_watchfiles_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # import watchfiles -> ImportError
    assert cli.main(["examples.hello:app", "--reload"]) == 2
    assert capsys.readouterr().err == (
        "trioserve: error: --reload needs the watchfiles package: pip install 'trioserve[reload]'\n"
    )
