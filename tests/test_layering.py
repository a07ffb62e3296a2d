"""Layering rules from DEVELOPERS.md, checked on the source rather than by importing it.

The sans-IO modules (``events``, ``http1``, ``http2``) must not import trio in
any form, and may import other trioserve modules only if those are sans-IO
too (importing ``.connection`` would pull trio in through the back door). The
files are parsed with :mod:`ast`, so nothing is imported and an import hidden
in a function body or under ``if TYPE_CHECKING`` still counts. The checkers are
tested on snippets first, so a broken checker cannot pass silently. The public
API is pinned too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trioserve

PACKAGE = Path(trioserve.__file__).parent
SANS_IO = (
    "events",
    "http1",
    "http1_heads",
    "http2",
    "http2_fields",
    "hpack_memo",
    "responses",
    "chunked",
)
# The trio side speaks events.ResetReason, events.InvalidResponse and the
# ServerProtocol methods; only the protocol modules know h11 and h2.
PROTOCOL_FREE = ("connection", "stream", "opening", "server", "context")


def _is_trio(name: str) -> bool:
    return name == "trio" or name.startswith("trio.")


def imports_trio(source: str) -> bool:
    """Does ``source`` import trio or one of its submodules, in any form?"""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(_is_trio(a.name) for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_trio(node.module or ""):
            return True
    return False


def imported_libraries(source: str) -> set[str]:
    """The top-level names of the absolute imports in ``source`` (in any form)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def trioserve_modules(source: str) -> set[str]:
    """The trioserve submodules ``source`` imports, relatively or absolutely."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "trioserve" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                parts = node.module.split(".") if node.module else []
            elif node.module and node.module.split(".")[0] == "trioserve":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
            else:  # "from . import x" / "from trioserve import x": x may be a module
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import trio", True),
        ("import trio.lowlevel", True),
        ("import trio as t", True),
        ("import os, trio", True),
        ("from trio import Event", True),
        ("from trio.lowlevel import checkpoint", True),
        ("def f():\n    import trio\n", True),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio\n", True),
        ("import trioserve", False),
        ("import trio_websocket", False),
        ("from trioserve import events", False),
        ("from .trio import x", False),  # a sibling module named trio, not the library
        ("x = 'import trio'", False),
    ],
)
def test_imports_trio_checker(source: str, expected: bool) -> None:
    assert imports_trio(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .events import Event", {"events"}),
        ("from . import connection", {"connection"}),
        ("from trioserve.stream import RequestStream", {"stream"}),
        ("from trioserve import wsgi", {"wsgi"}),
        ("import trioserve.server", {"server"}),
        ("import h2.connection\nfrom h11 import Request", set()),
    ],
)
def test_trioserve_modules_checker(source: str, expected: set[str]) -> None:
    assert trioserve_modules(source) == expected


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_does_not_import_trio(module: str) -> None:
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    assert not imports_trio(source), f"trioserve/{module}.py imports trio"


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_only_imports_sans_io_siblings(module: str) -> None:
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    others = trioserve_modules(source) - set(SANS_IO)
    assert not others, f"trioserve/{module}.py imports {sorted(others)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import h2.errors", {"h2"}),
        ("from h11 import Request", {"h11"}),
        ("if TYPE_CHECKING:\n    import hyperframe.frame\n", {"hyperframe"}),
        ("from .http1 import x", set()),
        ("import trio, os.path", {"trio", "os"}),
    ],
)
def test_imported_libraries_checker(source: str, expected: set[str]) -> None:
    assert imported_libraries(source) == expected


@pytest.mark.parametrize("module", PROTOCOL_FREE)
def test_trio_side_does_not_speak_the_protocol_libraries(module: str) -> None:
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    spoken = imported_libraries(source) & {"h11", "h2", "hyperframe", "hpack", "httptools"}
    assert not spoken, f"trioserve/{module}.py imports {sorted(spoken)}"


def test_stream_knows_its_connection_only_as_an_interface() -> None:
    """stream.py talks to a StreamOwner; it never imports connection.py (nor opening.py),
    not even for type checking, so the two cannot grow back into one object."""
    source = (PACKAGE / "stream.py").read_text(encoding="utf-8")
    assert not trioserve_modules(source) & {"connection", "opening", "server"}


def test_the_protocols_do_not_import_each_other() -> None:
    for module, other in (("http1", "http2"), ("http2", "http1")):
        source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        assert other not in trioserve_modules(source), f"{module}.py imports {other}.py"


def test_public_api() -> None:
    assert trioserve.__all__ == ["Config", "ConfigError", "Server", "serve_wsgi"]
    for name in trioserve.__all__:
        assert hasattr(trioserve, name)


def imports_trio_asyncio(source: str) -> bool:
    """Does ``source`` import trio_asyncio (the optional asyncio bridge), in any form?"""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0] == "trio_asyncio" for name in names):
            return True
    return False


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import trio_asyncio", True),
        ("import trio, trio_asyncio as ta", True),
        ("from trio_asyncio import aio_as_trio", True),
        ("from trio_asyncio._loop import open_loop", True),
        ("def f():\n    import trio_asyncio\n", True),
        ("import trio", False),
        ("import asyncio", False),
        ("from .trio_asyncio import x", False),
        ("x = 'import trio_asyncio'", False),
    ],
)
def test_imports_trio_asyncio_checker(source: str, expected: bool) -> None:
    assert imports_trio_asyncio(source) is expected


def test_no_module_imports_trio_asyncio() -> None:
    """trio-asyncio is an optional extra (examples/with_asyncio.py): the package never needs it."""
    offenders = [
        path.name
        for path in sorted(PACKAGE.rglob("*.py"))
        if imports_trio_asyncio(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"these modules import trio_asyncio: {offenders}"


def test_only_metrics_speaks_prometheus_client_and_the_counters_need_nothing() -> None:
    """prometheus_client is an extra, imported only by metrics.py (and, to check that it
    is there when --metrics-bind is given, inside a function of config.py); nothing
    imports metrics.py at the top: it is loaded when --metrics-bind asks for it.
    stats.py, on every request's path, imports no trio and no other trioserve module."""
    users = [
        path.stem
        for path in sorted(PACKAGE.rglob("*.py"))
        if "prometheus_client" in imported_libraries(path.read_text(encoding="utf-8"))
    ]
    assert users == ["config", "metrics"]
    config = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
    assert "prometheus_client" not in imported_libraries(
        "\n".join(
            ast.unparse(node)
            for node in config.body
            if not isinstance(node, ast.ClassDef | ast.FunctionDef)
        )
    )
    stats = (PACKAGE / "stats.py").read_text(encoding="utf-8")
    assert not imports_trio(stats)
    assert trioserve_modules(stats) == set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [node for node in tree.body if isinstance(node, ast.ImportFrom | ast.Import)]
        for node in top_level:
            assert "metrics" not in trioserve_modules(ast.unparse(node)), path.name
