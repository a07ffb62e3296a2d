"""Test your WSGI app against trioserve, in memory, under resets and disconnects.

No sockets, no ports: the client and the server talk through an in-memory
pipe with a bounded buffer, so a client that stops reading really does push
back on the server, exactly as a TCP peer would. Works in any trio test
(pytest-trio's ``trio_mode`` included)::

    from trioserve.testing import AppProbe, open_test_client

    async def test_upload_is_cancelled_on_reset():
        probe = AppProbe(my_app)
        async with open_test_client(probe, http2=True) as client:
            stream = await client.open_stream("POST", "/upload", end=False)
            await stream.send(b"first part")
            await stream.reset()                    # RST_STREAM(CANCEL)
            record = await probe.wait_finished()
        assert record.cancelled and record.closed   # the app saw it, close() ran

What the pieces do:

* :func:`open_test_client` serves an app (or a ``Config``-configured server)
  over one in-memory connection and yields a :class:`TestClient`.
* :meth:`TestClient.request` sends a whole request and returns a
  :class:`TestResponse`; :meth:`TestClient.open_stream` gives a
  :class:`TestStream` to send the body in pieces, read the response piece by
  piece, and :meth:`TestStream.reset` it at any moment.
* :meth:`TestClient.pause_reading` / :meth:`TestClient.resume_reading` stop
  and restart consuming the response (HTTP/2: no more WINDOW_UPDATEs, the
  window runs to zero; HTTP/1.1: the socket stops being read).
  :meth:`TestClient.disconnect` drops the connection (``abort=True``: like a
  TCP reset).
* :class:`AppProbe` wraps your app and records, per request, what it read,
  whether it was cancelled, and whether ``close()`` was called.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
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

from .config import Config
from .context import ServerContext, context_from_config
from .http2 import keep_open_after_goaway
from .opening import serve_connection
from .wsgi import ConnectionInfo, StartResponse, WSGIApp

__all__ = [
    "AppProbe",
    "AppRecord",
    "FrameInfo",
    "TestClient",
    "TestResponse",
    "TestServer",
    "TestStream",
    "memory_connection",
    "open_test_client",
    "open_test_server",
]

# Bytes the in-memory pipe holds in each direction before the writer blocks:
# about what a loopback TCP connection buffers.
DEFAULT_PIPE_CAPACITY = 256 * 1024


# ---------------------------------------------------------------------------
# The in-memory transport
# ---------------------------------------------------------------------------


class _Pipe:
    """One direction of the in-memory connection: a bounded byte buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.eof = False  # the writer closed its side (FIN)
        self.broken = False  # reset: both ends fail
        self.reader_gone = False  # the reader closed its end: writes fail
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        await self._changed.wait()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        await trio.lowlevel.checkpoint()
        while view:
            if self.broken or self.reader_gone:
                raise trio.BrokenResourceError("connection reset by peer")
            room = self.capacity - len(self.buffer)
            if room <= 0:
                await self.wait()
                continue
            self.buffer += view[:room]
            view = view[room:]
            self.notify()

    async def read(self, max_bytes: int | None) -> bytes:
        while not self.buffer and not self.eof and not self.broken:
            await self.wait()
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise trio.BrokenResourceError("connection reset by peer")
        n = len(self.buffer) if max_bytes is None else min(max_bytes, len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.notify()
        return data


class MemoryEndpoint(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection with bounded buffers (see :func:`memory_connection`)."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if self._out.eof:
            raise trio.ClosedResourceError("send_eof() was called")
        await self._out.write(data)

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._out.buffer) >= self._out.capacity and not self._out.broken:
            await self._out.wait()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        self._out.eof = True
        self._out.notify()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        return await self._in.read(max_bytes)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.eof = True
            self._in.reader_gone = True
            self._out.notify()
            self._in.notify()
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Drop the connection like a TCP reset: both sides' next operations fail."""
        for pipe in (self._out, self._in):
            pipe.broken = True
            pipe.buffer.clear()
            pipe.notify()


def memory_connection(
    capacity: int = DEFAULT_PIPE_CAPACITY,
) -> tuple[MemoryEndpoint, MemoryEndpoint]:
    """A connected (client, server) pair of in-memory streams with bounded buffers."""
    to_server, to_client = _Pipe(capacity), _Pipe(capacity)
    return MemoryEndpoint(to_server, to_client), MemoryEndpoint(to_client, to_server)


# ---------------------------------------------------------------------------
# What the app saw
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class AppRecord:
    """What one app invocation saw and did, filled in from its worker thread."""

    environ: dict[str, Any]
    body_read: bytearray = field(default_factory=bytearray)
    bytes_written: int = 0
    cancelled: bool = False  # trio.Cancelled reached the app (reset, disconnect, shutdown)
    close_calls: int = 0  # how often the iterable's close() was called (PEP 3333: once)
    exception: BaseException | None = None  # what the app raised, if anything
    thread: str = ""
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def closed(self) -> bool:
        """The iterable's close() was called."""
        return self.close_calls > 0

    @property
    def path(self) -> str:
        return str(self.environ.get("PATH_INFO", ""))


class AppProbe:
    """Wrap a WSGI app to record what each invocation saw (an :class:`AppRecord`).

    The wrapper is transparent: list responses stay lists (the server's
    one-hop fast path still applies), streamed ones keep their ``close()``.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.records: list[AppRecord] = []
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._added = trio.Event()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        record = AppRecord(environ=environ, thread=threading.current_thread().name)
        with self._lock:
            self.records.append(record)
        trio.from_thread.run_sync(self._notify_added)
        environ["wsgi.input"] = _RecordingInput(environ["wsgi.input"], record)

        def recording_start_response(*args: Any) -> Any:
            write = start_response(*args)

            def recording_write(data: bytes) -> None:
                try:
                    write(data)
                except trio.Cancelled:
                    record.cancelled = True
                    raise
                record.bytes_written += len(data)

            return recording_write

        try:
            result = self.app(environ, recording_start_response)
        except BaseException as exc:
            record.cancelled |= isinstance(exc, trio.Cancelled)
            record.exception = exc
            self._finish(record)
            raise
        if isinstance(result, list | tuple):
            record.bytes_written += sum(len(chunk) for chunk in result)
            self._finish(record)
            return result
        return _RecordingIterable(result, record, self)

    def _notify_added(self) -> None:
        self._added.set()
        self._added = trio.Event()

    def _finish(self, record: AppRecord) -> None:
        if not record.cancelled:
            try:
                trio.from_thread.check_cancelled()
            except trio.Cancelled:
                record.cancelled = True
        trio.from_thread.run_sync(record.finished.set)

    async def wait_started(self, count: int = 1) -> AppRecord:
        """Wait until ``count`` requests have reached the app; return the last of them."""
        while len(self.records) < count:
            await self._added.wait()
        return self.records[count - 1]

    async def wait_finished(self, index: int = -1, *, path: str | None = None) -> AppRecord:
        """Wait until a request has finished in the app, and return its record.

        The request is ``records[index]`` (default: the latest to start), or the
        first one for ``path`` (PATH_INFO) if given. "Finished" means the app
        returned a list, raised, or its iterable's close() was called.
        """
        if path is not None:
            while (record := self.find(path)) is None:
                await self._added.wait()
        else:
            if not self.records:
                await self.wait_started()
            record = self.records[index]
        await record.finished.wait()
        return record

    def find(self, path: str) -> AppRecord | None:
        """The first record whose PATH_INFO is ``path``, or None."""
        return next((record for record in self.records if record.path == path), None)


class _RecordingInput:
    def __init__(self, wrapped: Any, record: AppRecord) -> None:
        self._wrapped = wrapped
        self._record = record

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._wrapped, name)(*args)
        except trio.Cancelled:
            self._record.cancelled = True
            raise

    def read(self, *args: Any) -> bytes:
        data: bytes = self._call("read", *args)
        self._record.body_read += data
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._call("readline", *args)
        self._record.body_read += data
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self._call("readlines", *args)
        for line in lines:
            self._record.body_read += line
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _RecordingIterable:
    def __init__(self, wrapped: Iterable[bytes], record: AppRecord, probe: AppProbe) -> None:
        self._wrapped = wrapped
        self._record = record
        self._probe = probe

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._wrapped:
                self._record.bytes_written += len(chunk)
                yield chunk
        except BaseException as exc:
            self._record.cancelled |= isinstance(exc, trio.Cancelled)
            if not isinstance(exc, GeneratorExit):
                self._record.exception = exc
            raise

    def close(self) -> None:
        try:
            close = getattr(self._wrapped, "close", None)
            if close is not None:
                close()
        finally:
            self._record.close_calls += 1
            self._probe._finish(self._record)


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


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
    """An HTTP/1.1 or HTTP/2 client on one in-memory connection to the server."""

    __test__ = False

    def __init__(
        self, stream: MemoryEndpoint, http2: bool, authority: str, *, record_frames: bool = False
    ) -> None:
        self.stream = stream
        self.http2 = http2
        self.authority = authority
        self.paused = False  # not consuming: HTTP/2 credit withheld (see pause_reading)
        self.socket_paused = False  # not even reading the socket
        self.closed = trio.Event()  # the server closed the connection
        self.goaway_received: h2.events.ConnectionTerminated | None = None  # last GOAWAY
        self.frames: list[FrameInfo] | None = [] if record_frames else None
        self._streams: dict[int, TestStream] = {}
        self._send_lock = trio.Lock()
        self._resume = trio.Event()
        self._withheld: dict[int, int] = {}  # HTTP/2 credit not yet returned while paused
        self._window_changed = trio.Event()
        self._output_wanted = trio.Event()
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_count = 0
        self._frame_buffer = bytearray()
        if http2:
            config = h2.config.H2Configuration(client_side=True, header_encoding=None)
            self._h2 = h2.connection.H2Connection(config)
            keep_open_after_goaway(self._h2)
        else:
            self._h11 = h11.Connection(h11.CLIENT)
            self._h1_stream: TestStream | None = None
            self._next_h1_id = 1

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
        if self.http2:
            return await self._h2_open(method, path, fields, body, end)
        return await self._h1_open(method, path, fields, body, end)

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
        if self.http2:
            for stream_id, size in list(self._withheld.items()):
                self._ack(stream_id, size)
            self._withheld.clear()
            await self._flush()

    async def open_window(self, size: int, stream_id: int | None = None) -> None:
        """HTTP/2: send WINDOW_UPDATE for ``stream_id`` (None: the connection)."""
        self._h2.increment_flow_control_window(size, stream_id)
        await self._flush()

    async def ping(self) -> None:
        """HTTP/2: send a PING and wait for its ACK (a full round trip through the server)."""
        self._ping_count += 1
        opaque = self._ping_count.to_bytes(8, "big")
        acked = self._pings[opaque] = trio.Event()
        self._h2.ping(opaque)
        await self._flush()
        await acked.wait()
        if self._pings.pop(opaque, None) is not None:  # woken by the end, not by the ACK
            raise trio.BrokenResourceError("the connection closed before the PING was answered")

    def send_window(self, stream_id: int | None = None) -> int:
        """HTTP/2: bytes this client may still send on ``stream_id`` (None: the connection)."""
        if stream_id is None:
            return int(self._h2.outbound_flow_control_window)
        return int(self._h2.local_flow_control_window(stream_id))

    async def goaway(self, error_code: int = 0, last_stream_id: int = 0) -> None:
        """HTTP/2: send GOAWAY, keeping the connection open for streams in flight."""
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        await self._flush()
        await self._raw_send(frame.serialize())

    async def disconnect(self, *, abort: bool = False) -> None:
        """Drop the connection: ``abort=True`` like a TCP reset, otherwise a clean close."""
        if abort:
            self.stream.abort()
        else:
            await self.stream.aclose()
        for stream in self._streams.values():
            stream._end()

    # ---- HTTP/1.1 ---------------------------------------------------------------

    async def _h1_open(
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

    async def _h1_pump(self) -> None:
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

    # ---- HTTP/2 -------------------------------------------------------------------

    async def _h2_start(self, settings: dict[int, int] | None) -> None:
        values = {h2.settings.SettingCodes(code): value for code, value in (settings or {}).items()}
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values=values)
        self._h2.max_inbound_frame_size = self._h2.local_settings.max_frame_size
        self._h2.initiate_connection()
        await self._flush()

    async def _h2_open(
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

    async def _h2_reader_task(self) -> None:
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
                    self._h2_event(event)
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

    async def _h2_sender_task(self) -> None:
        while True:
            await self._output_wanted.wait()
            self._output_wanted = trio.Event()
            await self._flush()

    def _h2_event(self, event: h2.events.Event) -> None:
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

    # ---- shared plumbing ----------------------------------------------------------

    async def _pump_until(self, event: trio.Event) -> None:
        if self.http2:
            await event.wait()
            return
        while not event.is_set():
            await self._h1_pump()

    async def _pump_until_data(self, stream: TestStream) -> None:
        if self.http2:
            await stream._data_arrived.wait()
        else:
            await self._h1_pump()

    async def _send_body(
        self, stream: TestStream, data: bytes, end: bool, pad_length: int | None
    ) -> None:
        if not self.http2:
            out = b""
            if data:
                out += self._h11.send(h11.Data(data=data)) or b""
            if end:
                out += self._h11.send(h11.EndOfMessage()) or b""
            await self._raw_send(out)
            return
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
        if self.http2:
            self._h2.reset_stream(stream.stream_id, error_code)
            # Whatever arrived for it but was not read is credited back, as a
            # real client does when it abandons a stream.
            self._ack(stream.stream_id, self._withheld.pop(stream.stream_id, 0))
            stream._end()
            await self._flush()
        else:
            await self.disconnect(abort=True)

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._h2.data_to_send()
            if data:
                await self._send_locked(data)

    async def _raw_send(self, data: bytes) -> None:
        if data:
            async with self._send_lock:
                await self._send_locked(data)

    async def _send_locked(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed.set()


class TestServer:
    """A trioserve server without sockets: each :meth:`connect` is a new connection.

    All connections share the server's state, thread limiter included, as the
    connections of a real server do.
    """

    __test__ = False

    def __init__(self, ctx: ServerContext, nursery: trio.Nursery) -> None:
        self.context = ctx
        self._nursery = nursery
        self._next_port = 50000

    @asynccontextmanager
    async def connect(
        self,
        *,
        http2: bool = False,
        h2_settings: dict[int, int] | None = None,
        pipe_capacity: int = DEFAULT_PIPE_CAPACITY,
        client_addr: tuple[str, int] | None = None,
        record_frames: bool = False,
    ) -> AsyncIterator[TestClient]:
        """Open a connection and yield its client.

        Args:
          http2: speak HTTP/2 (prior knowledge) instead of HTTP/1.1.
          h2_settings: the client's HTTP/2 SETTINGS, e.g.
            ``{h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}`` for a zero window.
          pipe_capacity: bytes buffered per direction before a writer blocks.
          client_addr: REMOTE_ADDR/REMOTE_PORT as the app sees them.
          record_frames: keep a :class:`FrameInfo` per HTTP/2 frame received
            in ``client.frames``.

        On exit the connection is closed (abruptly if the block raised) and the
        server side finishes, every app thread it started included.
        """
        if client_addr is None:
            client_addr = ("127.0.0.1", self._next_port)
            self._next_port += 1
        client_end, server_end = memory_connection(pipe_capacity)
        info = ConnectionInfo(
            scheme="http",
            server_name="testserver",
            server_port="80",
            client_addr=client_addr[0],
            client_port=str(client_addr[1]),
            root_path=self.context.root_path,
            forwarding=self.context.forwarding,
        )
        client = TestClient(client_end, http2, "testserver", record_frames=record_frames)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_end, self.context, info)
            if http2:
                await client._h2_start(h2_settings)
                nursery.start_soon(client._h2_reader_task)
                nursery.start_soon(client._h2_sender_task)
            try:
                yield client
            except BaseException:
                client.stream.abort()  # cancel whatever the server still runs for us
                raise
            else:
                await client.stream.aclose()
                nursery.cancel_scope.cancel()  # the client's own tasks


@asynccontextmanager
async def open_test_server(
    app: WSGIApp, *, config: Config | None = None, **options: Any
) -> AsyncIterator[TestServer]:
    """A server for ``app`` that clients reach with ``server.connect()``; see TestServer."""
    config = (config or Config()).replace(**options) if options else (config or Config())
    async with trio.open_nursery() as nursery:
        yield TestServer(context_from_config(app, config), nursery)


@asynccontextmanager
async def open_test_client(
    app: WSGIApp,
    *,
    config: Config | None = None,
    http2: bool = False,
    h2_settings: dict[int, int] | None = None,
    pipe_capacity: int = DEFAULT_PIPE_CAPACITY,
    client_addr: tuple[str, int] = ("127.0.0.1", 50000),
    record_frames: bool = False,
    **options: Any,
) -> AsyncIterator[TestClient]:
    """Serve ``app`` over one in-memory connection and yield a client for it.

    The same as ``open_test_server(app, ...)`` followed by one
    ``server.connect(...)``; see :meth:`TestServer.connect` for the
    arguments. ``config`` and ``options`` configure the server
    (``threads=1``, ``h2_initial_window_size=...``).
    """
    async with (
        open_test_server(app, config=config, **options) as server,
        server.connect(
            http2=http2,
            h2_settings=h2_settings,
            pipe_capacity=pipe_capacity,
            client_addr=client_addr,
            record_frames=record_frames,
        ) as client,
    ):
        yield client
