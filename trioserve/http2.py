"""Sans-IO HTTP/2 server protocol, built on h2.

Same shape as :mod:`trioserve.http1`: ``receive_data`` + ``next_events`` in,
``send_*`` + ``data_to_send`` out, no I/O and no trio.

Where flow control lives (both directions):

* Inbound. Request body bytes are reported as :class:`BodyReceived` but *not*
  credited back to the peer. Credit is returned by :meth:`acknowledge_body`,
  which the trio side calls only when the app takes the bytes, so a slow
  reader slows its own upload and nobody else's. The connection window is
  opened to ``initial_window_size * max_concurrent_streams`` at start, so one
  stalled stream can never use up the window the others need. Padding is
  credited at once (no app ever consumes it). h2's WindowManager batches the
  resulting WINDOW_UPDATE frames.
* Outbound. ``send_body`` only appends to the stream's queue. The frames are
  cut in :meth:`data_to_send`, which walks the streams round-robin, one frame
  per stream per round, each no bigger than the peer's max frame size and the
  stream's and connection's send windows. A stream with no window waits
  without holding anyone up; a WINDOW_UPDATE shows up as :class:`WindowOpened`
  so the driver knows to call ``data_to_send`` again.

After a stream is reset nothing more is sent for it: its queue is dropped.

A response is held to its own content-length (the rules of
:mod:`trioserve.responses`): ``send_body`` raises
:class:`~trioserve.events.InvalidResponse` rather than queue a byte past it,
and ``end_stream`` rather than end a body that fell short; the caller then
resets the stream with INTERNAL_ERROR.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState
from h2.stream import StreamInputs, StreamState
from hyperframe.frame import GoAwayFrame

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
    WindowOpened,
)
from .hpack_memo import MemoDecoder, MemoEncoder
from .http2_fields import MalformedFields, request_fields, trailer_problem
from .responses import (
    NO_BODY_STATUSES,
    body_too_long,
    body_too_short,
    check_status,
    declared_length,
    error_body,
    in_words,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Connection-specific header fields are forbidden in HTTP/2 (RFC 9113 §8.2.2);
# WSGI apps written for HTTP/1.1 may still set them, so they are dropped
# rather than letting h2 refuse the whole response.
# TE is one too in a response (only a request may carry "TE: trailers").
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)

# How much response data one buffers_to_send() call frames at most. Bounds the
# size of a single socket write (and so the memory in flight) while still
# letting writes coalesce many small frames.
MAX_BATCH = 256 * 1024

# h2's window size ceiling (RFC 9113 §6.9.1), also the largest stream id.
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1

# Opaque data of the PING that times the two-step graceful GOAWAY.
SHUTDOWN_PING = b"trio-bye"

# Frame types and flags read by the frame-header scan (RFC 9113 §6).
FRAME_DATA = 0x0
FRAME_HEADERS = 0x1
FRAME_SETTINGS = 0x4
FRAME_CONTINUATION = 0x9
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
FLAG_ACK = 0x1  # (SETTINGS and PING)
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Abuse budgets (CVE-2023-44487 Rapid Reset, CVE-2025-8671 MadeYouReset,
# CVE-2019-9512/9515/9518 control-frame floods). Each is a count that grows
# with useful work, so long-lived, busy connections never run out, while a
# peer that only resets streams or only sends control frames soon does, and
# gets GOAWAY(ENHANCE_YOUR_CALM).
# A frame header (RFC 9113 §4.1): 24-bit length (as 16 + 8 bits), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">HBBBL")
# A HEADERS frame longer than this is left to h2 (which buffers it the same
# way): it is not a plain request, and holding it here is not worth it.
_OPENING_FRAME_MAX = 16384
_EMPTY = memoryview(b"")
_SENDING_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_OPEN_CONNECTION_STATES = frozenset({ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN})
# h2's state-machine inputs the request path gives, as module constants: on Python
# 3.11 an Enum class attribute costs a hook call each read (see trioserve.http1's _Input).
_RECV_HEADERS: Final = ConnectionInputs.RECV_HEADERS
_ODD_STREAM_IDS: Final = AllowedStreamIDs.ODD
_SEND_HEADERS: Final = StreamInputs.SEND_HEADERS
_SEND_END_STREAM: Final = StreamInputs.SEND_END_STREAM

# RST_STREAM codes for the reasons the trio side gives (events.ResetReason).
_RESET_CODES = {
    ResetReason.CANCEL: h2.errors.ErrorCodes.CANCEL,
    ResetReason.APP_ERROR: h2.errors.ErrorCodes.INTERNAL_ERROR,
    ResetReason.REFUSED: h2.errors.ErrorCodes.REFUSED_STREAM,
}

RESET_BUDGET = 100  # streams reset (by the peer, by h2, or refused) beyond those completed
CONTROL_BUDGET = 10_000  # frames that carry no request data (PING, SETTINGS, PRIORITY,
# WINDOW_UPDATE, RST_STREAM, unknown types, empty DATA, DATA for closed streams)...
CONTROL_PER_STREAM = 100  # ...plus this many per completed stream...
CONTROL_BYTES_PER_FRAME = 1024  # ...plus one per this many response bytes sent...
# ...plus this many per DATA frame sent: a client may answer each one with a
# WINDOW_UPDATE for its stream and one for the connection, and one that opens
# its window a KiB at a time does (two frames a KiB, against one a KiB above).
CONTROL_PER_DATA_FRAME = 2


class _Shutdown(enum.Enum):
    """Our side of a graceful shutdown: the two-step GOAWAY of RFC 9113 §6.8."""

    RUNNING = "running"  # no GOAWAY sent: new streams welcome
    PINGING = "pinging"  # GOAWAY(2^31-1) and a PING sent; waiting for the PING's ACK
    FINAL = "final"  # GOAWAY(last stream id) sent: no new streams, close when idle


# The members as module constants, which the code below reads instead: on Python
# 3.11 reading an attribute of an Enum class goes through EnumType's ``__getattr__``
# hook (see trioserve.http1's _Input), and every read of the connection asks.
_SHUTDOWN_RUNNING: Final = _Shutdown.RUNNING
_SHUTDOWN_PINGING: Final = _Shutdown.PINGING
_SHUTDOWN_FINAL: Final = _Shutdown.FINAL


@dataclass(slots=True)
class _Outbound:
    """A stream's response data waiting for flow-control credit."""

    headers: Headers | None = None
    chunks: deque[memoryview] = field(default_factory=deque)
    size: int = 0
    end: bool = False
    head_only: bool = False  # HEAD request or 204/304: body bytes are dropped
    declared: int | None = None  # the response's content-length, if it counts
    counted: int = 0  # body bytes queued in all, counted against ``declared``


class _H2Stream(h2.stream.H2Stream):
    """h2's stream, less its own checks of a request's content-length (see _H2Connection)."""

    def _initialize_content_length(self, headers: object) -> None:
        # Nothing expected, so h2's _track_content_length never raises either.
        self._expected_content_length = None


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, whose streams leave a request's content-length to trioserve.

    h2 holds a request's DATA to its content-length, and when they differ, or
    the value is not a number, it ends the whole connection (GOAWAY
    PROTOCOL_ERROR): every other stream on it is lost too. RFC 9113 §8.1.1
    makes either a malformed request, to be answered with a stream error. So
    trioserve reads the value (trioserve.http2_fields), counts the DATA
    (HTTP2Connection._translate), and resets that one stream.
    """

    def _begin_new_stream(
        self, stream_id: int, allowed_ids: AllowedStreamIDs
    ) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _H2Stream  # built by h2 as ever; only that method differs
        return stream


class HTTP2Connection:
    """One HTTP/2 server connection's protocol state.

    Args:
      max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS we announce.
      initial_window_size: each stream's receive window (bytes buffered per
        stream at most before the app reads).
      max_frame_size: largest frame we accept (SETTINGS_MAX_FRAME_SIZE).
      max_header_list_size: SETTINGS_MAX_HEADER_LIST_SIZE we announce and enforce.
      max_body_size: request body bytes allowed per stream, 0 for no limit.
      max_header_count: header fields allowed per request (431 beyond).
      max_path_length: longest :path accepted (414 beyond).
    """

    multiplexed = True

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 100,
        initial_window_size: int = 256 * 1024,
        max_frame_size: int = 16 * 1024,
        max_header_list_size: int = 64 * 1024,
        max_body_size: int = 0,
        max_header_count: int = 100,
        max_path_length: int = 8 * 1024,
    ) -> None:
        # Outbound headers are ours to get right (send_response lowercases
        # names and drops connection-specific fields; trioserve.wsgi validated
        # names and values), and inbound ones are checked, and cookies joined,
        # in one pass by trioserve.http2_fields: h2 doing either costs a chain
        # of generators per header block.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self._h2 = _H2Connection(config=config)
        settings = h2.settings.SettingCodes
        initial_values = {
            settings.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            settings.MAX_FRAME_SIZE: max_frame_size,
            settings.MAX_HEADER_LIST_SIZE: max_header_list_size,
            settings.ENABLE_PUSH: 0,
        }
        # Settings given as initial values take effect at once. That is only
        # safe for a window at least as large as the protocol default: a
        # client may send 65535 bytes before it has seen our SETTINGS (RFC
        # 9113 §6.9.2), so a smaller window must wait for the client's ACK.
        self._late_window = None
        if initial_window_size >= 65535:
            initial_values[settings.INITIAL_WINDOW_SIZE] = initial_window_size
        else:
            self._late_window = initial_window_size
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values=initial_values)
        self._h2.max_inbound_frame_size = max_frame_size
        keep_open_after_goaway(self._h2)
        # HPACK coders that replay a repeated header block instead of coding it
        # again while the dynamic table is unchanged (trioserve.hpack_memo).
        # Swapped in before any frame, so they start from the same empty table.
        self._encoder = MemoEncoder()
        self._h2.encoder = self._encoder
        self._h2.decoder = MemoDecoder(max_header_list_size)
        self.max_concurrent_streams = max_concurrent_streams
        self._connection_window = min(MAX_WINDOW, initial_window_size * max_concurrent_streams)
        self._max_body_size = max_body_size
        # Bytes for the socket, in order: frames h2 produced, our own GOAWAYs and
        # DATA frames; handed over whole by buffers_to_send().
        self._control: list[bytes | memoryview] = []
        self._control_size = 0
        self._events: list[Event] = []
        self._outbound: dict[int, _Outbound] = {}
        self._ready: dict[int, None] = {}  # streams with something to frame, in round-robin order
        self._remote_open: set[int] = set()  # streams whose request body is still coming
        self._body_received: dict[int, int] = {}
        # Streams whose request declared a content-length and has a body still
        # coming: sid -> that length, which its DATA must add up to (§8.1.1).
        self._declared_length: dict[int, int] = {}
        self._uncredited: dict[int, int] = {}  # body bytes that never used a window
        self._rejected: set[int] = set()  # streams answered without the app (413, 501)
        # Streams whose END_STREAM went out with the last byte of their declared
        # content-length, before the app ended them: sid -> that length, kept
        # until end_stream() or a reset so that a byte too many is still refused.
        self._ended_early: dict[int, int] = {}
        self._shutdown = _SHUTDOWN_RUNNING
        self._max_header_count = max_header_count
        self._max_path_length = max_path_length
        self._preface_left = len(PREFACE)  # the client preface precedes the first frame
        self._frame_left = 0  # payload bytes of the current frame still to come
        self._frame_head = b""  # a frame header split across reads
        self._resets = 0
        self._completed = 0
        self._control_frames = 0
        self._in_header_block = False  # HEADERS seen, END_HEADERS not yet (header deadline)
        # Opening streams ourselves (_receive_frames) needs h2 to hold no partial
        # frame, so it starts right after the client's first SETTINGS frame when
        # that ends within a read (the usual case: so the first requests are
        # opened, and refused over the limit, the same way as later ones), or
        # else at the first read that ends on a frame boundary after it; from
        # then on h2 is handed whole frames.
        self._settings_seen = False
        self._settings_end: int | None = None  # in this read, where that SETTINGS ends
        # A SETTINGS frame's payload split across reads, gathered for its table
        # sizes (_signal_smallest_table_size).
        self._settings_payload: bytearray | None = None
        self._whole_frames = False
        self._partial_frame = b""  # a frame header, or a HEADERS frame, not yet whole
        self._h2_frame_left = 0  # bytes still to come of a frame h2 has the start of
        self._h2_in_header_block = False  # h2 holds HEADERS that await CONTINUATIONs
        self._bytes_sent = 0
        self._data_frames_sent = 0  # with data: each earns CONTROL_PER_DATA_FRAME
        self._last_stream_id = MAX_STREAM_ID
        self._peer_closed = False  # EOF, error, or GOAWAY from the peer

    # ---- starting up --------------------------------------------------------

    def initiate(self) -> None:
        """Start a connection (prior knowledge or ALPN): queue our SETTINGS."""
        self._h2.initiate_connection()
        self._open_connection_window()

    def initiate_upgrade(
        self, settings_header: bytes, request: RequestReceived, *, preamble: bytes = b""
    ) -> None:
        """Start a connection upgraded from HTTP/1.1 (``Upgrade: h2c``).

        ``request`` becomes stream 1, half-closed: its body came over HTTP/1.1.
        ``preamble`` (the ``101 Switching Protocols`` bytes) goes out first.
        """
        self._queue(preamble)
        self._h2.initiate_upgrade_connection(settings_header)
        self._open_connection_window()
        self._outbound[1] = _Outbound(head_only=request.method == b"HEAD")

    def note_upgrade_body(self, size: int) -> None:
        """Stream 1's body came over HTTP/1.1, so consuming it earns the peer no credit."""
        self._uncredited[1] = size

    def _open_connection_window(self) -> None:
        if self._late_window is not None:
            self._h2.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._late_window}
            )
        increment = self._connection_window - 65535
        if increment > 0:
            self._h2.increment_flow_control_window(increment)
        self._pull_control()

    # ---- state the driver asks about -------------------------------------

    @property
    def closing(self) -> bool:
        """True once no new streams can come: close when the live ones end."""
        return self._shutdown is _SHUTDOWN_FINAL or self._peer_closed

    @property
    def output_size(self) -> int:
        """Control-frame bytes queued for the socket (response data is counted per stream)."""
        return self._control_size

    def stream_output_size(self, stream_id: int) -> int:
        """Response bytes queued for ``stream_id`` that are not yet framed."""
        out = self._outbound.get(stream_id)
        return out.size if out is not None else 0

    def file_to_send(self) -> FileSegment | None:
        """Files go out with ``os.sendfile`` over HTTP/1.1 only: never one here."""
        return None

    def send_file(self, stream_id: int, segment: FileSegment) -> None:
        raise NotImplementedError("HTTP/2 frames file data like any other body")

    def stream_blocked(self, stream_id: int) -> bool:
        """Is more queued for ``stream_id`` than its flow-control window lets out now?"""
        out = self._outbound.get(stream_id)
        return out is not None and out.size > self._h2.local_flow_control_window(stream_id)

    @property
    def buffered_input(self) -> int:
        return 0

    @property
    def partial_request(self) -> bool:
        """Is a header block (HEADERS without END_HEADERS) waiting for its CONTINUATIONs?"""
        return self._in_header_block

    @property
    def has_queued_streams(self) -> bool:
        """Is any response still queued here (waiting for flow-control window)?"""
        return bool(self._outbound)

    @property
    def wants_sender(self) -> bool:
        """Control frames or responses queued, or no new streams to come."""
        return (
            bool(self._control_size)
            or bool(self._outbound)
            or self._shutdown is _SHUTDOWN_FINAL
            or self._peer_closed
        )

    def response_ended(self, stream_id: int) -> bool:
        """Has ``stream_id``'s response ended on the wire before its app ended it?

        True once all of a declared content-length has been framed (with
        END_STREAM on its last frame) while the app is still finishing, e.g.
        a generator running on after its last chunk. The client counts the
        stream closed and may open another.
        """
        return stream_id in self._ended_early

    # ---- bytes in, events out ---------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the socket; ``b""`` means the peer closed the connection."""
        if not data:
            self._abandon_all()
            self._events.append(ConnectionClosed(abort=True))
            return
        if self._peer_closed and not self._outbound:
            return  # after a fatal error: nothing more is read
        oversized = self._scan_frame_headers(data)
        if oversized is not None:
            self.fail(
                h2.errors.ErrorCodes.FRAME_SIZE_ERROR, f"frame of {oversized} bytes announced"
            )
            return
        if self._over_control_budget():
            # Checked before h2 parses this read too: a flood packs thousands
            # of frames into one read, and parsing them all holds up every
            # other connection for a noticeable moment.
            self.fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too many control frames")
            return
        try:
            if self._whole_frames:
                h2_events = self._receive_frames(data)
            elif self._settings_end is not None:
                split, self._settings_end = self._settings_end, None
                h2_events = self._h2.receive_data(data[:split])  # the preface and SETTINGS
                self._whole_frames = True
                h2_events += self._receive_frames(data[split:])
            else:
                h2_events = self._h2.receive_data(data)
                self._whole_frames = self._settings_seen and not (
                    self._preface_left
                    or self._frame_left
                    or self._frame_head
                    or self._in_header_block
                )
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY with the right error code.
            self._abandon_all()
            code = int(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
            reason = f"HTTP/2 protocol error: {in_words(str(exc), 'invalid frame')}"
            self._events.append(BadRequest(status=400, reason=reason))
            self._events.append(ConnectionClosed(abort=True, error_code=code))
            self._pull_control()
            return
        for h2_event in h2_events:
            self._translate(h2_event)
        if self._rejected:
            # Events for a rejected stream can only come in the batch that
            # carried its HEADERS, or while our answer to it is still queued.
            self._rejected.intersection_update(self._outbound)
        if self._resets > RESET_BUDGET + self._completed:
            self.fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too many streams reset")
        elif self._over_control_budget():
            self.fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "too many control frames")
        self._pull_control()

    def _over_control_budget(self) -> bool:
        return self._control_frames > (
            CONTROL_BUDGET
            + CONTROL_PER_STREAM * self._completed
            + self._bytes_sent // CONTROL_BYTES_PER_FRAME
            + CONTROL_PER_DATA_FRAME * self._data_frames_sent
        )

    def _scan_frame_headers(self, data: bytes | bytearray) -> int | None:
        """Read each frame's 9-byte header before h2 buffers the frame.

        Two jobs. h2 checks a frame's length only once the whole frame has
        arrived, so a peer announcing 16 MiB could make us hold 16 MiB first:
        return the announced length of the first frame over our
        SETTINGS_MAX_FRAME_SIZE. And count the frames that carry no request
        data against the control-frame budget here, because h2 answers or
        drops several kinds without an event we would see (PING and SETTINGS
        ACKs, and frames on closed streams, each of which earns an
        RST_STREAM: the CVE-2019-9514 reflection).
        """
        limit = self._h2.max_inbound_frame_size
        size = len(data)
        position = 0
        self._settings_end = None  # (set below for this read only)
        if self._preface_left:
            skipped = min(self._preface_left, size)
            self._preface_left -= skipped
            position = skipped
        if self._frame_left:
            skipped = min(self._frame_left, size - position)
            if self._settings_payload is not None:
                self._settings_payload += data[position : position + skipped]
                if skipped == self._frame_left:
                    self._signal_smallest_table_size(self._settings_payload)
                    self._settings_payload = None
            self._frame_left -= skipped
            position += skipped
        while position < size:
            head = self._frame_head + bytes(data[position : position + 9 - len(self._frame_head)])
            position += 9 - len(self._frame_head) if len(head) == 9 else size - position
            if len(head) < 9:
                self._frame_head = head
                return None
            self._frame_head = b""
            length = int.from_bytes(head[:3], "big")
            if length > limit:
                return length
            frame_type = head[3]
            if frame_type in (FRAME_HEADERS, FRAME_CONTINUATION):
                self._in_header_block = not head[4] & FLAG_END_HEADERS
            elif frame_type == FRAME_DATA:
                stream_id = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
                if (not length and not head[4] & FLAG_END_STREAM) or (
                    stream_id not in self._remote_open
                    and stream_id <= self._h2.highest_inbound_stream_id
                ):
                    self._control_frames += 1  # empty, or for a closed stream
            else:
                self._control_frames += 1
                if frame_type == FRAME_SETTINGS and not head[4] & FLAG_ACK:
                    if not self._settings_seen:
                        self._settings_seen = True
                        if position + length <= size:
                            self._settings_end = position + length
                    if position + length <= size:
                        self._signal_smallest_table_size(data[position : position + length])
                    else:
                        self._settings_payload = bytearray(data[position:])
            skipped = min(length, size - position)
            position += skipped
            self._frame_left = length - skipped
        return None

    def _signal_smallest_table_size(self, payload: bytes | bytearray) -> None:
        """A SETTINGS frame that changes SETTINGS_HEADER_TABLE_SIZE more than once:
        tell our encoder its smallest value first, before h2 reads the frame.

        RFC 9113 §6.5.3 applies a frame's settings in order, and RFC 7541 §4.2
        has the encoder signal the smallest table size between two header
        blocks, then the last. h2 reads a frame's settings into a dict, so it
        sees the last value alone; a client whose decoder shrank its table
        (nghttp -c 0 -c 4096) would find no size update and fail the connection
        with COMPRESSION_ERROR. Called before h2 reads the frame, which then sets
        the last size: the encoder sends both updates. A malformed frame is h2's
        to refuse; only its whole entries are read here.
        """
        sizes = [
            int.from_bytes(payload[entry + 2 : entry + 6], "big")
            for entry in range(0, len(payload) - 5, 6)
            if payload[entry : entry + 2] == b"\x00\x01"  # SETTINGS_HEADER_TABLE_SIZE
        ]
        if len(sizes) > 1 and min(sizes[:-1]) < sizes[-1]:
            self._encoder.header_table_size = min(sizes[:-1])

    def _receive_frames(self, data: bytes | bytearray) -> list[h2.events.Event]:
        """h2's receive_data, except that a plain HEADERS frame opening a stream is ours.

        A new stream's HEADERS is most of what a request costs h2 on the way
        in: a frame object parsed and copied, ``repr(frame)`` for a trace log
        that is off, a dispatch, and the stream set up. Here frame headers are
        read from the bytes directly. A HEADERS frame that may open a stream
        plainly (one complete header block, no padding, an odd stream id) is
        held until it is whole; if it does open a new stream with room under
        MAX_CONCURRENT_STREAMS it is decoded with h2's own decoder and entered
        in h2's books by h2's own stream code (see _open_stream). Every other
        byte goes to h2 as it arrives and in order, so h2 judges everything
        else, at the moment it always has.
        """
        conn = self._h2
        if self._partial_frame:
            data = self._partial_frame + data
            self._partial_frame = b""
        size = len(data)
        view = memoryview(data)
        events: list[h2.events.Event] = []
        position = handed = 0  # bytes before ``handed`` went to h2 or were opened here
        if self._h2_frame_left:  # the rest of a frame h2 already has the start of
            position = min(self._h2_frame_left, size)
            self._h2_frame_left -= position
        in_block = self._h2_in_header_block
        try:
            while size - position >= 9:
                length = int.from_bytes(view[position : position + 3], "big")
                end = position + 9 + length
                frame_type = data[position + 3]
                flags = data[position + 4]
                if frame_type in (FRAME_HEADERS, FRAME_CONTINUATION):
                    if (
                        frame_type == FRAME_HEADERS
                        and not in_block
                        and flags & FLAG_END_HEADERS
                        and not flags & FLAG_PADDED
                        and data[position + 8] & 1  # an odd (client) stream id
                        and length <= _OPENING_FRAME_MAX
                    ):
                        # h2 first takes the frames before this one: whether
                        # it opens a stream plainly depends on what they did.
                        if handed < position:
                            events += conn.receive_data(view[handed:position])
                            handed = position
                        if end > size:
                            break  # held whole here until the rest arrives
                        # (the reserved bit of a stream id is ignored, RFC 9113 §4.1)
                        sid = (
                            int.from_bytes(view[position + 5 : position + 9], "big") & MAX_STREAM_ID
                        )
                        block = self._plain_stream_opening(view, position, end, flags, sid)
                        if block is not None:
                            end_stream = bool(flags & FLAG_END_STREAM)
                            if self._at_stream_limit():
                                self._refuse_stream(sid, block, end_stream)
                            else:
                                events += self._open_stream(sid, block, end_stream)
                            handed = end
                    in_block = not flags & FLAG_END_HEADERS
                if end > size:  # h2 gets this frame's start now, the rest as it comes
                    self._h2_frame_left = end - size
                    position = size
                    break
                position = end
            if handed < position:
                events += conn.receive_data(view[handed:position])
        finally:
            self._h2_in_header_block = in_block
            if position < size:
                self._partial_frame = bytes(view[position:])
            view.release()
        return events

    def _plain_stream_opening(
        self, view: memoryview, start: int, end: int, flags: int, sid: int
    ) -> bytes | None:
        """The header block of stream ``sid``'s HEADERS frame at ``view[start:end]`` if
        it opens the stream plainly (see _receive_frames), else None: h2 handles it."""
        conn = self._h2
        if sid <= conn.highest_inbound_stream_id:
            return None
        block_start = start + 9
        if flags & FLAG_PRIORITY:
            # A priority (exclusive bit and 31-bit dependency, weight) comes
            # first. Ignored, as trioserve ignores all priorities; one that
            # is cut short or makes the stream depend on itself is h2's error.
            block_start += 5
            if block_start > end:
                return None
            depends_on = int.from_bytes(view[start + 9 : start + 13], "big") & MAX_STREAM_ID
            if depends_on == sid:
                return None
        return bytes(view[block_start:end])

    def _at_stream_limit(self) -> bool:
        """As many streams are open as our SETTINGS_MAX_CONCURRENT_STREAMS allows."""
        conn = self._h2
        # h2 counts the open streams by walking all it holds (about 15 µs at
        # 100). Fewer held than the limit means fewer open, so the walk is
        # needed only at the limit; it also drops the closed ones, as
        # _stream_complete does for the streams it closes.
        limit = conn.local_settings.max_concurrent_streams
        return len(conn.streams) >= limit and conn.open_inbound_streams >= limit

    def _refuse_stream(self, sid: int, block: bytes, end_stream: bool) -> None:
        """Refuse a stream over the limit with RST_STREAM(REFUSED_STREAM).

        RFC 9113 §5.1.2 makes it a stream error, PROTOCOL_ERROR or
        REFUSED_STREAM; the second tells the client that nothing was processed,
        so it may retry (a client can open a few too many before our SETTINGS
        reach it). h2 alone would end the whole connection. The stream is
        opened in h2's books, its header block decoded so that the HPACK
        state stays in step with the client's, and reset at once: later frames
        for it get h2's answer for a stream we reset. Its events are dropped.
        Each refusal spends the reset budget, like the other refusals.
        """
        self._open_stream(sid, block, end_stream)
        self._resets += 1
        self._send_reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)

    def _open_stream(self, sid: int, block: bytes, end_stream: bool) -> list[h2.events.Event]:
        """Open stream ``sid`` from its header block: the steps of h2's own HEADERS handling.

        Decoding (h2's error translation around our decoder), the connection
        state machine, a new stream, and the stream's own receive_headers (its
        state machine and events; the content-length is trioserve's, see
        _H2Connection), in h2's order. A protocol error ends the connection
        exactly as in h2's receive_data: GOAWAY queued, then the error raised.
        """
        conn = self._h2
        try:
            headers = h2.connection._decode_headers(conn.decoder, block)
            events = conn.state_machine.process_input(_RECV_HEADERS)
            stream = conn._begin_new_stream(sid, _ODD_STREAM_IDS)
            frames, stream_events = stream.receive_headers(
                headers, end_stream, conn.config.header_encoding
            )
        except h2.exceptions.ProtocolError as exc:
            conn._terminate_connection(exc.error_code)
            raise
        conn._prepare_for_sending(frames)
        return events + stream_events

    def expire_partial_request(self) -> list[Event]:
        """A header block has waited too long for its CONTINUATIONs: end the connection."""
        self.fail(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "header block not completed in time")
        return self.next_events()

    def fail(self, code: int, reason: str) -> None:
        """End the connection at once: GOAWAY(code), every stream abandoned."""
        try:
            name = h2.errors.ErrorCodes(code).name
        except ValueError:
            name = str(code)
        self._events.append(BadRequest(400, f"HTTP/2 protocol error: {reason} (GOAWAY {name})"))
        self._events.append(ConnectionClosed(abort=True, error_code=int(code)))
        self._abandon_all()
        self._send_goaway(self._h2.highest_inbound_stream_id, int(code))

    def next_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _translate(self, event: h2.events.Event) -> None:
        emit = self._events.append
        if isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            data = event.data
            padding = event.flow_controlled_length - len(data)
            if padding:
                self._h2.acknowledge_received_data(padding, sid)
            if sid in self._rejected:
                self._h2.acknowledge_received_data(len(data), sid)
                return
            total = self._body_received.get(sid, 0) + len(data)
            self._body_received[sid] = total
            declared = self._declared_length.get(sid)
            if declared is not None and total > declared:
                self._h2.acknowledge_received_data(len(data), sid)
                self._malformed(
                    sid, "malformed request: body longer than its content-length", started=True
                )
                return
            if self._max_body_size and total > self._max_body_size:
                self._h2.acknowledge_received_data(len(data), sid)
                self._rejected.add(sid)
                emit(BadRequest(413, "request body too large", stream_id=sid))
                return
            if data:
                emit(BodyReceived(sid, data))
        elif isinstance(event, h2.events.RequestReceived):
            self._request_received(event)
        elif isinstance(event, h2.events.TrailersReceived):
            # Trailers are not passed to the app (WSGI has no place for them),
            # but a malformed section still makes the request malformed.
            problem = trailer_problem(event.headers or ())
            if problem is not None and event.stream_id not in self._rejected:
                self._malformed(event.stream_id, f"malformed trailers: {problem}", started=True)
        elif isinstance(event, h2.events.StreamEnded):
            sid = event.stream_id
            body_came = sid in self._remote_open
            self._remote_open.discard(sid)
            received = self._body_received.pop(sid, 0)
            declared = self._declared_length.pop(sid, None)
            if sid in self._rejected:
                self._rejected.discard(sid)
            elif declared is not None and received != declared:
                self._malformed(
                    sid, "malformed request: body shorter than its content-length", started=True
                )
            elif body_came:  # (a request without one was announced with end_stream)
                emit(BodyEnded(sid))
        elif isinstance(event, h2.events.StreamReset):
            # remote_reset False: h2 reset the stream itself for a peer error
            # (MadeYouReset); both kinds spend the reset budget.
            self._resets += 1
            self._rejected.discard(event.stream_id)
            self._forget(event.stream_id)
            emit(StreamReset(event.stream_id, int(event.error_code or 0)))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if self._ready:
                emit(WindowOpened())  # a new initial window may let queued data go
        elif isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == SHUTDOWN_PING and self._shutdown is _SHUTDOWN_PINGING:
                # One round trip after GOAWAY(2^31-1): every stream the client
                # opened before seeing it has reached us. Now name the last one.
                self._shutdown = _SHUTDOWN_FINAL
                self._last_stream_id = self._h2.highest_inbound_stream_id
                self._send_goaway(self._last_stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            # Also with nothing queued: a stream whose response waits on disk
            # (stream.py's spilling) reads its next piece back when told.
            emit(WindowOpened())
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._peer_closed = True
            code = int(event.error_code or 0)
            if code:
                self._abandon_all()
            emit(ConnectionClosed(abort=code != 0, error_code=code))

    def _request_received(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        end_stream = event.stream_ended is not None
        if sid > self._last_stream_id:
            # Opened after our final GOAWAY: not processed, the client may retry it.
            self._rejected.add(sid)
            self._send_reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        try:
            fields = request_fields(event.headers or ())
        except MalformedFields as exc:
            self._malformed(sid, f"malformed request: {exc}")
            return
        method, target, scheme, authority, headers, content_length, expects_continue = fields
        if end_stream and content_length:
            self._malformed(sid, "malformed request: content-length but no body")
            return
        self._outbound[sid] = _Outbound(head_only=method == b"HEAD")
        if not end_stream:
            self._remote_open.add(sid)
            if content_length is not None:
                self._declared_length[sid] = content_length
        if target is None or scheme is None:
            self._reject(sid, 501, "CONNECT is not supported", end_stream)
            return
        if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
            # RFC 9113 §8.3.1: an http(s) :path is an absolute path, or "*" for
            # OPTIONS. The app needs a PATH_INFO.
            self._reject(sid, 400, "invalid :path", end_stream)
            return
        if len(target) > self._max_path_length:
            self._reject(sid, 414, "request target too long", end_stream)
            return
        if len(headers) > self._max_header_count:
            self._reject(sid, 431, "too many header fields", end_stream)
            return
        if self._max_body_size and (content_length or 0) > self._max_body_size:
            self._reject(sid, 413, "request body too large", end_stream)
            return
        self._events.append(
            RequestReceived(
                stream_id=sid,
                method=method,
                target=target,
                headers=headers,
                http_version="2",
                scheme=scheme.decode("ascii", "replace"),
                authority=authority,
                end_stream=end_stream,
                expects_continue=expects_continue and not end_stream,
                content_length=content_length,
            )
        )

    def _malformed(self, sid: int, reason: str, *, started: bool = False) -> None:
        """Reset a stream whose header fields break RFC 9113 §8 (a stream error, §8.1.1).

        ``started``: the request already went to the app (its trailers are
        the malformed part), so the driver is told to cancel it too.
        """
        # Logged, and a request the app never saw is counted as refused; the
        # reset spends the reset budget, as h2's resets for a peer's errors do.
        self._events.append(BadRequest(400, f"{reason} (stream {sid})", answered=not started))
        if started:
            self._events.append(StreamReset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR))
        self._rejected.add(sid)  # whatever the same batch still holds for it is dropped
        self._resets += 1
        self._send_reset(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _reject(self, sid: int, status: int, reason: str, end_stream: bool) -> None:
        """Answer a request ourselves, without the app; its body is discarded."""
        # The stream id is reported in the reason, not as a live stream: there
        # is no RequestReceived for it and so nothing for the driver to cancel.
        self._events.append(BadRequest(status, f"{reason} (stream {sid})", answered=True))
        self._rejected.add(sid)
        self.send_error_response(sid, status)

    # ---- responses in, bytes out ------------------------------------------

    def send_continue(self, stream_id: int) -> None:
        """Send an interim ``100 Continue`` on ``stream_id``."""
        try:
            self._h2.send_headers(stream_id, [(b":status", b"100")])
        except h2.exceptions.StreamClosedError:
            return  # reset meanwhile
        self._pull_control()

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
        """Queue the response HEADERS (sent with END_STREAM if no body follows).

        Raises InvalidResponse, having queued nothing, for a status that is not
        final or a bad content-length (the rules of trioserve.responses).
        ``traits`` is for HTTP/1.1 (a Connection field is dropped here anyway).
        """
        out = self._outbound.get(stream_id)
        if out is None:
            return  # reset meanwhile: send nothing more
        if content_length == UNCHECKED:
            check_status(status)  # HTTP/2 has no reason phrase to check
            declared = declared_length(headers)
        else:
            declared = content_length  # checked by trioserve.wsgi
        fields: Headers = [(b":status", str(status).encode("ascii"))]
        for name, value in headers:
            lowered = name.lower()
            if lowered not in _HOP_BY_HOP:
                fields.append((lowered, value))
        out.headers = fields
        if status in NO_BODY_STATUSES:
            out.head_only = True
        if not out.head_only:
            out.declared = declared
        self._mark_ready(stream_id)

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
        """``send_response``, ``send_body`` for each chunk, then ``end_stream``.

        (Frames are made only when the sender takes them, so there is nothing
        to join here.)
        """
        self.send_response(stream_id, status, headers, reason=reason, content_length=content_length)
        for chunk in body:
            self.send_body(stream_id, chunk)
        self.end_stream(stream_id)

    def send_body(self, stream_id: int, data: bytes) -> None:
        """Queue response body bytes; they go out as flow control allows.

        Raises InvalidResponse, queuing nothing of ``data``, if they would go
        past the declared content-length.
        """
        out = self._outbound.get(stream_id)
        if out is None or out.head_only or not data:
            if out is None and data and stream_id in self._ended_early:
                raise body_too_long(self._ended_early[stream_id])
            return
        counted = out.counted + len(data)
        if out.declared is not None and counted > out.declared:
            raise body_too_long(out.declared)
        out.counted = counted
        out.chunks.append(memoryview(data))
        out.size += len(data)
        self._mark_ready(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Mark the response complete; END_STREAM goes out after the queued data.

        Raises InvalidResponse if the body is shorter than its content-length
        declared: such a response must not end cleanly (the caller resets it).
        """
        out = self._outbound.get(stream_id)
        if out is None:
            self._ended_early.pop(stream_id, None)  # (its END_STREAM has gone out)
            return
        if out.declared is not None and out.counted < out.declared:
            raise body_too_short(out.declared, out.counted)
        out.end = True
        self._mark_ready(stream_id)

    def send_error_response(
        self, stream_id: int, status: int, detail: str = "", *, close: bool = False
    ) -> int:
        """Answer ``stream_id`` with a short plain-text error and end it; the body
        bytes queued (the page's length: a HEAD request's are dropped unsent).

        ``close`` is for HTTP/1.1; here an unfinished request body is stopped
        with RST_STREAM(NO_ERROR) once the response has gone out.
        """
        body = error_body(status, detail)
        self.send_response(
            stream_id,
            status,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        )
        self.send_body(stream_id, body)
        self.end_stream(stream_id)
        return len(body)

    def reset_stream(self, stream_id: int, reason: ResetReason = ResetReason.CANCEL) -> int:
        """Abandon ``stream_id``: drop its queued output and send RST_STREAM.

        Returns how many body bytes were dropped: not framed yet, they never go.
        """
        if reason is ResetReason.REFUSED:
            self._resets += 1  # refusals spend the reset budget too (Rapid Reset)
        out = self._outbound.get(stream_id)
        dropped = 0 if out is None else out.size
        self._send_reset(stream_id, _RESET_CODES[reason])
        self._pull_control()
        return dropped

    def _send_reset(self, stream_id: int, code: int) -> None:
        """Drop ``stream_id``'s queued output and have h2 send RST_STREAM with ``code``."""
        self._forget(stream_id)
        try:
            self._h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            # Already closed on the wire, e.g. h2 reset it for a later frame
            # of the same read (events are handled after the whole read).
            pass

    def stream_send_room(self, stream_id: int) -> int:
        """Window the peer granted ``stream_id`` (and the connection) beyond what is queued."""
        out = self._outbound.get(stream_id)
        if out is None:
            return 0
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError:
            return 0
        return max(0, window - out.size)

    def take_stream_output(self, stream_id: int) -> list[bytes | memoryview]:
        """Take back ``stream_id``'s queued body bytes that are not framed yet.

        They are the app's bytes as it gave them: the caller sends them again
        later with :meth:`send_body`, in order, before anything newer.
        """
        out = self._outbound.get(stream_id)
        if out is None or not out.chunks:
            return []
        taken: list[bytes | memoryview] = list(out.chunks)
        out.chunks.clear()
        out.size = 0
        out.counted -= sum(map(len, taken))  # they are counted again when sent again
        return taken

    def acknowledge_body(self, stream_id: int, size: int) -> None:
        """The app consumed ``size`` body bytes of ``stream_id``: return the credit."""
        if stream_id in self._uncredited:
            free = self._uncredited.pop(stream_id)
            if size < free:
                self._uncredited[stream_id] = free - size
            size = max(0, size - free)
        if size:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                return  # the connection is already closed
            self._pull_control()

    def release_idle(self) -> None:
        pass  # HTTP/2 connections do not doze: h2's state is the connection's

    def start_shutdown(self) -> None:
        """Begin a graceful shutdown: the two-step GOAWAY of RFC 9113 §6.8.

        First GOAWAY(2^31-1) with a PING: the client learns to open no more
        streams, yet nothing it already sent is refused. When the PING comes
        back, GOAWAY(last stream id) follows and streams above it are refused.
        Streams already started run to completion either way.
        """
        if self._shutdown is not _SHUTDOWN_RUNNING or self._peer_closed:
            return
        self._shutdown = _SHUTDOWN_PINGING
        self._send_goaway(MAX_STREAM_ID)
        self._h2.ping(SHUTDOWN_PING)
        self._pull_control()

    def _send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        # Built by hand: h2's close_connection() would close its state machine
        # and refuse to send the in-flight responses a graceful GOAWAY is for.
        self._pull_control()
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        self._queue(frame.serialize())

    def send_failed(self) -> None:
        self._abandon_all()

    def _abandon_all(self) -> None:
        """The connection is gone: no queued response can be sent any more."""
        self._peer_closed = True
        self._outbound.clear()
        self._ready.clear()
        self._remote_open.clear()

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """Frame queued response data as windows allow; all pending bytes, in
        order, as pieces for one gathering write (DATA payloads are not copied)."""
        if self._ready:
            self._frame_ready_streams()
        if not self._control:
            data = self._h2.data_to_send()
            return [data] if data else []
        self._pull_control()
        parts = self._control
        self._control = []
        self._control_size = 0
        return parts

    def data_to_send(self) -> bytes:
        """:meth:`buffers_to_send` joined into one piece."""
        if not self._ready and not self._control:
            return self._h2.data_to_send()  # no list made for h2's own bytes
        parts = self.buffers_to_send()
        return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)

    # ---- internals ---------------------------------------------------------

    def _mark_ready(self, stream_id: int) -> None:
        self._ready[stream_id] = None

    def _forget(self, stream_id: int) -> None:
        self._outbound.pop(stream_id, None)
        self._ended_early.pop(stream_id, None)
        self._ready.pop(stream_id, None)
        self._remote_open.discard(stream_id)
        self._body_received.pop(stream_id, None)
        self._declared_length.pop(stream_id, None)

    def _pull_control(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._queue(data)

    def _queue(self, data: bytes | memoryview) -> None:
        self._control.append(data)
        self._control_size += len(data)

    def _frame_ready_streams(self) -> None:
        """Round-robin: one frame per ready stream per round, within windows and budget."""
        self._pull_control()  # what h2 framed so far goes before the DATA framed here
        budget = MAX_BATCH
        max_frame = self._h2.max_outbound_frame_size
        while self._ready and budget > 0:
            progressed = False
            for sid in list(self._ready):
                out = self._outbound.get(sid)
                if out is None:
                    continue
                try:
                    budget, moved = self._frame_one(sid, out, budget, max_frame)
                except h2.exceptions.StreamClosedError:
                    self._forget(sid)  # closed underneath us (e.g. by h2 itself)
                    continue
                if moved:
                    progressed = True
                    if sid in self._ready:  # rotate: the next batch starts after it
                        del self._ready[sid]
                        self._ready[sid] = None
                if budget <= 0:
                    break
            if not progressed:
                break

    def _frame_one(self, sid: int, out: _Outbound, budget: int, max_frame: int) -> tuple[int, bool]:
        """Frame at most one HEADERS or DATA frame for ``sid``; return (budget left, progressed)."""
        conn = self._h2
        if out.headers is not None:
            finished = not out.size and self._body_complete(sid, out)
            self._send_headers_frame(sid, out.headers, finished)
            out.headers = None
            if finished:
                self._stream_complete(sid, out)
            return budget, True
        if out.size:
            window = conn.local_flow_control_window(sid)
            if window <= 0:
                return budget, False  # stays ready; a WindowOpened event brings us back
            chunk = out.chunks[0]
            n = min(window, max_frame, len(chunk), budget)
            if n == len(chunk):
                out.chunks.popleft()
            else:
                out.chunks[0] = chunk[n:]
            out.size -= n
            self._bytes_sent += n
            self._data_frames_sent += 1
            finished = not out.size and self._body_complete(sid, out)
            self._send_data_frame(sid, chunk[:n], finished)
            if finished:
                self._stream_complete(sid, out)
            elif not out.size:
                del self._ready[sid]
            return budget - n, True
        if out.end:
            self._send_data_frame(sid, _EMPTY, True)
            self._stream_complete(sid, out)
            return budget, True
        del self._ready[sid]
        return budget, False

    def _plainly_open(self, sid: int) -> h2.stream.H2Stream | None:
        """``sid``'s h2 stream if both it and the connection are plainly open, else None."""
        conn = self._h2
        stream = conn.streams.get(sid)
        if (
            stream is None
            or stream.state_machine.state not in _SENDING_STATES
            or conn.state_machine.state not in _OPEN_CONNECTION_STATES
        ):
            return None
        return stream

    def _send_headers_frame(self, sid: int, fields: Headers, end_stream: bool) -> None:
        """Frame a response's HEADERS (and CONTINUATIONs) ourselves; h2 keeps its books.

        h2's send_headers costs about three times the HPACK encoding it wraps
        (a frame object per frame, header-validation generators set up even
        when validation is off, two state machines). For the final response
        on a plainly open stream we make the same two state-machine moves h2
        would, encode with the encoder h2 itself uses (its dynamic table must
        stay the one the peer's decoder mirrors; it replays a repeated head,
        see :mod:`trioserve.hpack_memo`), and write the frame headers here.
        Anything else (trailers, a stream or connection not plainly open) goes
        through h2, which raises what it should.
        """
        conn = self._h2
        stream = self._plainly_open(sid)
        if stream is None or stream.state_machine.headers_sent:
            conn.send_headers(sid, fields, end_stream=end_stream)
            self._pull_control()
            return
        machine = stream.state_machine
        machine.process_input(_SEND_HEADERS)
        block = self._encoder.encode_fields(fields)
        flags = FLAG_END_STREAM if end_stream else 0
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
        # What h2 records from the block it sends (a response has no :method).
        stream.request_method = None
        max_frame = conn.max_outbound_frame_size
        size = len(block)
        if size <= max_frame:
            self._queue(
                _FRAME_HEADER.pack(
                    size >> 8, size & 0xFF, FRAME_HEADERS, flags | FLAG_END_HEADERS, sid
                )
                + block
            )
            return
        # Too big for one frame: HEADERS, then CONTINUATIONs, END_HEADERS on the last.
        view = memoryview(block)
        kind = FRAME_HEADERS
        for start in range(0, size, max_frame):
            piece = view[start : start + max_frame]
            last = start + max_frame >= size
            length = len(piece)
            frame_flags = flags | (FLAG_END_HEADERS if last else 0)
            self._queue(_FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, frame_flags, sid))
            self._queue(piece)  # joined with the rest in data_to_send: no copy here
            kind, flags = FRAME_CONTINUATION, 0

    def _send_data_frame(self, sid: int, data: memoryview, end_stream: bool = False) -> None:
        """Frame a DATA frame ourselves; h2 keeps the flow-control books.

        h2's send_data costs about 12 µs a frame (two state machines, a frame
        object, three copies): most of the CPU of a large HTTP/2 download. A
        DATA frame changes no state in either machine but the two send
        windows, and END_STREAM one stream state: we write its 9-byte header
        here, debit the windows and move the stream's state exactly as h2
        would. Anything unusual (a stream or connection that is not plainly
        open) goes through h2, which raises what it should.
        """
        conn = self._h2
        stream = self._plainly_open(sid)
        if stream is None:
            conn.send_data(sid, data, end_stream=end_stream)
            self._pull_control()
            return
        size = len(data)
        if end_stream:
            stream.state_machine.process_input(_SEND_END_STREAM)
            header = _FRAME_HEADER.pack(size >> 8, size & 0xFF, FRAME_DATA, FLAG_END_STREAM, sid)
        else:
            header = _FRAME_HEADER.pack(size >> 8, size & 0xFF, FRAME_DATA, 0, sid)
        self._queue(header)
        if size:
            self._queue(data)
            conn.outbound_flow_control_window -= size
            stream.outbound_flow_control_window -= size

    def _body_complete(self, stream_id: int, out: _Outbound) -> bool:
        """May END_STREAM go on the frame that empties ``out``?

        Yes once the app has ended the response; and as soon as all of its
        declared content-length is queued, if the request has ended too: no
        byte may follow, so a streamed (iterator) response needs no empty
        DATA frame of its own once the app returns. Not while the request body
        is still coming: ending the response would stop the upload
        (RST_STREAM) under an app that may still read it.
        """
        return out.end or (out.counted == out.declared and stream_id not in self._remote_open)

    def _stream_complete(self, stream_id: int, out: _Outbound) -> None:
        """END_STREAM is framed; if the request body is still coming, stop it (RFC 9113 §8.1)."""
        self._completed += 1
        remote_open = stream_id in self._remote_open
        self._forget(stream_id)
        if not out.end and out.declared is not None:
            self._ended_early[stream_id] = out.declared
        conn = self._h2
        if remote_open:
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        # The stream is closed now: take it out of h2's books the way h2's
        # own count of open streams does (remembering who closed it, for the
        # frames that may still come), so that its books hold about the open
        # streams only and _plain_stream_opening need not count them.
        stream = conn.streams.get(stream_id)
        if stream is not None and stream.closed:
            del conn.streams[stream_id]
            conn._closed_streams[stream_id] = stream.closed_by


def keep_open_after_goaway(conn: h2.connection.H2Connection) -> None:
    """Let a received GOAWAY close the connection only when trioserve says so.

    RFC 9113 §6.8: after a GOAWAY, streams up to its last stream id may still
    complete; the peer keeps sending WINDOW_UPDATE, DATA and PING for them.
    h2 instead closes its connection state machine on any GOAWAY, after which
    every frame, sent or received, is a protocol error (python-hyper/h2#1181,
    open). This connection's transition table keeps the state on a received
    GOAWAY; ``HTTP2Connection.closing`` then stops new work and the driver
    closes once the streams in flight are done. (h2 still drops frames it had
    queued but not yet handed out when the GOAWAY arrived: at most an ACK.)
    trioserve.testing's client uses it too, as real clients behave this way.
    """
    machine = conn.state_machine
    transitions = dict(machine._transitions)
    states = h2.connection.ConnectionState
    for state in (states.IDLE, states.SERVER_OPEN, states.CLIENT_OPEN):
        transitions[(state, h2.connection.ConnectionInputs.RECV_GOAWAY)] = (None, state)
    machine._transitions = transitions
