"""The trioserve command's logging: where the error and access logs go, as text or JSON.

trioserve logs through the standard library, on three loggers under ``trioserve``:

========================  =========================================================
``trioserve.error``       the server's own messages: start, stop, failed requests
``trioserve.access``      one line per request (:mod:`trioserve.accesslog`)
``trioserve.app``         what the app writes to ``wsgi.errors``
========================  =========================================================

:func:`configure_logging` sets them up from the options, once per process (the
supervisor and each worker alike):

* the error log (``trioserve``, so ``trioserve.app`` too) goes to stderr or to
  ``--error-log FILE`` at ``--log-level``; the access log to ``--access-log``
  (``-`` is stdout), not to the error log;
* ``--log-format json`` writes one JSON object per line to both: ``time`` (ISO
  8601, local time with its offset), ``level``, ``logger``, ``pid``,
  ``message``, ``exception`` (the traceback) when there is one, and for access
  lines the request's fields (:func:`trioserve.accesslog.access_fields`);
* files are opened in append mode when the options are read, so one that cannot
  be opened is refused at start; they are reopened when moved away (logrotate,
  :class:`logging.handlers.WatchedFileHandler`);
* a log that can no longer be written (a full disk) is reported once, and
  serving goes on: an access log problem on the error log, an error log
  problem on stderr.

``--log-config FILE`` hands all of this to the standard library instead: a
``dictConfig`` dictionary in a ``.json`` or ``.toml`` file, or a ``fileConfig``
``.ini`` file (what gunicorn's ``--log-config`` takes). Only ``--log-level`` is
applied first, as the level of ``trioserve``; loggers the file does not name
keep working (``disable_existing_loggers`` defaults to false), and records
reach the handlers the file gives them or its root logger. The JSON format is
there for such files too: ``"()": "trioserve.logs.JSONFormatter"``.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import logging.handlers
import os
import sys
import tomllib
from typing import TYPE_CHECKING, Any, TextIO

from .accesslog import access_fields
from .config import ConfigError

if TYPE_CHECKING:
    from .config import Config

ERROR_LOGGER = logging.getLogger("trioserve.error")

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def configure_logging(config: Config) -> None:
    """Set up the ``trioserve`` loggers from ``config`` (see the module docstring).

    Raises:
      ConfigError: a log file cannot be opened, or ``--log-config`` does not load.
    """
    root = logging.getLogger("trioserve")
    root.setLevel(config.log_level.upper())
    access = logging.getLogger("trioserve.access")
    if config.log_config is not None:
        load_log_config(config.log_config)
        return
    json_format = config.log_format == "json"
    error_handler = _handler("error log", config.error_log, sys.stderr)
    error_handler.setFormatter(
        JSONFormatter() if json_format else logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT)
    )
    root.handlers[:] = [error_handler]
    access.propagate = False  # access lines never go to the error log
    access.setLevel(logging.INFO)
    access.handlers[:] = []
    if config.access_log is not None:
        access_handler = _handler("access log", config.access_log, sys.stdout)
        access_handler.setFormatter(JSONFormatter() if json_format else logging.Formatter())
        access.handlers[:] = [access_handler]


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created).astimezone()
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        atoms = getattr(record, "access", None)
        if isinstance(atoms, dict):
            entry.update(access_fields(atoms))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def load_log_config(path: str) -> None:
    """Apply a ``--log-config`` file (.json/.toml dictConfig, .ini fileConfig).

    Raises:
      ConfigError: one line naming the file and what is wrong with it.
    """
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".json", ".toml", ".ini"):
        raise ConfigError(
            f"--log-config {path}: give a .json or .toml dictConfig, or an .ini fileConfig"
        )
    try:
        if kind == ".ini":
            with open(path, encoding="utf-8"):  # fileConfig would take a missing file as empty
                pass
            logging.config.fileConfig(path, disable_existing_loggers=False)
            return
        with open(path, "rb") as file:
            document = json.load(file) if kind == ".json" else tomllib.load(file)
        if not isinstance(document, dict):
            raise ConfigError(f"--log-config {path}: expected a dictConfig dictionary")
        document.setdefault("disable_existing_loggers", False)
        logging.config.dictConfig(document)
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"--log-config {path}: cannot read it: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--log-config {path}: not valid {kind[1:].upper()}: {exc}") from None
    except Exception as exc:
        # dictConfig wraps the real problem ("Unable to configure handler 'x'"): say both.
        if exc.__cause__ is not None:
            reason = f"{exc}: {exc.__cause__}"
        elif isinstance(exc, KeyError):  # fileConfig: a section or option it needs
            reason = f"missing {exc}"
        else:
            reason = str(exc) or type(exc).__name__
        raise ConfigError(f"--log-config {path}: {reason}") from None


# ---- handlers that report a write failure once ------------------------------------------


class _ReportOnce:
    """A handler mixin: the first failure to write is reported, later ones are silent.

    logging's own handleError prints a traceback per record, which for an
    access log on a full disk would be one per request.
    """

    log_name = ""
    target = ""
    _reported = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self._reported:
            return
        self._reported = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        message = f"cannot write the {self.log_name} to {self.target}: {reason}"
        if self.log_name == "access log":
            ERROR_LOGGER.error(
                "%s; requests are still served, further failures are not reported", message
            )
            return
        try:
            print(f"trioserve: {message}; further failures are not reported", file=sys.__stderr__)
        except (OSError, ValueError):
            pass


class _ReportingStreamHandler(_ReportOnce, logging.StreamHandler):  # type: ignore[type-arg]
    pass


class _ReportingFileHandler(_ReportOnce, logging.handlers.WatchedFileHandler):
    pass


def _handler(log_name: str, target: str | None, console: TextIO) -> logging.Handler:
    handler: _ReportOnce
    if target is None or target == "-":
        handler = _ReportingStreamHandler(console)
        handler.target = "stdout" if console is sys.stdout else "stderr"
    else:
        try:
            handler = _ReportingFileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot open the {log_name} {target}: {exc.strerror or exc}"
            ) from None
        handler.target = target
    handler.log_name = log_name
    assert isinstance(handler, logging.Handler)
    return handler
