"""The in-memory client: :class:`TestClient` and its streams, over HTTP/1.1 or HTTP/2.

:func:`new_client` makes the client for the protocol asked for. The public API
is :class:`TestClient`'s; the two subclasses only say how each protocol does
it (h11 and h2 as the client-side protocol libraries), and the HTTP/2-only
methods (``ping``, ``goaway``, windows) say so when called over HTTP/1.1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio
from hyperframe.frame import GoAwayFrame

from ..http2 import keep_open_after_goaway
from ._pipe import MemoryEndpoint


@dataclass
class TestResponse:
    """A response as the client received it."""

    __test__ = False  # not a pytest test class

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    http_version: str = ""
    informational: list[int] = field(default_factory=list)  # e.g. [100] after 100 Continue
    complete: bool = False  # ended properly (False: reset or connection closed mid-way)

    _body: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def body(self) -> bytes:
        """The body received so far (all of it once the response is read)."""
        return bytes(self._body)

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass(frozen=True)
class FrameInfo:
    """One HTTP/2 frame the client received (see ``record_frames``)."""

    type: str  # "DATA", "HEADERS", "RST_STREAM", ...
    stream_id: int
    length: int
    flags: int


_FRAME_TYPES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST_STREAM",
    4: "SETTINGS",
    5: "PUSH_PROMISE",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
    9: "CONTINUATION",
}


class TestStream:
    """One request in flight: send its body in pieces, read its response, reset it."""

    __test__ = False

    def __init__(self, client: TestClient, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        self.response = TestResponse()
        self.headers_received = trio.Event()
        self.ended = trio.Event()  # response complete, reset, or connection gone
        self.reset_code: int | None = None  # RST_STREAM code from the server (HTTP/2)
        self._data: deque[bytes] = deque()
        self._data_arrived = trio.Event()

    def _push_data(self, data: bytes) -> None:
        self._data.append(data)
        self._data_arrived.set()
        self._data_arrived = trio.Event()

    def _end(self, *, complete: bool = False) -> None:
        if not self.ended.is_set():
            self.response.complete = complete
        self.ended.set()
        self.headers_received.set()
        self._data_arrived.set()

    async def send(self, data: bytes, *, end: bool = False, pad_length: int | None = None) -> None:
        """Send a piece of the request body (and end it if ``end``).

        ``pad_length`` (HTTP/2) pads the DATA frames, which the server must
        credit back at once.
        """
        await self.client._send_body(self, data, end, pad_length)

    async def end(self) -> None:
        """End the request body."""
        await self.client._send_body(self, b"", True, None)

    async def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the request: RST_STREAM on HTTP/2, an abrupt disconnect on HTTP/1.1."""
        await self.client._reset(self, error_code)

    async def open_window(self, size: int) -> None:
        """HTTP/2: grant the server ``size`` more bytes of this stream's response."""
        await self.client.open_window(size, self.stream_id)

    async def receive_headers(self) -> TestResponse:
        """Wait for the response head (status and headers)."""
        await self.client._pump_until(self.headers_received)
        return self.response

    async def receive_data(self, *, keep: bool = True) -> bytes:
        """The next piece of response body; b"" once the response is over.

        With ``keep=False`` the piece is not added to ``response.body`` (for
        large responses a test only hashes or counts).
        """
        while not self._data and not self.ended.is_set():
            await self.client._pump_until_data(self)
        if self._data:
            data = self._data.popleft()
            if keep:
                self.response._body += data
            return data
        return b""

    async def read_response(self) -> TestResponse:
        """Read the rest of the response and return it."""
        while await self.receive_data():
            pass
        return self.response


class TestClient:
    """An HTTP/1.1 or HTTP/2 client on one in-memory connection to the server.

    Made by :meth:`TestServer.connect <trioserve.testing.TestServer.connect>`
    (or :func:`~trioserve.testing.open_test_client`); ``http2`` says which.
    """

    __test__ = False
    http2 = False

    def __init__(self, stream: MemoryEndpoint, authority: str) -> None:
        self.stream = stream
        self.authority = authority
        self.paused = False  # not consuming: HTTP/2 credit withheld (see pause_reading)
        self.socket_paused = False  # not even reading the socket
        self.closed = trio.Event()  # the server closed the connection
        self.goaway_received: h2.events.ConnectionTerminated | None = None  # last GOAWAY
        self.frames: list[FrameInfo] | None = None  # HTTP/2 frames received, if recorded
        self._streams: dict[int, TestStream] = {}
        self._send_lock = trio.Lock()
        self._resume = trio.Event()

    async def _start(self, nursery: trio.Nursery, settings: dict[int, int] | None) -> None:
        """Begin the connection (HTTP/2: the preface and the client's tasks)."""

    # ---- public API -----------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> TestResponse:
        """Send a complete request and return the complete response."""
        stream = await self.open_stream(method, path, headers=headers, body=body)
        return await stream.read_response()

    async def get(self, path: str, **kwargs: Any) -> TestResponse:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: bytes = b"", **kwargs: Any) -> TestResponse:
        return await self.request("POST", path, body=body, **kwargs)

    async def open_stream(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        end: bool = True,
    ) -> TestStream:
        """Send a request head (and ``body``); with ``end=False`` more body may follow.

        Over HTTP/1.1, a request whose body is not ended here is sent with
        ``Transfer-Encoding: chunked`` unless ``headers`` set a Content-Length.
        """
        fields = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        return await self._open(method, path, fields, body, end)

    def pause_reading(self, *, socket: bool = False) -> None:
        """Stop consuming responses, so the server must stop sending (backpressure).

        HTTP/2: by default the client keeps reading frames but returns no more
        flow-control credit, so the server's windows run down to zero (what a
        slow HTTP/2 consumer does). With ``socket=True`` (always, for HTTP/1.1)
        the client stops reading the connection altogether, like a stalled peer.
        """
        self.paused = True
        self.socket_paused = socket or not self.http2

    async def resume_reading(self) -> None:
        """Consume again, returning the credit withheld meanwhile."""
        self.paused = self.socket_paused = False
        self._resume.set()
        self._resume = trio.Event()

    async def open_window(self, size: int, stream_id: int | None = None) -> None:
        """HTTP/2: send WINDOW_UPDATE for ``stream_id`` (None: the connection)."""
        raise RuntimeError("open_window() needs an HTTP/2 connection")

    async def ping(self) -> None:
        """HTTP/2: send a PING and wait for its ACK (a full round trip through the server)."""
        raise RuntimeError("ping() needs an HTTP/2 connection")

    def send_window(self, stream_id: int | None = None) -> int:
        """HTTP/2: bytes this client may still send on ``stream_id`` (None: the connection)."""
        raise RuntimeError("send_window() needs an HTTP/2 connection")

    async def goaway(self, error_code: int = 0, last_stream_id: int = 0) -> None:
        """HTTP/2: send GOAWAY, keeping the connection open for streams in flight."""
        raise RuntimeError("goaway() needs an HTTP/2 connection")

    async def disconnect(self, *, abort: bool = False) -> None:
        """Drop the connection: ``abort=True`` like a TCP reset, otherwise a clean close."""
        if abort:
            self.stream.abort()
        else:
            await self.stream.aclose()
        for stream in self._streams.values():
            stream._end()

    # ---- what each protocol does its own way ----------------------------------------

    async def _open(
        self, method: str, path: str, fields: list[tuple[bytes, bytes]], body: bytes, end: bool
    ) -> TestStream:
        raise NotImplementedError

    async def _pump_until(self, event: trio.Event) -> None:
        """Return once ``event`` is set (reading the connection meanwhile if need be)."""
        raise NotImplementedError

    async def _pump_until_data(self, stream: TestStream) -> None:
        """Return once more of ``stream``'s response may have arrived."""
        raise NotImplementedError

    async def _send_body(
        self, stream: TestStream, data: bytes, end: bool, pad_length: int | None
    ) -> None:
        raise NotImplementedError

    async def _reset(self, stream: TestStream, error_code: int) -> None:
        raise NotImplementedError

    async def _raw_send(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed.set()


class _HTTP1Client(TestClient):
    """HTTP/1.1 through h11: one request at a time, read on demand by the caller."""

    def __init__(self, stream: MemoryEndpoint, authority: str) -> None:
        super().__init__(stream, authority)
        self._h11 = h11.Connection(h11.CLIENT)
        self._h1_stream: TestStream | None = None
        self._next_h1_id = 1

    async def _open(
        self, method: str, path: str, fields: list[tuple[bytes, bytes]], body: bytes, end: bool
    ) -> TestStream:
        if self._h1_stream is not None and not self._h1_stream.ended.is_set():
            raise RuntimeError("HTTP/1.1: finish reading the previous response first")
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        names = {name.lower() for name, _ in fields}
        if b"host" not in names:
            fields.insert(0, (b"Host", self.authority.encode("latin-1")))
        if b"content-length" not in names and b"transfer-encoding" not in names:
            if end and body:
                fields.append((b"Content-Length", str(len(body)).encode()))
            elif not end:
                fields.append((b"Transfer-Encoding", b"chunked"))
        stream = TestStream(self, self._next_h1_id)
        self._next_h1_id += 1
        self._h1_stream = stream
        self._streams[stream.stream_id] = stream
        data = self._h11.send(h11.Request(method=method, target=path, headers=fields)) or b""
        if body:
            data += self._h11.send(h11.Data(data=body)) or b""
        if end:
            data += self._h11.send(h11.EndOfMessage()) or b""
        await self._raw_send(data)
        return stream

    async def _pump(self) -> None:
        """Read and handle one HTTP/1.1 response event."""
        stream = self._h1_stream
        assert stream is not None
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:
                # The server closed mid-response (an aborted response): what
                # arrived so far is all there is.
                self.closed.set()
                stream._end()
                return
            if event is h11.NEED_DATA:
                while self.paused:
                    await self._resume.wait()
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.closed.set()
                self._h11.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                stream.response.informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                stream.response.status = event.status_code
                stream.response.headers = list(event.headers.raw_items())
                stream.response.http_version = event.http_version.decode()
                stream.headers_received.set()
            elif isinstance(event, h11.Data):
                stream._push_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                stream._end(complete=True)
            elif isinstance(event, h11.ConnectionClosed):
                stream._end()
            return

    async def _pump_until(self, event: trio.Event) -> None:
        while not event.is_set():
            await self._pump()

    async def _pump_until_data(self, stream: TestStream) -> None:
        await self._pump()

    async def _send_body(
        self, stream: TestStream, data: bytes, end: bool, pad_length: int | None
    ) -> None:
        out = b""
        if data:
            out += self._h11.send(h11.Data(data=data)) or b""
        if end:
            out += self._h11.send(h11.EndOfMessage()) or b""
        await self._raw_send(out)

    async def _reset(self, stream: TestStream, error_code: int) -> None:
        await self.disconnect(abort=True)


class _HTTP2Client(TestClient):
    """HTTP/2 through h2, prior knowledge: a reader task and a sender task of its own."""

    http2 = True

    def __init__(self, stream: MemoryEndpoint, authority: str, *, record_frames: bool) -> None:
        super().__init__(stream, authority)
        self.frames = [] if record_frames else None
        self._withheld: dict[int, int] = {}  # credit not yet returned while paused
        self._window_changed = trio.Event()
        self._output_wanted = trio.Event()
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_count = 0
        self._frame_buffer = bytearray()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        keep_open_after_goaway(self._h2)

    async def _start(self, nursery: trio.Nursery, settings: dict[int, int] | None) -> None:
        values = {h2.settings.SettingCodes(code): value for code, value in (settings or {}).items()}
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values=values)
        self._h2.max_inbound_frame_size = self._h2.local_settings.max_frame_size
        self._h2.initiate_connection()
        await self._flush()
        nursery.start_soon(self._reader_task)
        nursery.start_soon(self._sender_task)

    async def resume_reading(self) -> None:
        await super().resume_reading()
        for stream_id, size in list(self._withheld.items()):
            self._ack(stream_id, size)
        self._withheld.clear()
        await self._flush()

    async def open_window(self, size: int, stream_id: int | None = None) -> None:
        self._h2.increment_flow_control_window(size, stream_id)
        await self._flush()

    async def ping(self) -> None:
        self._ping_count += 1
        opaque = self._ping_count.to_bytes(8, "big")
        acked = self._pings[opaque] = trio.Event()
        self._h2.ping(opaque)
        await self._flush()
        await acked.wait()
        if self._pings.pop(opaque, None) is not None:  # woken by the end, not by the ACK
            raise trio.BrokenResourceError("the connection closed before the PING was answered")

    def send_window(self, stream_id: int | None = None) -> int:
        if stream_id is None:
            return int(self._h2.outbound_flow_control_window)
        return int(self._h2.local_flow_control_window(stream_id))

    async def goaway(self, error_code: int = 0, last_stream_id: int = 0) -> None:
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        await self._flush()
        await self._raw_send(frame.serialize())

    async def _open(
        self, method: str, path: str, fields: list[tuple[bytes, bytes]], body: bytes, end: bool
    ) -> TestStream:
        if end and body and all(name.lower() != b"content-length" for name, _ in fields):
            fields.append((b"content-length", str(len(body)).encode()))
        stream_id = self._h2.get_next_available_stream_id()
        stream = TestStream(self, stream_id)
        self._streams[stream_id] = stream
        head = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode("latin-1")),
            *((name.lower(), value) for name, value in fields),
        ]
        self._h2.send_headers(stream_id, head, end_stream=end and not body)
        await self._flush()
        if body:
            await self._send_body(stream, body, end, None)
        return stream

    async def _reader_task(self) -> None:
        """Read frames and react, never waiting to send (writes go to the sender task)."""
        try:
            while True:
                while self.socket_paused:
                    await self._resume.wait()
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                if self.frames is not None:
                    self._record_frames(data)
                for event in self._h2.receive_data(data):
                    self._handle(event)
                self._output_wanted.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h2.exceptions.ProtocolError:
            pass  # the server broke the protocol; tests see the connection end
        self.closed.set()
        self._window_changed.set()
        for acked in self._pings.values():
            acked.set()  # ping() raises: no ACK will come
        for stream in self._streams.values():
            stream._end()

    async def _sender_task(self) -> None:
        while True:
            await self._output_wanted.wait()
            self._output_wanted = trio.Event()
            await self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            response = stream.response
            response.http_version = "2"
            for name, value in event.headers or ():
                assert isinstance(name, bytes)
                assert isinstance(value, bytes)
                if name == b":status":
                    response.status = int(value)
                else:
                    response.headers.append((name, value))
            stream.headers_received.set()
        elif isinstance(event, h2.events.InformationalResponseReceived) and stream is not None:
            for name, value in event.headers or ():
                if name == b":status":
                    stream.response.informational.append(int(value))
        elif isinstance(event, h2.events.DataReceived):
            size = event.flow_controlled_length
            if stream is not None and not stream.ended.is_set():
                stream._push_data(event.data)
            if self.paused and stream is not None:
                self._withheld[event.stream_id] = self._withheld.get(event.stream_id, 0) + size
            else:
                self._ack(event.stream_id, size)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream._end(complete=True)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset_code = int(event.error_code or 0)
            stream._end()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = event
        elif isinstance(event, h2.events.PingAckReceived):
            acked = self._pings.pop(bytes(event.ping_data), None)
            if acked is not None:
                acked.set()
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_changed.set()
            self._window_changed = trio.Event()

    def _record_frames(self, data: bytes) -> None:
        assert self.frames is not None
        buffer = self._frame_buffer
        buffer += data
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind = _FRAME_TYPES.get(buffer[3], f"0x{buffer[3]:02x}")
            stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            self.frames.append(FrameInfo(kind, stream_id, length, buffer[4]))
            del buffer[: 9 + length]

    def _ack(self, stream_id: int, size: int) -> None:
        if size:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # connection already closed

    async def _pump_until(self, event: trio.Event) -> None:
        await event.wait()  # the reader task does the reading

    async def _pump_until_data(self, stream: TestStream) -> None:
        await stream._data_arrived.wait()

    async def _send_body(
        self, stream: TestStream, data: bytes, end: bool, pad_length: int | None
    ) -> None:
        try:
            await self._h2_send_body(stream, data, end, pad_length)
        except h2.exceptions.StreamClosedError:
            # The server finished (or reset) the stream first, e.g. it answered
            # without reading the whole body: real clients stop sending too.
            pass

    async def _h2_send_body(
        self, stream: TestStream, data: bytes, end: bool, pad_length: int | None
    ) -> None:
        view = memoryview(data)
        overhead = 0 if pad_length is None else pad_length + 1
        while view:
            window = self._h2.local_flow_control_window(stream.stream_id) - overhead
            size = min(window, self._h2.max_outbound_frame_size - overhead, len(view))
            if size <= 0:
                changed = self._window_changed
                await self._flush()
                await changed.wait()  # the reader task sees the WINDOW_UPDATE
                if self.closed.is_set():
                    raise trio.BrokenResourceError("the connection closed while waiting for window")
                continue
            self._h2.send_data(stream.stream_id, bytes(view[:size]), pad_length=pad_length)
            view = view[size:]
            await self._flush()
        if end:
            self._h2.end_stream(stream.stream_id)
            await self._flush()

    async def _reset(self, stream: TestStream, error_code: int) -> None:
        self._h2.reset_stream(stream.stream_id, error_code)
        # Whatever arrived for it but was not read is credited back, as a
        # real client does when it abandons a stream.
        self._ack(stream.stream_id, self._withheld.pop(stream.stream_id, 0))
        stream._end()
        await self._flush()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._h2.data_to_send()
            if data:
                await self._send_locked(data)


def new_client(
    stream: MemoryEndpoint, *, http2: bool, authority: str, record_frames: bool = False
) -> TestClient:
    """The client for ``stream``, speaking HTTP/2 (prior knowledge) or HTTP/1.1."""
    if http2:
        return _HTTP2Client(stream, authority, record_frames=record_frames)
    return _HTTP1Client(stream, authority)
