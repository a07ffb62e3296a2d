"""The ``trioserve`` command: parse flags into a Config, load the app, serve until a signal.

The argument parser is generated from :class:`trioserve.config.Config`'s
fields, so every flag is a config field with the same name and default.
Misconfiguration ends the process with one line on stderr and exit status 2
(bad flags, app not importable) or 1 (cannot bind, unreadable certificate);
never with a traceback, except when the app's own module fails while importing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import types
from collections.abc import Sequence
from typing import Any, get_type_hints

import trio

from .config import Config, ConfigError, options
from .importer import import_app
from .server import Server, serve_wsgi
from .wsgi import WSGIApp

LOGGER = logging.getLogger("trioserve.error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description="Serve a WSGI application over HTTP/1.1 and HTTP/2 (h2 over TLS, h2c).",
    )
    parser.add_argument(
        "app",
        metavar="MODULE:ATTR",
        help="the WSGI application, e.g. examples.hello:app (ATTR defaults to 'application')",
    )
    hints = get_type_hints(Config)
    for field in options():
        meta = field.metadata
        flags = meta["flags"] or ("--" + field.name.replace("_", "-"),)
        kind = hints[field.name]
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            shown = "on" if default else "off"
        elif kind == tuple[str, ...]:
            # argparse would append to a non-empty default list rather than
            # replace it, so the default is applied in config_from_args.
            kwargs.update(action="append", default=None, metavar=meta["metavar"] or None)
            shown = " ".join(default)
        else:
            kwargs["type"] = _scalar_type(kind)
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            shown = "none" if default is None else repr(default) if default == "" else str(default)
        kwargs["help"] = f"{meta['help']} (default: {shown})".replace("%", "%%")
        parser.add_argument(*flags, **kwargs)
    return parser


def _scalar_type(kind: Any) -> Any:
    if isinstance(kind, types.UnionType):  # e.g. str | None
        kind = next(arg for arg in kind.__args__ if arg is not type(None))
    return kind


def config_from_args(args: argparse.Namespace) -> Config:
    values = {field.name: getattr(args, field.name) for field in options()}
    if values["bind"] is None:
        del values["bind"]
    return Config(**values)


def setup_logging(config: Config) -> None:
    """Error log to stderr at ``--log-level``; access log to ``--access-log``."""
    formatter = logging.Formatter(
        f"[%(asctime)s] [{os.getpid()}] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S %z"
    )
    error_handler = logging.StreamHandler(sys.stderr)
    error_handler.setFormatter(formatter)
    root = logging.getLogger("trioserve")
    root.handlers[:] = [error_handler]
    root.setLevel(config.log_level.upper())
    access = logging.getLogger("trioserve.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    if config.access_log:
        handler: logging.Handler
        if config.access_log == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            handler = logging.FileHandler(config.access_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.handlers[:] = [handler]


async def run_until_signalled(app: WSGIApp, config: Config) -> None:
    """Serve until SIGINT/SIGTERM: the first stops gracefully, a second one at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await serve_wsgi(app, nursery, config=config)
            for address in server.addresses:
                scheme = "https" if config.certfile else "http"
                LOGGER.info(
                    "Listening on %s",
                    address if address.startswith("unix:") else f"{scheme}://{address}",
                )
            nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
            await server.wait_stopped()
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: Any, server: Server, cancel_scope: trio.CancelScope) -> None:
    count = 0
    async for signum in signals:
        count += 1
        if count == 1:
            LOGGER.info(
                "Received %s: finishing in-flight requests (up to %.0fs); send again to stop now",
                signal.Signals(signum).name,
                server.config.graceful_timeout,
            )
            server.stop_nowait()
        else:
            LOGGER.info("Received %s again: stopping now", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        app = import_app(args.app, factory=config.factory)
    except ConfigError as exc:
        print(f"trioserve: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    try:
        trio.run(run_until_signalled, app, config)
    except BaseExceptionGroup as group:
        error = _only_config_error(group)
        if error is None:
            raise
        print(f"trioserve: error: {error}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"trioserve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _only_config_error(group: BaseExceptionGroup[BaseException]) -> ConfigError | None:
    """The ConfigError a startup failure is made of, if that is all it is."""
    matched, rest = group.split(ConfigError)
    if matched is None or rest is not None:
        return None
    exc: BaseException = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConfigError)
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
