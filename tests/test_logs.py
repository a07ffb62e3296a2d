"""Logs end to end: --log-format json, --error-log, --log-config, and logs that fail.

The command runs as a real process (tests/test_cli.py's helpers); requests come from
curl and httpx. What is checked is what an operator would ship: each line of the
error and access logs, files reopened after rotation, one line at start for a log
that cannot be opened or configured, and a log that fails later reported once
while every request is still answered. The last tests drive :class:`AccessLog`
in process, where a failure can be made to happen on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.apps import hello as hello_app
from tests.test_cli import TIMEOUT, assert_one_line_error, request, run_cli, serving
from tests.test_docs import example
from trioserve import accesslog, serve_wsgi
from trioserve.config import COMMON_LOG_FORMAT, ConfigError

APP = "examples.hello:app"


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    curl_path = shutil.which("curl")
    if curl_path is None:
        pytest.skip("curl is not installed")
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [curl_path, "-sS", "--max-time", "10", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def wait_for_lines(path: Path, count: int) -> list[str]:
    """The file's lines once it has at least ``count`` (polled, with TIMEOUT as the bound)."""
    with trio.fail_after(TIMEOUT):
        while True:
            lines = path.read_text().splitlines() if path.exists() else []  # noqa: ASYNC240
            if len(lines) >= count:
                return lines
            # The file is written by the server subprocess: a polling interval for a
            # condition, bounded by fail_after(TIMEOUT), not a timing assumption.
            await trio.sleep(0.01)


# ---- --log-format json ---------------------------------------------------------------------

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


async def test_json_error_and_access_logs() -> None:
    args = ("-b", "127.0.0.1:0", "--log-format", "json", "--access-log", "-")
    async with serving(
        APP, *args, "--access-log-format", COMMON_LOG_FORMAT + ' "%({x-id}i)s"'
    ) as cli:
        first = json.loads(cli.stderr[0])
        result = await curl("-A", "curl-test", "-H", "X-Id: 42", cli.url + "/path?q=1")
        assert result.returncode == 0, result.stderr
        await cli.wait_for_line("", stream="stdout")
        access = json.loads(cli.stdout[0])
    assert ISO_TIME.fullmatch(first.pop("time")), first
    assert first == {
        "level": "INFO",
        "logger": "trioserve.error",
        "pid": cli.process.pid,
        "message": f"Listening on {cli.url}",
    }
    assert ISO_TIME.fullmatch(access.pop("time"))
    duration = access.pop("duration")
    assert isinstance(duration, float)
    assert 0 <= duration < TIMEOUT
    message = access.pop("message")
    assert message.startswith("127.0.0.1 - - [")
    assert message.endswith('] "GET /path?q=1 HTTP/1.1" 200 14 "42"')
    assert access == {
        "level": "INFO",
        "logger": "trioserve.access",
        "pid": cli.process.pid,
        "remote_addr": "127.0.0.1",
        "request": "GET /path?q=1 HTTP/1.1",
        "method": "GET",
        "path": "/path",
        "query": "q=1",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes_sent": 14,
        "referer": None,
        "user_agent": "curl-test",
        "request_headers": {"x-id": "42"},
    }


async def test_json_error_log_carries_the_traceback() -> None:
    async with serving(
        "tests.cli_targets:raises", "-b", "127.0.0.1:0", "--log-format", "json"
    ) as cli:
        result = await curl("-o", "/dev/null", "-w", "%{http_code}", cli.url)
        assert result.stdout == b"500"
        await cli.wait_for_line('"level": "ERROR"')
    record = next(json.loads(line) for line in cli.stderr if '"ERROR"' in line)
    assert record["logger"] == "trioserve.error"
    assert "Traceback (most recent call last)" in record["exception"]
    assert record["exception"].endswith("RuntimeError: raised on purpose by the app")


# ---- files: --error-log, --access-log, rotation ----------------------------------------------


async def test_error_log_to_a_file(tmp_path: Path) -> None:
    log, socket_path = tmp_path / "error.log", tmp_path / "s"
    args = ("-b", f"unix:{socket_path}", "--error-log", str(log))
    async with serving(APP, *args, listeners=0) as cli:
        lines = await wait_for_lines(log, 1)
        assert lines[0].endswith(f"[INFO] Listening on unix:{socket_path}")
        cli.send_signal(signal.SIGTERM)
        assert await cli.wait_exit() == 0
    lines = log.read_text().splitlines()
    assert "[INFO] Received SIGTERM: finishing in-flight requests" in lines[1]
    assert cli.stderr == []  # everything went to the file


async def test_access_log_file_is_reopened_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with serving(APP, "-b", "127.0.0.1:0", "--access-log", str(log)) as cli:
        assert (await request(cli.url, "/before")).status == 200
        await wait_for_lines(log, 1)
        log.rename(tmp_path / "access.log.1")  # what logrotate does
        assert (await request(cli.url, "/after")).status == 200
        after = await wait_for_lines(log, 1)
    rotated = (tmp_path / "access.log.1").read_text().splitlines()
    assert len(rotated) == 1
    assert '"GET /before HTTP/1.1"' in rotated[0]
    assert len(after) == 1
    assert '"GET /after HTTP/1.1"' in after[0]


@pytest.mark.parametrize(
    ("flag", "name", "path", "reason"),
    [
        ("--access-log", "access log", "/nonexistent/dir/access.log", "No such file or directory"),
        ("--error-log", "error log", "/nonexistent/dir/error.log", "No such file or directory"),
        ("--access-log", "access log", "/", "Is a directory"),
    ],
)
async def test_log_file_that_cannot_be_opened(flag: str, name: str, path: str, reason: str) -> None:
    result = await run_cli(APP, "-b", "127.0.0.1:0", flag, path)
    line = assert_one_line_error(result, 2)
    assert line == f"trioserve: error: cannot open the {name} {path}: {reason}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_access_log_on_a_full_disk_is_reported_once_and_requests_are_answered() -> None:
    async with serving(APP, "-b", "127.0.0.1:0", "--access-log", "/dev/full") as cli:
        for _ in range(5):
            response = await request(cli.url)
            assert response.status == 200
            assert response.body == b"Hello, world!\n"
        await cli.wait_for_line("cannot write the access log")
    reports = [line for line in cli.stderr if "cannot write" in line]
    assert len(reports) == 1, cli.stderr
    assert reports[0].endswith(
        "[ERROR] cannot write the access log to /dev/full: No space left on device;"
        " requests are still served, further failures are not reported"
    )
    assert "Traceback" not in "\n".join(cli.stderr)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_error_log_on_a_full_disk_is_reported_once_on_stderr(tmp_path: Path) -> None:
    socket_path = tmp_path / "s"
    args = ("-b", f"unix:{socket_path}", "--error-log", "/dev/full", "--log-level", "debug")
    async with serving(APP, *args, listeners=0) as cli:
        # The first line that fails is "Listening on ...", written once the socket is bound.
        await cli.wait_for_line("cannot write the error log")
        for _ in range(3):
            result = await curl("--unix-socket", str(socket_path), "http://x/")
            assert result.stdout == b"Hello, world!\n"
    assert cli.stderr == [
        "trioserve: cannot write the error log to /dev/full: No space left on device;"
        " further failures are not reported"
    ]


# ---- --log-config -----------------------------------------------------------------------------


async def test_log_config_toml_from_the_docs(tmp_path: Path) -> None:
    """The --log-config example of docs/logging.md (marked ``test: log-config``)."""
    path = tmp_path / "logging.toml"
    path.write_text(example("log-config").text)
    async with serving(
        APP, "-b", "127.0.0.1:0", "--log-config", str(path), log_stream="stdout"
    ) as cli:
        result = await curl(cli.url + "/from-the-docs")
        assert result.returncode == 0
        await cli.wait_for_line("from-the-docs", stream="stdout")
    records = [json.loads(line) for line in cli.stdout]
    assert records[0]["message"].startswith("Listening on http://127.0.0.1:")
    assert records[0]["logger"] == "trioserve.error"
    access = [record for record in records if record["logger"] == "trioserve.access"]
    assert len(access) == 1
    assert access[0]["path"] == "/from-the-docs"
    assert access[0]["status"] == 200
    assert cli.stderr == []


async def test_log_config_json_dict(tmp_path: Path) -> None:
    access_file = tmp_path / "access.log"
    config = {
        "version": 1,
        "formatters": {"plain": {"format": "%(levelname)s|%(name)s|%(message)s"}},
        "handlers": {
            "err": {"class": "logging.StreamHandler", "formatter": "plain"},
            "acc": {"class": "logging.FileHandler", "filename": str(access_file)},
        },
        "loggers": {
            "trioserve": {"handlers": ["err"], "level": "INFO"},
            "trioserve.access": {"handlers": ["acc"], "propagate": False},
        },
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    fmt = "%(m)s %(U)s %(s)s"
    async with serving(APP, "-b", "127.0.0.1:0", "--log-config", str(path),
                       "--access-log-format", fmt) as cli:  # fmt: skip
        assert cli.stderr[0] == f"INFO|trioserve.error|Listening on {cli.url}"
        assert (await request(cli.url, "/json-config")).status == 200
        lines = await wait_for_lines(access_file, 1)
    assert lines == ["GET /json-config 200"]


async def test_log_config_ini_like_gunicorn(tmp_path: Path) -> None:
    path = tmp_path / "logging.ini"
    path.write_text(
        "[loggers]\nkeys = root, access\n\n"
        "[handlers]\nkeys = out\n\n"
        "[formatters]\nkeys = tagged\n\n"
        "[logger_root]\nhandlers = out\nlevel = INFO\n\n"
        "[logger_access]\nqualname = trioserve.access\nhandlers = out\npropagate = 0\n\n"
        "[handler_out]\nclass = StreamHandler\nformatter = tagged\nargs = (sys.stdout,)\n\n"
        "[formatter_tagged]\nformat = ini:%(name)s:%(message)s\n"
    )
    async with serving(
        APP, "-b", "127.0.0.1:0", "--log-config", str(path), log_stream="stdout"
    ) as cli:
        assert (await request(cli.url, "/ini")).status == 200
        await cli.wait_for_line('"GET /ini HTTP/1.1" 200', stream="stdout")
    assert cli.stdout[0] == f"ini:trioserve.error:Listening on {cli.url}"
    assert cli.stdout[1].startswith("ini:trioserve.access:127.0.0.1 - - [")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.json", None, "cannot read it: No such file or directory"),
        ("bad.json", "{version: 1", "not valid JSON: Expecting property name enclosed in double"
         " quotes: line 1 column 2 (char 1)"),
        ("bad.toml", "version = ", "not valid TOML: Invalid value (at end of document)"),
        ("list.json", "[1, 2]", "expected a dictConfig dictionary"),
        ("noversion.json", "{}", "dictionary doesn't specify a version"),
        ("handler.json",
         '{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}',
         "Unable to configure handler 'h': Cannot resolve 'no.such.Handler': No module named"
         " 'no'"),
        ("missing.ini", None, "cannot read it: No such file or directory"),
        ("partial.ini", "[loggers]\nkeys = root\n", "missing 'formatters'"),
        ("logging.yaml", "version: 1", "give a .json or .toml dictConfig, or an .ini fileConfig"),
    ],
    ids=lambda value: value if isinstance(value, str) and "." in value[-5:] else None,
)  # fmt: skip
async def test_log_config_that_does_not_load(
    tmp_path: Path, name: str, content: str | None, reason: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = await run_cli(APP, "-b", "127.0.0.1:0", "--log-config", str(path))
    line = assert_one_line_error(result, 2)
    assert line == f"trioserve: error: --log-config {path}: {reason}"


@pytest.mark.parametrize("flag", ["--access-log=-", "--error-log=-", "--log-format=json"])
async def test_log_config_replaces_the_other_log_options(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "logging.json"
    path.write_text('{"version": 1}')
    result = await run_cli(APP, "-b", "127.0.0.1:0", "--log-config", str(path), flag)
    option = flag.partition("=")[0]
    assert assert_one_line_error(result, 2) == (
        f"trioserve: error: --log-config configures the logs: give no {option}"
        " (configure it in the file)"
    )


async def test_bad_log_format_value() -> None:
    result = await run_cli(APP, "-b", "127.0.0.1:0", "--log-format", "xml")
    assert assert_one_line_error(result, 2) == (
        "trioserve: error: log-format must be text or json, not 'xml'"
    )


# ---- --access-log-format: refused at start -------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("%(nope)s", "unknown atom %(nope)s"),
        ("%(h)s %(h)", "atom %(h) has no s: write %(h)s"),
        ("%(D)d", "atom %(D)d: atoms are strings, write %(D)s"),
        ("%(h)-15x", "atom %(h)-15x: atoms are strings, write %(h)-15s"),
        ("100% %(h)s", "stray % at position 3; write %% for a percent sign"),
        ("%(h)s %(r", "unclosed %( at position 6: '%(r'"),
        ("%({x-id})s", "unknown atom %({x-id})s"),  # a header atom needs i or o
    ],
)
async def test_access_log_format_typos_are_refused_at_start(fmt: str, message: str) -> None:
    result = await run_cli(
        APP, "-b", "127.0.0.1:0", "--access-log", "-", "--access-log-format", fmt
    )
    assert assert_one_line_error(result, 2) == f"trioserve: error: --access-log-format: {message}"


@pytest.mark.parametrize(
    "fmt",
    [
        COMMON_LOG_FORMAT,
        "%(h)-15s %(T)s %(M)s %(D)s %(L)s %(p)s 100%% %({user-agent}i)s %({content-type}o)s",
        "no atoms at all",
    ],
)
def test_access_log_formats_that_are_accepted(fmt: str) -> None:
    accesslog.check_format(fmt)


def test_config_checks_the_access_log_format_for_embedders() -> None:
    from trioserve import Config

    with pytest.raises(ConfigError, match=re.escape("unknown atom %(nope)s")):
        Config(access_log_format="%(nope)s")


# ---- AccessLog itself never fails a request --------------------------------------------------


@pytest.fixture
def error_records() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of trioserve.error while the test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("trioserve.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def get_all(url: str, http2: bool, count: int) -> list[httpx.Response]:
    with httpx.Client(http1=not http2, http2=http2, timeout=TIMEOUT) as client:
        return [client.get(url + f"/{n}") for n in range(count)]


class _Failing(logging.Filter):
    """A filter that raises, as a broken handler or filter of the user's might."""

    def filter(self, record: logging.LogRecord) -> bool:
        raise KeyError("the filter broke")


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c"])
@pytest.mark.parametrize("failure", ["atoms", "filter"])
async def test_a_failing_access_log_is_reported_once_and_requests_are_answered(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    error_records: list[logging.LogRecord],
    http2: bool,
    failure: str,
) -> None:
    access = logging.getLogger("trioserve.access")
    monkeypatch.setattr(access, "level", logging.INFO)
    if failure == "atoms":

        def broken(self: Any, stream: Any) -> dict[str, str]:
            raise KeyError("nope")

        monkeypatch.setattr(accesslog.AccessLog, "atoms", broken)
    else:
        monkeypatch.setattr(access, "filters", [_Failing()])
    server = await serve_wsgi(hello_app, nursery, bind="127.0.0.1:0", access_log="-")
    responses = await trio.to_thread.run_sync(get_all, server.url, http2, 4)
    await server.stop()
    assert [response.status_code for response in responses] == [200] * 4
    assert all(response.text == "Hello, world!\n" for response in responses)
    reports = [record.getMessage() for record in error_records]
    assert len(reports) == 1, reports
    assert reports[0].startswith("Access log: cannot log a request (KeyError: ")
    assert reports[0].endswith("requests are still served, further failures are not reported")
