"""The thread side of the WSGI bridge (PEP 3333).

Everything in this module runs in a worker thread started by
``trio.to_thread.run_sync``. It reaches trio only through the
:class:`StreamPort` protocol that the trio side
(:class:`trioserve.stream.RequestStream`) implements, with ``trio.from_thread``
or the trio token's ``run_sync_soon``. That is the one seam between the app's
blocking world and the event loop.

What a hop costs, and how it is avoided: a round trip into trio and back
(``from_thread.run_sync``/``run``) costs the thread tens of microseconds of
handoff. So a list or tuple response makes no hop at all (it is returned whole
from :func:`call_app`), a streamed response *pushes* each chunk without waiting
(:meth:`StreamPort.push`: the trio side takes it from a ``run_sync_soon``
callback) and only waits, with ``from_thread.run``, once too much of its output
is still queued, and the request body is fetched a whole buffered batch per
round trip (``take_body_nowait``, then ``wait_body`` only if nothing is there).

Cancellation: when the request's trio task is cancelled (client reset or
disconnect, server shutdown), the next hop raises :class:`trio.Cancelled` in the
app thread. ``Cancelled`` derives from ``BaseException``, so an app's
``except Exception`` does not swallow it; the iterable's ``close()`` still runs.
Long CPU-bound work can poll with ``environ["trioserve.check_cancelled"]()``.

PEP 3333 rules enforced here, each with a test in tests/test_wsgi.py:

- headers are delayed until the first non-empty body chunk, or the end of the
  iterable (an empty body still sends them);
- ``start_response`` with ``exc_info`` re-raises once headers are sent, and may
  replace status and headers before that; a second call without ``exc_info``
  is an error;
- ``start_response`` returns a ``write`` callable, and checks the head at once
  (PEP 3333: "so that an error can be raised while the application is still
  running"): status, header names and values, and the framing rules of
  :mod:`trioserve.responses`;
- ``close()`` of the iterable is called on every path, once;
- environ values are native strings (bytes decoded as latin-1), SERVER_PORT too.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import trio

from .events import UNCHECKED, FileSegment, Headers, InvalidResponse, RequestReceived
from .proxy import FORWARDING_KEYS, AllowList, apply_forwarded
from .responses import (
    check_status,
    declared_length,
    error_body,
    field_traits,
    reason_phrase,
)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

APP_LOGGER = logging.getLogger("trioserve.app")
LOGGER = logging.getLogger("trioserve.error")

# Chunk size for wsgi.file_wrapper when the app gives none (PEP 3333 suggests
# the server pick one; 64 KiB matches the socket read size).
FILE_BLOCK_SIZE = 64 * 1024

# PEP 3333: a three-digit code, then a space and the reason phrase (trioserve
# also takes the code alone); responses.check_status vets the phrase's characters.
_STATUS_RE = re.compile(r"([0-9]{3})(?: (.*))?", re.DOTALL)
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class StreamCancelled(Exception):
    """Raised by the trio side of a hop when the request's task is cancelled.

    Never reaches the app: :func:`_raise_cancelled` turns it into the real
    :class:`trio.Cancelled` by taking one checkpoint inside the task.
    """


@dataclass(slots=True)
class ResponseHead:
    """A response's status line and headers, converted to bytes and validated."""

    status: int
    reason: bytes
    headers: Headers
    # Its Content-Length once the rules of trioserve.responses were applied to
    # it (None: none declared); UNCHECKED for a head nobody has checked.
    content_length: int | None = UNCHECKED
    # trioserve.responses.field_traits of ``headers`` as the app gave them
    # (UNCHECKED: not looked at yet).
    traits: int = UNCHECKED


class StreamPort(Protocol):
    """What the app thread may ask of its request's trio task (see stream.py)."""

    def take_body_nowait(self) -> bytes | None: ...
    async def wait_body(self) -> bytes: ...
    def push(self, head: ResponseHead | None, data: bytes) -> bool: ...
    async def wait_writable(self) -> None: ...
    @property
    def can_sendfile(self) -> bool: ...


@dataclass(slots=True)
class AppResult:
    """What is left to do when the app thread returns.

    ``head`` is None when it already went out (the app streamed); otherwise the
    trio side sends ``head`` and ``body`` (the whole response: the list fast
    path, or an iterable that produced no data) and ends the stream.
    """

    head: ResponseHead | None
    body: list[bytes] = field(default_factory=list)
    # A file to send with os.sendfile instead of ``body``; its iterable's
    # close() is then the trio side's to call, once the file has gone out.
    file: FileSegment | None = None
    close: Callable[[], object] | None = None


_NO_TLS: Mapping[str, str] = MappingProxyType({})  # shared: not a dict per connection


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Per-connection facts the environ needs, computed once per connection."""

    scheme: str  # "http" or "https"
    server_name: str
    server_port: str
    client_addr: str | None  # None for unix-socket peers
    client_port: str | None
    root_path: str = ""
    forwarding: AllowList | None = None  # trusted proxies (None: forwarding headers kept as is)
    # TLS connections: mod_ssl's SSL_* variables (trioserve.tls.tls_environ), same every request.
    tls: Mapping[str, str] = field(default_factory=lambda: _NO_TLS)
    # The environ entries every request of the connection shares but the
    # client's address (build_environ copies it, rather than building them
    # again per request). Without TLS it is shared with every connection to
    # the same address, so an idle connection does not hold a copy.
    environ_base: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = _server_environ(self.root_path, self.server_name, self.server_port, self.scheme)
        if self.tls:
            base = {**base, **self.tls}
        object.__setattr__(self, "environ_base", base)


@functools.lru_cache(maxsize=64)
def _server_environ(
    root_path: str, server_name: str, server_port: str, scheme: str
) -> dict[str, Any]:
    """The environ entries that depend only on where the server listens (never mutated)."""
    return {
        "SCRIPT_NAME": root_path,
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SERVER_SOFTWARE": "trioserve",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
        "trioserve.check_cancelled": trio.from_thread.check_cancelled,
    }


def _raise_cancelled() -> None:
    # One checkpoint in the request's own task: raises trio.Cancelled because
    # that task's cancel scope is cancelled.
    trio.from_thread.run(trio.lowlevel.checkpoint)
    raise AssertionError("stream reported cancelled, but the checkpoint did not raise")


class InputStream:
    """``wsgi.input``: the request body, streamed from trio on demand.

    Data is fetched only when the local buffer runs dry, a whole buffered batch
    per hop. The trio side holds at most one flow-control window (HTTP/2) or
    one read buffer (HTTP/1.1) per stream, so memory stays bounded however
    large the body, and the client is slowed down when the app reads slowly.
    ``read()`` returns b"" exactly at the end of the body.
    """

    __slots__ = ("_buffer", "_eof", "_port", "_pos")  # made per request

    def __init__(self, port: StreamPort, initial: bytes = b"", eof: bool = False) -> None:
        self._port = port
        self._buffer = initial
        self._pos = 0
        self._eof = eof

    def _fetch(self) -> bytes:
        """The next batch of body bytes from trio; b"" at the end of the body."""
        if self._eof:
            return b""
        trio.from_thread.check_cancelled()
        try:
            data = trio.from_thread.run_sync(self._port.take_body_nowait)
        except StreamCancelled:
            _raise_cancelled()
        if data is None:
            data = trio.from_thread.run(self._port.wait_body)
        if not data:
            self._eof = True
        return data

    def _gather(self, enough: Callable[[bytes, int], bool]) -> bytes:
        """Fetch until ``enough(new_data, total_buffered)`` or EOF; return the unread bytes."""
        parts = [self._buffer[self._pos :]] if self._pos < len(self._buffer) else []
        total = len(self._buffer) - self._pos
        while True:
            data = self._fetch()
            if not data:
                break
            parts.append(data)
            total += len(data)
            if enough(data, total):
                break
        self._buffer = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0
        return self._buffer

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data = self._gather(lambda _data, _total: False)
            self._buffer = b""
            return data
        if len(self._buffer) - self._pos < size:
            self._gather(lambda _data, total: total >= size)
        data = self._buffer[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        end = self._buffer.find(b"\n", self._pos) + 1
        if not end and not 0 <= limit <= len(self._buffer) - self._pos:
            self._gather(lambda data, total: b"\n" in data or 0 <= limit <= total)
            end = self._buffer.find(b"\n", self._pos) + 1
        if not end:
            end = len(self._buffer)
        if 0 <= limit < end - self._pos:
            end = self._pos + limit
        line = self._buffer[self._pos : end]
        self._pos = end
        return line

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class ErrorStream:
    """``wsgi.errors``: text written here goes to the ``trioserve.app`` logger, a line at a time.

    The file-like object PEP 3333 asks for (``write``, ``writelines``,
    ``flush``), made per request: a plain slotted class, because an
    ``io.TextIOBase`` costs several times as much to make and to free.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"wsgi.errors.write() takes str, not {type(text).__name__}")
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            APP_LOGGER.error("%s", line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            APP_LOGGER.error("%s", self._partial)
            self._partial = ""


class FileWrapper:
    """``wsgi.file_wrapper``: iterate a file-like object in blocks; ``close()`` closes it."""

    def __init__(self, filelike: Any, block_size: int = FILE_BLOCK_SIZE) -> None:
        self.filelike = filelike
        self.block_size = block_size
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.block_size)
            if not block:
                return
            yield block


_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2"}


# Header field names (lower-case, as the protocols give them) and their
# environ keys: "user-agent" is HTTP_USER_AGENT on every request. The first
# names seen are kept, up to a bound, since a client chooses them.
_ENVIRON_KEYS_KEPT = 256
_ENVIRON_KEYS: dict[bytes, str] = {}


def build_environ(
    request: RequestReceived,
    info: ConnectionInfo,
    wsgi_input: InputStream,
    check_cancelled: Callable[[], None] = trio.from_thread.check_cancelled,
) -> dict[str, Any]:
    """The PEP 3333 environ for ``request``."""
    path, _, query = request.target.partition(b"?")
    if request.method == b"OPTIONS" and path == b"*":
        path_info = "*"
    else:
        path_info = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
    script_name = info.root_path
    if script_name and (path_info == script_name or path_info.startswith(script_name + "/")):
        path_info = path_info[len(script_name) :]
    environ = info.environ_base.copy()
    if info.client_addr is not None:
        environ["REMOTE_ADDR"] = info.client_addr
        environ["REMOTE_PORT"] = info.client_port
    target = request.target.decode("latin-1")
    environ["REQUEST_METHOD"] = request.method.decode("latin-1")
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query.decode("latin-1")
    environ["RAW_URI"] = environ["REQUEST_URI"] = target
    environ["SERVER_PROTOCOL"] = _PROTOCOLS.get(request.http_version) or (
        "HTTP/" + request.http_version
    )
    environ["wsgi.input"] = wsgi_input
    environ["wsgi.errors"] = ErrorStream()
    if request.scheme:  # as before the template: an empty scheme falls back to the connection's
        environ["wsgi.url_scheme"] = request.scheme
    if check_cancelled is not trio.from_thread.check_cancelled:
        environ["trioserve.check_cancelled"] = check_cancelled
    if request.authority is not None:
        environ["HTTP_HOST"] = request.authority.decode("latin-1")
    for name, value in request.headers:
        if b"_" in name:
            # "X-Auth_User" would collide with "X-Auth-User" in HTTP_X_AUTH_USER:
            # drop it so a client cannot spoof a header a proxy vouched for.
            continue
        if name == b"content-type":
            environ["CONTENT_TYPE"] = value.decode("latin-1")
            continue
        if name == b"content-length":
            environ["CONTENT_LENGTH"] = value.decode("latin-1")
            continue
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            if len(_ENVIRON_KEYS) < _ENVIRON_KEYS_KEPT:
                _ENVIRON_KEYS[name] = key
        text = value.decode("latin-1")
        if key in environ:
            if key == "HTTP_HOST" and request.authority is not None:
                continue  # HTTP/2: :authority wins over a Host field
            text = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + text
        environ[key] = text
    if info.forwarding is not None and not environ.keys().isdisjoint(FORWARDING_KEYS):
        # (apply_forwarded's own first look, made here without the call: most
        # requests carry no forwarding header at all)
        apply_forwarded(environ, info.forwarding)
    return environ


def _encode_status(status: str) -> tuple[int, bytes]:
    """The code and reason phrase of a ``start_response`` status, checked whole.

    Raises InvalidResponse naming the app's value (rule 1 of trioserve.responses).
    """
    match = _STATUS_RE.fullmatch(status)
    try:
        if match is None:
            raise InvalidResponse("not a three-digit code and a reason phrase")
        code = int(match[1])
        try:
            reason = (match[2] or "").encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidResponse("reason phrase not encodable as latin-1") from None
        check_status(code, reason)
    except InvalidResponse as exc:
        raise InvalidResponse(f"invalid status {status!r}: {exc}") from None
    return code, reason


# start_response arguments repeat: most responses of an app share their
# status and headers. The checked, encoded form of recent ones is kept, so a
# repeated head costs a dict lookup instead of the encoding and the regular
# expressions. Bounded; emptied when full, so heads that never repeat (a
# per-response ETag, say) only ever cost the full check.
_HEAD_MEMO_ENTRIES = 128
_head_memo: dict[
    tuple[object, ...], tuple[int, bytes, tuple[tuple[bytes, bytes], ...], int | None, int]
] = {}


def _encode_head(status: str, headers: list[tuple[str, str]]) -> ResponseHead:
    """Validate ``start_response`` arguments and convert them to bytes.

    A wrong type raises TypeError (a bug in the app's code); a value that must
    not go out raises InvalidResponse, which :func:`call_app` answers with a 500.
    """
    if type(status) is not str:
        raise TypeError(f"status must be str, not {type(status).__name__}")
    if type(headers) is not list:
        raise TypeError(f"headers must be a list, not {type(headers).__name__}")
    for item in headers:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError(f"each header must be a (name, value) tuple: {item!r}")
        if type(item[0]) is not str or type(item[1]) is not str:
            raise TypeError(f"header name and value must be str: {item!r}")
    # Exact types only from here on, so equal arguments mean the same head.
    key = (status, *headers)
    known = _head_memo.get(key)
    if known is None:
        code, reason = _encode_status(status)
        encoded = tuple(_encode_field(name, value) for name, value in headers)
        # Rule 2: one valid Content-Length, a plain chunked coding. Worked out
        # here, in the app's thread, so the protocol layer need not do it again.
        # And what the trio side looks for in them (Date, Server, framing, close).
        known = (code, reason, encoded, declared_length(encoded), field_traits(encoded))
        if len(_head_memo) >= _HEAD_MEMO_ENTRIES:
            _head_memo.clear()
        _head_memo[key] = known
    code, reason, encoded, declared, traits = known
    return ResponseHead(code, reason, list(encoded), declared, traits)


def _encode_field(name: str, value: str) -> tuple[bytes, bytes]:
    """One response header field as bytes, or InvalidResponse (rule 1 of trioserve.responses)."""
    try:
        raw_name = name.encode("latin-1")
        raw_value = value.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidResponse(f"header not encodable as latin-1: {(name, value)!r}") from None
    if not _TOKEN_RE.match(raw_name):
        raise InvalidResponse(f"invalid header name {name!r}")
    if _BAD_VALUE_RE.search(raw_value):
        raise InvalidResponse(f"invalid character in header {name!r}: {value!r}")
    return raw_name, raw_value.strip(b" \t")


class _Responder:
    """``start_response`` and ``write`` for one request, plus the send path."""

    __slots__ = ("_head", "_port", "headers_sent")

    def __init__(self, port: StreamPort) -> None:
        self._port = port
        self._head: ResponseHead | None = None
        self.headers_sent = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback cycle, as PEP 3333 asks
        elif self._head is not None:
            raise RuntimeError("start_response() called twice without exc_info")
        self._head = _encode_head(status, headers)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333 ``write()``: returns once the data is queued for the client."""
        if type(data) is not bytes:
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if self._head is None:
            raise RuntimeError("write() called before start_response()")
        if data or not self.headers_sent:
            self.send(data)

    def send(self, data: bytes) -> None:
        """Hand a chunk (and the headers, the first time) to the trio side."""
        head = None if self.headers_sent else self._head
        if head is None and not self.headers_sent:
            raise RuntimeError("the application returned body data before calling start_response()")
        trio.from_thread.check_cancelled()
        keep_going = self._port.push(head, data)
        self.headers_sent = True
        if not keep_going:
            trio.from_thread.run(self._port.wait_writable)

    def final_head(self) -> ResponseHead:
        if self._head is None:
            raise RuntimeError("the application returned without calling start_response()")
        return self._head


def call_app(
    app: WSGIApp,
    request: RequestReceived,
    info: ConnectionInfo,
    port: StreamPort,
    initial_body: bytes,
    body_complete: bool,
) -> AppResult:
    """Run one WSGI request to completion in this (worker) thread.

    Returns what the trio side still has to send. Exceptions from the app
    propagate (after ``close()``); the trio side decides between a 500 and a
    reset depending on whether the headers went out. The one exception is a
    head ``start_response`` refused (:class:`InvalidResponse`: a status or
    framing header that must not go out): that is answered here with a 500
    and logged as one line naming the app's value.
    """
    # Reset while this thread was being handed the request (after the thread
    # slot was won)? Then the app must not run at all: Rapid Reset defence.
    trio.from_thread.check_cancelled()
    wsgi_input = InputStream(port, initial_body, body_complete)
    environ = build_environ(request, info, wsgi_input)
    responder = _Responder(port)
    try:
        return _run_app(app, environ, responder, port)
    except InvalidResponse as exc:
        if responder.headers_sent:
            raise
        # start_response refused the head (and the app let that propagate):
        # nothing went out, so the client gets a 500 and the log one line.
        LOGGER.error(
            "500 for %s %s: %s",
            request.method.decode("latin-1"),
            request.target.decode("latin-1"),
            exc,
        )
        return _error_result(500)


def _error_result(status: int) -> AppResult:
    """trioserve's own plain-text error response, sent as if the app had returned it."""
    body = error_body(status)
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode("ascii")),
    ]
    return AppResult(ResponseHead(status, reason_phrase(status), headers), [body])


def _run_app(
    app: WSGIApp, environ: dict[str, Any], responder: _Responder, port: StreamPort
) -> AppResult:
    """Call the app and collect its response (the body of :func:`call_app`)."""
    iterable = app(environ, responder.start_response)
    handed_over = False  # the iterable's close() went to the trio side with a file
    try:
        if type(iterable) is FileWrapper and not responder.headers_sent and port.can_sendfile:
            head = responder.final_head()
            segment = _file_segment(iterable.filelike, head)
            if segment is not None:
                handed_over = True
                return AppResult(head, file=segment, close=getattr(iterable, "close", None))
        if type(iterable) in (list, tuple) and not responder.headers_sent:
            # Fast path: the whole response is in memory; hand it back in the
            # return value instead of one hop per chunk.
            body = []
            for chunk in iterable:
                if chunk:
                    if type(chunk) is not bytes:
                        raise TypeError(
                            f"the application returned {type(chunk).__name__}, not bytes"
                        )
                    body.append(chunk)
            return AppResult(responder.final_head(), body)
        send = responder.send
        for chunk in iterable:
            if chunk:
                if type(chunk) is not bytes:
                    raise TypeError(f"the application yielded {type(chunk).__name__}, not bytes")
                send(chunk)
            else:
                trio.from_thread.check_cancelled()
        if responder.headers_sent:
            return AppResult(None)
        return AppResult(responder.final_head())
    finally:
        close = getattr(iterable, "close", None)
        if close is not None and not handed_over:
            close()
        environ["wsgi.errors"].flush()


def _file_segment(filelike: Any, head: ResponseHead) -> FileSegment | None:
    """The part of ``filelike`` the response sends, if ``os.sendfile`` can send it.

    Only for a regular file, a response with a Content-Length, and a file that
    still holds that many bytes from its current position; anything else goes
    through the ordinary block-by-block path.
    """
    lengths = [value for name, value in head.headers if name.lower() == b"content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    length = int(lengths[0])
    try:
        fd = filelike.fileno()
        # trioserve.static.FileRange has no tell(): its read position is .position
        offset = filelike.tell() if hasattr(filelike, "tell") else filelike.position
        info = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    if type(fd) is not int or type(offset) is not int or not stat.S_ISREG(info.st_mode):
        return None
    if info.st_size - offset < length:
        return None
    return FileSegment(fd, offset, length)
