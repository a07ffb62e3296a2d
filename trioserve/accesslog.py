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
b      response body bytes, "-" if none
B      response body bytes
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

Formatting is skipped entirely when the access logger would drop the line.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Protocol

from .events import RequestReceived
from .wsgi import ConnectionInfo, ResponseHead

ACCESS_LOGGER = logging.getLogger("trioserve.access")

_HEADER_ATOM = re.compile(r"%\(\{([^}]+)\}([io])\)s")


class FinishedRequest(Protocol):
    """What an access log line is made of (a finished :class:`~trioserve.stream.RequestStream`)."""

    request: RequestReceived
    info: ConnectionInfo
    status: int  # 0 if the stream ended before a response
    bytes_sent: int
    started_at: float  # time.time() when the request head arrived
    response_head: ResponseHead | None


class AccessLog:
    """Formats and emits access log lines. Call it with a finished request."""

    def __init__(self, fmt: str, logger: logging.Logger = ACCESS_LOGGER) -> None:
        self.fmt = fmt
        self.logger = logger
        self._header_atoms = {f"{{{name}}}{kind}" for name, kind in _HEADER_ATOM.findall(fmt)}

    def __call__(self, stream: FinishedRequest) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(self.fmt % self.atoms(stream))

    def atoms(self, stream: FinishedRequest) -> dict[str, str]:
        request = stream.request
        duration = time.time() - stream.started_at
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        protocol = "HTTP/2" if request.http_version == "2" else f"HTTP/{request.http_version}"
        method = request.method.decode("latin-1")
        headers = {name: value for name, value in request.headers}
        info = stream.info
        atoms = {
            "h": info.client_addr or "-",
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
