"""Sans-IO tests for :class:`trioserve.http2.HTTP2Connection` against a real h2 client.

The client is ``h2.connection.H2Connection`` in client mode with
``header_encoding=None``; :func:`pump` moves bytes both ways until neither side
has anything more to say and returns what each side saw. Server-side
assertions compare trioserve's event dataclasses exactly; client-side
ones compare a tuple summary of h2's events (:func:`summary`), or the raw
frames parsed with hyperframe (:func:`frames`) when the wire order or the
frame sizes are the point. No trio, no mocks, no sockets.
"""

from __future__ import annotations

import collections

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from trioserve.events import (
    BadRequest,
    BodyEnded,
    BodyReceived,
    ConnectionClosed,
    InvalidResponse,
    RequestReceived,
    ResetReason,
    StreamReset,
    WindowOpened,
)
from trioserve.http2 import (
    CONTROL_BUDGET,
    MAX_BATCH,
    MAX_WINDOW,
    PREFACE,
    RESET_BUDGET,
    HTTP2Connection,
)
from trioserve.responses import error_body

Codes = h2.settings.SettingCodes
Errors = h2.errors.ErrorCodes

GET = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/"),
]
POST = [(b":method", b"POST"), *GET[1:]]

# ---- helpers -------------------------------------------------------------------


def h2_client(**config: bool) -> h2.connection.H2Connection:
    return h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding=None, **config)
    )


def client_receive(client: h2.connection.H2Connection, data: bytes) -> list[h2.events.Event]:
    """Feed server bytes to the h2 client peer the way curl and nghttp behave.

    h2 closes its state machine on any GOAWAY, while real clients keep
    serving the streams a graceful GOAWAY lets finish (RFC 9113 §6.8) and
    answer PINGs. So frames go in one at a time and a clean GOAWAY reopens
    the client's state machine.
    """
    events: list[h2.events.Event] = []
    view = memoryview(data)
    while view:
        length = int.from_bytes(view[:3], "big") + 9
        frame_events = client.receive_data(bytes(view[:length]))
        view = view[length:]
        events += frame_events
        for event in frame_events:
            if isinstance(event, h2.events.ConnectionTerminated) and event.error_code == 0:
                client.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
    return events


def pump(
    client: h2.connection.H2Connection, server: HTTP2Connection
) -> tuple[list[h2.events.Event], list[object]]:
    """Move bytes both ways until both sides are quiet; return (client events, server events)."""
    client_events: list[h2.events.Event] = []
    server_events: list[object] = []
    while True:
        moved = False
        data = client.data_to_send()
        if data:
            server.receive_data(data)
            moved = True
        server_events += server.next_events()
        data = server.data_to_send()
        if data:
            client_events += client_receive(client, data)
            moved = True
        if not moved:
            return client_events, server_events


def connect(
    *,
    client: h2.connection.H2Connection | None = None,
    client_settings: dict[int, int] | None = None,
    client_window: int = 0,
    **server_kwargs: int,
) -> tuple[h2.connection.H2Connection, HTTP2Connection]:
    """A client and a server past the preface and both SETTINGS exchanges."""
    server = HTTP2Connection(**server_kwargs)
    server.initiate()
    client = client or h2_client()
    client.initiate_connection()
    if client_settings:
        client.update_settings(client_settings)
    if client_window:
        client.increment_flow_control_window(client_window)
    pump(client, server)
    return client, server


def request(
    client: h2.connection.H2Connection,
    stream_id: int,
    headers: list[tuple[bytes, bytes]] = GET,
    body: bytes | None = None,
    *,
    end: bool = True,
) -> None:
    """Queue a request on the client (HEADERS, then DATA if ``body`` is given)."""
    client.send_headers(stream_id, headers, end_stream=end and body is None)
    if body is not None:
        client.send_data(stream_id, body, end_stream=end)


def summary(events: list[h2.events.Event]) -> list[tuple[object, ...]]:
    """h2 client events as plain tuples, for exact comparison."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, h2.events.ResponseReceived):
            out.append(("response", e.stream_id, e.headers, e.stream_ended is not None))
        elif isinstance(e, h2.events.InformationalResponseReceived):
            out.append(("info", e.stream_id, e.headers))
        elif isinstance(e, h2.events.DataReceived):
            out.append(("data", e.stream_id, e.data))
        elif isinstance(e, h2.events.StreamEnded):
            out.append(("end", e.stream_id))
        elif isinstance(e, h2.events.StreamReset):
            out.append(("reset", e.stream_id, int(e.error_code)))
        elif isinstance(e, h2.events.WindowUpdated):
            out.append(("window", e.stream_id, e.delta))
        elif isinstance(e, h2.events.ConnectionTerminated):
            out.append(("goaway", int(e.error_code), e.last_stream_id))
        elif isinstance(e, h2.events.RemoteSettingsChanged):
            out.append(("settings",))
        elif isinstance(e, h2.events.SettingsAcknowledged):
            out.append(("settings-ack",))
        else:  # pragma: no cover - a test would need updating
            out.append((type(e).__name__,))
    return out


def data_frames(events: list[h2.events.Event]) -> list[tuple[int, int]]:
    """(stream id, length) of each DATA frame the client received, in order."""
    return [
        (e.stream_id, e.flow_controlled_length)
        for e in events
        if isinstance(e, h2.events.DataReceived)
    ]


def sent_ends(server: HTTP2Connection) -> list[tuple[type[Frame], bool]]:
    """The frames the server has to send now, each as (type, END_STREAM set)."""
    return [(type(f), "END_STREAM" in f.flags) for f in frames(server.data_to_send())]


def frames(data: bytes) -> list[Frame]:
    """Split raw server output into hyperframe frames."""
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame written by hand, for things the h2 client refuses to send."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes([frame_type, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def respond(
    server: HTTP2Connection,
    stream_id: int,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    status: int = 200,
) -> None:
    server.send_response(stream_id, status, headers or [])
    server.send_body(stream_id, body)
    server.end_stream(stream_id)


# ---- starting up --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("streams", "window", "frame", "header_list", "connection_window"),
    [
        (100, 256 * 1024, 16384, 64 * 1024, 100 * 256 * 1024),
        (8, 2**20, 32768, 4096, 8 * 2**20),
        (4, 2**30, 16384, 1024, MAX_WINDOW),  # 4 GiB capped to 2**31-1
        (2, 1024, 16384, 1024, None),  # 2 KiB < 65535: the default window stays
    ],
    ids=["defaults", "custom", "capped", "below-default"],
)
def test_initiate_sends_settings_and_opens_the_connection_window(
    streams: int, window: int, frame: int, header_list: int, connection_window: int | None
) -> None:
    server = HTTP2Connection(
        max_concurrent_streams=streams,
        initial_window_size=window,
        max_frame_size=frame,
        max_header_list_size=header_list,
    )
    server.initiate()
    sent = frames(server.data_to_send())
    settings = sent[0]
    assert isinstance(settings, SettingsFrame)
    assert "ACK" not in settings.flags
    announced_window = window
    if window < 65535:
        # A window below the default must not apply before the client's ACK
        # (RFC 9113 §6.9.2): the first SETTINGS keeps the default and a second
        # one, which h2 applies on ACK, lowers it.
        later = sent.pop(1)
        assert isinstance(later, SettingsFrame)
        assert later.settings == {Codes.INITIAL_WINDOW_SIZE: window}
        announced_window = 65535
    assert {
        code: settings.settings[code]
        for code in (
            Codes.MAX_CONCURRENT_STREAMS,
            Codes.INITIAL_WINDOW_SIZE,
            Codes.MAX_FRAME_SIZE,
            Codes.MAX_HEADER_LIST_SIZE,
            Codes.ENABLE_PUSH,
        )
    } == {
        Codes.MAX_CONCURRENT_STREAMS: streams,
        Codes.INITIAL_WINDOW_SIZE: announced_window,
        Codes.MAX_FRAME_SIZE: frame,
        Codes.MAX_HEADER_LIST_SIZE: header_list,
        Codes.ENABLE_PUSH: 0,
    }
    updates = [(f.stream_id, f.window_increment) for f in sent[1:]]
    if connection_window is None:
        assert updates == []
    else:
        assert updates == [(0, connection_window - 65535)]
    assert server.data_to_send() == b""

    # And a real client agrees.
    client = h2_client()
    client.initiate_connection()
    client.receive_data(
        b"".join(
            f.serialize() for f in [*sent[:1], *([later] if window < 65535 else []), *sent[1:]]
        )
    )
    assert client.outbound_flow_control_window == (connection_window or 65535)
    assert client.remote_settings.initial_window_size == window
    assert client.remote_settings.max_concurrent_streams == streams
    assert not server.closing


def test_handshake_with_a_client() -> None:
    server = HTTP2Connection()
    server.initiate()
    client = h2_client()
    client.initiate_connection()
    client_events, server_events = pump(client, server)
    assert summary(client_events) == [
        ("settings",),
        ("window", 0, 100 * 256 * 1024 - 65535),
        ("settings-ack",),
    ]
    assert server_events == []
    assert server.output_size == 0


# ---- requests --------------------------------------------------------------------------


def test_get_request() -> None:
    client, server = connect()
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"example.com:8443"),
        (b":path", b"/a/b?c=d"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
    ]
    request(client, 1, headers)
    client_events, server_events = pump(client, server)
    assert server_events == [
        RequestReceived(
            stream_id=1,
            method=b"GET",
            target=b"/a/b?c=d",
            # Cookie crumbs are joined into one field (RFC 9113 §8.2.3).
            headers=[(b"accept", b"*/*"), (b"cookie", b"a=1; b=2")],
            http_version="2",
            scheme="https",
            authority=b"example.com:8443",
            end_stream=True,
            expects_continue=False,
            content_length=None,
        ),
    ]
    assert client_events == []


def test_post_with_body() -> None:
    client, server = connect()
    request(client, 1, [*POST, (b"content-length", b"11")], b"hello world")
    _, server_events = pump(client, server)
    assert server_events == [
        RequestReceived(
            stream_id=1,
            method=b"POST",
            target=b"/",
            headers=[(b"content-length", b"11")],
            http_version="2",
            scheme="https",
            authority=b"example.com",
            end_stream=False,
            content_length=11,
        ),
        BodyReceived(1, b"hello world"),
        BodyEnded(1),
    ]


def test_body_credit_is_returned_only_when_acknowledged() -> None:
    # Stream window 16 KiB; connection window 4 * 16 KiB = 65536.
    client, server = connect(initial_window_size=16384, max_concurrent_streams=4)
    request(client, 1, POST, b"x" * 16384, end=False)
    client_events, server_events = pump(client, server)
    assert server_events[1:] == [BodyReceived(1, b"x" * 16384)]
    assert client_events == []  # no WINDOW_UPDATE: the app has not read it
    assert server.data_to_send() == b""
    assert client.local_flow_control_window(1) == 0

    server.acknowledge_body(1, 16384)
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, f.window_increment) for f in sent] == [
        (WindowUpdateFrame, 1, 16384)
    ]
    client.receive_data(b"".join(f.serialize() for f in sent))
    assert client.local_flow_control_window(1) == 16384


def test_padding_is_credited_at_once() -> None:
    client, server = connect(initial_window_size=512, max_concurrent_streams=4)
    request(client, 1, POST, end=False)
    client.send_data(1, b"x", pad_length=255)  # 257 flow-controlled bytes, 256 of them padding
    server.receive_data(client.data_to_send())
    assert server.next_events()[1:] == [BodyReceived(1, b"x")]
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, f.window_increment) for f in sent] == [
        (WindowUpdateFrame, 1, 256)
    ]


def test_body_sent_before_our_settings_arrive_is_accepted() -> None:
    # RFC 9113 §6.9.2: streams start with a 65535-byte window until the client
    # has seen SETTINGS_INITIAL_WINDOW_SIZE; clients may send right after the
    # preface (§3.4). The RFC's own example: 60 KB sent, then a 16 KB setting.
    server = HTTP2Connection(initial_window_size=16384, max_concurrent_streams=4)
    server.initiate()
    client = h2_client()
    client.initiate_connection()
    request(client, 1, POST, end=False)
    for _ in range(3):
        client.send_data(1, b"x" * 16384)
    server.receive_data(client.data_to_send())
    events = server.next_events()
    assert [type(e) for e in events] == [RequestReceived, BodyReceived, BodyReceived, BodyReceived]
    assert not server.closing


# ---- responses -----------------------------------------------------------------------


def test_response_arrives_intact() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"Content-Type", b"text/plain"), (b"X-Request-Id", b"42")])
    server.send_body(1, b"hello, ")
    server.send_body(1, b"world")
    server.end_stream(1)
    assert server.stream_output_size(1) == 12
    client_events, server_events = pump(client, server)
    assert summary(client_events) == [
        (
            "response",
            1,
            [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-request-id", b"42")],
            False,
        ),
        ("data", 1, b"hello, "),  # one DATA frame per send_body() piece
        ("data", 1, b"world"),
        ("end", 1),
    ]
    assert server_events == []
    assert server.stream_output_size(1) == 0


def test_a_table_size_sent_twice_still_gets_its_size_update() -> None:
    """A client that sends SETTINGS_HEADER_TABLE_SIZE 0 twice before the next response
    gets a dynamic table size update at the start of that response's header block
    (RFC 7541 §4.2): h2 tells the encoder the size once per frame, and hpack's own
    encoder forgets the update when told the same size again."""
    table_size = h2.settings.SettingCodes.HEADER_TABLE_SIZE
    client, server = connect()
    request(client, 1)
    pump(client, server)
    respond(server, 1, b"first")  # fills the table with the response's fields
    pump(client, server)
    for _ in range(2):
        client.update_settings({table_size: 0})
        pump(client, server)
    request(client, 3)
    pump(client, server)
    respond(server, 3, b"second")
    [head] = [frame for frame in frames(server.data_to_send()) if isinstance(frame, HeadersFrame)]
    assert head.data[0] == 0x20  # a size update to 0 first


@pytest.mark.parametrize("split", [None, 3, 9, 15], ids=["whole", "head", "entry", "value"])
def test_a_table_size_lowered_and_raised_in_one_settings_frame_signals_both(
    split: int | None,
) -> None:
    """SETTINGS_HEADER_TABLE_SIZE 0 then 4096 in one frame (nghttp -c 0 -c 4096):
    the settings apply in order (RFC 9113 §6.5.3), so the next header block starts
    with size updates to 0, then 4096 (RFC 7541 §4.2), though h2 reads the frame
    into a dict and sees 4096 alone. The frame may come in pieces."""
    client, server = connect()
    entries = b"\x00\x01" + (0).to_bytes(4, "big") + b"\x00\x01" + (4096).to_bytes(4, "big")
    settings = raw_frame(0x4, 0, 0, entries)
    for piece in [settings] if split is None else [settings[:split], settings[split:]]:
        server.receive_data(piece)
    assert server.next_events() == []
    acks = [frame for frame in frames(server.data_to_send()) if isinstance(frame, SettingsFrame)]
    assert [frame.flags for frame in acks] == [{"ACK"}]
    request(client, 1)
    server.receive_data(client.data_to_send())
    server.next_events()
    respond(server, 1, b"body")
    [head] = [frame for frame in frames(server.data_to_send()) if isinstance(frame, HeadersFrame)]
    assert head.data.startswith(b"\x20\x3f\xe1\x1f")  # size updates: 0, then 4096
    decoder = hpack.Decoder()
    assert (b":status", b"200") in decoder.decode(head.data, raw=True)
    assert decoder.header_table_size == 4096


@pytest.mark.parametrize("size", [100, 16_384 - 40, 40_000], ids=["small", "frame", "continued"])
def test_response_heads_framed_by_hand_decode_on_a_real_client(size: int) -> None:
    """trioserve frames response HEADERS itself (h2's HPACK encoder, our frame headers).

    A head bigger than one frame goes out as HEADERS + CONTINUATIONs; the client's h2
    must decode every response and keep its HPACK table in step over many of them.
    """
    client, server = connect()
    value = b"v" * size
    for sid in (1, 3, 5):
        request(client, sid)
    pump(client, server)
    for sid in (1, 3, 5):
        # The same fields every time: the second and third use the dynamic table.
        respond(server, sid, b"body %d" % sid, [(b"x-big", value), (b"x-id", b"%d" % sid)])
    wire = server.data_to_send()
    kinds = [type(frame).__name__ for frame in frames(wire) if frame.stream_id == 1]
    if size > 16_384:
        assert kinds[:4] == ["HeadersFrame", "ContinuationFrame", "ContinuationFrame", "DataFrame"]
    else:
        assert kinds == ["HeadersFrame", "DataFrame"]
    if size < 4096:  # fits HPACK's default table: later heads refer to the first one's entries
        heads = {f.stream_id: len(f.data) for f in frames(wire) if isinstance(f, HeadersFrame)}
        assert heads[3] < heads[1] / 10, heads
        assert heads[5] < heads[1] / 10, heads
    events = summary(client_receive(client, wire))
    for sid in (1, 3, 5):  # round-robin interleaves the streams; each in order
        fields = [(b":status", b"200"), (b"x-big", value), (b"x-id", b"%d" % sid)]
        assert [event for event in events if event[1] == sid] == [
            ("response", sid, fields, False),
            ("data", sid, b"body %d" % sid),
            ("end", sid),
        ]
    # h2's books agree: every stream closed on both sides, nothing left open.
    assert server._h2.open_outbound_streams == 0
    assert server._h2.open_inbound_streams == 0
    assert client.open_outbound_streams == 0


def test_hop_by_hop_headers_are_dropped() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    respond(
        server,
        1,
        b"ok",
        [
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"websocket"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),  # request-only in HTTP/2
            (b"X-Kept", b"yes"),
        ],
    )
    client_events, _ = pump(client, server)
    assert summary(client_events)[0] == (
        "response",
        1,
        [(b":status", b"200"), (b"x-kept", b"yes")],
        False,
    )


def test_response_larger_than_the_window_resumes_after_window_update() -> None:
    client, server = connect()  # the client keeps h2's default 65535-byte windows
    request(client, 1)
    pump(client, server)
    respond(server, 1, b"x" * 100_000)
    client_events, server_events = pump(client, server)
    assert data_frames(client_events) == [(1, 16384)] * 3 + [(1, 16383)]
    assert ("end", 1) not in summary(client_events)
    assert server.stream_output_size(1) == 100_000 - 65535
    assert server.data_to_send() == b""  # stalled: nothing to send

    client.acknowledge_received_data(65535, 1)  # stream and connection WINDOW_UPDATE
    client_events, server_events = pump(client, server)
    assert server_events == [WindowOpened(), WindowOpened()]
    assert data_frames(client_events) == [(1, 16384), (1, 16384), (1, 1697)]
    assert summary(client_events)[-1] == ("end", 1)
    assert server.stream_output_size(1) == 0


@pytest.mark.parametrize(
    ("client_max_frame", "expected"),
    [(None, [16384] * 6 + [1696]), (40000, [40000, 40000, 20000])],
    ids=["default", "client-allows-40000"],
)
def test_frames_never_exceed_the_client_max_frame_size(
    client_max_frame: int | None, expected: list[int]
) -> None:
    settings = {Codes.INITIAL_WINDOW_SIZE: 2**20}
    if client_max_frame:
        settings[Codes.MAX_FRAME_SIZE] = client_max_frame
    client, server = connect(client_settings=settings, client_window=2**20)
    request(client, 1)
    pump(client, server)
    respond(server, 1, b"x" * 100_000)
    client_events, _ = pump(client, server)
    assert [size for _, size in data_frames(client_events)] == expected


def send_big_responses(stream_ids: list[int], size: int):
    """A client with large windows, and the server answering each stream with ``size`` bytes."""
    client, server = connect(
        client_settings={Codes.INITIAL_WINDOW_SIZE: 2**24}, client_window=2**26
    )
    for sid in stream_ids:
        request(client, sid)
    pump(client, server)
    for sid in stream_ids:
        respond(server, sid, b"x" * size)
    return client, server


def batches(client: h2.connection.H2Connection, server: HTTP2Connection) -> list[list[int]]:
    """Stream id of each DATA frame, per data_to_send() call, until the server is done."""
    out = []
    while data := server.data_to_send():
        out.append([sid for sid, _ in data_frames(client.receive_data(data))])
    return out


def test_two_streams_are_interleaved_round_robin() -> None:
    client, server = send_big_responses([1, 3], 300_000)
    result = batches(client, server)
    frames_per_batch = MAX_BATCH // 16384
    assert [len(b) for b in result] == [frames_per_batch, frames_per_batch, 6]
    for batch in result:
        assert batch == [1, 3] * (len(batch) // 2)  # both progress in every batch


def test_round_robin_resumes_where_the_last_batch_stopped() -> None:
    # 16 frames per batch over 3 streams: the rounds must carry on across
    # calls (1,3,5,1,3,5,...), not restart at stream 1 each time.
    client, server = send_big_responses([1, 3, 5], 300_000)
    order = [sid for batch in batches(client, server)[:3] for sid in batch]
    assert order == [1, 3, 5] * 16


def test_no_stream_starves_when_streams_outnumber_a_batch() -> None:
    stream_ids = list(range(1, 35, 2))  # 17 streams, 16 frames per batch
    client, server = send_big_responses(stream_ids, 100_000)
    served = set()
    for _ in range(2):
        data = server.data_to_send()
        served |= {sid for sid, _ in data_frames(client.receive_data(data))}
    assert served == set(stream_ids)


@pytest.mark.parametrize(
    ("method", "status", "headers"),
    [
        (b"HEAD", 200, [(b"content-length", b"5")]),
        (b"GET", 204, []),
        (b"GET", 304, []),
    ],
    ids=["HEAD", "204", "304"],
)
def test_no_data_frames_for_bodiless_responses(
    method: bytes, status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    client, server = connect()
    request(client, 1, [(b":method", method), *GET[1:]])
    pump(client, server)
    respond(server, 1, b"hello", headers, status)
    assert server.stream_output_size(1) == 0
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, "END_STREAM" in f.flags) for f in sent] == [
        (HeadersFrame, 1, True)
    ]
    client_events = client.receive_data(b"".join(f.serialize() for f in sent))
    assert summary(client_events) == [
        ("response", 1, [(b":status", str(status).encode()), *headers], True),
        ("end", 1),
    ]


def test_empty_body_ends_the_stream_on_headers() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    respond(server, 1, b"", [(b"content-length", b"0")])
    assert sent_ends(server) == [(HeadersFrame, True)]


def test_end_stream_after_data_goes_on_the_last_data_frame() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    respond(server, 1, b"abc")
    assert sent_ends(server) == [
        (HeadersFrame, False),
        (DataFrame, True),
    ]


def test_end_stream_later_sends_an_empty_data_frame() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [])
    server.send_body(1, b"abc")
    assert [type(f) for f in frames(server.data_to_send())] == [HeadersFrame, DataFrame]
    server.end_stream(1)
    sent = frames(server.data_to_send())
    assert [(type(f), f.data, "END_STREAM" in f.flags) for f in sent] == [(DataFrame, b"", True)]


def test_declared_length_reached_ends_the_stream_on_the_last_data_frame() -> None:
    """A streamed response whose content-length is all queued ends on its last DATA
    frame, before the app ends it: no empty DATA frame of its own afterwards."""
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"6")])
    server.send_body(1, b"abc")
    assert sent_ends(server) == [
        (HeadersFrame, False),
        (DataFrame, False),
    ]
    server.send_body(1, b"def")
    sent = frames(server.data_to_send())
    assert [(type(f), f.data, "END_STREAM" in f.flags) for f in sent] == [(DataFrame, b"def", True)]
    assert server.response_ended(1)  # the app has not ended it yet
    server.end_stream(1)
    assert server.data_to_send() == b""
    assert not server.response_ended(1)


def test_empty_declared_body_ends_on_the_headers_frame_before_the_app_ends_it() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"0")])
    assert sent_ends(server) == [(HeadersFrame, True)]
    server.end_stream(1)
    assert server.data_to_send() == b""


def test_a_byte_past_the_length_after_an_early_end_is_still_refused() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"3")])
    server.send_body(1, b"abc")
    client_events, _ = pump(client, server)
    assert summary(client_events)[-2:] == [("data", 1, b"abc"), ("end", 1)]
    with pytest.raises(InvalidResponse, match="longer than its Content-Length of 3"):
        server.send_body(1, b"d")
    server.reset_stream(1)  # what stream.py does; the stream is closed on the wire already
    assert server.data_to_send() == b""
    assert not server.response_ended(1)


def test_no_early_end_while_the_request_body_is_coming() -> None:
    """Ending the response would stop the upload (RST_STREAM) under an app that may
    still be reading it: END_STREAM waits for the app."""
    client, server = connect()
    request(client, 1, POST, b"partial", end=False)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"2")])
    server.send_body(1, b"ok")
    assert sent_ends(server) == [
        (HeadersFrame, False),
        (DataFrame, False),
    ]
    assert not server.response_ended(1)
    server.end_stream(1)
    assert sent_ends(server) == [
        (DataFrame, True),
        (RstStreamFrame, False),
    ]


# ---- responses held to their own framing (trioserve.responses) ---------------------------


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (101, []),
        (103, []),
        (99, []),
        (600, []),
        (200, [(b"content-length", b"5"), (b"content-length", b"6")]),
        (200, [(b"content-length", b"5, 5")]),
        (200, [(b"content-length", b"-1")]),
    ],
    ids=["101", "103", "99", "600", "two-lengths", "list", "negative"],
)
def test_response_head_that_breaks_the_rules_queues_nothing(
    status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    with pytest.raises(InvalidResponse):
        server.send_response(1, status, headers)
    assert server.data_to_send() == b""
    server.reset_stream(1)  # what stream.py does (with its own code: INTERNAL_ERROR)
    client_events, _ = pump(client, server)
    assert [event[:2] for event in summary(client_events)] == [("reset", 1)]


@pytest.mark.parametrize("queued_first", [False, True], ids=["framed-first", "all-queued"])
def test_body_past_its_content_length_is_never_sent(queued_first: bool) -> None:
    """content-length: 5, then 138 bytes: nothing past the fifth byte goes out, and
    the stream is reset rather than ended (no END_STREAM reaches the client)."""
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"5")])
    server.send_body(1, b"abc")
    client_events = [] if queued_first else pump(client, server)[0]
    with pytest.raises(InvalidResponse, match="longer than its Content-Length of 5"):
        server.send_body(1, b"d" * 135)
    server.reset_stream(1)
    client_events += pump(client, server)[0]
    sent = b"".join(e.data for e in client_events if isinstance(e, h2.events.DataReceived))
    assert sent == (b"" if queued_first else b"abc")  # a reset drops what is still queued
    assert ("end", 1) not in summary(client_events)
    assert summary(client_events)[-1][:2] == ("reset", 1)


def test_body_short_of_its_content_length_never_ends_cleanly() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"100")])
    server.send_body(1, b"12345")
    with pytest.raises(InvalidResponse, match="ended after 5 of the 100 bytes"):
        server.end_stream(1)
    server.reset_stream(1)
    client_events, _ = pump(client, server)
    assert ("end", 1) not in summary(client_events)
    assert summary(client_events)[-1][:2] == ("reset", 1)


def test_exact_content_length_over_several_pieces_ends_cleanly() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [(b"Content-Length", b"10")])
    for piece in (b"01234", b"", b"567", b"89"):
        server.send_body(1, piece)
    server.end_stream(1)
    client_events, _ = pump(client, server)
    assert summary(client_events)[-2:] == [("data", 1, b"89"), ("end", 1)]


def test_head_and_bodiless_statuses_count_no_body() -> None:
    """A HEAD response (or 204/304) may declare the length a GET would have had."""
    client, server = connect()
    request(client, 1, [(b":method", b"HEAD"), *GET[1:]])
    request(client, 3, GET)
    pump(client, server)
    server.send_response(1, 200, [(b"content-length", b"1000")])
    server.end_stream(1)
    server.send_response(3, 304, [(b"content-length", b"1000")])
    server.send_body(3, b"x" * 2000)
    server.end_stream(3)
    client_events, _ = pump(client, server)
    assert [e for e in summary(client_events) if e[0] in ("end", "reset", "data")] == [
        ("end", 1),
        ("end", 3),
    ]


# ---- resets ----------------------------------------------------------------------------


def test_client_reset_drops_queued_output() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [])
    server.send_body(1, b"never sent")
    client.reset_stream(1, Errors.CANCEL)
    server.receive_data(client.data_to_send())
    assert server.next_events() == [StreamReset(1, Errors.CANCEL)]
    assert server.data_to_send() == b""
    # Later calls for the stream are no-ops.
    server.send_response(1, 200, [])
    server.send_body(1, b"more")
    server.end_stream(1)
    assert server.stream_output_size(1) == 0
    assert server.data_to_send() == b""


def test_client_reset_mid_response_stops_the_stream() -> None:
    client, server = connect()
    request(client, 1)
    request(client, 3)
    pump(client, server)
    respond(server, 1, b"x" * 100_000)  # stalls at the 65535 window
    client_events, _ = pump(client, server)
    assert sum(size for _, size in data_frames(client_events)) == 65535
    client.reset_stream(1, Errors.CANCEL)
    client.acknowledge_received_data(65535, 1)  # reopens the connection window too
    client_events, server_events = pump(client, server)
    # (and WindowOpened for the connection window: it is reported even with
    # nothing queued, for responses waiting on disk)
    assert server_events == [StreamReset(1, Errors.CANCEL), WindowOpened()]
    assert client_events == []
    server.end_stream(1)
    respond(server, 3, b"other")
    sent = frames(server.data_to_send())
    assert {f.stream_id for f in sent} == {3}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, Errors.CANCEL),
        (ResetReason.CANCEL, Errors.CANCEL),
        (ResetReason.APP_ERROR, Errors.INTERNAL_ERROR),
        (ResetReason.REFUSED, Errors.REFUSED_STREAM),
    ],
    ids=["default-cancel", "cancel", "app-error-internal-error", "refused"],
)
def test_reset_stream_sends_rst_stream(code: ResetReason | None, expected: int) -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    server.send_response(1, 200, [])
    server.send_body(1, b"queued")
    if code is None:
        server.reset_stream(1)
    else:
        server.reset_stream(1, code)
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, f.error_code) for f in sent] == [(RstStreamFrame, 1, expected)]
    client_events = client.receive_data(b"".join(f.serialize() for f in sent))
    assert summary(client_events) == [("reset", 1, expected)]
    server.reset_stream(1)  # already closed: nothing more
    assert server.data_to_send() == b""


def test_ending_the_response_while_the_request_body_is_open_resets_with_no_error() -> None:
    client, server = connect()
    request(client, 1, POST, b"partial", end=False)
    pump(client, server)
    respond(server, 1, b"done")
    sent = frames(server.data_to_send())
    assert [(type(f), "END_STREAM" in f.flags) for f in sent[:2]] == [
        (HeadersFrame, False),
        (DataFrame, True),
    ]
    assert [(type(f), f.stream_id, f.error_code) for f in sent[2:]] == [
        (RstStreamFrame, 1, Errors.NO_ERROR)
    ]
    client_events = client.receive_data(b"".join(f.serialize() for f in sent))
    assert summary(client_events)[1:] == [
        ("data", 1, b"done"),
        ("end", 1),
        ("reset", 1, Errors.NO_ERROR),
    ]


# ---- limits ---------------------------------------------------------------------------


def test_content_length_over_max_body_size_is_answered_413() -> None:
    client, server = connect(max_body_size=100)
    request(client, 1, [*POST, (b"content-length", b"200")], end=False)
    client_events, server_events = pump(client, server)
    # Answered by the layer itself: no live stream for the driver (stream_id None).
    assert server_events == [BadRequest(413, "request body too large (stream 1)", answered=True)]
    body = error_body(413)
    assert summary(client_events) == [
        (
            "response",
            1,
            [
                (b":status", b"413"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
            False,
        ),
        ("data", 1, body),
        ("end", 1),
        ("reset", 1, Errors.NO_ERROR),  # the request body is still open
    ]


def test_content_length_over_max_body_size_with_the_body_in_the_same_read() -> None:
    client, server = connect(max_body_size=100)
    request(client, 1, [*POST, (b"content-length", b"200")], b"x" * 200)
    _, server_events = pump(client, server)
    assert server_events == [BadRequest(413, "request body too large (stream 1)", answered=True)]


def test_streamed_body_over_max_body_size_is_reported_once() -> None:
    client, server = connect(max_body_size=100)
    request(client, 1, POST, end=False)
    for piece in (b"a" * 60, b"b" * 60, b"c" * 60):
        client.send_data(1, piece)
    client.end_stream(1)
    client_events, server_events = pump(client, server)
    # The live stream is cancelled by the driver on the BadRequest; the rest
    # of its body, END_STREAM included, is discarded.
    assert server_events[1:] == [
        BodyReceived(1, b"a" * 60),
        BadRequest(413, "request body too large", stream_id=1),
    ]
    assert client_events == []  # the driver answers; the layer sends nothing itself


def test_discarded_body_bytes_are_credited_back() -> None:
    client, server = connect(max_body_size=100, initial_window_size=1024, max_concurrent_streams=4)
    request(client, 1, POST, end=False)
    client.send_data(1, b"a" * 100)
    client.send_data(1, b"b" * 900)  # over the limit: dropped, window returned
    client_events, _ = pump(client, server)
    assert summary(client_events) == [("window", 1, 900)]


# ---- other frames -----------------------------------------------------------------------


def test_send_continue() -> None:
    client, server = connect()
    request(client, 1, [*POST, (b"expect", b"100-continue")], end=False)
    _, server_events = pump(client, server)
    assert isinstance(server_events[0], RequestReceived)
    assert server_events[0].expects_continue is True
    server.send_continue(1)
    client_events, _ = pump(client, server)
    assert summary(client_events) == [("info", 1, [(b":status", b"100")])]


def test_expect_continue_without_a_body_is_not_waited_on() -> None:
    client, server = connect()
    request(client, 1, [*POST, (b"expect", b"100-continue")])
    _, server_events = pump(client, server)
    assert isinstance(server_events[0], RequestReceived)
    assert server_events[0].expects_continue is False


def test_start_shutdown_sends_goaway() -> None:
    client, server = connect()
    request(client, 1)
    request(client, 3)
    pump(client, server)
    assert not server.closing
    server.start_shutdown()
    # Step 1 (RFC 9113 §6.8): GOAWAY(2^31-1) and a PING to time one round trip.
    assert not server.closing
    sent = frames(server.data_to_send())
    assert [type(f) for f in sent] == [GoAwayFrame, PingFrame]
    assert (sent[0].last_stream_id, sent[0].error_code) == (2**31 - 1, Errors.NO_ERROR)
    client_events = client_receive(client, b"".join(f.serialize() for f in sent))
    assert summary(client_events)[0] == ("goaway", Errors.NO_ERROR, 2**31 - 1)
    # A stream the client opened before it saw the GOAWAY is still accepted.
    request(client, 5)
    _, server_events = pump(client, server)  # carries the PING ACK back as well
    assert isinstance(server_events[0], RequestReceived)
    assert server_events[0].stream_id == 5
    # Step 2, after the PING ACK: GOAWAY naming the last stream processed.
    assert server.closing
    server.start_shutdown()  # idempotent: no third GOAWAY
    request(client, 7)  # opened after the final GOAWAY: refused
    client_events, server_events = pump(client, server)
    assert server_events == []
    assert ("reset", 7, Errors.REFUSED_STREAM) in summary(client_events)


def test_wants_sender_follows_output_and_closing() -> None:
    """The driver's one look (wants_sender) says what the three properties say."""
    client, server = connect()
    seen = []

    def look() -> None:
        spelled_out = bool(server.output_size) or server.has_queued_streams or server.closing
        assert server.wants_sender == spelled_out
        seen.append(server.wants_sender)

    request(client, 1)
    pump(client, server)
    look()  # a stream open: its response is yet to be queued and sent
    server.send_response(1, 200, [])
    server.send_body(1, b"queued")
    server.end_stream(1)
    pump(client, server)
    look()  # all sent, the stream over: nothing to do
    client.ping(b"12345678")
    server.receive_data(client.data_to_send())
    server.next_events()
    look()  # a PING ACK (a control frame) queued
    pump(client, server)
    look()
    client.close_connection(Errors.NO_ERROR)
    pump(client, server)
    look()  # the client's GOAWAY: nothing queued, but no new streams come
    assert seen == [True, False, True, False, True]


@pytest.mark.parametrize("head_sent", [False, True], ids=["not-started", "mid-body"])
def test_streams_in_flight_finish_after_start_shutdown(head_sent: bool) -> None:
    # RFC 9113 §6.8: streams up to the GOAWAY's last stream id may still complete.
    client, server = connect()
    request(client, 1)
    pump(client, server)
    if head_sent:
        server.send_response(1, 200, [])
        server.send_body(1, b"before ")
        pump(client, server)
    server.start_shutdown()
    pump(client, server)
    if not head_sent:
        server.send_response(1, 200, [])
    server.send_body(1, b"after")
    server.end_stream(1)
    client_events, _ = pump(client, server)
    assert summary(client_events)[-2:] == [("data", 1, b"after"), ("end", 1)]


def test_streams_in_flight_finish_after_a_clean_client_goaway() -> None:
    client, server = connect()
    request(client, 1)
    pump(client, server)
    client.close_connection(Errors.NO_ERROR)
    _, server_events = pump(client, server)
    assert server_events == [ConnectionClosed(abort=False)]  # "responses may still go out"
    respond(server, 1, b"still answered")
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id) for f in sent] == [(HeadersFrame, 1), (DataFrame, 1)]


@pytest.mark.parametrize(
    ("code", "abort"), [(Errors.NO_ERROR, False), (Errors.INTERNAL_ERROR, True)]
)
def test_client_goaway(code: int, abort: bool) -> None:
    client, server = connect()
    client.close_connection(code)
    _, server_events = pump(client, server)
    assert server_events == [ConnectionClosed(abort=abort, error_code=code)]
    assert server.closing


def test_eof_aborts() -> None:
    _, server = connect()
    server.receive_data(b"")
    assert server.next_events() == [ConnectionClosed(abort=True)]
    assert server.closing


def uppercase_header_request() -> bytes:
    client = h2_client(validate_outbound_headers=False, normalize_outbound_headers=False)
    client.initiate_connection()
    client.clear_outbound_data_buffer()
    client.send_headers(1, [*GET, (b"X-Upper", b"1")], end_stream=True)
    return client.data_to_send()


def oversized_header_list_request() -> bytes:
    client = h2_client()
    client.initiate_connection()
    client.clear_outbound_data_buffer()
    client.send_headers(1, [*GET, (b"x-big", b"a" * 2000)], end_stream=True)
    return client.data_to_send()


@pytest.mark.parametrize(
    ("make_bytes", "code"),
    [
        (lambda: raw_frame(0x0, 0, 0, b"x"), Errors.PROTOCOL_ERROR),
        (lambda: raw_frame(0x0, 0, 1, b"x" * 20000), Errors.FRAME_SIZE_ERROR),
        (oversized_header_list_request, Errors.ENHANCE_YOUR_CALM),
    ],
    ids=["data-on-stream-0", "frame-too-large", "header-list-too-large"],
)
def test_protocol_error_closes_the_connection_with_goaway(make_bytes, code: int) -> None:
    client, server = connect(max_header_list_size=1024)
    server.receive_data(make_bytes())
    events = server.next_events()
    assert len(events) == 2
    bad, closed = events
    assert isinstance(bad, BadRequest)
    assert (bad.status, bad.stream_id) == (400, None)
    assert bad.reason.startswith("HTTP/2 protocol error: ")
    assert "b'" not in bad.reason  # h2 quotes the bytes as a repr; the log line does not
    assert closed == ConnectionClosed(abort=True, error_code=code)
    assert server.closing
    sent = frames(server.data_to_send())
    assert [(type(f), f.error_code) for f in sent] == [(GoAwayFrame, code)]
    assert summary(client.receive_data(b"".join(f.serialize() for f in sent)))[0][:2] == (
        "goaway",
        code,
    )


def test_malformed_request_is_a_stream_error_and_the_connection_goes_on() -> None:
    """RFC 9113 §8.1.1: a malformed request (here an uppercase field name) is
    answered with RST_STREAM(PROTOCOL_ERROR); the next request on the same
    connection is served as usual."""
    client, server = connect()
    server.receive_data(uppercase_header_request())
    [bad] = server.next_events()
    assert isinstance(bad, BadRequest)
    assert (bad.status, bad.stream_id, bad.answered) == (400, None, True)
    assert bad.reason == "malformed request: invalid character in a field name (stream 1)"
    assert not server.closing
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, f.error_code) for f in sent] == [
        (RstStreamFrame, 1, Errors.PROTOCOL_ERROR)
    ]
    request(client, 3)
    _, server_events = pump(client, server)
    assert [type(e) for e in server_events] == [RequestReceived]  # (end_stream: no BodyEnded)
    assert server_events[0].stream_id == 3


def test_malformed_requests_spend_the_reset_budget() -> None:
    """Each malformed request costs the server an RST_STREAM: past RESET_BUDGET of
    them (with nothing completed) the connection ends with ENHANCE_YOUR_CALM."""
    client, server = connect()
    client.config.validate_outbound_headers = False
    client.config.normalize_outbound_headers = False
    for n in range(RESET_BUDGET):
        request(client, 2 * n + 1, [*GET, (b"X-Upper", b"1")])
    _, events = pump(client, server)
    assert not server.closing
    assert [type(e) for e in events] == [BadRequest] * RESET_BUDGET
    request(client, 2 * RESET_BUDGET + 1, [*GET, (b"X-Upper", b"1")])
    client_events, events = pump(client, server)
    assert server.closing
    assert events[-1] == ConnectionClosed(abort=True, error_code=Errors.ENHANCE_YOUR_CALM)
    assert summary(client_events)[-1][:2] == ("goaway", Errors.ENHANCE_YOUR_CALM)


def test_a_client_opening_its_window_a_kib_at_a_time_is_not_a_flood() -> None:
    """A client with a 1 KiB stream window that answers each DATA frame with a
    WINDOW_UPDATE for the stream and one for the connection sends two control
    frames a KiB: a response several times CONTROL_BUDGET KiB long still goes out
    whole, with no GOAWAY (each DATA frame sent earns the two it may draw)."""
    client, server = connect(client_settings={Codes.INITIAL_WINDOW_SIZE: 1024})
    request(client, 1)
    pump(client, server)
    size = 2 * CONTROL_BUDGET * 1024  # 20 MiB, in 20,480 DATA frames of 1 KiB
    respond(server, 1, b"x" * size)
    received = 0
    ended = False
    while not ended:
        client_events, _ = pump(client, server)
        assert not [e for e in client_events if isinstance(e, h2.events.ConnectionTerminated)]
        assert client_events, "the response stalled"
        for event in client_events:
            if isinstance(event, h2.events.DataReceived) and event.stream_ended is None:
                received += event.flow_controlled_length
                client.increment_flow_control_window(event.flow_controlled_length, stream_id=1)
                client.increment_flow_control_window(event.flow_controlled_length)
            elif isinstance(event, h2.events.DataReceived):
                received += event.flow_controlled_length  # the last: no window to open
            ended = ended or isinstance(event, h2.events.StreamEnded)
    assert received == size
    assert not server.closing


def trailers_request(
    trailers: list[tuple[bytes, bytes]],
) -> tuple[h2.connection.H2Connection, HTTP2Connection, list[object]]:
    """A POST whose body is followed by ``trailers``, sent without h2's own checks."""
    client, server = connect()
    client.config.validate_outbound_headers = False
    client.config.normalize_outbound_headers = False
    request(client, 1, POST, b"body", end=False)
    client.send_headers(1, trailers, end_stream=True)
    _, server_events = pump(client, server)
    return client, server, server_events


def test_well_formed_trailers_end_the_body() -> None:
    _, server, events = trailers_request([(b"x-checksum", b"abc")])
    assert [type(e) for e in events] == [RequestReceived, BodyReceived, BodyEnded]
    assert not server.closing


@pytest.mark.parametrize(
    ("trailers", "problem"),
    [
        ([(b":path", b"/")], "pseudo-header field in trailers"),
        ([(b"X-Checksum", b"abc")], "invalid character in a field name"),
        ([(b"x-checksum", b"a\nb")], "CR, LF or NUL in a field value"),
        ([(b"connection", b"close")], "connection-specific field"),
    ],
    ids=["pseudo", "uppercase", "lf-in-value", "connection"],
)
def test_malformed_trailers_reset_the_stream_the_app_already_has(
    trailers: list[tuple[bytes, bytes]], problem: str
) -> None:
    """The request went to the app with its HEADERS; malformed trailers make it
    malformed after all: the stream is reset (PROTOCOL_ERROR), the driver told
    to cancel it, and no BodyEnded makes the body look complete."""
    client, server, events = trailers_request(trailers)
    assert [type(e) for e in events] == [RequestReceived, BodyReceived, BadRequest, StreamReset]
    bad, reset = events[2:]
    assert bad.reason == f"malformed trailers: {problem} (stream 1)"
    assert not bad.answered  # the stream itself is counted when the app is done
    assert reset == StreamReset(1, Errors.PROTOCOL_ERROR)
    assert not server.closing
    request(client, 3)
    _, later = pump(client, server)
    assert [type(e) for e in later] == [RequestReceived]


def content_length_request(
    declared: list[bytes], body: list[bytes]
) -> tuple[h2.connection.H2Connection, HTTP2Connection, list[object]]:
    """A POST on stream 1 with a content-length field for each of ``declared``, its
    body in ``body``'s DATA frames (the last ends the stream; none: the HEADERS
    does), sent without h2's own checks."""
    client, server = connect()
    client.config.validate_outbound_headers = False
    client.config.normalize_outbound_headers = False
    fields = [*POST, *((b"content-length", value) for value in declared)]
    client.send_headers(1, fields, end_stream=not body)
    for n, chunk in enumerate(body):
        client.send_data(1, chunk, end_stream=n == len(body) - 1)
    _, server_events = pump(client, server)
    return client, server, server_events


def assert_only_stream_1_was_reset(
    client: h2.connection.H2Connection, server: HTTP2Connection
) -> None:
    """Stream 1 got RST_STREAM(PROTOCOL_ERROR), no GOAWAY, and stream 3 is served."""
    assert not server.closing
    assert server.data_to_send() == b""  # (pump handed the RST_STREAM to the client)
    request(client, 3)
    client_events, later = pump(client, server)
    assert [type(e) for e in later] == [RequestReceived]
    assert later[0].stream_id == 3
    assert not [e for e in client_events if isinstance(e, h2.events.ConnectionTerminated)]


@pytest.mark.parametrize(
    ("body", "problem", "events_before"),
    [
        ([b"ab", b"c"], "body shorter than its content-length", [BodyReceived, BodyReceived]),
        ([b"abc", b"def"], "body longer than its content-length", [BodyReceived]),
        ([b"abcdefg"], "body longer than its content-length", []),
    ],
    ids=["shorter", "longer-in-the-second-frame", "longer-in-one-frame"],
)
def test_a_body_that_breaks_its_content_length_resets_that_stream_alone(
    body: list[bytes], problem: str, events_before: list[type]
) -> None:
    """RFC 9113 §8.1.1: the request is malformed, a stream error. h2 alone would end
    the whole connection (GOAWAY), taking every other stream on it along."""
    client, server, events = content_length_request([b"5"], body)
    assert [type(e) for e in events] == [
        RequestReceived,
        *events_before,
        BadRequest,
        StreamReset,
    ]
    bad, reset = events[-2:]
    assert bad.reason == f"malformed request: {problem} (stream 1)"
    assert not bad.answered  # the app may have the request: the driver cancels it
    assert reset == StreamReset(1, Errors.PROTOCOL_ERROR)
    assert_only_stream_1_was_reset(client, server)


@pytest.mark.parametrize(
    ("declared", "body", "problem"),
    [
        ([b"x"], [b"abcde"], "invalid content-length"),
        ([b"-1"], [b"abcde"], "invalid content-length"),
        ([b"5", b"6"], [b"abcde"], "conflicting content-length fields"),
        ([b"1" * 19], [b"abcde"], "content-length of more than 18 digits"),
        ([b"1" * 5000], [b"abcde"], "content-length of more than 18 digits"),
        ([b"5"], [], "content-length but no body"),
    ],
    ids=["letter", "negative", "conflicting", "19-digits", "5000-digits", "no-body"],
)
def test_a_malformed_content_length_is_a_stream_error(
    declared: list[bytes], body: list[bytes], problem: str
) -> None:
    """Refused before the app sees the request, on that stream alone (h2 would have
    ended the connection for each of these but the last two)."""
    client, server, events = content_length_request(declared, body)
    assert [type(e) for e in events] == [BadRequest]
    assert events[0].reason == f"malformed request: {problem} (stream 1)"
    assert events[0].answered
    assert_only_stream_1_was_reset(client, server)


def test_equal_content_lengths_and_a_body_that_matches_them_are_a_request() -> None:
    _, server, events = content_length_request([b"5", b"5"], [b"ab", b"cde"])
    assert [type(e) for e in events] == [RequestReceived, BodyReceived, BodyReceived, BodyEnded]
    assert events[0].content_length == 5
    assert not server.closing


# ---- h2c upgrade ------------------------------------------------------------------------

SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
UPGRADED_REQUEST = RequestReceived(
    stream_id=1,
    method=b"GET",
    target=b"/",
    headers=[(b"host", b"example.com")],
    http_version="1.1",
    end_stream=True,
)


def upgraded(**server_kwargs: int) -> tuple[h2.connection.H2Connection, HTTP2Connection, bytes]:
    """A client that asked for h2c and a server that accepted; returns the server's first bytes."""
    client = h2_client()
    settings_header = client.initiate_upgrade_connection()  # also queues the client preface
    server = HTTP2Connection(**server_kwargs)
    server.initiate_upgrade(settings_header, UPGRADED_REQUEST, preamble=SWITCHING)
    return client, server, server.data_to_send()


def test_initiate_upgrade_sends_the_preamble_first() -> None:
    client, server, first = upgraded()
    assert first.startswith(SWITCHING)
    sent = frames(first[len(SWITCHING) :])
    assert [type(f) for f in sent] == [SettingsFrame, WindowUpdateFrame]
    assert server.data_to_send() == b""  # the preamble went out once
    client.receive_data(first[len(SWITCHING) :])
    assert client.data_to_send().startswith(PREFACE)


def test_upgraded_stream_1_is_answerable() -> None:
    client, server, first = upgraded()
    client.receive_data(first[len(SWITCHING) :])
    _, server_events = pump(client, server)
    assert server_events == []  # stream 1's request came over HTTP/1.1
    respond(server, 1, b"hi", [(b"content-length", b"2")])
    client_events, _ = pump(client, server)
    assert summary(client_events) == [
        ("response", 1, [(b":status", b"200"), (b"content-length", b"2")], False),
        ("data", 1, b"hi"),
        ("end", 1),
    ]
    # New streams from the client are served as usual.
    request(client, 3)
    _, server_events = pump(client, server)
    assert [(type(e), e.stream_id) for e in server_events] == [  # type: ignore[attr-defined]
        (RequestReceived, 3),
    ]


def test_upgraded_head_request_gets_no_body() -> None:
    client = h2_client()
    settings_header = client.initiate_upgrade_connection()
    server = HTTP2Connection()
    head = RequestReceived(
        stream_id=1, method=b"HEAD", target=b"/", headers=[], http_version="1.1", end_stream=True
    )
    server.initiate_upgrade(settings_header, head, preamble=SWITCHING)
    client.receive_data(server.data_to_send()[len(SWITCHING) :])
    pump(client, server)
    respond(server, 1, b"dropped", [(b"content-length", b"7")])
    client_events, _ = pump(client, server)
    assert summary(client_events) == [
        ("response", 1, [(b":status", b"200"), (b"content-length", b"7")], True),
        ("end", 1),
    ]


@pytest.mark.parametrize("noted", [True, False], ids=["noted", "not-noted"])
def test_note_upgrade_body_earns_no_credit(noted: bool) -> None:
    # Connection window 4 * 16 KiB = 65536. Streams 3 and 5 use half of it;
    # acknowledging 32 KiB on stream 1 would then be worth a WINDOW_UPDATE -
    # wrongly, since stream 1's body came over HTTP/1.1 and used no window.
    client, server, first = upgraded(initial_window_size=16384, max_concurrent_streams=4)
    client.receive_data(first[len(SWITCHING) :])
    pump(client, server)
    if noted:
        server.note_upgrade_body(32768)
    for sid in (3, 5):
        request(client, sid, POST, b"x" * 16384, end=False)
    pump(client, server)
    server.acknowledge_body(1, 32768)
    sent = frames(server.data_to_send())
    if noted:
        assert sent == []
    else:  # what note_upgrade_body prevents: 32 KiB of credit for nothing
        assert [(type(f), f.stream_id, f.window_increment) for f in sent] == [
            (WindowUpdateFrame, 0, 32768)
        ]


def test_note_upgrade_body_only_covers_the_noted_bytes() -> None:
    client, server, first = upgraded(initial_window_size=16384, max_concurrent_streams=4)
    client.receive_data(first[len(SWITCHING) :])
    pump(client, server)
    server.note_upgrade_body(100)
    for sid in (3, 5):
        request(client, sid, POST, b"x" * 16384, end=False)
    pump(client, server)
    server.acknowledge_body(1, 60)
    server.acknowledge_body(1, 40)
    assert server.data_to_send() == b""
    # Beyond the noted 100 bytes, acknowledgements count again.
    server.acknowledge_body(1, 100 + 32768)
    sent = frames(server.data_to_send())
    assert [(type(f), f.stream_id, f.window_increment) for f in sent] == [
        (WindowUpdateFrame, 0, 32768)
    ]


# ---- h2's books: closed streams leave them at once; no count below the limit ----------


@pytest.mark.parametrize("request_open", [False, True], ids=["request-ended", "upload-stopped"])
def test_a_stream_closed_by_its_response_leaves_h2s_books_at_once(request_open: bool) -> None:
    """As h2's own count of open streams would drop it (remembering who closed
    it); frames the client still sends for it are met as h2 meets them then."""
    client, server = connect()
    request(
        client,
        1,
        POST if request_open else GET,
        b"part" if request_open else None,
        end=not request_open,
    )
    pump(client, server)
    respond(server, 1, b"done")
    client_events, _ = pump(client, server)
    expected = [("response", 1, [(b":status", b"200")], False), ("data", 1, b"done"), ("end", 1)]
    if request_open:
        expected.append(("reset", 1, Errors.NO_ERROR))  # the upload is stopped (RFC 9113 §8.1)
    assert summary(client_events) == expected
    books = server._h2
    assert 1 not in books.streams
    assert 1 in books._closed_streams
    # A late WINDOW_UPDATE for the closed stream is ignored, as h2 ignores it.
    server.receive_data(raw_frame(0x8, 0, 1, (100).to_bytes(4, "big")))
    assert server.next_events() == []
    assert server.data_to_send() == b""
    request(client, 3)
    _, server_events = pump(client, server)
    assert [type(e).__name__ for e in server_events] == ["RequestReceived"]


def test_new_streams_are_counted_only_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """h2 counts open streams by walking all it holds. While it holds fewer than
    the limit no count is needed; at the limit the count still refuses, as h2 does."""
    walks: list[int] = []
    count_open = h2.connection.H2Connection._open_streams

    def counted(self: h2.connection.H2Connection, remainder: int) -> int:
        if not self.config.client_side:  # (the h2 client counts its own to send)
            walks.append(len(self.streams))
        return count_open(self, remainder)

    monkeypatch.setattr(h2.connection.H2Connection, "_open_streams", counted)
    client, server = connect(max_concurrent_streams=2)
    for sid in (1, 3, 5):  # one after another: each closed before the next
        request(client, sid)
        pump(client, server)
        respond(server, sid, b"ok")
        pump(client, server)
    assert walks == []
    request(client, 7)
    request(client, 9)
    pump(client, server)  # two open: at the limit
    # h2's client keeps to the limit itself: stream 11 goes as raw bytes, its
    # fields never indexed, so both HPACK tables stay as they were.
    block = hpack.Encoder().encode([(name, value, True) for name, value in GET])
    client._data_to_send += raw_frame(0x1, 0x5, 11, block)  # HEADERS, END_STREAM|END_HEADERS
    server.receive_data(client.data_to_send())
    assert walks  # counted at the limit ...
    # ... and refused: RST_STREAM(REFUSED_STREAM) for that stream alone.
    assert not [e for e in server.next_events() if isinstance(e, RequestReceived)]
    assert [
        (type(f), f.stream_id, getattr(f, "error_code", None))
        for f in frames(server.data_to_send())
    ] == [(RstStreamFrame, 11, Errors.REFUSED_STREAM)]


def over_limit_requests(
    client: h2.connection.H2Connection, first: int, count: int, *, end: bool = True
) -> None:
    """Queue ``count`` requests from stream ``first`` on, whatever the client
    knows of the server's limit: each adds a field of its own to the HPACK table."""
    limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    known = client.remote_settings.get(limit)
    client.remote_settings._settings.pop(limit, None)  # h2's own check would stop us
    for sid in range(first, first + 2 * count, 2):
        request(client, sid, [*GET, (b"x-stream", str(sid).encode())], end=end)
    if known is not None:
        client.remote_settings._settings[limit] = collections.deque([known])


def test_streams_over_the_limit_in_the_first_flight_are_refused() -> None:
    """A client may open streams before our SETTINGS reach it (RFC 9113 §6.5.2 puts
    no limit until then): those over the limit get RST_STREAM(REFUSED_STREAM),
    which tells it nothing was processed, and the connection carries on."""
    server = HTTP2Connection(max_concurrent_streams=2)
    server.initiate()
    client = h2_client()
    client.initiate_connection()
    for sid in (1, 3, 5, 7):  # one read: the preface, SETTINGS and four HEADERS
        request(client, sid, [*GET, (b"x-stream", str(sid).encode())])
    server.receive_data(client.data_to_send())
    opened = [e.stream_id for e in server.next_events() if isinstance(e, RequestReceived)]
    assert opened == [1, 3]
    client_events = client_receive(client, server.data_to_send())
    assert [s for s in summary(client_events) if s[0] in ("reset", "goaway")] == [
        ("reset", 5, Errors.REFUSED_STREAM),
        ("reset", 7, Errors.REFUSED_STREAM),
    ]
    respond(server, 1, b"one")
    respond(server, 3, b"three")
    client_events, _ = pump(client, server)
    assert ("data", 1, b"one") in summary(client_events)
    assert ("data", 3, b"three") in summary(client_events)
    assert not [s for s in summary(client_events) if s[0] == "goaway"]
    # Stream 9 repeats stream 7's field: the client sends it as an index into the
    # HPACK table, which holds it only if the refused block was decoded too.
    request(client, 9, [*GET, (b"x-stream", b"7")])
    _, server_events = pump(client, server)
    (nine,) = [e for e in server_events if isinstance(e, RequestReceived)]
    assert nine.stream_id == 9
    assert (b"x-stream", b"7") in nine.headers


def test_a_stream_over_the_limit_later_is_refused_alone() -> None:
    """At the limit on an established connection: the extra stream is refused, its
    header block decoded (the HPACK tables stay in step), and its request body is
    dropped as h2 drops frames for a stream it reset, the connection window
    counted as used up and due back."""
    client, server = connect(max_concurrent_streams=2)
    request(client, 1)
    request(client, 3)
    pump(client, server)
    window = client.outbound_flow_control_window
    over_limit_requests(client, 5, 1, end=False)  # HEADERS without END_STREAM ...
    client.send_data(5, b"x" * 1000)  # ... and a body
    client_events, server_events = pump(client, server)
    assert not [e for e in server_events if getattr(e, "stream_id", None) == 5]
    assert ("reset", 5, Errors.REFUSED_STREAM) in summary(client_events)
    assert not [s for s in summary(client_events) if s[0] == "goaway"]
    # The body's bytes count as processed: h2 gives the connection window back
    # with its next WINDOW_UPDATE, so they never hold up the other streams.
    assert client.outbound_flow_control_window == window - 1000
    assert server._h2._inbound_flow_control_window_manager._bytes_processed == 1000
    respond(server, 1, b"one")
    pump(client, server)
    request(client, 7, [*GET, (b"x-stream", b"5")])  # indexed by the refused block
    client_events, server_events = pump(client, server)
    (seven,) = [e for e in server_events if isinstance(e, RequestReceived)]
    assert (b"x-stream", b"5") in seven.headers


def test_refusals_over_the_limit_spend_the_reset_budget() -> None:
    """Opening streams over the limit again and again is Rapid Reset by another
    name: each refusal counts, and past the budget the connection ends."""
    client, server = connect(max_concurrent_streams=1)
    request(client, 1)
    pump(client, server)
    over_limit_requests(client, 3, RESET_BUDGET + 1)
    client_events, _ = pump(client, server)
    assert summary(client_events)[-1][:2] == ("goaway", Errors.ENHANCE_YOUR_CALM)


def test_a_padded_stream_over_the_limit_is_h2s_connection_error() -> None:
    """A HEADERS frame trioserve does not open itself (padded, or continued) goes
    to h2, which treats the limit as a connection error: allowed too (RFC 9113
    §5.4.1), and what real clients never send at the limit."""
    client, server = connect(max_concurrent_streams=1)
    request(client, 1)
    pump(client, server)
    block = hpack.Encoder().encode([(name, value, True) for name, value in GET])
    padded = b"\x00" + block  # pad length 0
    client._data_to_send += raw_frame(0x1, 0x5 | 0x8, 3, padded)  # + PADDED
    client_events, _ = pump(client, server)
    assert summary(client_events) == [("goaway", Errors.PROTOCOL_ERROR, 1)]
