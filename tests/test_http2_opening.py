"""Streams opened by trioserve.http2 itself (``_receive_frames``), with h2 as the reference.

Once the handshake is over, a HEADERS frame that plainly opens a stream is cut
from the bytes and entered in h2's books by trioserve, not parsed by h2. Every
other frame still goes to h2, whole and in order. The reference here is the
same connection with every frame left to h2 (:class:`AllToH2`): for any bytes,
split across reads anywhere, both must report the same events and send the
same bytes back.
"""

from __future__ import annotations

import collections
import itertools

import h2.errors
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_http2 import GET, POST, connect, pump, raw_frame, request, respond
from trioserve.events import ConnectionClosed, Event, RequestReceived
from trioserve.http2 import HTTP2Connection

HEADERS, PRIORITY_FRAME, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x1, 0x2, 0x3, 0x4, 0x6, 0x9
DATA = 0x0
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20

CLIENT_HANDSHAKE = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    + raw_frame(SETTINGS, 0, 0, b"")
    + raw_frame(SETTINGS, 0x1, 0, b"")  # ACK of the server's SETTINGS
)


class AllToH2(HTTP2Connection):
    """The reference: every frame is parsed and handled by h2 itself, with one
    change of trioserve's: a stream over MAX_CONCURRENT_STREAMS whose HEADERS
    frame is plain (not padded, not continued, not depending on itself, an odd
    new stream id) is opened by h2 with the limit lifted for it and then reset
    with REFUSED_STREAM, its events dropped, where h2 alone would end the
    connection. Any other HEADERS frame over the limit stays h2's connection
    error."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        conn = self._h2
        # HEADERS frames h2 merged with CONTINUATIONs, by id. The frames are kept
        # too: a freed frame's id can come back as a later frame's.
        continued: dict[int, Frame] = {}
        merge = conn.incoming_buffer._update_header_buffer

        def merging(frame: Frame | None) -> Frame | None:
            out = merge(frame)
            if isinstance(frame, ContinuationFrame) and out is not None:
                continued[id(out)] = out
            return out

        conn.incoming_buffer._update_header_buffer = merging  # type: ignore[method-assign]
        receive_headers = conn._receive_headers_frame
        limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS

        def refusing(frame: HeadersFrame):  # type: ignore[no-untyped-def]
            try:
                return receive_headers(frame)
            except h2.exceptions.TooManyStreamsError:
                plain = (
                    "PADDED" not in frame.flags
                    and continued.get(id(frame)) is not frame
                    and not ("PRIORITY" in frame.flags and frame.depends_on == frame.stream_id)
                    and frame.stream_id % 2
                    and frame.stream_id > conn.highest_inbound_stream_id
                )
                if not plain:
                    raise
            settings = conn.local_settings._settings
            kept = settings[limit]
            settings[limit] = collections.deque([2**31 - 1])
            try:
                frames, events = receive_headers(frame)
            finally:
                settings[limit] = kept
            self._resets += 1
            conn.reset_stream(frame.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]

        conn._frame_dispatch_table[HeadersFrame] = refusing

    def _receive_frames(self, data: bytes | bytearray) -> list:  # type: ignore[type-arg]
        return self._h2.receive_data(data)


def started(server: HTTP2Connection) -> HTTP2Connection:
    server.initiate()
    server.receive_data(CLIENT_HANDSHAKE)
    server.next_events()
    server.data_to_send()
    return server


def feed(
    server: HTTP2Connection, data: bytes, cuts: list[int], answer: bool = True
) -> list[tuple[list[Event], bytes]]:
    """Feed ``data`` in pieces cut at ``cuts`` and return what each read gave.

    ``answer``: each request is answered at once (its stream closes); otherwise
    streams stay open, so MAX_CONCURRENT_STREAMS comes into play.
    """
    seen = []
    points = [0, *sorted(set(cut % (len(data) + 1) for cut in cuts)), len(data)]
    for start, end in itertools.pairwise(points):
        if start == end:
            continue
        server.receive_data(data[start:end])
        events = server.next_events()
        for event in events:
            if answer and isinstance(event, RequestReceived):
                respond(server, event.stream_id, b"hi", [(b"content-length", b"2")])
        seen.append((events, server.data_to_send()))
        if any(isinstance(event, ConnectionClosed) for event in events):
            break
    return seen


# A header block as a client would encode it: indexed and literal fields, some
# entering the dynamic table (so blocks decode only in order).
_encoder = hpack.Encoder()
BLOCKS = [
    _encoder.encode(GET),
    _encoder.encode(GET),  # now mostly indexed
    _encoder.encode([*GET[:3], (b":path", b"/other"), (b"cookie", b"a=1")]),
    hpack.Encoder().encode(POST),
    hpack.Encoder().encode([(b":method", b"GET")]),  # malformed: pseudo-headers missing
    hpack.Encoder().encode([(b":path", b"/"), *GET]),  # malformed: repeated :path
    b"\xff\xff\xff\xff",  # HPACK garbage: a compression error
    b"",
]


@st.composite
def frame_sequences(draw: st.DrawFn) -> bytes:
    frames = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(
            st.sampled_from(["headers"] * 6 + ["continuation", "data", "rst", "priority", "ping"])
        )
        # (1 | 2**31: stream 1 with the reserved bit set, which must be ignored)
        sid = draw(st.sampled_from([1, 3, 5, 7, 9, 2, 0, 11, 101, 1 | 2**31]))
        if kind == "headers":
            flags = draw(st.sampled_from([END_HEADERS, END_HEADERS | END_STREAM]))
            flags |= draw(st.sampled_from([0, 0, PADDED, PRIORITY]))
            block = draw(st.sampled_from(BLOCKS))
            if draw(st.booleans()) and len(block) > 1:  # a block split over CONTINUATION
                flags &= ~END_HEADERS
                frames.append(raw_frame(HEADERS, flags & ~PADDED, sid, block[:1]))
                frames.append(raw_frame(CONTINUATION, END_HEADERS, sid, block[1:]))
                continue
            payload = block
            if flags & PRIORITY:
                depends_on = draw(st.sampled_from([0, sid, 1]))
                payload = depends_on.to_bytes(4, "big") + b"\x10" + payload
                if draw(st.integers(0, 9)) == 0:
                    payload = payload[:3]  # too short for its priority
            if flags & PADDED:
                payload = b"\x02" + payload + b"\x00\x00"
            frames.append(raw_frame(HEADERS, flags, sid, payload))
        elif kind == "continuation":
            frames.append(raw_frame(CONTINUATION, END_HEADERS, sid, BLOCKS[0]))
        elif kind == "data":
            frames.append(raw_frame(DATA, draw(st.sampled_from([0, END_STREAM])), sid, b"body"))
        elif kind == "rst":
            frames.append(raw_frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big")))
        elif kind == "priority":
            frames.append(raw_frame(PRIORITY_FRAME, 0, sid, b"\x00\x00\x00\x01\x10"))
        else:
            frames.append(raw_frame(PING, 0, 0, b"12345678"))
    return b"".join(frames)


@settings(max_examples=800, deadline=None)
@given(
    frame_sequences(),
    st.lists(st.integers(0, 10_000), max_size=4),
    st.sampled_from([1, 2, 100]),
    st.booleans(),
)
def test_same_events_and_bytes_as_h2(
    data: bytes, cuts: list[int], streams: int, answer: bool
) -> None:
    """Valid, malformed and hostile frames alike, cut across reads anywhere: the
    events and every byte sent back are h2's own (GOAWAY codes, RST_STREAMs,
    compression errors), and refusals over MAX_CONCURRENT_STREAMS the reference's."""
    ours = started(HTTP2Connection(max_concurrent_streams=streams))
    reference = started(AllToH2(max_concurrent_streams=streams))
    assert feed(ours, data, cuts, answer) == feed(reference, data, cuts, answer)


@settings(max_examples=400, deadline=None)
@given(
    frame_sequences(),
    st.lists(st.integers(0, 10_000), max_size=4),
    st.sampled_from([1, 2, 100]),
)
def test_same_events_and_bytes_as_h2_from_the_preface_on(
    data: bytes, cuts: list[int], streams: int
) -> None:
    """The client's preface and SETTINGS in the same reads as its first frames (a
    client's first flight), cut anywhere: h2 takes the preface and SETTINGS, and the
    frames after them go the short way from the same read on."""
    ours = HTTP2Connection(max_concurrent_streams=streams)
    reference = AllToH2(max_concurrent_streams=streams)
    for server in (ours, reference):
        server.initiate()
        server.data_to_send()
    first_flight = CLIENT_HANDSHAKE + data
    assert feed(ours, first_flight, cuts, False) == feed(reference, first_flight, cuts, False)


# ---- which frames take the short way ------------------------------------------------


@pytest.fixture
def h2_headers_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stream ids of the HEADERS frames h2 itself handled."""
    calls: list[int] = []
    import h2.connection

    original = h2.connection.H2Connection._receive_headers_frame

    def counting(self: h2.connection.H2Connection, frame):  # type: ignore[no-untyped-def]
        calls.append(frame.stream_id)
        return original(self, frame)

    monkeypatch.setattr(h2.connection.H2Connection, "_receive_headers_frame", counting)
    # h2 looks its handlers up in a table built per connection: connect() after this.
    return calls


def test_plain_requests_are_opened_here(h2_headers_calls: list[int]) -> None:
    client, server = connect()
    for sid in (1, 3, 5):
        request(client, sid)
    request(client, 7, POST, b"body")
    client_events, server_events = pump(client, server)
    assert [e.stream_id for e in server_events if isinstance(e, RequestReceived)] == [1, 3, 5, 7]
    assert h2_headers_calls == []
    for sid in (1, 3, 5, 7):
        respond(server, sid, b"ok")
    client_events, _ = pump(client, server)
    assert sum(1 for e in client_events if type(e).__name__ == "StreamEnded") == 4


UNUSUAL = {
    "padded": raw_frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, b"\x01" + BLOCKS[3] + b"\0"),
    "depends-on-itself": raw_frame(
        HEADERS,
        END_HEADERS | END_STREAM | PRIORITY,
        1,
        (1).to_bytes(4, "big") + b"\x10" + BLOCKS[3],
    ),
    "continued": raw_frame(HEADERS, END_STREAM, 1, BLOCKS[3][:1])
    + raw_frame(CONTINUATION, END_HEADERS, 1, BLOCKS[3][1:]),
    "even-stream-id": raw_frame(HEADERS, END_HEADERS | END_STREAM, 2, BLOCKS[3]),
}


@pytest.mark.parametrize("name", UNUSUAL)
def test_anything_unusual_is_left_to_h2(name: str, h2_headers_calls: list[int]) -> None:
    server = started(HTTP2Connection())
    server.receive_data(UNUSUAL[name])
    server.next_events()
    assert h2_headers_calls == [UNUSUAL[name][8]]


def test_a_priority_cut_short_is_h2s_error() -> None:
    server = started(HTTP2Connection())
    server.receive_data(raw_frame(HEADERS, END_HEADERS | PRIORITY, 1, b"\x00\x00"))
    events = server.next_events()
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].error_code == 6  # FRAME_SIZE_ERROR, as h2 says


def test_the_reserved_bit_of_a_stream_id_is_ignored(h2_headers_calls: list[int]) -> None:
    server = started(HTTP2Connection())
    block = hpack.Encoder().encode(GET)
    server.receive_data(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1 | 2**31, block))
    events = server.next_events()
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1]
    assert h2_headers_calls == []


def test_a_reused_stream_id_is_left_to_h2(h2_headers_calls: list[int]) -> None:
    server = started(HTTP2Connection())
    block = hpack.Encoder().encode(POST)
    server.receive_data(raw_frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    assert h2_headers_calls == []
    server.receive_data(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    events = server.next_events()
    assert h2_headers_calls == [1]
    assert isinstance(events[-1], ConnectionClosed)  # h2: a lower id is a connection error


def test_over_max_concurrent_streams_is_refused_here(h2_headers_calls: list[int]) -> None:
    server = started(HTTP2Connection(max_concurrent_streams=2))
    encoder = hpack.Encoder()
    server.receive_data(
        b"".join(raw_frame(HEADERS, END_HEADERS, sid, encoder.encode(POST)) for sid in (1, 3))
    )
    events = server.next_events()
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1, 3]
    server.receive_data(raw_frame(HEADERS, END_HEADERS, 5, encoder.encode(POST)))
    events = server.next_events()
    assert h2_headers_calls == []  # refused without h2's HEADERS handling
    assert events == []
    assert server.data_to_send() == raw_frame(RST_STREAM, 0, 5, (7).to_bytes(4, "big"))


def test_over_max_concurrent_streams_unusual_is_left_to_h2(h2_headers_calls: list[int]) -> None:
    server = started(HTTP2Connection(max_concurrent_streams=1))
    server.receive_data(raw_frame(HEADERS, END_HEADERS, 1, BLOCKS[3]))
    server.next_events()
    padded = b"\x01" + BLOCKS[3] + b"\0"
    server.receive_data(raw_frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 3, padded))
    events = server.next_events()
    assert h2_headers_calls == [3]  # and h2 ends the connection, as it always has
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].error_code == 1  # PROTOCOL_ERROR


def test_frames_split_at_every_byte_give_the_same_requests() -> None:
    encoder = hpack.Encoder()
    data = (
        b"".join(
            raw_frame(HEADERS, END_HEADERS | END_STREAM, sid, encoder.encode(GET)) for sid in (1, 3)
        )
        + raw_frame(HEADERS, END_HEADERS, 5, encoder.encode(POST))
        + raw_frame(DATA, END_STREAM, 5, b"body")
    )
    server = started(HTTP2Connection())
    server.receive_data(data)
    whole = server.next_events()
    assert len(whole) == 5  # three requests, one body, one end (the GETs said end_stream)
    for cut in range(1, len(data)):
        server = started(HTTP2Connection())
        server.receive_data(data[:cut])
        events = server.next_events()
        server.receive_data(data[cut:])
        assert events + server.next_events() == whole, cut


def test_h2_forgets_streams_opened_here() -> None:
    """h2 drops closed streams when it counts open ones; streams opened here are counted
    and dropped too, so its books stay as small as the streams in flight."""
    client, server = connect(max_concurrent_streams=10)
    for round_start in range(1, 2000, 20):
        for sid in range(round_start, round_start + 20, 2):
            request(client, sid)
        _, events = pump(client, server)
        for event in events:
            if isinstance(event, RequestReceived):
                respond(server, event.stream_id, b"ok")
        pump(client, server)
    assert len(server._h2.streams) <= 10
