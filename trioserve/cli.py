"""The ``trioserve`` command: parse flags into a Config, load the app, serve until a signal.

The argument parser is generated from :class:`trioserve.config.Config`'s
fields, so every flag is a config field with the same name and default;
``--config FILE`` supplies the same fields from TOML, under the flags given
(:mod:`trioserve.configfile`). With ``--workers N`` above 1 this process
becomes the supervisor of N worker processes and never imports the app
(:mod:`trioserve.workers`).

Misconfiguration ends the process with one line on stderr and exit status 2
(bad flags, app not importable, a log file that cannot be opened) or 1 (cannot
bind, unreadable certificate): the error's ``exit_status``. Never with a
traceback, except when the app's own module fails while importing; with
``--log-level debug`` an error caused by an exception (a package the app needs
is missing) shows that exception's traceback above the line.

Before serving (see :mod:`trioserve.process`): ``--chdir`` and ``--umask``,
the logs (:mod:`trioserve.logs`), the pid file; the app is imported before the
sockets are bound, except with ``--user``/``--group``, where it is imported only
after binding and switching user. ``--reload`` runs the supervisor with one
worker, restarted when a Python file changes (:mod:`trioserve.reloader`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any, get_type_hints

import trio

from . import __version__
from .config import Config, ConfigError, options
from .configfile import load_config_file
from .importer import import_app
from .listeners import bind_listeners, remove_socket_files, systemd_listeners
from .logs import configure_logging
from .process import (
    Identity,
    drop_privileges,
    pid_file,
    prepare_process,
    tune_garbage_collector,
)
from .reloader import check_reload_available
from .server import Server, serve_wsgi
from .tls import reload_certificates
from .workers import (
    ignore_terminal_signals,
    in_worker,
    report_ready,
    run_supervisor,
    worker_stats,
)
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
        nargs="?",
        help="the WSGI application, e.g. examples.hello:app (ATTR defaults to 'application');"
        " omitted with --root DIR",
    )
    parser.add_argument("--version", action="version", version=f"trioserve {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a TOML file: keys are the long flag names (dash- or snake_case);"
        " flags given here override it; see trioserve/configfile.py (default: none)",
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
        # A sentinel default: only flags actually given reach config_from_args,
        # so they override a --config file and the others do not hide it.
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            shown = "on" if default else "off"
        elif kind == tuple[str, ...]:
            # Appends to an empty list: flags given replace the default (or the file's list).
            kwargs.update(action="append", metavar=meta["metavar"] or None)
            shown = " ".join(default)
        else:
            kwargs["type"] = _scalar_type(kind)
            # A count reads "--threads N" rather than argparse's "--threads THREADS".
            metavar = meta["metavar"] or ("N" if kind is int else "")
            if metavar:
                kwargs["metavar"] = metavar
            shown = "none" if default is None else repr(default) if default == "" else str(default)
        kwargs["help"] = f"{meta['help']} (default: {shown})".replace("%", "%%")
        parser.add_argument(*flags, **kwargs)
    return parser


def _scalar_type(kind: Any) -> Any:
    if isinstance(kind, types.UnionType):  # e.g. str | None
        kind = next(arg for arg in kind.__args__ if arg is not type(None))
    return kind


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config: ``--config`` file values, overridden by the flags given, else the defaults."""
    values = load_config_file(args.config) if args.config else {}
    values.update(given_options(args))
    return Config(**values)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields set by flags on the command line (the parser's defaults are a sentinel)."""
    return {field.name: getattr(args, field.name) for field in options() if field.name in args}


async def run_until_signalled(
    config: Config, load: Callable[[], WSGIApp], identity: Identity | None = None
) -> None:
    """Serve until SIGINT/SIGTERM: the first stops gracefully, a second one at once.

    ``load`` gives the app. With ``identity`` (``--user``/``--group``) the
    sockets are bound first, then the process becomes that user, and only then
    is the app loaded. With TLS, SIGHUP reads the certificate files again
    (:func:`trioserve.tls.reload_certificates`); without TLS it keeps its
    default meaning.

    A worker process (see :mod:`trioserve.workers`) stops on SIGTERM only (its
    parent handles SIGINT and SIGHUP), serves the sockets it was given rather
    than systemd's, counts into the block its parent reads for ``/metrics``, and
    reports to its parent once it serves.

    ``--app-thread-scheduling auto`` is batch here: the command's process and
    its threads are its own (:mod:`trioserve.app_threads`).
    """
    if config.app_thread_scheduling == "auto":
        config = dataclasses.replace(config, app_thread_scheduling="batch")
    worker = in_worker()
    watched: tuple[signal.Signals, ...] = (signal.SIGTERM,)
    if not worker:
        watched += (signal.SIGINT,)
    if config.certfile and not worker:
        watched += (signal.SIGHUP,)
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            activated = [] if worker else systemd_listeners()
            if activated:
                LOGGER.info("Serving %d socket(s) from systemd (LISTEN_FDS)", len(activated))
            listeners = activated or None
            if identity is not None:
                listeners = listeners or await bind_listeners(config)
                app = _load_as(identity, load, listeners)
            else:
                app = load()
            stats = worker_stats() if worker else None  # shared with the supervisor (metrics)
            server = await serve_wsgi(app, nursery, config=config, listeners=listeners, stats=stats)
            tune_garbage_collector(config.gc_threshold)
            for address in server.addresses:
                scheme = "https" if config.certfile else "http"
                LOGGER.log(
                    logging.DEBUG if worker else logging.INFO,
                    "Worker serving %s" if worker else "Listening on %s",
                    address if address.startswith("unix:") else f"{scheme}://{address}",
                )
            if worker:
                nursery.start_soon(report_ready, server, nursery.cancel_scope)
            nursery.start_soon(_watch_signals, signals, server, nursery.cancel_scope)
            await server.wait_stopped()
            nursery.cancel_scope.cancel()


def _load_as(
    identity: Identity, load: Callable[[], WSGIApp], listeners: list[trio.SocketListener]
) -> WSGIApp:
    """Become ``identity``, then load the app; the listeners are closed if that fails."""
    try:
        drop_privileges(identity)
        return load()
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        remove_socket_files(listeners)
        raise


async def _watch_signals(signals: Any, server: Server, cancel_scope: trio.CancelScope) -> None:
    count = 0
    async for signum in signals:
        if signum == signal.SIGHUP:
            _reload_certificates()
            continue
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


def _reload_certificates() -> None:
    try:
        reload_certificates()
    except ConfigError as exc:
        LOGGER.error(
            "Received SIGHUP: the TLS files do not load, keeping the current ones: %s", exc
        )
        return
    LOGGER.info("Received SIGHUP: TLS files read again; new connections use them")


def load_app(spec: str | None, config: Config) -> WSGIApp:
    """The app to serve: MODULE:ATTR imported, or StaticFiles for ``--root DIR`` (exactly one)."""
    check_app_source(spec, config)
    if spec is not None:
        app: WSGIApp = import_app(spec, factory=config.factory)
        return app
    from .static import StaticFiles

    assert config.root is not None
    try:
        return StaticFiles(config.root, charset=config.static_charset)
    except OSError as exc:
        raise ConfigError(f"--root {config.root}: not a directory") from exc


def check_app_source(spec: str | None, config: Config) -> None:
    """Exactly one of MODULE:ATTR and ``--root DIR`` (checked without importing anything)."""
    if spec is None and config.root is None:
        raise ConfigError("give the app as MODULE:ATTR, or --root DIR to serve static files")
    if spec is not None and config.root is not None:
        raise ConfigError(f"give either MODULE:ATTR ({spec}) or --root DIR, not both")


def main(argv: Sequence[str] | None = None) -> int:
    if in_worker():
        ignore_terminal_signals()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        args.config = os.path.abspath(args.config)  # read again on SIGHUP, after --chdir
    config: Config | None = None
    try:
        config = config_from_args(args)
        identity = prepare_process(config)
        check_app_source(args.app, config)
        if config.reload:
            check_reload_available()
        configure_logging(config)
        # --workers above 1 or --reload: this process supervises and never imports the app.
        supervise = (config.workers > 1 or config.reload) and not in_worker()
        app: WSGIApp | None = None
        if not supervise and identity is None:
            app = load_app(args.app, config)  # before binding: a bad app costs no socket
        with pid_file(config.pid):
            if supervise:
                after_bind = (
                    None if identity is None else functools.partial(drop_privileges, identity)
                )
                reread = functools.partial(config_from_args, args)
                status: int = trio.run(run_supervisor, config, args.app, reread, after_bind)
                return status
            load = functools.partial(load_app, args.app, config) if app is None else lambda: app
            trio.run(run_until_signalled, config, load, identity)
    except BaseExceptionGroup as group:
        error = _only_config_error(group)
        if error is None:
            raise
        return _refuse(error, config)
    except ConfigError as exc:
        return _refuse(exc, config)
    return 0


def _refuse(error: ConfigError, config: Config | None) -> int:
    """Report ``error`` in one line (its cause's traceback too at --log-level debug)."""
    if config is not None and config.log_level.lower() == "debug" and error.__cause__ is not None:
        traceback.print_exception(error.__cause__, file=sys.stderr)
    print(f"trioserve: error: {error}", file=sys.stderr)
    return error.exit_status


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
