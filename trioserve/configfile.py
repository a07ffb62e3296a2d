"""``--config FILE``: options from a TOML file, read with the standard library's tomllib.

The file is flat: its keys are :class:`~trioserve.config.Config` field names,
in snake_case (``max_requests``) or dash-case like the flags (``max-requests``),
and each value has the field's type::

    bind = ["127.0.0.1:8000", "unix:/run/app.sock"]   # a string or a list of strings
    workers = 4
    graceful-timeout = 30                             # an integer is fine for seconds
    proxy_protocol = true

The command line wins: :func:`trioserve.cli.config_from_args` starts from the
file's values and lays the flags actually given on top (the parser's defaults
are a sentinel, so a flag left out never hides a file value); fields in
neither keep their :class:`Config` defaults.

``--config`` itself is the one flag without a Config field: it says where
options come from rather than being one, a file cannot usefully name another
file, and embedders of :func:`trioserve.serve_wsgi` build a Config directly.
"""

from __future__ import annotations

import tomllib
import types
from typing import Any, get_type_hints

from .config import Config, ConfigError, options

_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def load_config_file(path: str) -> dict[str, Any]:
    """Read ``path`` and return its options as ``{field_name: value}``, ready for ``Config(**...)``.

    Only what the file sets is returned. Values are checked against the
    fields' types here (integers are accepted for float fields; a string or a
    list of strings for repeatable options); the values themselves are checked
    by :class:`Config` as for the command line.

    Raises:
      ConfigError: one line naming the file and the problem: unreadable file,
        TOML syntax error, unknown key (named), key given in both spellings,
        or a value of the wrong type.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    hints = get_type_hints(Config)
    fields = {field.name for field in options()}
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in fields or ("_" in key and "-" in key):
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        if name in values:
            raise ConfigError(f"config file {path}: {name!r} is given twice ({key!r})")
        values[name] = _convert(path, key, value, hints[name])
    return values


def _convert(path: str, key: str, value: Any, kind: Any) -> Any:
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise _type_error(path, key, value, "a string or a list of strings")
    if isinstance(kind, types.UnionType):  # str | None: TOML has no null, so a str
        kind = next(arg for arg in kind.__args__ if arg is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise _type_error(path, key, value, _TYPE_NAMES[int])
    if not isinstance(value, kind):
        raise _type_error(path, key, value, _TYPE_NAMES.get(kind, kind.__name__))
    return value


def _type_error(path: str, key: str, value: Any, expected: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    toml_type = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), "a date or time")
    return ConfigError(f"config file {path}: {key} must be {expected}, not {toml_type} ({shown})")
