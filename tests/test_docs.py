"""The README's checkable claims: its CLI reference, its security tables, its examples.

The truth comes from the code, never from a list kept here: the options are those of the
parser ``trioserve.cli.build_parser()`` builds (what ``trioserve --help`` prints), their
defaults are :class:`trioserve.config.Config`'s field defaults, and the constants the
security tables name are looked up in ``trioserve/``. So a flag added to ``Config``
without a README row fails ``test_cli_table_lists_every_option_help_prints``, a changed
default fails ``test_cli_table_defaults_are_config_defaults``, and so on.

How the README is read:

* The CLI reference is the one table whose header is ``| option | default | meaning |``,
  one row per parser option. Its first cell holds that option's flags, each a Markdown
  code span with an optional placeholder: -b and --bind ADDRESS, comma-separated.
* A default cell is ``(none)``, ``off``/``on``, ``—`` (the option takes no value), one or
  more comma-separated code spans (a span holding two double quotes is the empty
  string), or a number with an optional ``KiB``/``MiB``/``GiB`` unit (``1 GiB``,
  ``10,000``). A trailing parenthetical is a comment: ``0 (never)``.
* The "Security and limits" tables have a ``setting`` column (a code span holding a
  --flag or a CONSTANT of ``trioserve/``) and a ``default`` column read the same way.

The Python examples are compiled and their imports resolved; the embedding, nursery.start
and trioserve.testing examples run in-process under ``trio.fail_after`` (the embedding one
binds 127.0.0.1:0 and stops at once). trioserve commands in shell and systemd blocks are
parsed by the real parser; the TOML example is loaded as a config file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

import trioserve.chunked
import trioserve.connection
import trioserve.http1
import trioserve.http2
import trioserve.stream
from examples import hello
from trioserve import cli, serve_wsgi
from trioserve.config import Config, options
from trioserve.configfile import load_config_file

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Modules whose constants the security tables may name.
CONSTANT_MODULES: tuple[ModuleType, ...] = (
    trioserve.chunked,
    trioserve.http1,
    trioserve.http2,
    trioserve.connection,
    trioserve.stream,
)

TIMEOUT = 10  # seconds: the bound on every example run here


def hello_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The ``app`` the examples leave undefined."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]


# ---- reading Markdown ------------------------------------------------------------------------


def section(title: str) -> str:
    """The text of the level-2 section ``## title``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match is not None, f"README has no section '## {title}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)


def split_row(line: str) -> list[str]:
    """A table row's cells; a ``|`` inside a code span does not split."""
    cells, current, in_code = [], "", False
    for char in line.strip().removeprefix("|").removesuffix("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
    cells.append(current.strip())
    return cells


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table in ``text``: (header cells, body rows)."""
    found = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = split_row(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                row = split_row(lines[i])
                assert len(row) == len(header), f"row has {len(row)} cells: {lines[i]}"
                rows.append(row)
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


# ---- reading a default cell ------------------------------------------------------------------


NO_DEFAULT = "—"  # the cell of an option that takes no value (--help)
_UNITS = {None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|GiB))?")
_SPANS = re.compile(r"`[^`]*`(?:, `[^`]*`)*")
_COMMENT = re.compile(r"(.+?) \([^()`]*\)")


def parse_default(cell: str) -> Any:
    """The value a default cell states (see the module docstring for the forms)."""
    if cell in (NO_DEFAULT, "(none)"):
        return None if cell == "(none)" else NO_DEFAULT
    comment = _COMMENT.fullmatch(cell)
    if comment is not None:
        cell = comment.group(1)
    if cell in ("off", "on"):
        return cell == "on"
    if _SPANS.fullmatch(cell):
        values = tuple("" if span == '""' else span for span in code_spans(cell))
        return values[0] if len(values) == 1 else values
    number = _NUMBER.fullmatch(cell)
    if number is not None:
        digits = number.group(1).replace(",", "")
        value = float(digits) if "." in digits else int(digits)
        return value * _UNITS[number.group(2)]
    raise AssertionError(f"cannot read the default {cell!r}")


def same_default(stated: Any, truth: Any) -> bool:
    """Does the README's ``stated`` value equal ``truth``, type included (True is not 1)?"""
    if isinstance(truth, tuple) and isinstance(stated, str):
        stated = (stated,)
    if isinstance(truth, bool) or isinstance(stated, bool):
        return stated is truth
    if isinstance(truth, int | float):
        if not isinstance(stated, int | float) or stated != truth:
            return False
        return isinstance(truth, float) or isinstance(stated, int)
    return type(stated) is type(truth) and stated == truth


def test_default_cells_are_read_as_intended() -> None:
    """The reader itself: each form, and a cell it cannot read fails loudly."""
    assert parse_default("(none)") is None
    assert parse_default(NO_DEFAULT) == NO_DEFAULT
    assert parse_default("off") is False
    assert parse_default("0 (never)") == 0
    assert parse_default("1 GiB") == 2**30
    assert parse_default("10,000") == 10_000
    assert parse_default('`""`') == ""
    assert parse_default("`127.0.0.1`, `::1`, `unix`") == ("127.0.0.1", "::1", "unix")
    assert parse_default('`%(h)s "%(r)s"` (common log format)') == '%(h)s "%(r)s"'
    assert same_default(5, 5.0)
    assert not same_default(1.5, 1)
    assert not same_default(1, True)
    assert not same_default("5", 5)
    assert same_default("127.0.0.1:8000", ("127.0.0.1:8000",))
    with pytest.raises(AssertionError, match="cannot read"):
        parse_default("about five")


# ---- the truth: the parser and Config ------------------------------------------------------


def field_defaults() -> dict[str, Any]:
    defaults = {}
    for field in options():
        if field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = field.default
    return defaults


FIELD_DEFAULTS = field_defaults()


def parser_options() -> dict[str, argparse.Action]:
    """Every option string ``trioserve --help`` prints, mapped to its parser action."""
    parser = cli.build_parser()
    return {
        flag: action
        for action in parser._actions
        if action.help is not argparse.SUPPRESS
        for flag in action.option_strings
    }


def expected_default(action: argparse.Action) -> Any:
    """What the option defaults to: its Config field's default (the parser's is a sentinel)."""
    if action.dest in FIELD_DEFAULTS:
        return FIELD_DEFAULTS[action.dest]
    if action.default is argparse.SUPPRESS:
        return NO_DEFAULT
    return action.default


def test_every_config_field_is_a_printed_option() -> None:
    """The premise of the checks below: each Config field is an option of the parser."""
    dests = {action.dest for action in parser_options().values()}
    assert set(FIELD_DEFAULTS) <= dests


def test_help_prints_every_option_of_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """``trioserve --help`` (cli.main, in-process) prints each option string we compare."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for flag in parser_options():
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", printed), flag


# ---- the CLI reference table -------------------------------------------------------------------


@dataclass
class Row:
    flags: list[str]
    placeholders: list[str]
    default: str
    meaning: str


def cli_table() -> list[Row]:
    found = [rows for header, rows in tables(README) if header == ["option", "default", "meaning"]]
    assert len(found) == 1, f"expected one '| option | default | meaning |' table, not {len(found)}"
    result = []
    for option_cell, default, meaning in found[0]:
        spans = code_spans(option_cell)
        assert option_cell == ", ".join(f"`{span}`" for span in spans), option_cell
        flags, placeholders = [], []
        for span in spans:
            flag, *placeholder = span.split(" ")
            assert flag.startswith("-"), option_cell
            assert len(placeholder) <= 1, option_cell
            flags.append(flag)
            placeholders.extend(placeholder)
        result.append(Row(flags, placeholders, default, meaning))
    return result


def test_cli_table_lists_every_option_help_prints() -> None:
    """Every option string of ``--help`` has a row, and every row's flags exist."""
    listed = [flag for row in cli_table() for flag in row.flags]
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    printed = set(parser_options())
    missing = sorted(printed - set(listed))
    unknown = sorted(set(listed) - printed)
    assert not missing, f"options --help prints but the README does not list: {missing}"
    assert not unknown, f"options the README lists but --help does not print: {unknown}"


def test_each_cli_row_is_exactly_one_option() -> None:
    """A row names one option with all its spellings (``-b``/``--bind``), so its default
    belongs to that option alone."""
    actions = parser_options()
    for row in cli_table():
        owners = {id(actions[flag]) for flag in row.flags if flag in actions}
        assert len(owners) == 1, f"{row.flags}: flags of {len(owners)} options in one row"
        action = actions[row.flags[0]]
        assert sorted(row.flags) == sorted(action.option_strings), row.flags


def test_cli_table_defaults_are_config_defaults() -> None:
    actions = parser_options()
    wrong = []
    for row in cli_table():
        action = actions[row.flags[0]]
        stated, truth = parse_default(row.default), expected_default(action)
        if not same_default(stated, truth):
            wrong.append(f"{row.flags[-1]}: README says {row.default!r}, the default is {truth!r}")
    assert not wrong, "\n".join(wrong)


def test_cli_table_shows_a_value_exactly_for_options_that_take_one() -> None:
    """``--threads N`` but ``--factory``: a placeholder where the option takes a value."""
    actions = parser_options()
    for row in cli_table():
        takes_value = actions[row.flags[0]].nargs != 0
        assert bool(row.placeholders) == takes_value, row.flags


def test_cli_meanings_keep_what_the_help_text_promises() -> None:
    """Each meaning is written, names every HTTP status the help text names (413 beyond,
    503 at once, ...), and says "repeatable" for an option that can be given again."""
    actions = parser_options()
    for row in cli_table():
        action = actions[row.flags[0]]
        assert row.meaning, row.flags
        help_text = (action.help or "").rsplit(" (default: ", 1)[0]
        for status in re.findall(r"\b[45]\d\d\b", help_text):
            assert status in row.meaning, f"{row.flags[-1]}: meaning does not say {status}"
        if isinstance(action, argparse._AppendAction):
            assert "repeatable" in row.meaning, row.flags


# ---- the security tables -----------------------------------------------------------------------


def security_rows() -> list[tuple[str, str]]:
    """(setting cell, default cell) of every row of the "Security and limits" tables."""
    rows: list[tuple[str, str]] = []
    for header, body in tables(section("Security and limits")):
        assert "setting" in header, header
        assert "default" in header, header
        setting, default = header.index("setting"), header.index("default")
        rows.extend((row[setting], row[default]) for row in body)
    assert rows, "no table in 'Security and limits'"
    return rows


def constant(name: str) -> Any:
    values = {getattr(module, name) for module in CONSTANT_MODULES if hasattr(module, name)}
    assert len(values) == 1, f"{name}: found {len(values)} values in trioserve/"
    return values.pop()


def security_settings() -> list[tuple[str, str]]:
    """(setting: ``--flag`` or ``CONSTANT``, its default cell) for every row."""
    settings = []
    for setting_cell, default in security_rows():
        spans = code_spans(setting_cell)
        assert setting_cell == f"`{spans[0]}`", f"one code span per setting: {setting_cell}"
        settings.append((spans[0], default))
    return settings


def test_security_defaults_are_the_code_defaults() -> None:
    actions = parser_options()
    wrong = []
    for setting, cell in security_settings():
        if setting.startswith("-"):
            assert setting in actions, f"{setting} is not an option"
            truth = expected_default(actions[setting])
        else:
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", setting), setting
            truth = constant(setting)
        if not same_default(parse_default(cell), truth):
            wrong.append(f"{setting}: README says {cell!r}, the code has {truth!r}")
    assert not wrong, "\n".join(wrong)


def test_security_tables_cover_the_abuse_budgets_and_every_timeout() -> None:
    settings = {setting for setting, _ in security_settings()}
    for name in ("RESET_BUDGET", "CONTROL_BUDGET"):
        assert name in settings, name
    for name in FIELD_DEFAULTS:
        if name.endswith("_timeout"):
            assert "--" + name.replace("_", "-") in settings, name


# ---- examples: Python ------------------------------------------------------------------------


PYTHON_BLOCKS = code_blocks(README, "python")


@pytest.mark.parametrize(
    "source", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_python_example_compiles_and_its_imports_exist(source: str) -> None:
    tree = ast.parse(compile(source, "README.md", "exec", ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            assert node.level == 0
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_readme_has_the_examples_checked_below() -> None:
    assert len(PYTHON_BLOCKS) >= 3
    assert any("serve_wsgi" in block for block in PYTHON_BLOCKS)


async def test_embedding_example_runs() -> None:
    """The block under "Embedding in a trio program", with ``app`` = examples.hello: it
    binds 127.0.0.1:0, prints the URL and stops gracefully by itself."""
    blocks = code_blocks(section("Embedding in a trio program"), "python")
    assert blocks, "no python block under 'Embedding in a trio program'"
    source = blocks[0].rstrip("\n")
    body, _, last = source.rpartition("\n")
    assert last == "trio.run(main)", last
    printed: list[str] = []
    namespace: dict[str, Any] = {
        "__name__": "readme_embedding",
        "app": hello_app,
        "print": lambda *args: printed.append(" ".join(map(str, args))),
    }
    exec(compile(body, "README.md", "exec"), namespace)
    with trio.fail_after(TIMEOUT):
        await namespace["main"]()
    assert len(printed) == 1
    assert re.fullmatch(r"serving on http://127\.0\.0\.1:\d+", printed[0])


async def test_nursery_start_idiom_runs(nursery: trio.Nursery) -> None:
    """The one-line ``nursery.start`` spelling the embedding section offers."""
    spans = [
        span
        for span in code_spans(section("Embedding in a trio program"))
        if "nursery.start(" in span
    ]
    assert len(spans) == 1, spans
    namespace: dict[str, Any] = {
        "functools": functools,
        "serve_wsgi": serve_wsgi,
        "app": hello_app,
        "nursery": nursery,
    }
    code = compile(spans[0], "README.md", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    with trio.fail_after(TIMEOUT):
        coroutine = eval(code, namespace)
        assert coroutine is not None, "the idiom does not await"
        await coroutine
        server = namespace["server"]
        assert server.url.startswith("http://127.0.0.1:")
        await server.stop()


@pytest.mark.parametrize("index", [0, 1], ids=["get", "reset"])
async def test_testing_example_runs(index: int) -> None:
    """Each trioserve.testing block, with an upload handler that reads until the body ends."""
    blocks = code_blocks(section("Testing your app with `trioserve.testing`"), "python")
    assert len(blocks) == 2

    def my_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        while environ["wsgi.input"].read(1024):
            pass
        start_response("200 OK", [("Content-Length", "0")])
        return []

    namespace: dict[str, Any] = {"__name__": "readme_testing", "my_app": my_app}
    exec(compile(blocks[index], "README.md", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    with trio.fail_after(TIMEOUT):
        await tests[0]()


# ---- examples: TOML and commands -------------------------------------------------------------


def test_config_file_example_is_valid(tmp_path: Path) -> None:
    # The --config example (the --log-config one runs in tests/test_logs.py).
    blocks = [block for block in code_blocks(section("Deployment"), "toml") if "--config" in block]
    assert len(blocks) == 1
    path = tmp_path / "trioserve.toml"
    path.write_text(blocks[0])
    Config(**load_config_file(str(path)))


def readme_commands() -> list[list[str]]:
    """The arguments of every ``trioserve`` / ``python -m trioserve`` command in shell and
    ini blocks (``&&`` chains and ``\\`` continuations included; comments dropped)."""
    commands = []
    for language in ("sh", "ini"):
        for block in code_blocks(README, language):
            for line in block.replace("\\\n", " ").split("\n"):
                if language == "ini":
                    if not line.startswith("ExecStart="):
                        continue
                    line = line.removeprefix("ExecStart=")
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words[:1] and (words[0] == "trioserve" or words[0].endswith("/trioserve")):
                        commands.append(words[1:])
                    elif words[:3] == ["python", "-m", "trioserve"]:
                        commands.append(words[3:])
    return commands


def test_readme_commands_are_valid_trioserve_command_lines() -> None:
    """Each command parses with the real parser, its options make a valid Config, and it
    names an app or --root (nothing is imported or bound)."""
    commands = readme_commands()
    assert len(commands) >= 8, commands
    for argv in commands:
        args = cli.build_parser().parse_args(argv)  # exits (fails the test) on a bad option
        config = Config(**cli.given_options(args))
        cli.check_app_source(args.app, config)


def test_commands_the_readme_names_exist() -> None:
    """``trioserve`` is a console script running cli.main; ``python -m trioserve`` works."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["trioserve"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
    assert importlib.util.find_spec("trioserve.__main__") is not None
    result = subprocess.run(
        [sys.executable, "-m", "trioserve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--forwarded-allow-ips" in result.stdout


# ---- links -----------------------------------------------------------------------------------


def heading_anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_readme_section_links_resolve() -> None:
    """``[...](#anchor)`` links (the CLI table has several) point at existing headings."""
    prose = re.sub(r"^```.*?^```$", "", README, flags=re.M | re.S)
    anchors = {heading_anchor(title) for title in re.findall(r"^#+ (.+)$", prose, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links
    missing = sorted(set(links) - anchors)
    assert not missing, f"links to no heading: {missing}"


@pytest.mark.external
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed; .ci/run installs it")
async def test_http2_and_tls_walkthrough_works(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The README's HTTP/2 and TLS steps: trustme's CLI makes the files it names, curl
    trusting certs/client.pem gets HTTP/2 over TLS, and h2c with prior knowledge works on
    a plain port (ports are 0 here instead of the README's fixed ones)."""
    text = section("HTTP/2 and TLS")
    assert "python -m trustme -d certs" in text
    certs = tmp_path / "certs"
    certs.mkdir()
    await trio.run_process([sys.executable, "-m", "trustme", "-d", str(certs)], capture_stdout=True)
    for name in ("server.pem", "server.key", "client.pem"):
        assert f"certs/{name}" in text
        assert (certs / name).is_file(), name
    with trio.fail_after(30):
        tls = await serve_wsgi(
            hello.app,
            nursery,
            bind="127.0.0.1:0",
            certfile=str(certs / "server.pem"),
            keyfile=str(certs / "server.key"),
        )
        plain = await serve_wsgi(hello.app, nursery, bind="127.0.0.1:0")
        for flags, url in (
            (["--http2", "--cacert", str(certs / "client.pem")], f"https://localhost:{tls.port}/"),
            (["--http2-prior-knowledge"], f"http://127.0.0.1:{plain.port}/"),
        ):
            result = await trio.run_process(
                ["curl", "-sS", *flags, "-w", "\\n%{http_version}", url], capture_stdout=True
            )
            body, _, version = result.stdout.decode().rpartition("\n")
            assert version == "2", (url, result.stdout)
            assert body.startswith("Hello"), body
