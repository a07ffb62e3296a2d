"""Loading the app named on the command line: ``module.path:attr.path``.

Attribute paths are resolved with ``getattr`` one name at a time (never
``eval``). Every way this can go wrong raises :class:`AppImportError` with a
message that says which part was wrong, including a module the app imports that
is not installed (its traceback is the error's ``__cause__``). Any other error
raised while the app's module runs is the app's own and propagates unchanged.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .config import ConfigError

# PEP 3333's examples and mod_wsgi both call the app "application".
DEFAULT_ATTRIBUTE = "application"


class AppImportError(ConfigError):
    """The app could not be found or is not callable."""


def import_app(spec: str, *, factory: bool = False) -> Any:
    """Import and return the WSGI callable named by ``spec`` (``MODULE[:ATTR]``).

    The current directory is put first on ``sys.path`` so that
    ``trioserve examples.hello:app`` works from a project checkout, as with
    gunicorn and uvicorn.
    """
    module_name, _, attr_path = spec.partition(":")
    attr_path = attr_path or DEFAULT_ATTRIBUTE
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise AppImportError(f"{spec!r} is not MODULE:ATTRIBUTE (e.g. myproject.wsgi:application)")
    if not all(part.isidentifier() for part in attr_path.split(".")):
        raise AppImportError(f"{attr_path!r} in {spec!r} is not an attribute path")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise AppImportError(f"cannot import module {module_name!r}: no such module") from None
        if exc.name is None:
            raise  # raised by hand, with no module named: the app's own error
        # The module exists; something it imports does not (a package not
        # installed, most often). One line says which; the traceback stays on
        # the exception for --log-level debug.
        raise AppImportError(
            f"cannot import module {module_name!r}: it needs {exc.name!r}, which is not"
            " installed (--log-level debug shows the traceback)"
        ) from exc
    obj: Any = module
    walked = module_name
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise AppImportError(
                f"module {module_name!r} has no attribute {attr_path!r}"
                f" ({walked}.{name} is missing)"
            ) from None
        walked += "." + name
    if factory:
        if not callable(obj):
            raise AppImportError(f"{spec!r} is not callable, so it cannot be a --factory")
        obj = obj()
    if not callable(obj):
        raise AppImportError(f"{spec!r} is a {type(obj).__name__}, not a WSGI callable")
    return obj
