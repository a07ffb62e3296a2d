"""The option reference, generated from what ``trioserve --help`` is generated from.

:func:`option_entries` reads the parser :func:`trioserve.cli.build_parser` builds (so every
option ``--help`` prints, ``-h`` and ``--config`` included) and takes each option's help
text and default from its :class:`trioserve.config.Config` field. The Sphinx extension
(``trioserve_docs.py``) renders the entries as ``.. option::`` blocks on the Options page;
tests/test_docs.py checks the entries against the parser and ``Config``. Nothing here
imports Sphinx, so the tests can use it without the ``docs`` extra.

A ``Config`` field this module has never heard of (a new option) still appears: in
"Other options", until it is given a group in :data:`GROUPS`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from trioserve import cli
from trioserve.config import GiB, KiB, MiB, options

# (title, introduction (MyST Markdown), the options in it: Config field names, or the
# parser's dest for the options that are not fields). Order: as a reader looks for them.
GROUPS: list[tuple[str, str, list[str]]] = [
    (
        "The command",
        "Options about the command itself. `trioserve MODULE:ATTR [OPTIONS]` serves a WSGI "
        "application; see {doc}`running`.",
        ["help", "version", "config"],
    ),
    (
        "Addresses and the application",
        "Where trioserve listens and what it serves. See {doc}`running` and {doc}`static-files`.",
        ["bind", "backlog", "unix_socket_mode", "root_path", "factory", "root", "static_charset"],
    ),
    (
        "Threads and processes",
        "How many app calls run at once, in how many processes. "
        "See {doc}`running` (workers and signals).",
        [
            "threads",
            "app_thread_scheduling",
            "max_threads_per_connection",
            "workers",
            "max_requests",
            "max_requests_jitter",
            "gc_threshold",
            "reload",
            "reload_dir",
        ],
    ),
    (
        "Process control",
        "Pid file, working directory, user and file mode mask. See {doc}`running`.",
        ["pid", "chdir", "user", "group", "umask"],
    ),
    (
        "Logs",
        "See {doc}`logging`.",
        ["log_level", "error_log", "access_log", "access_log_format", "log_format", "log_config"],
    ),
    (
        "Metrics",
        "Prometheus' text format on a listener of its own. See {doc}`metrics`.",
        ["metrics_bind"],
    ),
    (
        "TLS",
        "HTTPS, and with it HTTP/2 through ALPN. See {doc}`http2-tls`.",
        [
            "certfile",
            "keyfile",
            "keyfile_password",
            "ca_certs",
            "cert_reqs",
            "ciphers",
            "tls_min_version",
        ],
    ),
    (
        "Timeouts",
        "In seconds. See {doc}`security` for what each one defends against.",
        [
            "keep_alive_timeout",
            "h2_idle_timeout",
            "tls_handshake_timeout",
            "header_timeout",
            "body_timeout",
            "write_timeout",
            "graceful_timeout",
        ],
    ),
    (
        "Limits",
        "Sizes are in bytes. See {doc}`security` for the status code each limit answers with.",
        [
            "max_request_body_size",
            "body_prebuffer",
            "max_header_size",
            "max_request_line_size",
            "max_header_count",
            "max_connections",
            "max_requests_in_flight",
        ],
    ),
    (
        "Slow clients",
        "When an app thread stops waiting for a slow client and writes the rest of its response "
        "to disk instead. See {doc}`security` (slow readers).",
        ["spill_after", "max_spill_per_response", "max_spill_total", "spill_dir"],
    ),
    (
        "HTTP/1.1",
        "Which parser reads request heads; trioserve frames requests and writes responses "
        "itself either way. See {doc}`wsgi-http`.",
        ["http1_parser"],
    ),
    (
        "HTTP/2",
        "The settings trioserve announces to HTTP/2 clients. See {doc}`http2-tls`.",
        [
            "h2_max_concurrent_streams",
            "h2_initial_window_size",
            "h2_max_frame_size",
            "h2_max_header_list_size",
        ],
    ),
    (
        "Proxies and responses",
        "Whom trioserve believes about the client, and what it says about itself. "
        "See {doc}`deployment/proxies`.",
        ["forwarded_allow_ips", "proxy_protocol", "server_header"],
    ),
]
OTHER_GROUP = ("Other options", "Options not yet sorted into a group above.")

NO_DEFAULT = "—"  # an option that takes no value (--help, --version)


@dataclass
class OptionEntry:
    """One option of ``trioserve --help``, as the reference shows it."""

    dest: str  # the Config field, or the parser's dest for --help/--version/--config
    flags: list[str]  # every spelling: ["-b", "--bind"]
    metavar: str | None  # the value's placeholder (ADDRESS), None if it takes no value
    default: str  # formatted: see format_default()
    help: str  # one sentence, from the Config field (else from the parser)
    repeatable: bool

    @property
    def signature(self) -> str:
        """``-b ADDRESS, --bind ADDRESS`` (the form ``.. option::`` takes)."""
        if self.metavar is None:
            return ", ".join(self.flags)
        return ", ".join(f"{flag} {self.metavar}" for flag in self.flags)


def format_size(value: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if value and value % unit == 0:
            return f"{value // unit} {name}"
    return f"{value:,}"


def format_default(value: Any, *, size: bool = False) -> str:
    """A default as the reference writes it: ``(none)``, ``off``/``on``, code spans
    (Markdown literals, comma-separated for a list), or a number with an
    optional ``KiB``/``MiB``/``GiB`` unit. tests/test_docs.py reads these back."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(f"`{item}`" for item in value)
    if isinstance(value, str):
        return '`""`' if value == "" else f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and size:
        return format_size(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _field_defaults() -> dict[str, Any]:
    defaults = {}
    for field in options():
        if field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        else:
            defaults[field.name] = field.default
    return defaults


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def option_entries() -> list[OptionEntry]:
    """Every option the parser prints in ``--help``, in the parser's order."""
    fields = {field.name: field for field in options()}
    defaults = _field_defaults()
    entries = []
    for action in cli.build_parser()._actions:
        if not action.option_strings or action.help is argparse.SUPPRESS:
            continue
        takes_value = action.nargs != 0
        metavar: str | None = None
        if takes_value:
            metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        field = fields.get(action.dest)
        if field is not None:
            help_text = field.metadata["help"]
            size = field.metadata["metavar"] == "BYTES"
            default = format_default(defaults[action.dest], size=size)
        else:
            help_text = (action.help or "").rsplit(" (default: ", 1)[0].replace("%%", "%")
            default = NO_DEFAULT if not takes_value else format_default(action.default)
        entries.append(
            OptionEntry(
                dest=action.dest,
                flags=list(action.option_strings),
                metavar=metavar,
                default=default,
                help=_sentence(help_text),
                repeatable=isinstance(action, argparse._AppendAction),
            )
        )
    return entries


def grouped_entries() -> list[tuple[str, str, list[OptionEntry]]]:
    """The entries by group (:data:`GROUPS`, then "Other options" for the rest)."""
    by_dest = {entry.dest: entry for entry in option_entries()}
    result = []
    for title, intro, dests in GROUPS:
        members = [by_dest.pop(dest) for dest in dests if dest in by_dest]
        if members:
            result.append((title, intro, members))
    if by_dest:
        result.append((*OTHER_GROUP, list(by_dest.values())))
    return result


def _escape(text: str) -> str:
    """Plain text for Markdown (MyST): no character of it starts markup."""
    for char in "\\`*_[]<>|{}#":
        text = text.replace(char, "\\" + char)
    return text


def option_lines(entry: OptionEntry) -> list[str]:
    """One option of the reference, as MyST Markdown lines (an ``option`` directive)."""
    lines = [f"````{{option}} {entry.signature}", _escape(entry.help), ""]
    if entry.default != NO_DEFAULT:
        lines += [f"Default: {entry.default}.", ""]
    if entry.repeatable:
        lines += [
            "Repeatable. Values given on the command line replace the default list",
            "(and the config file's) rather than adding to it.",
            "",
        ]
    return [*lines, "````", ""]
