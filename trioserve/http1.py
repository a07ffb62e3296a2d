"""Sans-IO HTTP/1.1 server protocol.

Bytes go in through :meth:`HTTP1Connection.receive_data`, events come out of
:meth:`HTTP1Connection.next_events`; responses go in through ``send_*`` calls
and come out as bytes from :meth:`HTTP1Connection.data_to_send`. Nothing here
does I/O or imports trio (``tests/test_layering.py`` checks).

One implementation of the protocol, with two parsers for request heads
(:mod:`trioserve.http1_heads`, ``--http1-parser``): this module frames each
request itself (it finds where a head ends, counts a Content-Length body and
decodes a chunked one with :mod:`trioserve.chunked`), decides keep-alive,
pipelining, ``100 Continue`` and the h2c upgrade, and writes every response,
so all of that is the same whichever parser reads the heads.

Rules this module keeps:

1. One request at a time. The next pipelined request is only parsed after the
   current response has ended (``end_stream``), so responses can never be
   reordered; the driver calls ``next_events`` again after each response.
2. Every rejection the peer caused is answered here (400, 408, 413, 414, 431,
   501, 505) with ``Connection: close``, and reported once as a
   :class:`~trioserve.events.BadRequest` so the driver can log it.
3. Request smuggling guards live here: both Content-Length and
   Transfer-Encoding, a body larger than allowed, and the raw-head and
   chunk-size checks of :mod:`trioserve.http1_heads` and
   :mod:`trioserve.chunked` refuse a request before any application code runs.
4. Switching to HTTP/2 (``Upgrade: h2c``) is an event, never an exception.
5. A response that breaks the rules of :mod:`trioserve.responses` raises
   :class:`~trioserve.events.InvalidResponse` from ``send_*``; nothing past a
   declared Content-Length is queued.
6. Error bodies and ``BadRequest`` reasons are words, never reprs of the
   offending bytes.

Responses are written as h11, the reference this module replaced, writes
them: the status line ``HTTP/1.1``, the app's fields as given, then the framing
fields the body needs (``Transfer-Encoding: chunked`` for a body of unknown
length to an HTTP/1.1 client, none and a close for an HTTP/1.0 one) and
``Connection: close`` when the connection will not be reused.
"""

from __future__ import annotations

import enum
from typing import Final

from .chunked import ChunkedScan
from .events import (
    UNCHECKED,
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    Event,
    FileSegment,
    Headers,
    RequestReceived,
    ResetReason,
    StreamReset,
    UpgradeToH2,
)
from .http1_heads import (
    HeadError,
    HeadParser,
    describe,
    head_end,
    head_parser,
    head_problem,
    partial_head_problem,
    plain_head_end,
    split_target,
    valid_settings,
)
from .responses import (
    ASKS_CLOSE,
    NO_BODY_STATUSES,
    body_too_long,
    body_too_short,
    check_status,
    declared_length,
    error_body,
    field_traits,
    reason_phrase,
)

__all__ = [
    "COALESCE_LIMIT",
    "MAX_BUFFERS",
    "MAX_DRAIN",
    "MAX_UPGRADE_BODY",
    "MAX_WRITE",
    "HTTP1Connection",
    "describe",
]

# An h2c upgrade request's body must be read completely before switching
# protocols (RFC 9113 §3.2 leaves no way to continue it on stream 1), so it is
# buffered. Larger bodies simply decline the upgrade and are served over HTTP/1.1.
MAX_UPGRADE_BODY = 64 * 1024

# When an application answers without reading the whole request body, the rest
# is read and discarded so the connection can be reused - up to this much.
# Beyond it, closing is cheaper than draining (nginx's lingering_close logic).
MAX_DRAIN = 256 * 1024

# buffers_to_send() hands over at most this much at a time: with
# stream.HTTP1_HIGH_WATER, the memory a stalled client can hold (see there for
# the split). Gathering writes of over 512 KiB cost the kernel about twice as
# much per byte (over loopback, 64 KiB chunks: 14-16 us of system time per
# chunk with 1 MiB writes against 7-8 with 512 KiB ones). A write takes no more
# than was queued, and its pieces are the app's own chunks (a gathering write
# copies nothing; TLS joins them into pieces of connection.WRITE_CHUNK), so a
# stalled client holds at most its queue and one write.
MAX_WRITE = 256 * 1024
# ...in at most this many pieces (a gathering write takes at most IOV_MAX,
# 1024 on Linux); more small chunks than that go out in later writes.
MAX_BUFFERS = 512

# send_whole_response joins a body of up to this many bytes to its head: one
# write instead of a gathering one, for the price of copying a small body.
COALESCE_LIMIT = 16 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _Input(enum.Enum):
    """What the bytes from the client are, at this point of the connection."""

    HEAD = "head"  # the next request head (parsed once no request is active)
    BODY = "body"  # the current request's body
    DRAIN = "drain"  # the body of a request already answered: read and dropped
    DONE = "done"  # the current request is complete; what follows waits for its answer
    IGNORE = "ignore"  # that request was the last one (Connection: close, HTTP/1.0)
    CLOSED = "closed"  # nothing more is parsed: an error, an upgrade, or the end


# The members as module constants, which the code below reads instead: on Python
# 3.11 reading an attribute of an Enum class (``_Input.DONE``) goes through EnumType's
# ``__getattr__`` hook, about 70 ns against about 10 for a global, and a request
# reads some twenty of these states.
_INPUT_HEAD: Final = _Input.HEAD
_INPUT_BODY: Final = _Input.BODY
_INPUT_DRAIN: Final = _Input.DRAIN
_INPUT_DONE: Final = _Input.DONE
_INPUT_IGNORE: Final = _Input.IGNORE
_INPUT_CLOSED: Final = _Input.CLOSED


class _Framing(enum.Enum):
    """How the current response's body is delimited on the wire."""

    NONE = "none"  # HEAD, 204, 304: no body bytes at all
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked (HTTP/1.1 clients)
    CLOSE = "close"  # ended by closing the connection (HTTP/1.0 clients)


# (Module constants, as _Input's.)
_FRAMING_NONE: Final = _Framing.NONE
_FRAMING_LENGTH: Final = _Framing.LENGTH
_FRAMING_CHUNKED: Final = _Framing.CHUNKED
_FRAMING_CLOSE: Final = _Framing.CLOSE


class HTTP1Connection:
    """One HTTP/1.1 server connection's protocol state.

    Args:
      max_header_size: bytes allowed for the request line plus headers (431 beyond).
      max_request_line_size: bytes allowed for the request line alone (414 beyond).
      max_header_count: header fields allowed per request (431 beyond).
      max_body_size: request body bytes allowed, 0 for no limit (413 beyond).
      allow_h2c_upgrade: honour ``Upgrade: h2c`` (cleartext connections only).
      parser: which parser reads request heads: ``auto``, ``h11`` or ``httptools``.
    """

    # Slots: one of these lives as long as its (often idle) keep-alive connection.
    __slots__ = (
        "_active",
        "_allow_h2c_upgrade",
        "_awaits_continue",
        "_body_received",
        "_body_sent",
        "_buffer",
        "_chunks",
        "_close_after",
        "_closed",
        "_continue_withheld",
        "_declared",
        "_drained",
        "_eof_reported",
        "_files_queued",
        "_framing",
        "_head_request",
        "_http10",
        "_input",
        "_keep_alive",
        "_length_left",
        "_max_body_size",
        "_max_header_count",
        "_max_header_size",
        "_max_request_line_size",
        "_no_keep_alive",
        "_outbound",
        "_parser",
        "_peer_eof",
        "_response_started",
        "_stream_id",
        "_upgrade",
        "output_size",
    )

    multiplexed = False

    def __init__(
        self,
        *,
        max_header_size: int = 64 * 1024,
        max_request_line_size: int = 8 * 1024,
        max_header_count: int = 100,
        max_body_size: int = 0,
        allow_h2c_upgrade: bool = False,
        parser: str = "auto",
    ) -> None:
        self._parser: HeadParser = head_parser(parser, max_header_size)
        self._max_header_size = max_header_size
        self._max_request_line_size = max_request_line_size
        self._max_header_count = max_header_count
        self._max_body_size = max_body_size
        self._allow_h2c_upgrade = allow_h2c_upgrade
        # Input.
        self._buffer = bytearray()  # received, not yet parsed or handed out
        self._input = _INPUT_HEAD
        self._peer_eof = False
        self._eof_reported = False
        self._length_left = 0  # _INPUT_BODY/DRAIN with a Content-Length: bytes to come
        self._chunks: ChunkedScan | None = None  # _INPUT_BODY/DRAIN of a chunked body
        self._body_received = 0
        self._drained = 0
        # An h2c upgrade under way: the request, its HTTP2-Settings, and its body so far.
        self._upgrade: tuple[RequestReceived, bytes, list[bytes]] | None = None
        # The exchange.
        self._stream_id = 0  # id of the current (or last) request
        self._active = False  # a request has been handed out and its response not ended
        self._keep_alive = True  # the client lets the connection carry another request
        self._http10 = False
        self._head_request = False
        self._awaits_continue = False  # it sent Expect: 100-continue and no body yet
        self._continue_withheld = False  # ...and has had neither 100 nor a response
        # Output.
        self._outbound: list[bytes | memoryview | FileSegment] = []
        # Bytes queued for the socket (the protocols' ``output_size``): a plain
        # attribute, not a property, since the driver reads it after every
        # read and every response.
        self.output_size = 0
        self._files_queued = 0  # FileSegments in _outbound
        self._response_started = False
        self._framing = _FRAMING_NONE
        self._declared: int | None = None  # the response's Content-Length, if it counts
        self._body_sent = 0  # response body bytes queued, counted against _declared
        self._close_after = False  # this response is the connection's last
        self._closed = False  # close once the output drains; parse nothing more
        self._no_keep_alive = False  # graceful shutdown: finish the current exchange, then close

    @property
    def parser_name(self) -> str:
        """``h11`` or ``httptools``: the parser reading this connection's request heads."""
        return self._parser.name

    # ---- state the driver asks about -------------------------------------

    @property
    def closing(self) -> bool:
        """True once the connection must close after ``data_to_send`` drains."""
        if self._closed:
            return True
        if self._active:
            return False
        if self._no_keep_alive and (self._input is not _INPUT_HEAD or not self._buffer):
            return True  # idle (not even part of a request buffered): close now
        if self._input is _INPUT_IGNORE:
            return True  # the last request has been answered
        return self._peer_eof and self._input in (_INPUT_HEAD, _INPUT_DONE)

    @property
    def partial_request(self) -> bool:
        """Has part of a request head arrived, with the rest still missing?"""
        return (
            not self._active
            and not self._closed
            and self._input is _INPUT_HEAD
            and bool(self._buffer)
        )

    def expire_partial_request(self) -> list[Event]:
        """The client took too long to send its request head: answer 408 and close."""
        return [self._reject(408, "request head not received in time")]

    @property
    def buffered_input(self) -> int:
        """Bytes received but not yet parsed (pipelined requests waiting their turn)."""
        return len(self._buffer) if self._input is _INPUT_DONE else 0

    @property
    def has_queued_streams(self) -> bool:
        """HTTP/1.1 queues nothing per stream: all output is in buffers_to_send()."""
        return False

    @property
    def wants_sender(self) -> bool:
        """Output queued, or the connection closing (HTTP/1.1 queues no streams)."""
        return bool(self.output_size) or self.closing

    def response_ended(self, stream_id: int) -> bool:
        """HTTP/1.1 counts no streams: a response ends when its request's turn does."""
        return False

    def stream_output_size(self, stream_id: int) -> int:
        """Bytes queued for the socket on behalf of ``stream_id`` (all of them, in HTTP/1.1)."""
        return self.output_size

    def stream_blocked(self, stream_id: int) -> bool:
        """HTTP/1.1 has no flow-control window: output waits only for the socket."""
        return False

    def stream_send_room(self, stream_id: int) -> int:
        """HTTP/1.1 has no flow-control window: as much as the socket takes."""
        return MAX_WRITE

    # ---- bytes in, events out ---------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the socket; ``b""`` means the peer closed its side."""
        if not data:
            self._peer_eof = True
        elif self._input is not _INPUT_CLOSED and self._input is not _INPUT_IGNORE:
            self._buffer += data

    def next_events(self) -> list[Event]:
        """Parse as far as the state allows and return what happened."""
        if not self._buffer and not self._peer_eof:
            # Nothing to parse and nothing to report: the usual case once a
            # response is out (the driver asks for a pipelined next request).
            return []
        events: list[Event] = []
        while True:
            state = self._input
            if state is _INPUT_HEAD:
                if self._active or not self._head(events):
                    break
            elif state is _INPUT_BODY or state is _INPUT_DRAIN:
                if not self._body(events):
                    break
            else:
                if state is _INPUT_DONE and self._peer_eof and not self._eof_reported:
                    # The client half-closed after its request: it may still read.
                    self._eof_reported = True
                    events.append(ConnectionClosed(abort=False))
                break
        return events

    def _head(self, events: list[Event]) -> bool:
        """Parse the next request head if all of it is here; False to stop for now."""
        buffer = self._buffer
        if not buffer:
            if self._peer_eof:
                self._input = _INPUT_CLOSED
                self._closed = True
                if not self._eof_reported:
                    self._eof_reported = True
                    events.append(ConnectionClosed(abort=False))
            return False
        start = 0
        while start < len(buffer) and buffer[start] in b"\r\n":
            start += 1  # empty lines before a request line are allowed (RFC 9112 §2.2)
        end = plain_head_end(buffer, start)
        plain = end >= 0
        if not plain:
            try:
                end = head_end(buffer, start)
            except HeadError as error:
                events.append(self._reject(error.status, error.reason))
                return False
            if end < 0:
                self._check_partial_head(buffer, start, events)
                return False
        head = bytes(buffer[start:end])
        del buffer[:end]
        request = self._request(head, events, plain)
        if request is None:
            return False
        if self._upgrade is None:
            events.append(request)
        if self._input is _INPUT_DONE and (self._upgrade is not None or not self._keep_alive):
            self._request_complete(events, announced=True)  # (else it has nothing to do)
        return True

    def _check_partial_head(self, buffer: bytearray, start: int, events: list[Event]) -> None:
        pending = len(buffer) - start
        problem = partial_head_problem(buffer, start)
        if problem is not None:
            events.append(self._reject(400, problem))
        elif self._peer_eof:
            events.append(self._reject(400, "connection closed in the middle of a request"))
        elif pending > self._max_request_line_size and b"\n" not in buffer:
            events.append(self._reject(414, "request line too long"))
        elif pending > self._max_header_size:
            events.append(self._reject(431, "request header fields too large"))

    def _request(self, head: bytes, events: list[Event], plain: bool) -> RequestReceived | None:
        """Check and parse a complete head; the request, or None if it was refused.

        ``plain``: :func:`~trioserve.http1_heads.plain_head_end` found it, so
        :func:`~trioserve.http1_heads.head_problem` would too.
        """
        if len(head) - 4 > self._max_header_size:
            events.append(self._reject(431, "request header fields too large"))
            return None
        line_end = head.find(b"\r\n")
        if line_end > self._max_request_line_size:
            events.append(self._reject(414, "request target too long"))
            return None
        problem = None if plain else head_problem(head[:-4])
        if problem is not None:
            events.append(self._reject(*problem))
            return None
        # The head is a request line "method SP target SP HTTP/d.d", then one field
        # a line (either check above made sure). Its version and its number of
        # fields are told here, before a parser sees it, so that both parsers
        # answer alike: llhttp refuses HTTP/0.0 or HTTP/1.2 as a 400, and h11
        # refuses a head without Host before its fields could be counted.
        if head[line_end - 3 : line_end] not in (b"1.1", b"1.0"):
            events.append(self._reject(505, "HTTP version not supported"))
            return None
        if head.count(b"\r\n") - 2 > self._max_header_count:  # (CRLFs: line, fields, end)
            events.append(self._reject(431, "too many header fields"))
            return None
        try:
            parsed = self._parser.parse(head)
        except HeadError as error:
            events.append(self._reject(error.status, error.reason))
            return None
        return self._admit(
            parsed.method, parsed.target, parsed.http_version, parsed.headers, events
        )

    def _admit(
        self,
        method: bytes,
        raw_target: bytes,
        version: bytes,
        headers: Headers,
        events: list[Event],
    ) -> RequestReceived | None:
        """trioserve's rules for the fields of a request; the request if it passes."""
        content_length: int | None = None
        chunked = False
        expects_continue = False
        upgrade: bytes | None = None
        settings: bytes | None = None
        connection_tokens: set[bytes] | None = None  # made only if a Connection field comes
        hosts = 0
        for name, value in headers:
            if name not in _ADMISSION_FIELDS:
                continue  # (most of a browser's fields: one look, not seven)
            if name == b"content-length":
                content_length = int(value)  # one, of digits only (head_problem)
            elif name == b"transfer-encoding":
                chunked = True  # one, "chunked" alone, without Content-Length (head_problem)
            elif name == b"host":
                hosts += 1
            elif name == b"expect":
                expects_continue = value.lower() == b"100-continue"
            elif name == b"connection":
                if connection_tokens is None:
                    connection_tokens = set()
                connection_tokens.update(token.strip().lower() for token in value.split(b","))
            elif name == b"upgrade":
                upgrade = value.lower()
            elif name == b"http2-settings":
                settings = value
        if hosts > 1:
            # RFC 9112 §3.2: more than one Host is a 400 (which one would we route by?)
            events.append(self._reject(400, "more than one Host header"))
            return None
        if not hosts and version == b"1.1":
            events.append(self._reject(400, "missing Host header"))
            return None
        if raw_target[:1] == b"/" and method != b"CONNECT":
            target, authority, problem = raw_target, None, None  # (origin-form: the usual)
        else:
            target, authority, problem = split_target(method, raw_target)
        if problem is not None:
            events.append(self._reject(501 if method == b"CONNECT" else 400, problem))
            return None
        if self._max_body_size and (content_length or 0) > self._max_body_size:
            events.append(self._reject(413, "request body too large"))
            return None
        has_body = chunked or bool(content_length)
        self._chunks = None
        if chunked:
            scan = ChunkedScan(
                max_body_size=self._max_body_size, max_trailer_size=self._max_header_size
            )
            refusal = scan.feed(bytes(self._buffer))  # the body bytes already here, if any
            if refusal is not None:  # refused before the app runs
                events.append(self._reject(*refusal))
                return None
            self._chunks = ChunkedScan(
                max_body_size=self._max_body_size, max_trailer_size=self._max_header_size
            )
        self._stream_id += 1
        self._active = True
        self._response_started = False
        self._body_received = 0
        self._length_left = content_length or 0
        self._input = _INPUT_BODY if has_body else _INPUT_DONE
        self._head_request = method == b"HEAD"
        self._http10 = version == b"1.0"
        # HTTP/1.0: one request per connection (as h11, which this module replaced).
        self._keep_alive = not self._http10 and (
            connection_tokens is None or b"close" not in connection_tokens
        )
        self._awaits_continue = self._continue_withheld = expects_continue and has_body
        # Positional (about half the cost of keywords, once per request), in
        # the order RequestReceived declares its fields.
        request = RequestReceived(
            self._stream_id,
            method,
            target,
            headers,
            version.decode("ascii"),  # http_version
            None,  # scheme: HTTP/1.x sends none
            authority,
            not has_body,  # end_stream
            expects_continue and has_body,  # expects_continue
            content_length,
        )
        if (
            self._allow_h2c_upgrade
            and upgrade == b"h2c"
            and settings is not None
            and connection_tokens is not None
            and {b"upgrade", b"http2-settings"} <= connection_tokens  # RFC 9113 §3.2
            and version == b"1.1"  # RFC 9110 §7.8: ignore Upgrade in HTTP/1.0
            and (content_length or 0) <= MAX_UPGRADE_BODY
            and not expects_continue
            and valid_settings(settings)
        ):
            # RFC 9113 §3.2.1 omits base64 padding; h2's decoder needs it.
            self._upgrade = (request, settings + b"=" * (-len(settings) % 4), [])
        return request

    def _body(self, events: list[Event]) -> bool:
        """Take request body bytes from the buffer; False to stop for now."""
        buffer = self._buffer
        draining = self._input is _INPUT_DRAIN
        if self._chunks is not None:
            if not buffer:
                return self._body_eof(events)
            refusal, pieces, used = self._chunks.decode(bytes(buffer))
            del buffer[:used]
            if refusal is not None:
                events.append(self._reject(*refusal))
                return False
            ended = self._chunks.done
        else:
            if not buffer:
                return self._body_eof(events)
            used = min(self._length_left, len(buffer))
            pieces = [bytes(buffer[:used])]
            del buffer[:used]
            self._length_left -= used
            ended = not self._length_left
        for data in pieces:
            if draining:
                self._drained += len(data)
                if self._drained > MAX_DRAIN:
                    self._input = _INPUT_CLOSED
                    self._closed = True
                    return False
            elif data and not self._body_data(data, events):
                return False
        if not ended:
            if not buffer and self._peer_eof:
                self._body_eof(events)
            return False
        self._chunks = None
        if draining:
            self._input = _INPUT_HEAD
            self._start_next()
            return True
        self._input = _INPUT_DONE
        self._request_complete(events)
        return True

    def _body_eof(self, events: list[Event]) -> bool:
        if self._peer_eof:
            # EOF in the middle of a request body: the client went away.
            if self._active and self._input is _INPUT_BODY:
                events.append(StreamReset(self._stream_id))
            self._input = _INPUT_CLOSED
            self._closed = True
        return False

    def _body_data(self, data: bytes, events: list[Event]) -> bool:
        self._awaits_continue = False
        self._body_received += len(data)
        # A backstop: the chunked scan refuses a size over the limit before its data.
        if self._max_body_size and self._body_received > self._max_body_size:
            events.append(self._reject(413, "request body too large"))
            return False
        if self._upgrade is not None:
            self._upgrade[2].append(data)
            if self._body_received > MAX_UPGRADE_BODY:
                self._decline_upgrade(events)
            return True
        events.append(BodyReceived(self._stream_id, data))
        return True

    def _request_complete(self, events: list[Event], announced: bool = False) -> None:
        """The request's body has ended, or it had none (``announced``: its
        RequestReceived said so with ``end_stream``, and no BodyEnded follows)."""
        if self._upgrade is not None:
            events.append(self._accept_upgrade())
            return
        if not announced:
            events.append(BodyEnded(self._stream_id))
        if not self._keep_alive:
            # Connection: close / HTTP/1.0: that request was the last one; whatever
            # follows is ignored (RFC 9112 §9.6), not an error.
            self._buffer.clear()

    def _accept_upgrade(self) -> UpgradeToH2:
        assert self._upgrade is not None
        request, settings, upgrade_body = self._upgrade
        self._queue(_SWITCHING)
        body = b"".join(upgrade_body)
        trailing = bytes(self._buffer)
        self._buffer.clear()
        self._upgrade = None
        self._active = False
        self._input = _INPUT_CLOSED
        self._closed = True  # this HTTP/1.1 connection is over; HTTP/2 takes the socket
        return UpgradeToH2(request=request, settings=settings, body=body, trailing=trailing)

    def _decline_upgrade(self, events: list[Event]) -> None:
        """Serve an upgrade request over HTTP/1.1 after all (its body grew too large)."""
        assert self._upgrade is not None
        request, _, upgrade_body = self._upgrade
        events.append(request)
        events.extend(BodyReceived(request.stream_id, chunk) for chunk in upgrade_body)
        self._upgrade = None

    def _reject(self, status: int, reason: str) -> BadRequest:
        """Answer a bad request ourselves if no response is under way, then close."""
        stream_id = self._stream_id if self._active else None
        draining = self._input is _INPUT_DRAIN
        self._closed = True
        self._input = _INPUT_CLOSED
        self._upgrade = None
        # Not while the body of a request already answered is drained: that
        # exchange has had its response, and the connection just closes.
        answered = stream_id is None and not self._response_started and not draining
        if answered:
            self._head_request = False
            self._write_error_response(status, reason)
        return BadRequest(status=status, reason=reason, stream_id=stream_id, answered=answered)

    # ---- responses in, bytes out ------------------------------------------

    def send_continue(self, stream_id: int) -> None:
        """Send ``100 Continue`` if the client is still waiting for it."""
        if self._awaits_continue and not self._response_started:
            self._awaits_continue = self._continue_withheld = False
            self._queue(_CONTINUE)

    def send_response(
        self,
        stream_id: int,
        status: int,
        headers: Headers,
        *,
        reason: bytes = b"",
        content_length: int | None = UNCHECKED,
        traits: int = UNCHECKED,
    ) -> None:
        """Queue the response head.

        Raises InvalidResponse, having queued nothing, for a head that breaks
        the rules of trioserve.responses (a status that is not final, a bad
        reason phrase or Content-Length). ``traits``: the fields'
        :func:`~trioserve.responses.field_traits`, if the caller knows them.
        """
        self._queue(self._response_head(status, headers, reason, content_length, traits))

    def send_whole_response(
        self,
        stream_id: int,
        status: int,
        headers: Headers,
        body: list[bytes],
        *,
        reason: bytes = b"",
        content_length: int | None = UNCHECKED,
        traits: int = UNCHECKED,
    ) -> None:
        """A complete response in one call: ``send_response``, ``send_body`` for
        each chunk, then ``end_stream``, raising as they would.

        A body of at most COALESCE_LIMIT bytes, exactly as long as its
        Content-Length, is queued in one piece with the head: one write, and
        a client that reads the head gets its body in the same segment.
        """
        head = self._response_head(status, headers, reason, content_length, traits)
        if self._framing is _FRAMING_LENGTH:
            size = sum(map(len, body))
            if size == self._declared and size <= COALESCE_LIMIT:
                self._body_sent = size
                whole = head + b"".join(body)
                self._outbound.append(whole)  # (self._queue, spelled out)
                self.output_size += len(whole)
                self._finish_request()
                return
        self._queue(head)
        for chunk in body:
            self.send_body(stream_id, chunk)
        self.end_stream(stream_id)

    def _response_head(
        self,
        status: int,
        headers: Headers,
        reason: bytes,
        content_length: int | None,
        traits: int,
    ) -> bytes:
        """Check a response head, set this response's framing, and serialize the head."""
        if content_length == UNCHECKED:
            check_status(status, reason)
            declared = declared_length(headers)
        else:
            declared = content_length  # checked by trioserve.wsgi (the reason too)
        no_body = self._head_request or status in NO_BODY_STATUSES
        self._declared = None if no_body else declared
        self._body_sent = 0
        self._response_started = True
        self._awaits_continue = False
        if self._continue_withheld and self._input is _INPUT_BODY:
            # Answering without having asked for the body: it may never come,
            # so this connection cannot carry another request.
            self._closed = True
        close = self._closed or self._no_keep_alive or not self._keep_alive
        # The app asked for it: no reuse, but its fields stay as given.
        if traits == UNCHECKED:
            traits = field_traits(headers)
        asked = bool(traits & ASKS_CLOSE)
        fields = headers
        if status in NO_BODY_STATUSES:
            framing = _FRAMING_NONE
        elif declared is not None:
            framing = _FRAMING_LENGTH
        elif self._http10:
            # A body of unknown length to an HTTP/1.0 client: ended by the close.
            framing = _FRAMING_CLOSE
            fields = _without(headers, b"content-length", b"transfer-encoding")
            close = close or not self._head_request
        else:
            framing = _FRAMING_CHUNKED
            fields = [*_without(headers, b"transfer-encoding"), (b"Transfer-Encoding", b"chunked")]
        if close:
            fields = _with_close(fields)
        self._close_after = close or asked
        self._framing = _FRAMING_NONE if self._head_request else framing
        return _head_bytes(status, reason, fields)

    def send_body(self, stream_id: int, data: bytes) -> None:
        """Queue body bytes (none for HEAD, 204 and 304).

        Raises InvalidResponse, queuing nothing of ``data``, if they would go
        past the declared Content-Length.
        """
        if not data or self._framing is _FRAMING_NONE:
            return
        self._count_body(len(data))
        if self._framing is _FRAMING_CHUNKED:
            self._queue(b"%x\r\n" % len(data))
            self._queue(data)
            self._queue(b"\r\n")
        else:
            self._queue(data)

    def send_file(self, stream_id: int, segment: FileSegment) -> None:
        """Queue a file's bytes for ``os.sendfile``, counted like ``send_body``'s."""
        if self._framing is _FRAMING_NONE:
            segment.sent = True  # nothing to send for HEAD, 204 or 304
            return
        self._count_body(segment.length)
        chunked = self._framing is _FRAMING_CHUNKED
        if chunked:
            self._queue(b"%x\r\n" % segment.length)
        self._files_queued += 1
        self._outbound.append(segment)
        self.output_size += segment.length
        if chunked:
            self._queue(b"\r\n")

    def end_stream(self, stream_id: int) -> None:
        """End the response. Raises InvalidResponse if it is shorter than declared."""
        if self._declared is not None and self._body_sent < self._declared:
            raise body_too_short(self._declared, self._body_sent)
        if self._framing is _FRAMING_CHUNKED:
            self._queue(_LAST_CHUNK)
        elif self._framing is _FRAMING_CLOSE:
            self._closed = True
        self._finish_request()

    def send_error_response(
        self, stream_id: int, status: int, detail: str = "", *, close: bool = False
    ) -> int:
        """Answer the current request with a short plain-text error and end it;
        the body bytes queued (none for HEAD).

        ``close``: the connection cannot be reused afterwards (for example the
        request body was abandoned half-way), so the response says so.
        """
        if close:
            self._closed = True
        queued = self._write_error_response(status, detail)
        self._finish_request()
        return queued

    def reset_stream(self, stream_id: int, reason: ResetReason = ResetReason.CANCEL) -> int:
        """Abandon the current response. HTTP/1.1 can only do that by closing,
        after what is queued: so nothing is dropped."""
        self._closed = True
        self._active = False
        self._input = _INPUT_CLOSED
        return 0

    def take_stream_output(self, stream_id: int) -> list[bytes | memoryview]:
        """Nothing: what is queued here is already framed for the wire (chunked coding)."""
        return []

    def acknowledge_body(self, stream_id: int, size: int) -> None:
        """HTTP/1.1 has no flow-control credit: the driver resumes reading instead."""

    def release_idle(self) -> None:
        self._parser.release()

    def start_shutdown(self) -> None:
        """Finish the current exchange, then close: no more keep-alive.

        A request whose bytes already arrived counts as current (it is answered,
        with ``Connection: close``); a connection with nothing buffered closes now.
        """
        self._no_keep_alive = True

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """What is queued for the socket, in order, for one gathering write: at
        most MAX_WRITE bytes in at most MAX_BUFFERS pieces, none of them copied.

        Stops at a queued file: :meth:`file_to_send` hands that over next.
        """
        outbound = self._outbound
        if not outbound:
            return []
        if (
            not self._files_queued
            and self.output_size <= MAX_WRITE
            and len(outbound) <= MAX_BUFFERS
        ):
            self._outbound = []  # all of it: the common case
            self.output_size = 0
            return outbound  # type: ignore[return-value]  # no FileSegment in it
        parts: list[bytes | memoryview] = []
        size = 0
        taken = 0
        for part in outbound:
            if isinstance(part, FileSegment) or size >= MAX_WRITE or taken >= MAX_BUFFERS:
                break
            room = MAX_WRITE - size
            if len(part) > room:
                view = memoryview(part)
                outbound[taken] = view[room:]
                parts.append(view[:room])
                size += room
                break
            parts.append(part)
            size += len(part)
            taken += 1
        del outbound[:taken]
        self.output_size -= size
        return parts

    def data_to_send(self) -> bytes:
        """:meth:`buffers_to_send` joined into one piece."""
        parts = self.buffers_to_send()
        if len(parts) == 1:
            first = parts[0]
            return first if type(first) is bytes else bytes(first)
        return b"".join(parts)

    def file_to_send(self) -> FileSegment | None:
        """The file to send next with ``os.sendfile``, once the bytes before it are out."""
        if self._files_queued and self._outbound and isinstance(self._outbound[0], FileSegment):
            segment = self._outbound.pop(0)
            assert isinstance(segment, FileSegment)
            self._files_queued -= 1
            self.output_size -= segment.length
            return segment
        return None

    def send_failed(self) -> None:
        """The socket write failed: nothing more can be sent."""
        self._closed = True
        self._input = _INPUT_CLOSED

    # ---- internals ---------------------------------------------------------

    def _queue(self, data: bytes | memoryview) -> None:
        self._outbound.append(data)
        self.output_size += len(data)

    def _count_body(self, size: int) -> None:
        sent = self._body_sent + size
        if self._declared is not None and sent > self._declared:
            raise body_too_long(self._declared)
        self._body_sent = sent

    def _write_error_response(self, status: int, detail: str) -> int:
        """Queue an error response, if none has started; the body bytes queued."""
        if self._response_started:
            self._closed = True
            return 0
        body = error_body(status, detail)
        self._response_started = True
        headers: Headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        if self._closed or self._no_keep_alive or not self._keep_alive:
            headers.append((b"Connection", b"close"))  # no reuse: an error, or a stop
            self._close_after = True
        self._queue(_head_bytes(status, b"", headers))
        self._framing = _FRAMING_NONE
        if self._head_request:
            return 0
        self._queue(body)
        return len(body)

    def _finish_request(self) -> None:
        self._active = False
        self._response_started = False
        if self._close_after or self._closed:
            self._closed = True
            self._input = _INPUT_CLOSED
            return
        if self._input is _INPUT_BODY:
            if self._continue_withheld:
                # They never got 100 Continue, so they may never send the body.
                self._closed = True
                self._input = _INPUT_CLOSED
                return
            self._input = _INPUT_DRAIN
            self._drained = 0
            return
        if self._input is _INPUT_DONE:
            self._input = _INPUT_HEAD if self._keep_alive else _INPUT_IGNORE
        self._start_next()

    def _start_next(self) -> None:
        self._framing = _FRAMING_NONE
        self._declared = None
        self._close_after = False
        self._head_request = False


# The request fields _admit acts on.
_ADMISSION_FIELDS = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"expect",
        b"connection",
        b"upgrade",
        b"http2-settings",
    )
)


_join_field = b": ".join
_join_lines = b"\r\n".join


def _head_bytes(status: int, reason: bytes, headers: Headers) -> bytes:
    """The status line and header block, empty line included: ``name: value`` in
    the order given (one function for both: it runs once per response)."""
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))
    if not headers:
        return line + b"\r\n"
    return line + _join_lines(map(_join_field, headers)) + b"\r\n\r\n"


def _without(headers: Headers, *names: bytes) -> Headers:
    return [(name, value) for name, value in headers if name.lower() not in names]


def _with_close(headers: Headers) -> Headers:
    """``headers`` with their Connection tokens, less keep-alive, plus close, at the end."""
    tokens = {b"close"}
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    tokens.discard(b"keep-alive")
    kept = _without(headers, b"connection")
    return [*kept, (b"Connection", b", ".join(sorted(tokens)))]
