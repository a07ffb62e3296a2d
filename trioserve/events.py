"""The vocabulary the sans-IO protocol layers speak to the connection driver.

Both :mod:`trioserve.http1` and :mod:`trioserve.http2` turn received bytes into
these events, so the trio side (:mod:`trioserve.connection`) handles HTTP/1.1
and HTTP/2 with one dispatch table. Events are nouns and carry only plain
data: no trio objects, no callbacks. Nobody changes one once it is made; they
are not frozen dataclasses only because a frozen one's ``__init__`` costs
three times as much (about 1 µs for a request head, once per request).

A "stream" is one request/response exchange. HTTP/2 gives it the stream id from
the wire; HTTP/1.1 numbers requests 1, 2, 3... on the connection, and only one
is ever live at a time.

One exception belongs to the vocabulary too: :class:`InvalidResponse`, which
both protocol layers raise when the application's response breaks its own
framing, so the trio side never needs to know h11's or h2's errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


class ResetReason(enum.Enum):
    """Why trioserve abandons a response half-way.

    HTTP/2 sends RST_STREAM with the matching code (RFC 9113 §7); HTTP/1.1 can
    only close the connection. Each protocol module maps these to its own
    wire vocabulary, so nothing above it spells an error code.
    """

    CANCEL = "cancel"  # we gave up on it: shutdown, a stalled client, the app cancelled
    APP_ERROR = "app error"  # the app broke its own response (HTTP/2 INTERNAL_ERROR)
    REFUSED = "refused"  # not processed at all; the client may retry it (REFUSED_STREAM)


# ``content_length`` of a response head nobody has checked yet: the protocol
# layer applies the rules of trioserve.responses itself (a head from the WSGI
# layer comes checked, with its Content-Length worked out, or None).
UNCHECKED = -1


class InvalidResponse(ValueError):
    """The application's response breaks its own framing or the rules for a response head.

    Raised by ``start_response`` for a head that must never go out (the app
    thread turns it into a 500), and by the protocol layers' ``send_*``
    methods for what only they can count (more body than the Content-Length
    announced, or less by the end); the caller then resets the stream (HTTP/1.1:
    closes the connection). The message says what is wrong, in words.
    """


@dataclass(slots=True)
class RequestReceived:
    """A request's head has arrived; its body (if any) follows as events.

    ``headers`` holds regular header fields only (HTTP/2 pseudo-headers are
    lifted into ``method``/``target``/``scheme``/``authority``), names lower-case.
    """

    stream_id: int
    method: bytes
    target: bytes
    headers: Headers
    http_version: str  # "1.0", "1.1" or "2"
    scheme: str | None = None  # HTTP/2 :scheme; None over HTTP/1.x
    authority: bytes | None = None  # HTTP/2 :authority; None over HTTP/1.x
    end_stream: bool = False  # True when no body follows (and no BodyEnded either)
    expects_continue: bool = False  # client waits for "100 Continue" before sending the body
    content_length: int | None = None


@dataclass(slots=True)
class BodyReceived:
    """A piece of a request body. Flow-control credit is returned only when the
    application consumes it (see ``acknowledge_body`` on the protocol objects)."""

    stream_id: int
    data: bytes


@dataclass(slots=True)
class BodyEnded:
    """The request body is complete (the application reads EOF after the buffered data).

    Not sent for a request whose :class:`RequestReceived` has ``end_stream``:
    that one said so already (one event less for every bodiless request).
    """

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The peer abandoned this stream (RST_STREAM, or a disconnect mid-request)."""

    stream_id: int
    error_code: int = 0


@dataclass(slots=True)
class BadRequest:
    """The peer sent something invalid.

    If ``stream_id`` is None the protocol layer has already queued the error
    response (or GOAWAY) itself and nothing else needs doing but logging (and
    counting: ``answered`` says a request got ``status`` that way, rather than
    the connection a GOAWAY). If it names a live stream, that stream must be
    cancelled and, if its response has not started, answered with ``status``.
    """

    status: int
    reason: str
    stream_id: int | None = None
    answered: bool = False


@dataclass(slots=True)
class WindowOpened:
    """The peer granted flow-control credit: queued response data may go out now."""


@dataclass(slots=True)
class UpgradeToH2:
    """An HTTP/1.1 request asked for ``Upgrade: h2c`` and the upgrade was accepted.

    The 101 response is already queued. ``request`` is to be answered on HTTP/2
    stream 1 with ``body`` as its complete request body; ``settings`` is the
    ``HTTP2-Settings`` header value (base64url, padded) and ``trailing`` holds bytes the client
    already sent after the request (the start of its HTTP/2 preface).
    """

    request: RequestReceived
    settings: bytes
    body: bytes
    trailing: bytes


@dataclass(slots=True)
class ConnectionClosed:
    """The peer is done: EOF, GOAWAY, or a fatal protocol error.

    ``abort`` is True when in-flight requests can no longer be answered and
    must be cancelled (a broken HTTP/2 connection); False when the peer merely
    stopped sending (an HTTP/1.1 half-close) and responses may still go out.
    """

    abort: bool = False
    error_code: int = 0


Event = (
    RequestReceived
    | BodyReceived
    | BodyEnded
    | StreamReset
    | BadRequest
    | WindowOpened
    | UpgradeToH2
    | ConnectionClosed
)


@dataclass(slots=True, eq=False)
class FileSegment:
    """Response body bytes to send straight from a file: ``length`` bytes from ``offset``.

    Queued by the HTTP/1.1 layer in place of the bytes themselves (h11 passes
    it through, counting ``len()`` against Content-Length); the driver sends
    it with ``os.sendfile`` and sets ``sent``.

    The descriptor belongs to the app's iterable, closed by ``close_file``.
    Its request's task calls that when it ends, unless the sender is in the
    middle of the file (``in_use``): then the sender does, when it lets go.
    Once ``abandoned``, the sender never touches the descriptor again (its
    number may already belong to another file).
    """

    fd: int
    offset: int
    length: int
    sent: bool = False
    in_use: bool = False
    abandoned: bool = False
    close_file: Callable[[], object] | None = None

    def let_go(self) -> None:
        """The sender is done with the file (sent or not); close it if its request has ended."""
        self.in_use = False
        if self.abandoned:
            self.release()

    def release(self) -> None:
        """Close the file (once), unless the sender still uses it; see above."""
        self.abandoned = True
        if not self.in_use and self.close_file is not None:
            close, self.close_file = self.close_file, None
            close()

    def __len__(self) -> int:
        return self.length


class ServerProtocol(Protocol):
    """What the connection driver needs from a sans-IO protocol object.

    Implemented by :class:`trioserve.http1.HTTP1Connection` and
    :class:`trioserve.http2.HTTP2Connection`; the driver never asks which one
    it holds.
    """

    multiplexed: bool  # many streams at once (HTTP/2), or one request at a time

    @property
    def closing(self) -> bool: ...
    @property
    def output_size(self) -> int: ...
    @property
    def buffered_input(self) -> int: ...
    @property
    def partial_request(self) -> bool: ...
    @property
    def has_queued_streams(self) -> bool: ...
    @property
    def wants_sender(self) -> bool:
        """Is there output to send, or a close for the sender to make?

        ``output_size or has_queued_streams or closing``, asked after every
        read and every request: one look instead of three.
        """
        ...

    def stream_output_size(self, stream_id: int) -> int: ...
    def send_file(self, stream_id: int, segment: FileSegment) -> None: ...
    def file_to_send(self) -> FileSegment | None: ...
    def stream_blocked(self, stream_id: int) -> bool: ...
    def response_ended(self, stream_id: int) -> bool:
        """Has the stream's response ended on the wire while its app still runs?"""
        ...

    def stream_send_room(self, stream_id: int) -> int:
        """How many more body bytes of the stream could go out now (flow control)."""
        ...

    def receive_data(self, data: bytes | bytearray) -> None: ...
    def next_events(self) -> list[Event]: ...
    def data_to_send(self) -> bytes: ...
    def buffers_to_send(self) -> list[bytes | memoryview]:
        """What ``data_to_send`` would join, uncopied, for a gathering write (os.writev)."""
        ...

    def send_continue(self, stream_id: int) -> None: ...
    def send_response(
        self,
        stream_id: int,
        status: int,
        headers: Headers,
        *,
        reason: bytes = b"",
        content_length: int | None = UNCHECKED,
        traits: int = UNCHECKED,
    ) -> None: ...
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
        """``send_response``, ``send_body`` for each chunk and ``end_stream`` in one call."""
        ...

    def send_body(self, stream_id: int, data: bytes) -> None: ...
    def end_stream(self, stream_id: int) -> None: ...
    def send_error_response(
        self, stream_id: int, status: int, detail: str = "", *, close: bool = False
    ) -> int:
        """Answer the stream with trioserve's own plain-text error; its body bytes queued."""
        ...

    def reset_stream(self, stream_id: int, reason: ResetReason = ResetReason.CANCEL) -> int:
        """Abandon the stream's response; how many of its queued body bytes were
        dropped rather than sent (they never reach the peer)."""
        ...

    def acknowledge_body(self, stream_id: int, size: int) -> None: ...
    def take_stream_output(self, stream_id: int) -> list[bytes | memoryview]:
        """Take back the stream's queued body bytes not yet framed for the wire."""
        ...

    def expire_partial_request(self) -> list[Event]:
        """The partial request head (or header block) took too long: refuse it, and say so."""
        ...

    def release_idle(self) -> None:
        """Nothing is under way: drop what the next request can build again (dozing)."""
        ...

    def start_shutdown(self) -> None: ...
    def send_failed(self) -> None: ...
