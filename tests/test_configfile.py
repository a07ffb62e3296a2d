"""``--config FILE``: TOML keys are Config fields, flags override the file, errors are one line.

The agreement test generates a file that sets every field of
:class:`trioserve.config.Config` to a value other than its default, so a new
field is covered the day it is added (and fails here if no value of its type
can be generated: then add it to ``SPECIAL``). ``--log-config`` excludes the
other log options, so it has a document of its own (``EXCLUSIVE``).
"""

from __future__ import annotations

import dataclasses
import re
import signal
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import trio

from tests.test_cli import ROOT, assert_one_line_error, request, run_cli, serving
from trioserve.cli import build_parser, config_from_args
from trioserve.config import Config, ConfigError, options
from trioserve.configfile import load_config_file

DEFAULTS = Config()

# Fields whose values must mean something (the generic ones below would be rejected).
SPECIAL: dict[str, Any] = {
    "bind": ["127.0.0.1:9", "unix:/tmp/trioserve-test.sock", "[::1]:9"],
    "log_level": "warning",
    "root_path": "/api",
    "access_log": "-",
    "certfile": "cert.pem",
    "keyfile": "key.pem",
    "forwarded_allow_ips": ["10.0.0.0/8", "unix"],
    "unix_socket_mode": "660",
    "root": "static",
    "static_charset": "utf-8",
    "error_log": "-",
    "log_format": "json",
    "keyfile_password": "env:TRIOSERVE_KEY_PASSWORD",
    "ca_certs": "ca.pem",
    "cert_reqs": "required",
    "ciphers": "ECDHE+AESGCM",
    "tls_min_version": "1.3",
    "reload_dir": ["src"],
    "umask": "027",
    "spill_dir": "/var/tmp",
    "http1_parser": "h11",
    "app_thread_scheduling": "batch",
    "metrics_bind": "127.0.0.1:9100",
}
# Fields that cannot be set together with the others: each gets a document of its own.
EXCLUSIVE: dict[str, Any] = {"log_config": "logging.toml"}


def non_default_value(field: dataclasses.Field[Any], kind: Any) -> Any:
    """A valid TOML value for ``field`` that differs from its default."""
    if field.name in SPECIAL:
        return SPECIAL[field.name]
    default = getattr(DEFAULTS, field.name)
    if kind is bool:
        return not default
    if kind is int:
        return default + 1
    if kind is float:
        return default + 1.5
    if kind in (str, str | None):
        return "x" + (default or "")
    raise AssertionError(f"add a value for {field.name} ({kind}) to SPECIAL")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return repr(value)


def every_field(dash: bool = False) -> tuple[str, dict[str, Any]]:
    """A TOML document setting every field, and the values it sets."""
    hints = get_type_hints(Config)
    values = {
        field.name: non_default_value(field, hints[field.name])
        for field in options()
        if field.name not in EXCLUSIVE
    }
    lines = [
        f"{name.replace('_', '-') if dash else name} = {toml_value(value)}"
        for name, value in values.items()
    ]
    return "\n".join(lines) + "\n", values


def write(tmp_path: Path, text: str, name: str = "trioserve.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def from_cli(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(list(argv)))


# ---------------------------------------------------------------------------
# Flags, fields and file keys agree
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dash", [False, True], ids=["snake_case", "dash-case"])
def test_every_field_has_a_file_key(tmp_path: Path, dash: bool) -> None:
    text, values = every_field(dash)
    path = write(tmp_path, text)
    loaded = load_config_file(path)
    assert set(loaded) | set(EXCLUSIVE) == {field.name for field in options()}
    expected = Config(**values)
    for field in options():
        if field.name not in EXCLUSIVE:
            assert getattr(expected, field.name) != getattr(DEFAULTS, field.name), field.name
    assert Config(**loaded) == expected
    # The same through the command line: --config alone gives the file's values.
    assert from_cli("--config", path) == expected


@pytest.mark.parametrize("name", sorted(EXCLUSIVE))
@pytest.mark.parametrize("dash", [False, True], ids=["snake_case", "dash-case"])
def test_exclusive_fields_have_a_file_key(tmp_path: Path, name: str, dash: bool) -> None:
    key = name.replace("_", "-") if dash else name
    path = write(tmp_path, f"{key} = {toml_value(EXCLUSIVE[name])}\n")
    expected = DEFAULTS.replace(**{name: EXCLUSIVE[name]})
    assert Config(**load_config_file(path)) == expected
    assert from_cli("--config", path) == expected


def test_every_flag_is_a_field_and_every_field_a_flag() -> None:
    parser = build_parser()
    dests = {action.dest for action in parser._actions if action.option_strings}
    fields = {field.name for field in options()}
    # --help, --version and --config are the only flags that are not options of the server.
    assert dests - fields == {"help", "version", "config"}
    assert fields <= dests
    for field in options():
        flags = field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)
        # The file key in dash-case is the long flag.
        assert "--" + field.name.replace("_", "-") in flags


def test_flags_override_the_file_and_absent_flags_do_not(tmp_path: Path) -> None:
    text, values = every_field()
    path = write(tmp_path, text)
    config = from_cli(
        "--config", path, "--threads", "3", "-b", "127.0.0.1:1", "--no-proxy-protocol"
    )
    assert config.threads == 3
    assert config.bind == ("127.0.0.1:1",)  # a repeatable flag replaces the file's list
    assert config.proxy_protocol is False
    # Everything not on the command line comes from the file, not from the defaults.
    assert config == Config(**values).replace(
        threads=3, bind=("127.0.0.1:1",), proxy_protocol=False
    )


def test_a_partial_file_leaves_the_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 3\ngraceful-timeout = 7\nbind = "unix:/tmp/x.sock"\n')
    config = from_cli("--config", path)
    assert config == DEFAULTS.replace(workers=3, graceful_timeout=7.0, bind=("unix:/tmp/x.sock",))
    assert isinstance(config.graceful_timeout, float)


def test_no_config_file_is_the_defaults() -> None:
    assert from_cli() == DEFAULTS


def test_example_file_loads() -> None:
    path = ROOT / "examples" / "trioserve.toml"
    values = load_config_file(str(path))
    assert values  # it sets something
    config = Config(**values)
    assert config != DEFAULTS


# ---------------------------------------------------------------------------
# Errors: one line, naming the problem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("thread = 4\n", "unknown key 'thread'"),
        ("config = 'other.toml'\n", "unknown key 'config'"),
        ("max_requests-jitter = 1\n", "unknown key 'max_requests-jitter'"),
        ("[server]\nthreads = 4\n", "unknown key 'server'"),
        ("threads = 4\nthreads = 5\n", "invalid TOML"),
        ("threads = 4\nthreads = 5\n", "line 2"),
        ("max_requests = 1\nmax-requests = 2\n", "'max_requests' is given twice"),
        ('threads = "4"\n', "threads must be an integer, not a string ('4')"),
        ("threads = 4.5\n", "threads must be an integer, not a float (4.5)"),
        ("threads = true\n", "threads must be an integer, not a boolean (True)"),
        ("graceful-timeout = true\n", "graceful-timeout must be a number, not a boolean"),
        ("graceful_timeout = '5'\n", "graceful_timeout must be a number, not a string"),
        ("factory = 1\n", "factory must be true or false, not an integer (1)"),
        ("certfile = 1\n", "certfile must be a string, not an integer"),
        ("bind = 8000\n", "bind must be a string or a list of strings, not an integer"),
        ("bind = [':8000', 1]\n", "bind must be a string or a list of strings, not an array"),
        ("bind = { port = 1 }\n", "bind must be a string or a list of strings, not a table"),
        ("server_header = 1979-05-27\n", "server_header must be a string, not a date or time"),
    ],
)
def test_bad_file_is_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    error = str(caught.value)
    assert "\n" not in error
    assert error.startswith(f"config file {path}: ")
    assert message in error


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cannot read config file .*missing\.toml: "):
        load_config_file(str(tmp_path / "missing.toml"))


def test_invalid_value_from_the_file_is_checked_like_a_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "threads = 0\n")
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        from_cli("--config", path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no_such_option = 1\n", "unknown key 'no_such_option'"),
        ('workers = "two"\n', "workers must be an integer, not a string ('two')"),
        ("workers = \n", "invalid TOML"),
        ("workers = 0\n", "workers must be at least 1"),
    ],
)
async def test_bad_file_from_the_command_line_exits_2(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    result = await run_cli("examples.hello:app", "--config", path)
    line = assert_one_line_error(result, 2)
    assert message in line


async def test_missing_file_from_the_command_line_exits_2(tmp_path: Path) -> None:
    result = await run_cli("examples.hello:app", "--config", str(tmp_path / "nope.toml"))
    line = assert_one_line_error(result, 2)
    assert "nope.toml" in line


# ---------------------------------------------------------------------------
# A real server
# ---------------------------------------------------------------------------


async def test_server_uses_the_file_and_the_command_line_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'bind = "127.0.0.1:0"\nserver-header = "from-the-file"\nthreads = 2\n',
    )
    async with serving("examples.hello:app", "--config", path) as cli:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", cli.url)
        response = await request(cli.url)
        assert response.status == 200
        assert response.headers["server"] == "from-the-file"
    async with serving(
        "examples.hello:app", "--config", path, "--server-header", "from-the-flag"
    ) as cli:
        response = await request(cli.url)
        assert response.headers["server"] == "from-the-flag"
        cli.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await cli.wait_exit() == 0
