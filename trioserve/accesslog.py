"""Access log lines, one per finished request, in gunicorn's ``%(atom)s`` format language.

Atoms:

====== ====================================================
h      remote address ("-" for unix sockets)
l      "-" (RFC 1413 identity, never known)
u      "-" (remote user, not known to a WSGI server)
t      time the request started, ``[10/Oct/2000:13:55:36 +0000]``
r      request line (``GET /path?q HTTP/1.1``)
m      method
U      path without query
q      query string
H      protocol (``HTTP/1.1``, ``HTTP/2``)
s      status code (0 if the stream ended before a response)
b      response body bytes, "-" if none (none for HEAD, 204 and 304; for a
       response trioserve cut short, what went out before the cut)
B      response body bytes, 0 if none
f      Referer header
a      User-Agent header
T      duration, whole seconds
M      duration, milliseconds
D      duration, microseconds
L      duration, decimal seconds
p      process id (identifies the worker)
{h}i   request header h
{h}o   response header h
====== ====================================================

Each atom is written ``%(atom)s`` (a width such as ``%(h)-15s`` is allowed) and
``%%`` is a percent sign. :func:`check_format` refuses anything else when the
options are read (:class:`~trioserve.config.Config` calls it), naming the bad
atom, so a typo cannot reach a request.

The line is emitted on the ``trioserve.access`` logger with the atoms attached
to the record as ``record.access`` (a dict), from which the JSON log format
(:mod:`trioserve.logs`) builds named fields (:func:`access_fields`).

Formatting is skipped entirely when the access logger would drop the line. An
access log must never take a request down: if a line cannot be formatted or
written, the failure is logged once, on ``trioserve.error``, and every request
is answered as if there were no access log.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

from .events import RequestReceived
from .wsgi import ConnectionInfo, ResponseHead

if TYPE_CHECKING:
    from .config import Config

ACCESS_LOGGER = logging.getLogger("trioserve.access")
ERROR_LOGGER = logging.getLogger("trioserve.error")

ATOMS = frozenset(("h", "l", "u", "t", "r", "m", "U", "q", "H", "s", "b", "B", "f", "a"))
ATOMS |= {"T", "M", "D", "L", "p"}

_HEADER_ATOM = re.compile(r"\{([^}]+)\}([io])")
# One directive of the % language: %%, or %(name) with optional flags, width,
# precision, and a conversion letter.
_DIRECTIVE = re.compile(r"%(?:%|\((?P<name>[^()]*)\)(?P<spec>[-+ #0]*\d*(?:\.\d+)?)(?P<conv>\w?))")


def check_format(fmt: str) -> None:
    """Refuse an access log format that would fail on a request, naming the bad part.

    Raises:
      ConfigError: an unknown atom, an atom without ``s``, another conversion
        (``%(D)d``: atoms are strings), an unclosed ``%(`` or a stray ``%``.
    """
    from .config import ConfigError  # here: config imports this module

    position = fmt.find("%")
    while position >= 0:
        match = _DIRECTIVE.match(fmt, position)
        if match is None:
            if fmt.startswith("%(", position):
                raise ConfigError(
                    f"--access-log-format: unclosed %( at position {position}: {fmt[position:]!r}"
                )
            raise ConfigError(
                f"--access-log-format: stray % at position {position}; write %% for a percent sign"
            )
        name, conv, written = match["name"], match["conv"], match.group(0)
        if name is not None:
            if name not in ATOMS and not _HEADER_ATOM.fullmatch(name):
                raise ConfigError(f"--access-log-format: unknown atom {written}")
            if conv != "s":
                fix = f"%({name}){match['spec']}s"
                if not conv:
                    raise ConfigError(f"--access-log-format: atom {written} has no s: write {fix}")
                raise ConfigError(
                    f"--access-log-format: atom {written}: atoms are strings, write {fix}"
                )
        position = fmt.find("%", match.end())


def access_log_for(config: Config) -> AccessLog | None:
    """The server's access log: on with ``--access-log`` or ``--log-config`` (whose file
    decides where ``trioserve.access`` goes), else None."""
    if config.access_log is None and config.log_config is None:
        return None
    return AccessLog(config.access_log_format)


class FinishedRequest(Protocol):
    """What an access log line is made of (a finished :class:`~trioserve.stream.RequestStream`)."""

    request: RequestReceived
    info: ConnectionInfo
    status: int  # 0 if the stream ended before a response
    started_at: float  # time.time() when the request head arrived
    response_head: ResponseHead | None

    @property
    def bytes_sent(self) -> int:
        """Response body bytes (none for HEAD)."""
        ...


class AccessLog:
    """Formats and emits access log lines. Call it with a finished request."""

    def __init__(self, fmt: str, logger: logging.Logger = ACCESS_LOGGER) -> None:
        check_format(fmt)
        self.fmt = fmt
        self.logger = logger
        self._header_atoms = {
            name for name in _atom_names(fmt) if _HEADER_ATOM.fullmatch(name) is not None
        }
        self._failed = False

    def __call__(self, stream: FinishedRequest) -> None:
        """Log one line for ``stream``; never raises (a failure is reported once)."""
        try:
            if not self.logger.isEnabledFor(logging.INFO):
                return
            atoms = self.atoms(stream)
            self.logger.info(self.fmt % atoms, extra={"access": atoms})
        except Exception as exc:
            if not self._failed:
                self._failed = True
                ERROR_LOGGER.error(
                    "Access log: cannot log a request (%s: %s); requests are still served,"
                    " further failures are not reported",
                    type(exc).__name__,
                    exc,
                )

    def atoms(self, stream: FinishedRequest) -> dict[str, str]:
        request = stream.request
        duration = time.time() - stream.started_at
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        protocol = "HTTP/2" if request.http_version == "2" else f"HTTP/{request.http_version}"
        method = request.method.decode("latin-1")
        headers = {name: value for name, value in request.headers}
        atoms = {
            "h": client_address(stream) or "-",
            "l": "-",
            "u": "-",
            "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(stream.started_at)),
            "r": f"{method} {target} {protocol}",
            "m": method,
            "U": path,
            "q": query,
            "H": protocol,
            "s": str(stream.status),
            "b": str(stream.bytes_sent) if stream.bytes_sent else "-",
            "B": str(stream.bytes_sent),
            "f": headers.get(b"referer", b"-").decode("latin-1"),
            "a": headers.get(b"user-agent", b"-").decode("latin-1"),
            "T": str(int(duration)),
            "M": str(int(duration * 1000)),
            "D": str(int(duration * 1_000_000)),
            "L": f"{duration:.6f}",
            "p": f"<{os.getpid()}>",
        }
        for atom in self._header_atoms:
            name, kind = atom[1:-2].lower().encode("latin-1"), atom[-1]
            if kind == "i":
                value = headers.get(name)
            else:
                head = stream.response_head
                value = next(
                    (v for n, v in (head.headers if head else []) if n.lower() == name), None
                )
            atoms[atom] = value.decode("latin-1") if value is not None else "-"
        return atoms


def client_address(stream: FinishedRequest) -> str | None:
    """The client's address (after PROXY / forwarding headers), None over a unix socket."""
    return stream.info.client_addr


def _atom_names(fmt: str) -> list[str]:
    return [match["name"] for match in _DIRECTIVE.finditer(fmt) if match["name"] is not None]


# Named fields for structured (JSON) access lines: atom -> (field, conversion).
_FIELDS: dict[str, tuple[str, Any]] = {
    "h": ("remote_addr", str),
    "r": ("request", str),
    "m": ("method", str),
    "U": ("path", str),
    "q": ("query", str),
    "H": ("protocol", str),
    "s": ("status", int),
    "B": ("bytes_sent", int),
    "f": ("referer", str),
    "a": ("user_agent", str),
    "L": ("duration", float),
}


def access_fields(atoms: dict[str, str]) -> dict[str, Any]:
    """The atoms of one line as named, typed fields (``"-"`` for unknown becomes None);
    header atoms of the format go under ``request_headers`` / ``response_headers``."""
    fields: dict[str, Any] = {}
    for atom, (name, convert) in _FIELDS.items():
        value = atoms.get(atom, "-")
        fields[name] = None if value == "-" and convert is str else convert(value)
    for atom, value in atoms.items():
        header = _HEADER_ATOM.fullmatch(atom)
        if header is not None:
            group = "request_headers" if header[2] == "i" else "response_headers"
            fields.setdefault(group, {})[header[1].lower()] = None if value == "-" else value
    return fields
