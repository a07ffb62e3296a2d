"""The documentation's checkable claims: the option reference, the tables of defaults, the
benchmark figures, and every example a page shows.

The truth comes from the code, never from a list kept here: the options are those of the
parser ``trioserve.cli.build_parser()`` builds (what ``trioserve --help`` prints), their
defaults are :class:`trioserve.config.Config`'s field defaults, and the constants the
security tables name are looked up in ``trioserve/``.

What is checked where:

* **The option reference** (docs/options.md) is generated when the site is built, by
  ``docs/_ext/optionref.py``. The tests here check that generator's entries: one per
  option ``--help`` prints, every spelling, a placeholder exactly for options that take a
  value, and the default ``Config`` has. README.md has no copy of it any more.
* **Tables of defaults** (docs/security.md, docs/migrating.md): a ``setting`` or
  ``trioserve`` column names options (code spans) or constants of ``trioserve/``, and the
  ``default`` column states their defaults (read by :func:`parse_default`).
* **Benchmark figures** (docs/performance.md) are built from the results files
  ``docs/images/bench/sources.json`` names; the tests check that those files are the ones
  the charts were drawn from.
* **Examples.** Every fenced code block of README.md, CHANGELOG.md and docs/ (MyST
  directives aside) is preceded by a marker saying what runs it, an HTML comment that
  neither GitHub nor the site shows:

  - ``<!-- test: NAME -->``: the test registered for NAME here (:func:`runs`) executes the
    block: Python blocks run (apps are served and requested), shell blocks run against a
    real server where they can, configuration blocks are loaded or checked for the
    numbers they must agree on. Two names are shared by many blocks: ``commands`` (every
    line is a trioserve command, parsed by the real parser into a valid Config, or a
    ``pip install``/``nox -s`` whose extra or session exists) and ``config-file`` (loaded as
    a ``--config`` file).
  - ``<!-- not-tested: REASON -->``: nothing here can run it (a package install, systemd,
    a 35-minute benchmark); the reason says so, and names the test that covers the same
    ground where there is one.

  ``text`` blocks (diagrams, output) need no marker. README.md's first block, the two
  commands, is checked by :func:`test_readme_starts_with_the_two_commands`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
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
from tests.test_cli import MODULE, serving
from trioserve import cli, serve_wsgi
from trioserve.config import Config, options
from trioserve.configfile import load_config_file
from trioserve.testing import AppProbe, open_test_client

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import benchdata  # noqa: E402  (docs/_ext: imports neither Sphinx nor matplotlib)
import optionref  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")

# Modules whose constants the security tables may name.
CONSTANT_MODULES: tuple[ModuleType, ...] = (
    trioserve.chunked,
    trioserve.http1,
    trioserve.http2,
    trioserve.connection,
    trioserve.stream,
)

TIMEOUT = 20  # seconds: the bound on every example run here
needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl not installed; .ci/run installs it"
)


def hello_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The ``app`` the examples leave undefined."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]


# ---- reading the pages -----------------------------------------------------------------------


def pages() -> list[Path]:
    """Every Markdown page: README.md, CHANGELOG.md and docs/ (the build output aside)."""
    found = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    found += sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return found


def page_text(name: str) -> str:
    """A page by its path from the repository root (``docs/security.md``)."""
    return (ROOT / name).read_text(encoding="utf-8")


_FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1$", re.M | re.S)
_MARKER = re.compile(r"<!-- (test|not-tested): (.+?) -->")


@dataclass
class Block:
    page: str  # from the repository root
    index: int  # among the page's blocks
    language: str
    text: str
    marker: str | None  # "test" or "not-tested"
    value: str  # the test's name, or the reason

    def __str__(self) -> str:
        return f"{self.page} block {self.index} ({self.language})"


def blocks(path: Path) -> list[Block]:
    """The page's fenced code blocks with their markers; MyST directives are not blocks."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        info = match.group(2).strip()
        if info.startswith("{"):
            continue  # {toctree}, {bench-table}, {eval-rst}...: directives, not examples
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.fullmatch(before.strip())
        found.append(
            Block(
                page=path.relative_to(ROOT).as_posix(),
                index=len(found),
                language=info.split()[0] if info else "",
                text=match.group(3),
                marker=marker.group(1) if marker else None,
                value=marker.group(2).strip() if marker else "",
            )
        )
    return found


ALL_BLOCKS = [block for path in pages() for block in blocks(path)]


def example(name: str) -> Block:
    """The one block marked ``<!-- test: NAME -->``."""
    found = [b for b in ALL_BLOCKS if b.marker == "test" and b.value == name]
    assert len(found) == 1, f"{len(found)} blocks are marked 'test: {name}'"
    return found[0]


def marked(name: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.marker == "test" and b.value == name]


# Names of examples and what runs them: a test here (registered with @runs), or one in
# another module (named here; test_every_runner_exists checks that it exists).
RUNNERS: dict[str, str] = {
    "log-config": "tests/test_logs.py::test_log_config_toml_from_the_docs",
}
SHARED = {"commands", "config-file"}


def runs(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(test: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            assert name not in RUNNERS, f"{name} registered twice"
            RUNNERS[name] = f"tests/test_docs.py::{test.__name__}"
        return test

    return register


def section(text: str, title: str) -> str:
    """The text of the level-2 section ``## title`` of ``text``, up to the next one."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"no section '## {title}'"
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


NO_DEFAULT = optionref.NO_DEFAULT  # the cell of an option that takes no value (--help)
_UNITS = {None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|GiB))?")
_SPANS = re.compile(r"`[^`]*`(?:, `[^`]*`)*")
_COMMENT = re.compile(r"(.+?) \([^()`]*\)")


def parse_default(cell: str) -> Any:
    """The value a default cell states: ``(none)``, ``off``/``on``, ``—`` (takes no value),
    comma-separated code spans (`""` is the empty string), or a number with an optional
    KiB/MiB/GiB unit; a trailing parenthetical is a comment: ``0 (never)``."""
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
    """Does the stated value equal ``truth``, type included (True is not 1)?"""
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
    if action.default is argparse.SUPPRESS or action.nargs == 0:
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


# ---- the option reference (docs/options.md, generated) --------------------------------------


def test_options_page_is_the_generated_reference() -> None:
    text = page_text("docs/options.md")
    assert "```{trioserve-options}\n```" in text
    assert not [t for t in tables(text) if t[0][:2] == ["option", "default"]], "a copy by hand"
    # The README's table went: the generated page is the one reference.
    assert not [t for t in tables(README) if t[0][:1] == ["option"]]


def test_reference_lists_every_option_help_prints() -> None:
    """Every option string of ``--help`` has an entry, and every entry's flags exist."""
    listed = [flag for entry in optionref.option_entries() for flag in entry.flags]
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    printed = set(parser_options())
    assert sorted(printed - set(listed)) == [], "options --help prints but the reference lacks"
    assert sorted(set(listed) - printed) == [], "options the reference lists but --help lacks"


def test_each_entry_is_exactly_one_option_with_all_its_spellings() -> None:
    actions = parser_options()
    for entry in optionref.option_entries():
        owners = {id(actions[flag]) for flag in entry.flags}
        assert len(owners) == 1, entry.flags
        assert sorted(entry.flags) == sorted(actions[entry.flags[0]].option_strings)


def test_reference_defaults_are_config_defaults() -> None:
    actions = parser_options()
    wrong = []
    for entry in optionref.option_entries():
        stated, truth = parse_default(entry.default), expected_default(actions[entry.flags[0]])
        if not same_default(stated, truth):
            wrong.append(f"{entry.flags[-1]}: the reference says {entry.default!r}, not {truth!r}")
    assert not wrong, "\n".join(wrong)


def test_reference_shows_a_value_exactly_for_options_that_take_one() -> None:
    """``--threads N`` but ``--factory``: a placeholder where the option takes a value, the
    same one ``--help`` prints."""
    actions = parser_options()
    help_text = cli.build_parser().format_help()
    for entry in optionref.option_entries():
        action = actions[entry.flags[0]]
        assert (entry.metavar is not None) == (action.nargs != 0), entry.flags
        if entry.metavar is not None:
            assert f"{entry.flags[-1]} {entry.metavar}" in help_text, entry.signature


def test_reference_text_keeps_what_the_help_text_promises() -> None:
    """Each entry is written, names every HTTP status its help names, and says
    "repeatable" for an option that can be given again."""
    actions = parser_options()
    for entry in optionref.option_entries():
        action = actions[entry.flags[0]]
        assert len(entry.help) > 10, entry.flags
        help_text = (action.help or "").rsplit(" (default: ", 1)[0]
        for status in re.findall(r"\b[45]\d\d\b", help_text):
            assert status in entry.help, f"{entry.flags[-1]}: does not say {status}"
        if isinstance(action, argparse._AppendAction):
            assert entry.repeatable, entry.flags
            assert "repeatable" in entry.help.lower(), entry.flags


def test_reference_groups_hold_every_option_once() -> None:
    grouped = [e.dest for _, _, members in optionref.grouped_entries() for e in members]
    assert sorted(grouped) == sorted(e.dest for e in optionref.option_entries())


@pytest.mark.parametrize("name", sorted(FIELD_DEFAULTS))
def test_format_default_reads_back_as_the_default(name: str) -> None:
    value = FIELD_DEFAULTS[name]
    for size in (False, True):
        if (isinstance(value, int) and not isinstance(value, bool)) or not size:
            assert same_default(parse_default(optionref.format_default(value, size=size)), value)


# ---- tables of defaults: docs/security.md and docs/migrating.md -----------------------------


def constant(name: str) -> Any:
    values = {getattr(module, name) for module in CONSTANT_MODULES if hasattr(module, name)}
    assert len(values) == 1, f"{name}: found {len(values)} values in trioserve/"
    return values.pop()


def security_settings() -> list[tuple[str, str]]:
    """(setting: ``--flag`` or ``CONSTANT``, its default cell) for every row."""
    settings = []
    found = tables(page_text("docs/security.md"))
    found = [(header, rows) for header, rows in found if "setting" in header]
    assert len(found) >= 2, "the limits and timeouts tables"
    for header, body in found:
        setting, default = header.index("setting"), header.index("default")
        for row in body:
            spans = code_spans(row[setting])
            assert row[setting] == f"`{spans[0]}`", f"one code span per setting: {row}"
            settings.append((spans[0], row[default]))
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
            wrong.append(f"{setting}: the page says {cell!r}, the code has {truth!r}")
    assert not wrong, "\n".join(wrong)


def test_security_tables_cover_the_abuse_budgets_and_every_timeout() -> None:
    settings = {setting for setting, _ in security_settings()}
    for name in ("RESET_BUDGET", "CONTROL_BUDGET"):
        assert name in settings, name
    for name in FIELD_DEFAULTS:
        if name.endswith("_timeout"):
            assert "--" + name.replace("_", "-") in settings, name


def _split_defaults(cell: str, count: int) -> list[str]:
    """``0, 0`` or ``(none), `none``` for ``count`` options; one part stands for all."""
    parts = re.split(r", (?=[^`]*(?:`[^`]*`[^`]*)*$)", cell)
    if count > 1 and len(parts) == count:
        return parts
    return [cell] * count


def test_migration_tables_name_real_options_with_their_defaults() -> None:
    """In docs/migrating.md, each trioserve option exists and its stated default is Config's."""
    actions = parser_options()
    found = [t for t in tables(page_text("docs/migrating.md")) if "trioserve" in t[0]]
    assert len(found) == 3, "gunicorn, waitress, hypercorn"
    wrong, checked = [], 0
    for header, rows in found:
        column, default = header.index("trioserve"), header.index("default")
        for row in rows:
            if row[column] in ("—", "`MODULE:ATTR`"):
                continue
            spans = code_spans(row[column])
            assert spans, row
            assert row[column] == ", ".join(f"`{s}`" for s in spans), row
            for flag in spans:
                assert flag in actions, f"{flag} is not an option of trioserve"
            owners = list(dict.fromkeys(id(actions[flag]) for flag in spans))
            by_owner = {id(actions[flag]): actions[flag] for flag in spans}
            for owner, cell in zip(owners, _split_defaults(row[default], len(owners)), strict=True):
                action = by_owner[owner]
                checked += 1
                if not same_default(parse_default(cell), expected_default(action)):
                    wrong.append(f"{action.option_strings[-1]}: the page says {cell!r}")
    assert checked > 50
    assert not wrong, "\n".join(wrong)


def test_defaults_quoted_in_prose_are_the_code_defaults() -> None:
    """A default given in passing, ``{option}`--threads` (40)``, is the Config default:
    the parenthetical's first part, read as a default cell (``5 s``: seconds)."""
    actions = parser_options()
    pattern = re.compile(r"\{option\}`(--?[\w-]+)[^`]*` \(([^()]+)\)")
    wrong, checked = [], 0
    for path in pages():
        for flag, quoted in pattern.findall(path.read_text(encoding="utf-8")):
            cell = re.split(r"[;,]", quoted)[0].strip().removesuffix(" s")
            try:
                stated = parse_default(cell)
            except AssertionError:
                continue  # a remark, not a default
            checked += 1
            truth = expected_default(actions[flag])
            if not same_default(stated, truth):
                wrong.append(f"{path.name}: {flag} ({quoted}), the default is {truth!r}")
    assert checked >= 5
    assert not wrong, "\n".join(wrong)


# ---- the performance page's data -----------------------------------------------------------


def test_bench_charts_and_tables_come_from_the_same_files() -> None:
    """The manifest docs/charts.py wrote names existing results files, unchanged since the
    charts were drawn, and the charts it lists exist (the build also refuses otherwise)."""
    assert benchdata.stale_sources() == []
    manifest = benchdata.read_manifest()
    assert manifest["results"], "no results file"
    for chart in manifest["charts"]:
        assert f"images/bench/{chart}" in page_text("docs/performance.md"), chart


def test_bench_tables_have_the_scenarios() -> None:
    results = benchdata.load(benchdata.manifest_paths())
    _, rows = benchdata.summary_table(results)
    assert len(rows) >= 10
    assert all(row[1] and not row[1].startswith("failed") for row in rows), rows
    assert benchdata.cost_steps(results), "the cost breakdown needs canned and canned-shaped"
    for kind in ("side-by-side", "cost", "idle", "runs"):
        assert f"```{{bench-table}} {kind}\n```" in page_text("docs/performance.md"), kind


@runs("charts-command")
def test_charts_command_draws_the_committed_charts_from_the_same_files(tmp_path: Path) -> None:
    """The command the page gives, with ``--out``: it draws every chart from the files the
    committed manifest names (so running it again reproduces the committed state)."""
    pytest.importorskip("matplotlib", reason="the docs extra installs matplotlib")
    words = shlex.split(example("charts-command").text)
    assert words[:2] == ["python", "docs/charts.py"], words
    committed = benchdata.read_manifest()
    assert words[2:] == [entry["path"] for entry in committed["results"]]
    result = subprocess.run(
        [sys.executable, "docs/charts.py", *words[2:], "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    drawn = json.loads((tmp_path / "sources.json").read_text())
    assert drawn["results"] == committed["results"]
    assert drawn["charts"] == committed["charts"]
    for chart in drawn["charts"]:
        assert (tmp_path / chart).read_text().startswith("<?xml"), chart


# ---- every example has a runner ----------------------------------------------------------


def test_every_example_says_what_runs_it() -> None:
    missing = []
    for block in ALL_BLOCKS:
        if block.page == "README.md" and block.index == 0:
            continue  # the two commands: test_readme_starts_with_the_two_commands
        if block.marker is None and block.language != "text":
            missing.append(str(block))
        if block.marker == "not-tested":
            assert len(block.value) > 20, f"{block}: say why it is not tested"
    assert not missing, "blocks without a test or not-tested marker:\n" + "\n".join(missing)


def test_every_example_name_has_one_block_and_one_runner() -> None:
    names = [b.value for b in ALL_BLOCKS if b.marker == "test"]
    unique = [name for name in names if name not in SHARED]
    assert len(unique) == len(set(unique)), "an example name is used twice"
    assert set(names) == set(RUNNERS), (
        f"named but not run: {sorted(set(names) - set(RUNNERS))};"
        f" run but not named: {sorted(set(RUNNERS) - set(names))}"
    )


def test_every_runner_exists() -> None:
    for name, where in RUNNERS.items():
        path, _, function = where.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, function, None)), f"{name}: no {where}"


# ---- commands -----------------------------------------------------------------------------


def command_lines(text: str) -> list[list[str]]:
    """Each command of a shell block: ``&&`` parts, ``\\`` continuations joined, comments
    dropped, as argument lists."""
    commands = []
    for line in text.replace("\\\n", " ").split("\n"):
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def trioserve_args(words: list[str]) -> list[str] | None:
    """The arguments of a ``trioserve`` or ``python -m trioserve`` command, else None."""
    if words[0] == "trioserve" or words[0].endswith("/trioserve"):
        return words[1:]
    if words[:3] in (["python", "-m", "trioserve"], ["python3", "-m", "trioserve"]):
        return words[3:]
    return None


def check_trioserve_command(args: list[str]) -> Config:
    """It parses with the real parser, makes a valid Config and names an app or --root
    (nothing is imported or bound)."""
    parsed = cli.build_parser().parse_args(args)  # exits (fails the test) on a bad option
    config = Config(**cli.given_options(parsed))
    cli.check_app_source(parsed.app, config)
    return config


def all_trioserve_commands() -> list[list[str]]:
    """Every trioserve command of every page: shell blocks, systemd's ExecStart, and the
    JSON command lists of Dockerfiles and Kubernetes manifests."""
    commands = []
    for block in ALL_BLOCKS:
        if block.language in ("sh", "console"):
            lines = command_lines(block.text)
        elif block.language == "ini":
            lines = [
                shlex.split(line.removeprefix("ExecStart="))
                for line in block.text.split("\n")
                if line.startswith("ExecStart=")
            ]
        elif block.language in ("dockerfile", "yaml"):
            lines = [
                json.loads(m) for m in re.findall(r"(?:CMD|command:) (\[.*?\])", block.text, re.S)
            ]
        else:
            continue
        commands += [args for words in lines if (args := trioserve_args(words)) is not None]
    return commands


def test_every_trioserve_command_in_the_docs_is_valid() -> None:
    commands = all_trioserve_commands()
    assert len(commands) >= 25, commands
    for args in commands:
        check_trioserve_command(args)


@runs("commands")
def test_commands_blocks_hold_only_checked_commands() -> None:
    """A ``commands`` block: every command is a trioserve one (checked above), a ``pip
    install`` of this checkout's extras or of a package, or a nox session that exists."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    noxfile = (ROOT / "noxfile.py").read_text()
    blocks_checked = marked("commands")
    assert len(blocks_checked) >= 10
    for block in blocks_checked:
        assert block.language == "sh", block
        for words in command_lines(block.text):
            if trioserve_args(words) is not None:
                continue
            if words[:2] == ["pip", "install"]:
                for spec in words[2:]:
                    match = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
                    if match and match.group(1):
                        assert set(match.group(1).split(",")) <= set(extras), (block, spec)
                continue
            if words[:2] == ["nox", "-s"]:
                assert f"def {words[2]}(" in noxfile, (block, words)
                continue
            raise AssertionError(f"{block}: not a checked command: {' '.join(words)}")


def test_commands_the_docs_name_exist() -> None:
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


@runs("two-commands")
def test_readme_starts_with_the_two_commands() -> None:
    """README.md opens with the two commands a new user types; .ci/run runs the second one
    verbatim; the Quickstart shows the same two."""
    match = re.match(r"# trioserve\n\n```sh\n(.*?)\n```\n", README, re.S)
    assert match is not None, "README.md must start with the two commands"
    first, second = match.group(1).split("\n")
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install . && ")
    args = trioserve_args(command_lines(first)[-1])
    assert args is not None
    check_trioserve_command(args)
    assert second in (ROOT / ".ci" / "run").read_text().split("\n")
    assert example("two-commands").text == match.group(1) + "\n"


def test_readme_stays_short_and_its_links_resolve() -> None:
    assert len(README.encode()) < 16 * 1024
    links = re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 15
    for link in local:
        assert (ROOT / link).exists(), link


# ---- configuration examples -----------------------------------------------------------------


@runs("config-file")
def test_config_file_examples_load(tmp_path: Path) -> None:
    found = marked("config-file")
    assert found
    for block in found:
        path = tmp_path / "trioserve.toml"
        path.write_text(block.text)
        Config(**load_config_file(str(path)))


@runs("pytest-trio-config")
def test_pytest_trio_setting_is_the_one_this_project_uses() -> None:
    shown = tomllib.loads(example("pytest-trio-config").text)
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert shown["tool"]["pytest"]["ini_options"]["trio_mode"] is True
    assert ours["tool"]["pytest"]["ini_options"]["trio_mode"] is True


@runs("systemd-service")
def test_systemd_unit_runs_a_valid_command_and_waits_for_the_drain() -> None:
    text = example("systemd-service").text
    (line,) = [line for line in text.split("\n") if line.startswith("ExecStart=")]
    args = trioserve_args(shlex.split(line.removeprefix("ExecStart=")))
    assert args is not None
    config = check_trioserve_command(args)
    stop = re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)
    assert stop is not None
    margin = 5 if config.workers > 1 else 0
    assert int(stop.group(1)) > config.graceful_timeout + margin


@runs("dockerfile")
def test_dockerfile_runs_a_valid_command_on_its_exposed_port() -> None:
    text = example("dockerfile").text
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    args = trioserve_args(json.loads(cmd))
    assert args is not None
    config = check_trioserve_command(args)
    exposed = re.search(r"^EXPOSE (\d+)$", text, re.M)
    assert exposed is not None
    assert config.bind == (f"0.0.0.0:{exposed.group(1)}",)


@runs("kubernetes")
def test_kubernetes_grace_period_covers_prestop_and_graceful_timeout() -> None:
    """The Deployment's numbers agree: its command is valid and listens on the container
    port, and terminationGracePeriodSeconds covers the preStop sleep, --graceful-timeout
    and the supervisor's 5 s with -w N."""
    text = example("kubernetes").text
    (command,) = re.findall(r"command: (\[\"trioserve\".*?\])", text, re.S)
    args = trioserve_args(json.loads(command))
    assert args is not None
    config = check_trioserve_command(args)
    port = re.search(r"containerPort: (\d+)", text)
    assert port is not None
    assert config.bind == (f"0.0.0.0:{port.group(1)}",)
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    sleep = re.search(r'preStop:\s+exec: \{command: \["sleep", "(\d+)"\]\}', text)
    assert grace is not None
    assert sleep is not None
    margin = 5 if config.workers > 1 else 0
    needed = int(sleep.group(1)) + config.graceful_timeout + margin
    assert int(grace.group(1)) >= needed
    assert text.count("port: http}") == 2
    assert "- name: http" in text


# ---- Python examples ------------------------------------------------------------------------


def run_python(name: str, **namespace: Any) -> dict[str, Any]:
    """Execute the example block ``name`` in a fresh namespace; return the namespace."""
    block = example(name)
    assert block.language == "python", block
    scope: dict[str, Any] = {"__name__": f"docs_{name.replace('-', '_')}", **namespace}
    exec(compile(block.text, f"{block.page}:{name}", "exec"), scope)
    return scope


@runs("embedding")
async def test_embedding_example_runs() -> None:
    """It binds 127.0.0.1:0, prints the URL and stops gracefully by itself."""
    source = example("embedding").text.rstrip("\n")
    body, _, last = source.rpartition("\n")
    assert last == "trio.run(main)", last
    printed: list[str] = []
    namespace: dict[str, Any] = {
        "__name__": "docs_embedding",
        "app": hello_app,
        "print": lambda *args: printed.append(" ".join(map(str, args))),
    }
    exec(compile(body, "docs/embedding.md", "exec"), namespace)
    with trio.fail_after(TIMEOUT):
        await namespace["main"]()
    assert len(printed) == 1
    assert re.fullmatch(r"serving on http://127\.0\.0\.1:\d+", printed[0])


@runs("nursery-start")
async def test_nursery_start_idiom_runs(nursery: trio.Nursery) -> None:
    namespace: dict[str, Any] = {
        "functools": functools,
        "serve_wsgi": serve_wsgi,
        "app": hello_app,
        "nursery": nursery,
    }
    code = compile(example("nursery-start").text, "docs", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    with trio.fail_after(TIMEOUT):
        coroutine = eval(code, namespace)
        assert coroutine is not None, "the idiom does not await"
        await coroutine
        server = namespace["server"]
        assert server.url.startswith("http://127.0.0.1:")
        await server.stop()


def upload_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``my_app`` of the testing examples: reads the body to its end, answers empty."""
    while environ["wsgi.input"].read(1024):
        pass
    start_response("200 OK", [("Content-Length", "0")])
    return []


@runs("testing-get", "testing-reset")
@pytest.mark.parametrize("name", ["testing-get", "testing-reset"])
async def test_testing_example_runs(name: str) -> None:
    namespace = run_python(name, my_app=upload_app)
    tests = [value for key, value in namespace.items() if key.startswith("test_")]
    assert len(tests) == 1
    with trio.fail_after(TIMEOUT):
        await tests[0]()


@runs("cancel-streaming", "testing-streaming")
async def test_ticker_stops_when_its_client_resets() -> None:
    """The ticker of docs/cancellation.md, under the test docs/testing.md shows: the test
    passes, and the generator's finally block ran."""
    printed: list[str] = []
    ticker = run_python("cancel-streaming", print=printed.append)["ticker"]
    namespace = run_python("testing-streaming", ticker=ticker)
    with trio.fail_after(TIMEOUT):
        await namespace["test_ticker_stops_when_the_client_resets"]()
    assert printed == ["ticker stopped"]


@runs("cancel-check")
async def test_check_cancelled_stops_a_long_computation() -> None:
    app = run_python("cancel-check")["sum_of_squares"]
    probe = AppProbe(app)
    with trio.fail_after(TIMEOUT):
        async with open_test_client(probe, http2=True) as client:
            response = await client.get("/?n=10")
            assert response.text == f"{sum(i * i for i in range(10))}\n"
            stream = await client.open_stream("GET", f"/?n={10**12}")  # hours of work
            record = await probe.wait_started(2)
            await stream.reset()
            await record.finished.wait()
    assert record.cancelled


@runs("static-mount")
async def test_static_files_mounted_under_flask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site" / "assets").mkdir(parents=True)
    (tmp_path / "site" / "assets" / "style.css").write_text("body {}\n")
    monkeypatch.chdir(tmp_path)
    app = run_python("static-mount")["app"]
    with trio.fail_after(TIMEOUT):
        async with open_test_client(app) as client:
            response = await client.get("/assets/style.css")
    assert response.status == 200
    assert response.body == b"body {}\n"
    assert response.header("Content-Type") == "text/css"


@runs("client-cert-app")
def test_client_certificate_app_checks_the_verification() -> None:
    app = run_python("client-cert-app")["app"]
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.append(status)

    body = app({"SSL_CLIENT_VERIFY": "NONE"}, start_response)
    assert seen[-1].startswith("403")
    assert b"certificate" in b"".join(body)
    environ = {"SSL_CLIENT_VERIFY": "SUCCESS", "SSL_CLIENT_S_DN": "CN=client,O=Example"}
    assert b"".join(app(environ, start_response)) == b"hello, CN=client,O=Example\n"
    assert seen[-1] == "200 OK"


@runs("config-api")
def test_config_api_example_runs() -> None:
    printed: list[str] = []
    run_python("config-api", print=lambda *args: printed.append(" ".join(map(str, args))))
    assert printed == ["threads must be at least 1, not 0"]


# ---- shell examples, run against a real server ---------------------------------------------


async def run_curl(words: list[str], port: int, cwd: Path) -> str:
    """A curl line of a page, with the page's port replaced by the test server's."""
    assert words[0] == "curl", words
    args = [re.sub(r":(8000|8443)/", f":{port}/", word) for word in words[1:]]
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", *args], capture_stdout=True, cwd=cwd
    )
    return str(result.stdout.decode())


def on_port_zero(args: list[str]) -> list[str]:
    """A trioserve command's arguments with its ``-b`` address replaced by port 0."""
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
            continue
        if word in ("-b", "--bind"):
            skip = True
            continue
        out.append(word)
    return [*out, "-b", "127.0.0.1:0"]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@runs("first-requests")
@pytest.mark.external
@needs_curl
async def test_first_requests_get_hello_over_both_protocols() -> None:
    """The Quickstart's two curl lines against the server its first command starts."""
    lines = command_lines(example("first-requests").text)
    with trio.fail_after(TIMEOUT):
        async with serving("examples.hello:app", "-b", "127.0.0.1:0") as cli_:
            for words in lines:
                assert await run_curl(words, port_of(cli_.url), ROOT) == "Hello, world!\n"


@runs("first-app", "first-app-serve", "first-app-requests")
@pytest.mark.external
@needs_curl
async def test_first_app_is_served_as_the_quickstart_says(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(example("first-app").text)
    (serve,) = command_lines(example("first-app-serve").text)
    args = trioserve_args(serve)
    assert args == ["myapp:app"]
    requests = command_lines(example("first-app-requests").text)
    with trio.fail_after(TIMEOUT):
        async with serving(*on_port_zero(args), cwd=tmp_path) as cli_:
            port = port_of(cli_.url)
            answers = [await run_curl(words, port, tmp_path) for words in requests]
    assert answers == ["You asked for /hello over HTTP/1.1\n", "1\n2\n3\n"]


async def make_certs(directory: Path) -> None:
    """``python -m trustme -d certs``: trustme is in the test extra."""
    await trio.Path(directory).mkdir(exist_ok=True)
    await trio.run_process(
        [sys.executable, "-m", "trustme", "-d", str(directory)], capture_stdout=True
    )


@runs("http2-in-three-lines")
@pytest.mark.external
@needs_curl
async def test_http2_in_three_lines(tmp_path: Path) -> None:
    lines = command_lines(example("http2-in-three-lines").text)
    assert lines[:3] == [
        ["pip", "install", "trustme"],
        ["mkdir", "-p", "certs"],
        ["python", "-m", "trustme", "-d", "certs"],
    ]
    server_line, curl_line = lines[3:]
    (tmp_path / "myapp.py").write_text(example("first-app").text)
    await make_certs(tmp_path / "certs")
    args = trioserve_args(server_line)
    assert args is not None
    with trio.fail_after(TIMEOUT):
        async with serving(*on_port_zero(args), cwd=tmp_path) as cli_:
            answer = await run_curl(curl_line, port_of(cli_.url), tmp_path)
    assert answer == "You asked for /hello over HTTP/2\n"


@runs("tls-walkthrough", "h2c-walkthrough")
@pytest.mark.external
@needs_curl
async def test_http2_and_tls_walkthrough_works(tmp_path: Path) -> None:
    """The HTTP/2 and TLS page's steps: trustme's CLI makes the files it names, curl trusting
    certs/client.pem gets HTTP/2 over TLS, and h2c with prior knowledge works on a plain
    port (ports are 0 here instead of the page's fixed ones)."""
    tls = command_lines(example("tls-walkthrough").text)
    assert tls[0] == ["pip", "install", "trustme"]
    assert tls[2] == ["python", "-m", "trustme", "-d", "certs"]
    await make_certs(tmp_path / "certs")
    for name in ("server.pem", "server.key", "client.pem"):
        assert (tmp_path / "certs" / name).is_file(), name
    h2c = command_lines(example("h2c-walkthrough").text)
    with trio.fail_after(TIMEOUT):
        for server_line, curl_line in ((tls[3], tls[4]), (h2c[0], h2c[1])):
            args = trioserve_args(server_line)
            assert args is not None
            args = [str(tmp_path / a) if a.startswith("certs/") else a for a in args]
            async with serving(*on_port_zero(args), cwd=ROOT) as cli_:
                flags = [*curl_line[:-1], "-w", "\\n%{http_version}", curl_line[-1]]
                output = await run_curl(flags, port_of(cli_.url), tmp_path)
            body, _, version = output.rpartition("\n")
            assert version == "2", output
            assert body.startswith("Hello"), body


def test_modules_the_examples_run_are_importable() -> None:
    """``MODULE``, the command the tests above run, is the ``python -m trioserve`` of the
    pages (the console script needs the package installed, which the tests do not)."""
    assert MODULE[1:] == ("-m", "trioserve")
