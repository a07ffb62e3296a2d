"""Targets for tests/test_cli.py: ``python -m trioserve tests.cli_targets:NAME`` from the repo root.

Every app goes through ``wsgiref.validate.validator``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.validate import validator

Environ = dict[str, Any]


def _text_app(text: str) -> Any:
    body = text.encode()

    def app(environ: Environ, start_response: Any) -> Iterable[bytes]:
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return validator(app)


def _environ(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Echo the CGI-ish parts of the environ as JSON."""
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL")
    body = json.dumps({key: environ.get(key) for key in keys}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _gc_settings(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """The serving process's garbage-collector threshold and frozen objects, as JSON."""
    import gc

    settings = {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
    body = json.dumps(settings).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _thread_policy(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """The scheduling policy of the thread the app runs in: "batch", "other" or a number."""
    import os

    policy = os.sched_getscheduler(0)
    names = {os.SCHED_OTHER: "other", getattr(os, "SCHED_BATCH", -1): "batch"}
    body = names.get(policy, str(policy)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _tls_echo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Echo mod_ssl's SSL_* variables, the protocol and the scheme as JSON."""
    echoed = {key: value for key, value in environ.items() if key.startswith("SSL_")}
    echoed["SERVER_PROTOCOL"] = environ["SERVER_PROTOCOL"]
    echoed["wsgi.url_scheme"] = environ["wsgi.url_scheme"]
    body = json.dumps(echoed).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _raises(environ: Environ, start_response: Any) -> Iterable[bytes]:
    raise RuntimeError("raised on purpose by the app")


def _slow_upload(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Say on stderr that the request is in flight, then read the whole body and report it.

    The test sends the body slowly, so the request stays in flight as long as it wants.
    """
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        # One write for the whole line: print() writes the newline separately, and
        # with -w 2 another worker's line could land between the two.
        sys.stderr.write("cli_targets: slow_upload started\n")
        sys.stderr.flush()
    received = b""
    while len(received) < length:
        chunk = environ["wsgi.input"].read(length - len(received))
        if not chunk:
            break
        received += chunk
    body = b"received %d bytes: %s" % (len(received), received)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _wait_for_fifo(environ: Environ, start_response: Any) -> Iterable[bytes]:
    """Say on stderr that the request is in flight, then block until the test writes the FIFO.

    ``?fifo=PATH`` names a FIFO the test created; opening it for reading blocks
    until the test opens it for writing, and the read ends when the test closes it.
    Without ``?fifo`` it answers at once.
    """
    paths = parse_qs(environ["QUERY_STRING"]).get("fifo")
    if paths:
        # One write for the whole line: print() writes the newline separately, and
        # with -w 2 another worker's line could land between the two.
        sys.stderr.write("cli_targets: wait_for_fifo started\n")
        sys.stderr.flush()
        with open(paths[0], "rb") as fifo:
            body = b"released by " + fifo.read()
    else:
        body = b"no fifo, no wait"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# MODULE with no :ATTR means MODULE:application.
application = _text_app("default attribute\n")

environ_echo = validator(_environ)
gc_settings = validator(_gc_settings)
thread_policy = validator(_thread_policy)
tls_echo = validator(_tls_echo)
raises = validator(_raises)
slow_upload = validator(_slow_upload)
wait_for_fifo = validator(_wait_for_fifo)

not_callable = 42


def factory() -> Any:
    """For --factory: called once, returns the app."""
    return _text_app("made by the factory\n")


def bad_factory() -> Any:
    """For --factory: returns something that is not a WSGI app."""
    return "not an app"


class _Namespace:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


# Dotted attribute paths: tests.cli_targets:holder.inner.app
holder = _Namespace(inner=_Namespace(app=_text_app("found through holder.inner.app\n")))
