"""Sans-IO HTTP/1.1 server protocol, built on h11.

Bytes go in through :meth:`HTTP1Connection.receive_data`, events come out of
:meth:`HTTP1Connection.next_events`; responses go in through ``send_*`` calls
and come out as bytes from :meth:`HTTP1Connection.data_to_send`. Nothing here
does I/O or imports trio (``tests/test_layering.py`` checks).

Rules this module keeps:

1. One request at a time. The next pipelined request is only parsed after the
   current response has ended (``end_stream``), so responses can never be
   reordered; the driver calls ``next_events`` again after each response.
2. Every rejection the peer caused is answered here with the status h11 hints
   (400, 413, 414, 431, 501) and ``Connection: close``, and reported once as a
   :class:`~trioserve.events.BadRequest` so the driver can log it.
3. Request smuggling guards live here: both Content-Length and
   Transfer-Encoding, or a body larger than allowed, are refused before any
   application code runs; so are chunk sizes h11 would accept but a 64-bit
   peer could not, and those the body limit cannot hold (trioserve.chunked,
   which follows a chunked body's bytes before h11 parses them).
4. Switching to HTTP/2 (``Upgrade: h2c``) is an event, never an exception.
5. A response that breaks the rules of :mod:`trioserve.responses` (or that h11
   refuses) raises :class:`~trioserve.events.InvalidResponse` from ``send_*``,
   never an h11 exception; nothing past a declared Content-Length is queued.
6. Error bodies and ``BadRequest`` reasons are words, never reprs of the
   offending bytes (:func:`describe`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import cast

import h11

from .chunked import ChunkedScan, Refusal
from .events import (
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    Event,
    FileSegment,
    Headers,
    InvalidResponse,
    RequestReceived,
    ResetReason,
    StreamReset,
    UpgradeToH2,
)
from .responses import (
    NO_BODY_STATUSES,
    body_too_long,
    body_too_short,
    check_status,
    declared_length,
    error_body,
    in_words,
    reason_phrase,
)

# An h2c upgrade request's body must be read completely before switching
# protocols (RFC 9113 §3.2 leaves no way to continue it on stream 1), so it is
# buffered. Larger bodies simply decline the upgrade and are served over HTTP/1.1.
MAX_UPGRADE_BODY = 64 * 1024

# When an application answers without reading the whole request body, the rest
# is read and discarded so the connection can be reused - up to this much.
# Beyond it, closing is cheaper than draining (nginx's lingering_close logic).
MAX_DRAIN = 256 * 1024

# data_to_send() hands over at most this much at a time: what a stalled client
# leaves stuck in the sender is this, on top of the queue (the stream's high
# water), and a large response goes out while the app produces the next part.
MAX_WRITE = 256 * 1024

# h11's RemoteProtocolError messages in trioserve's words, looked up by the
# start of h11's text once the data it quotes is cut off (responses.in_words).
# A message not listed is shown as in_words leaves it, so a change of wording
# in h11 costs only polish, never a repr on the wire.
_H11_WORDINGS = (
    ("illegal request line", "malformed request line"),
    ("no request line", "no request line"),
    ("illegal header line", "malformed header line"),
    ("continuation line at start", "obsolete line folding"),
    ("illegal chunk header", "malformed chunk size line"),
    ("malformed chunk footer", "chunk data not followed by CRLF"),
    ("receive buffer too long", "request header fields too large"),
    ("missing mandatory host", "missing Host header"),
    ("found multiple host", "more than one Host header"),
    ("conflicting content-length", "conflicting Content-Length headers"),
    ("bad content-length", "invalid Content-Length"),
    ("multiple transfer-encoding", "more than one Transfer-Encoding header"),
    ("only transfer-encoding: chunked", "unsupported Transfer-Encoding"),
    ("illegal method", "invalid method"),
    ("illegal target", "invalid request target"),
    ("illegal header name", "invalid header name"),
    ("illegal header value", "invalid header value"),
    ("peer unexpectedly closed", "connection closed in the middle of a request"),
)


def describe(exc: h11.ProtocolError) -> str:
    """What an h11 protocol error says was wrong, in words, with no repr."""
    text = in_words(str(exc))
    lowered = text.lower()
    for start, wording in _H11_WORDINGS:
        if lowered.startswith(start):
            return wording
    return text


class HTTP1Connection:
    """One HTTP/1.1 server connection's protocol state.

    Args:
      max_header_size: bytes allowed for the request line plus headers (431 beyond).
      max_request_line_size: bytes allowed for the request line alone (414 beyond).
      max_header_count: header fields allowed per request (431 beyond).
      max_body_size: request body bytes allowed, 0 for no limit (413 beyond).
      allow_h2c_upgrade: honour ``Upgrade: h2c`` (cleartext connections only).
    """

    multiplexed = False

    def __init__(
        self,
        *,
        max_header_size: int = 64 * 1024,
        max_request_line_size: int = 8 * 1024,
        max_header_count: int = 100,
        max_body_size: int = 0,
        allow_h2c_upgrade: bool = False,
    ) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._max_header_size = max_header_size
        self._max_request_line_size = max_request_line_size
        self._max_header_count = max_header_count
        self._max_body_size = max_body_size
        self._allow_h2c_upgrade = allow_h2c_upgrade
        self._outbound: list[bytes | memoryview | FileSegment] = []
        self._outbound_size = 0
        self._files_queued = 0  # FileSegments in _outbound
        self._stream_id = 0  # id of the current (or last) request
        self._active = False  # a request has been handed out and its response not ended
        self._response_started = False
        self._continue_withheld = False  # client expects 100 Continue and has not had it
        self._head_checked = False  # the current request head passed _raw_head_problem
        self._head_request = False
        self._no_body = False  # HEAD or 204/304: the response's body bytes are dropped
        self._declared: int | None = None  # the response's Content-Length, if it counts
        self._body_sent = 0  # response body bytes queued, counted against _declared
        self._body_received = 0
        self._chunks: ChunkedScan | None = None  # following a chunked request body
        self._chunk_refusal: Refusal | None = None  # what it found wrong, not yet answered
        self._draining = 0  # >0: discarding the rest of an unread body; bytes discarded + 1
        self._upgrade: tuple[RequestReceived, bytes] | None = None
        self._upgrade_body: list[bytes] = []
        self._closed = False  # close once the current exchange is over; parse nothing more
        self._no_keep_alive = False  # graceful shutdown: finish the current exchange, then close
        self._peer_eof = False

    # ---- state the driver asks about -------------------------------------

    @property
    def closing(self) -> bool:
        """True once the connection must close after ``data_to_send`` drains."""
        if self._closed:
            return True
        if self._active:
            return False
        if self._no_keep_alive and not self._h11.trailing_data[0]:
            return True  # idle (not even part of a request buffered): close now
        our = self._h11.our_state
        return our in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) or (
            self._peer_eof and self._h11.their_state in (h11.IDLE, h11.DONE, h11.CLOSED)
        )

    @property
    def partial_request(self) -> bool:
        """Has part of a request head arrived, with the rest still missing?"""
        return (
            not self._active
            and not self._closed
            and self._h11.their_state is h11.IDLE
            and bool(self._h11.trailing_data[0])
        )

    def expire_partial_request(self) -> list[Event]:
        """The client took too long to send its request head: answer 408 and close."""
        return [self._reject(408, "request head not received in time")]

    @property
    def buffered_input(self) -> int:
        """Bytes received but not yet parsed (pipelined requests waiting their turn)."""
        return len(self._h11.trailing_data[0]) if self._h11.their_state is h11.DONE else 0

    @property
    def has_queued_streams(self) -> bool:
        """HTTP/1.1 queues nothing per stream: all output is in data_to_send()."""
        return False

    @property
    def output_size(self) -> int:
        """Bytes queued for the socket."""
        return self._outbound_size

    def stream_output_size(self, stream_id: int) -> int:
        """Bytes queued for the socket on behalf of ``stream_id`` (all of them, in HTTP/1.1)."""
        return self._outbound_size

    def stream_blocked(self, stream_id: int) -> bool:
        """HTTP/1.1 has no flow-control window: output waits only for the socket."""
        return False

    # ---- bytes in, events out ---------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the socket; ``b""`` means the peer closed its side."""
        if not data:
            self._peer_eof = True
        if self._h11.their_state is not h11.ERROR and not self._closed:
            data = bytes(data)
            if self._chunks is not None:
                # The scan sees these bytes before h11 parses them (next_events).
                self._chunk_refusal = self._chunks.feed(data)
                if self._chunks.done or self._chunk_refusal is not None:
                    self._chunks = None
            self._h11.receive_data(data)

    def next_events(self) -> list[Event]:
        """Parse as far as the state allows and return what happened."""
        events: list[Event] = []
        if self._closed:
            return events
        if not self._active and not self._peer_eof and not self._h11.trailing_data[0]:
            # Between requests with nothing buffered (the common case after a
            # response): there is nothing to parse.
            return events
        while True:
            if self._chunk_refusal is not None:
                events.append(self._reject(*self._chunk_refusal))
                return events
            if self._h11.their_state is h11.MUST_CLOSE:
                # Connection: close / HTTP/1.0: that request was the last one;
                # whatever follows is ignored (RFC 9112 §9.6), not an error.
                return events
            if not self._head_checked and self._h11.their_state is h11.IDLE and not self._active:
                complete, problem = _raw_head_problem(self._h11.trailing_data[0])
                if problem is not None:
                    events.append(self._reject(400, problem))
                    return events
                # Incomplete: h11 asks for more data (or refuses an oversized head).
                self._head_checked = complete
            try:
                h11_event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._peer_eof and self._active:
                    # EOF in the middle of a request body: the client went away.
                    self._closed = True
                    events.append(StreamReset(self._stream_id))
                else:
                    events.append(self._reject(exc.error_status_hint, describe(exc)))
                return events
            if h11_event is h11.NEED_DATA:
                if self._h11.their_state is h11.IDLE and not self._active:
                    self._check_request_line_length(events)
                return events
            if h11_event is h11.PAUSED:
                if self._upgrade is not None:
                    # h11 puts an accepted-for-consideration upgrade request in
                    # MIGHT_SWITCH_PROTOCOL rather than DONE once its body is read.
                    if self._h11.their_state is not h11.DONE:
                        events.append(self._accept_upgrade())
                    else:  # Upgrade without "Connection: Upgrade": not an upgrade request
                        self._decline_upgrade(events)
                        events.append(BodyEnded(self._stream_id))
                return events
            if not self._handle(cast(h11.Event, h11_event), events):
                return events

    def _handle(self, h11_event: h11.Event, events: list[Event]) -> bool:
        """Translate one h11 event; False stops parsing for now."""
        sid = self._stream_id
        if isinstance(h11_event, h11.Request):
            return self._handle_request(h11_event, events)
        if isinstance(h11_event, h11.Data):
            data = bytes(h11_event.data)
            if self._draining:
                self._draining += len(data)
                if self._draining > MAX_DRAIN:
                    self._closed = True
                    return False
                return True
            self._body_received += len(data)
            # A backstop: the chunked scan refuses a size over the limit before its data.
            if self._max_body_size and self._body_received > self._max_body_size:
                events.append(self._reject(413, "request body too large"))
                return False
            if self._upgrade is not None:
                self._upgrade_body.append(data)
                if self._body_received > MAX_UPGRADE_BODY:
                    self._decline_upgrade(events)
                return True
            events.append(BodyReceived(sid, data))
            return True
        if isinstance(h11_event, h11.EndOfMessage):
            if self._draining:
                self._draining = 0
                self._start_next_cycle()
                return True
            if self._upgrade is None:
                events.append(BodyEnded(sid))
            return True
        if isinstance(h11_event, h11.ConnectionClosed):
            events.append(ConnectionClosed(abort=False))
            return False
        return True  # pragma: no cover - h11 has no other events for a server

    def _handle_request(self, request: h11.Request, events: list[Event]) -> bool:
        headers: Headers = list(request.headers)
        request_line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
        if request_line > self._max_request_line_size:
            events.append(self._reject(414, "request target too long"))
            return False
        # h11 bounds only a head that is still incomplete; one that arrives
        # whole in a large read must be measured here (request line + fields).
        head_size = request_line + sum(len(name) + len(value) + 4 for name, value in headers)
        if head_size > self._max_header_size:
            events.append(self._reject(431, "request header fields too large"))
            return False
        if len(headers) > self._max_header_count:
            events.append(self._reject(431, "too many header fields"))
            return False
        content_length: int | None = None
        chunked = False
        expects_continue = False
        upgrade: bytes | None = None
        settings: bytes | None = None
        connection_tokens: set[bytes] = set()
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expects_continue = value.lower() == b"100-continue"
            elif name == b"upgrade":
                upgrade = value.lower()
            elif name == b"http2-settings":
                settings = value
            elif name == b"connection":
                connection_tokens.update(token.strip().lower() for token in value.split(b","))
        if sum(1 for name, _ in headers if name == b"host") > 1:
            # RFC 9112 §3.2: more than one Host is a 400 (which one would we route by?)
            events.append(self._reject(400, "more than one Host header"))
            return False
        target, authority, problem = _split_target(request.method, bytes(request.target))
        if problem is not None:
            events.append(self._reject(501 if request.method == b"CONNECT" else 400, problem))
            return False
        if chunked and content_length is not None:
            # RFC 9112 §6.3: a sender MUST NOT send both; a server MAY reject.
            # Accepting would let a front proxy and us disagree on where the
            # body ends (request smuggling), so we always reject.
            events.append(self._reject(400, "both Content-Length and Transfer-Encoding"))
            return False
        if self._max_body_size and (content_length or 0) > self._max_body_size:
            events.append(self._reject(413, "request body too large"))
            return False
        self._chunks = None
        if chunked and not self._scan_chunked_body(events):
            return False
        self._stream_id += 1
        self._active = True
        self._response_started = False
        self._body_received = 0
        self._head_request = request.method == b"HEAD"
        has_body = chunked or bool(content_length)
        self._continue_withheld = expects_continue and has_body
        event = RequestReceived(
            stream_id=self._stream_id,
            method=bytes(request.method),
            target=target,
            headers=headers,
            http_version=request.http_version.decode("ascii"),
            authority=authority,
            end_stream=not has_body,
            expects_continue=expects_continue and has_body,
            content_length=content_length,
        )
        if (
            self._allow_h2c_upgrade
            and upgrade == b"h2c"
            and settings is not None
            and {b"upgrade", b"http2-settings"} <= connection_tokens  # RFC 9113 §3.2
            and request.http_version == b"1.1"  # RFC 9110 §7.8: ignore Upgrade in HTTP/1.0
            and (content_length or 0) <= MAX_UPGRADE_BODY
            and not expects_continue
        ) and _valid_settings(settings):
            # RFC 9113 §3.2.1 omits base64 padding; h2's decoder needs it.
            self._upgrade = (event, settings + b"=" * (-len(settings) % 4))
            self._upgrade_body = []
            return True
        events.append(event)
        return True

    def _scan_chunked_body(self, events: list[Event]) -> bool:
        """Start following a chunked body from the bytes already buffered after its head.

        Chunk sizes h11 would accept but we refuse (see trioserve.chunked) are
        answered before the app runs when they came with the head; later ones
        as soon as they arrive (receive_data, then next_events).
        """
        scan = ChunkedScan(
            max_body_size=self._max_body_size, max_trailer_size=self._max_header_size
        )
        refusal = scan.feed(self._h11.trailing_data[0])
        if refusal is not None:
            events.append(self._reject(*refusal))
            return False
        if not scan.done:
            self._chunks = scan
        return True

    def _accept_upgrade(self) -> UpgradeToH2:
        assert self._upgrade is not None
        request, settings = self._upgrade
        self._write(
            h11.InformationalResponse(
                status_code=101,
                headers=[(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")],
                reason=b"Switching Protocols",
            )
        )
        trailing, _ = self._h11.trailing_data
        body = b"".join(self._upgrade_body)
        self._upgrade = None
        self._upgrade_body = []
        self._active = False
        self._closed = True  # this HTTP/1.1 connection is over; HTTP/2 takes the socket
        return UpgradeToH2(request=request, settings=settings, body=body, trailing=bytes(trailing))

    def _decline_upgrade(self, events: list[Event]) -> None:
        """Serve an upgrade request over HTTP/1.1 after all (its body grew too large)."""
        assert self._upgrade is not None
        request, _ = self._upgrade
        events.append(request)
        events.extend(BodyReceived(request.stream_id, chunk) for chunk in self._upgrade_body)
        self._upgrade = None
        self._upgrade_body = []

    def _check_request_line_length(self, events: list[Event]) -> None:
        pending, _ = self._h11.trailing_data
        if len(pending) > self._max_request_line_size and b"\n" not in pending:
            events.append(self._reject(414, "request line too long"))

    def _reject(self, status: int, reason: str) -> BadRequest:
        """Answer a bad request ourselves if no response is under way, then close."""
        stream_id = self._stream_id if self._active else None
        self._closed = True
        answered = stream_id is None and self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        if answered:
            self._write_error_response(status, reason)
        return BadRequest(status=status, reason=reason, stream_id=stream_id, answered=answered)

    # ---- responses in, bytes out ------------------------------------------

    def send_continue(self, stream_id: int) -> None:
        """Send ``100 Continue`` if the client is still waiting for it."""
        if self._h11.they_are_waiting_for_100_continue and not self._response_started:
            self._continue_withheld = False
            self._write(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))

    def send_response(
        self, stream_id: int, status: int, headers: Headers, *, reason: bytes = b""
    ) -> None:
        """Queue the response head.

        Raises InvalidResponse, having queued nothing, for a head that breaks
        the rules of trioserve.responses (a status that is not final, a bad
        reason phrase or Content-Length) or that h11 refuses.
        """
        check_status(status, reason)
        declared = declared_length(headers)
        self._no_body = self._head_request or status in NO_BODY_STATUSES
        self._declared = None if self._no_body else declared
        self._body_sent = 0
        self._response_started = True
        if self._continue_withheld and self._h11.their_state is h11.SEND_BODY:
            # Answering without having asked for the body: it may never come,
            # so this connection cannot carry another request.
            self._closed = True
        if self._closed or self._no_keep_alive:
            headers = [*headers, (b"Connection", b"close")]
        try:
            response = h11.Response(
                status_code=status, headers=headers, reason=reason or reason_phrase(status)
            )
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from exc
        self._write(response)

    def send_body(self, stream_id: int, data: bytes) -> None:
        """Queue body bytes (none for HEAD, 204 and 304).

        Raises InvalidResponse, queuing nothing of ``data``, if they would go
        past the declared Content-Length.
        """
        if data and not self._no_body:
            self._count_body(len(data))
            self._write(h11.Data(data=data))

    def send_file(self, stream_id: int, segment: FileSegment) -> None:
        """Queue a file's bytes for ``os.sendfile``, counted like ``send_body``'s."""
        if self._no_body:
            segment.sent = True  # nothing to send for HEAD, 204 or 304
            return
        self._count_body(segment.length)
        # h11 passes the Data payload through untouched and only needs its
        # len() (its documented way to support sendfile), hence the cast.
        try:
            parts = self._h11.send_with_data_passthrough(h11.Data(data=cast(bytes, segment)))
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from exc
        for part in cast(list[bytes | FileSegment], parts or []):
            if isinstance(part, FileSegment):
                self._files_queued += 1
            self._outbound.append(part)
            self._outbound_size += len(part)

    def end_stream(self, stream_id: int) -> None:
        """End the response. Raises InvalidResponse if it is shorter than declared."""
        if self._declared is not None and self._body_sent < self._declared:
            raise body_too_short(self._declared, self._body_sent)
        self._write(h11.EndOfMessage())
        self._finish_request()

    def send_error_response(
        self, stream_id: int, status: int, detail: str = "", *, close: bool = False
    ) -> None:
        """Answer the current request with a short plain-text error and end it.

        ``close``: the connection cannot be reused afterwards (for example the
        request body was abandoned half-way), so the response says so.
        """
        if close:
            self._closed = True
        self._write_error_response(status, detail)
        self._finish_request()

    def reset_stream(self, stream_id: int, reason: ResetReason = ResetReason.CANCEL) -> None:
        """Abandon the current response. HTTP/1.1 can only do that by closing."""
        self._closed = True
        self._active = False

    def stream_send_room(self, stream_id: int) -> int:
        """HTTP/1.1 has no flow-control window: as much as the socket takes."""
        return MAX_WRITE

    def take_stream_output(self, stream_id: int) -> list[bytes | memoryview]:
        """Nothing: what is queued here is already framed for the wire (chunked coding)."""
        return []

    def acknowledge_body(self, stream_id: int, size: int) -> None:
        """HTTP/1.1 has no flow-control credit: the driver resumes reading instead."""

    def start_shutdown(self) -> None:
        """Finish the current exchange, then close: no more keep-alive.

        A request whose bytes already arrived counts as current (it is answered,
        with ``Connection: close``); a connection with nothing buffered closes now.
        """
        self._no_keep_alive = True

    def data_to_send(self) -> bytes:
        """What is queued for the socket, coalesced into one write of at most MAX_WRITE.

        Stops at a queued file: :meth:`file_to_send` hands that over next.
        """
        outbound = self._outbound
        if not outbound:
            return b""
        if len(outbound) == 1 and self._outbound_size <= MAX_WRITE:
            first = outbound[0]
            if not isinstance(first, FileSegment):  # the common case: one small response
                outbound.clear()
                self._outbound_size = 0
                return bytes(first)
        parts: list[bytes | memoryview] = []
        size = 0
        while outbound and size < MAX_WRITE:
            part = outbound[0]
            if isinstance(part, FileSegment):
                break
            room = MAX_WRITE - size
            if len(part) > room:
                view = memoryview(part)
                outbound[0] = view[room:]
                part = view[:room]
            else:
                del outbound[0]
            parts.append(part)
            size += len(part)
        self._outbound_size -= size
        return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)

    def file_to_send(self) -> FileSegment | None:
        """The file to send next with ``os.sendfile``, once the bytes before it are out."""
        if self._files_queued and self._outbound and isinstance(self._outbound[0], FileSegment):
            segment = self._outbound.pop(0)
            assert isinstance(segment, FileSegment)
            self._files_queued -= 1
            self._outbound_size -= segment.length
            return segment
        return None

    def send_failed(self) -> None:
        """The socket write failed: nothing more can be sent."""
        self._h11.send_failed()
        self._closed = True

    # ---- internals ---------------------------------------------------------

    def _count_body(self, size: int) -> None:
        sent = self._body_sent + size
        if self._declared is not None and sent > self._declared:
            raise body_too_long(self._declared)
        self._body_sent = sent

    def _write(self, event: h11.Event) -> None:
        try:
            data = self._h11.send(event)
        except h11.LocalProtocolError as exc:
            raise _refused(exc) from exc
        if data:
            self._outbound.append(data)
            self._outbound_size += len(data)

    def _write_error_response(self, status: int, detail: str) -> None:
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._closed = True
            return
        body = error_body(status, detail)
        self._response_started = True
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        if self._closed or self._no_keep_alive:  # protocol error or shutdown: no reuse
            headers.append((b"Connection", b"close"))
        self._write(h11.Response(status_code=status, reason=reason_phrase(status), headers=headers))
        if not self._head_request:
            self._write(h11.Data(data=body))
        self._write(h11.EndOfMessage())

    def _finish_request(self) -> None:
        self._active = False
        self._response_started = False
        if self._closed or self._h11.our_state is not h11.DONE:
            self._closed = True
            return
        their = self._h11.their_state
        if their is h11.SEND_BODY:
            if self._continue_withheld:
                # They never got 100 Continue, so they may never send the body.
                self._closed = True
                return
            self._draining = 1
            return
        self._start_next_cycle()

    def _start_next_cycle(self) -> None:
        self._chunks = None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._head_checked = False
        else:
            self._closed = True


def _refused(exc: h11.LocalProtocolError) -> InvalidResponse:
    """h11 refusing what we send means the app's response breaks HTTP/1.1.

    Our own checks (trioserve.responses) come first, so this is the backstop.
    """
    return InvalidResponse(f"invalid HTTP/1.1 response: {in_words(str(exc))}")


# RFC 9112 §3.2.2 absolute-form: scheme "://" authority, then path and query.
_ABSOLUTE_FORM = re.compile(rb"(?i:https?)://([^/?#@]+)([/?][^#]*)?")


def _split_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None, str | None]:
    """The origin-form target, the authority of an absolute-form one, and any problem.

    RFC 9112 §3.2: a server takes origin-form (``/path?query``), ``*`` for
    OPTIONS, and absolute-form (``http://host/path``, whose host replaces the
    Host field, §3.2.2). A WSGI app cannot answer CONNECT's authority-form, and
    anything else has no PATH_INFO to give it.
    """
    if method == b"CONNECT":  # whatever its target: a 2xx would turn the connection into a tunnel
        return target, None, "CONNECT is not supported"
    if target[:1] == b"/":
        return target, None, None
    if target == b"*" and method == b"OPTIONS":
        return target, None, None
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target, None, "invalid request target"
    path = match[2] or b"/"
    if path[:1] == b"?":
        path = b"/" + path
    return path, match[1], None


# RFC 9110 §5.5: field values are visible characters, spaces and tabs (obs-text
# aside). h11 lets other control characters through; a proxy may strip or split
# on them, so they are refused. CR and LF are checked separately.
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _raw_head_problem(raw: bytes) -> tuple[bool, str | None]:
    """What is wrong with a raw request head that h11 would quietly accept.

    h11 follows RFC 9112's lenient options: it merges identical duplicate or
    list-form Content-Length values, accepts bare LF line endings, unfolds
    obs-fold lines and lets control characters through in field values. Each
    is harmless alone, but a front proxy that reads the same bytes differently
    is how request smuggling starts, so trioserve refuses them (RFC 9112 §2.2,
    §5.2, §6.3 and RFC 9110 §5.5 allow rejecting them).
    Returns (whether the head is complete, what is wrong with it or None).
    """
    raw = raw.lstrip(b"\r\n")  # empty lines before a request line are allowed
    # Where h11 sees the head end: a line ending (CRLF or a bare LF) and an empty line.
    end_match = _HEAD_END.search(raw)
    if end_match is None:
        return False, None
    if end_match[0] != b"\r\n\r\n":
        return True, "bare LF line ending"
    head = raw[: end_match.start()]
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return True, "bare LF or CR in the request head"
    if _CONTROL_CHARACTER.search(head):
        return True, "control character in the request head"
    lines = head.split(b"\r\n")[1:]
    lengths = 0
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return True, "obsolete line folding"
        if line[:15].lower() == b"content-length:":
            lengths += 1
            if lengths > 1:
                return True, "more than one Content-Length"
            if b"," in line:
                return True, "list-form Content-Length"
    return True, None


def _valid_settings(value: bytes) -> bool:
    """Is ``value`` a well-formed ``HTTP2-Settings`` header (base64url of 6-byte entries)?"""
    try:
        padded = value + b"=" * (-len(value) % 4)
        decoded = base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(decoded) % 6 == 0
