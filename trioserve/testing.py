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

from .config import Config
from .connection import ServerContext, serve_connection
from .server import context_from_config
from .wsgi import ConnectionInfo, StartResponse, WSGIApp

__all__ = [
    "AppProbe",
    "AppRecord",
    "TestClient",
    "TestResponse",
    "TestStream",
    "open_test_client",
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
    closed: bool = False  # the iterable's close() was called
    exception: BaseException | None = None  # what the app raised, if anything
    thread: str = ""
    finished: trio.Event = field(default_factory=trio.Event)


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

    async def wait_finished(self, index: int = -1) -> AppRecord:
        """Wait until request ``index`` (default: the latest) has finished in the app."""
        if not self.records:
            await self.wait_started()
        record = self.records[index]
        await record.finished.wait()
        return record


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
            self._record.closed = True
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
    body: bytes = b""
    http_version: str = ""
    informational: list[int] = field(default_factory=list)  # e.g. [100] after 100 Continue

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


class TestStream:
    """One request in flight: send its body in pieces, read its response, reset it."""

    __test__ = False

    def __init__(self, client: TestClient, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        self.response = TestResponse()
        self.headers_received = trio.Event()
        self.ended = trio.Event()  # response complete, or reset
        self.reset_code: int | None = None  # RST_STREAM code from the server (HTTP/2)
        self._data: deque[bytes] = deque()
        self._data_arrived = trio.Event()

    def _push_data(self, data: bytes) -> None:
        self._data.append(data)
        self._data_arrived.set()
        self._data_arrived = trio.Event()

    def _end(self) -> None:
        self.ended.set()
        self.headers_received.set()
        self._data_arrived.set()

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send a piece of the request body (and end it if ``end``)."""
        await self.client._send_body(self, data, end)

    async def end(self) -> None:
        """End the request body."""
        await self.client._send_body(self, b"", True)

    async def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the request: RST_STREAM on HTTP/2, an abrupt disconnect on HTTP/1.1."""
        await self.client._reset(self, error_code)

    async def receive_headers(self) -> TestResponse:
        """Wait for the response head (status and headers)."""
        await self.client._pump_until(self.headers_received)
        return self.response

    async def receive_data(self) -> bytes:
        """The next piece of response body; b"" once the response is complete."""
        while not self._data and not self.ended.is_set():
            await self.client._pump_until_data(self)
        if self._data:
            data = self._data.popleft()
            self.response.body += data
            self.client._consumed(self, len(data))
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

    def __init__(self, stream: MemoryEndpoint, http2: bool, authority: str) -> None:
        self.stream = stream
        self.http2 = http2
        self.authority = authority
        self.paused = False
        self._send_lock = trio.Lock()
        self._streams: dict[int, TestStream] = {}
        self._resume = trio.Event()
        self._unacked: dict[int, int] = {}
        self._window_changed = trio.Event()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = trio.Event()  # the server closed the connection
        if http2:
            config = h2.config.H2Configuration(client_side=True, header_encoding=None)
            self._h2 = h2.connection.H2Connection(config)
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

    def pause_reading(self) -> None:
        """Stop consuming the response: the server must stop sending (backpressure)."""
        self.paused = True

    async def resume_reading(self) -> None:
        """Consume again (and return the flow-control credit withheld meanwhile)."""
        self.paused = False
        self._resume.set()
        self._resume = trio.Event()
        if self.http2:
            for stream_id, size in list(self._unacked.items()):
                self._ack(stream_id, size)
            self._unacked.clear()
            await self._flush()

    async def disconnect(self, *, abort: bool = False) -> None:
        """Drop the connection: ``abort=True`` like a TCP reset, otherwise a clean close."""
        if abort:
            self.stream.abort()
        else:
            await self.stream.aclose()
        for stream in self._streams.values():
            stream._end()

    async def ping(self) -> None:
        """HTTP/2: send PING (useful to provoke a round trip)."""
        self._h2.ping(b"trioserv")
        await self._flush()

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
        """Read and handle one batch of HTTP/1.1 response events."""
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
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                stream._end()
            return

    # ---- HTTP/2 -------------------------------------------------------------------

    async def _h2_start(self, settings: dict[int, int] | None) -> None:
        values = {h2.settings.SettingCodes(code): value for code, value in (settings or {}).items()}
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values=values)
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
            await self._send_body(stream, body, end)
        return stream

    async def _h2_reader_task(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                for event in self._h2.receive_data(data):
                    self._h2_event(event)
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed.set()
        self._window_changed.set()
        for stream in self._streams.values():
            stream._end()

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
            if stream is not None:
                stream._push_data(event.data)
                self._unacked[event.stream_id] = self._unacked.get(event.stream_id, 0) + size
            else:
                self._ack(event.stream_id, size)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream._end()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset_code = int(event.error_code or 0)
            stream._end()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_changed.set()
            self._window_changed = trio.Event()

    def _ack(self, stream_id: int, size: int) -> None:
        if size:
            try:
                self._h2.acknowledge_received_data(size, stream_id)
            except Exception:  # connection already closed
                pass

    # ---- shared plumbing ----------------------------------------------------------

    def _consumed(self, stream: TestStream, size: int) -> None:
        if self.http2 and not self.paused:
            unacked = self._unacked.pop(stream.stream_id, 0)
            self._ack(stream.stream_id, unacked)

    async def _pump_until(self, event: trio.Event) -> None:
        if self.http2:
            await event.wait()
            return
        while not event.is_set():
            await self._h1_pump()

    async def _pump_until_data(self, stream: TestStream) -> None:
        if self.http2:
            arrived = stream._data_arrived
            if not self.paused:
                await self._flush()
            await arrived.wait()
        else:
            await self._h1_pump()

    async def _send_body(self, stream: TestStream, data: bytes, end: bool) -> None:
        if not self.http2:
            out = b""
            if data:
                out += self._h11.send(h11.Data(data=data)) or b""
            if end:
                out += self._h11.send(h11.EndOfMessage()) or b""
            await self._raw_send(out)
            return
        try:
            await self._h2_send_body(stream, data, end)
        except h2.exceptions.StreamClosedError:
            # The server finished (or reset) the stream first, e.g. it answered
            # without reading the whole body: real clients stop sending too.
            pass

    async def _h2_send_body(self, stream: TestStream, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while view:
            window = self._h2.local_flow_control_window(stream.stream_id)
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            if size <= 0:
                changed = self._window_changed
                await self._flush()
                await changed.wait()  # the reader task sees the WINDOW_UPDATE
                continue
            self._h2.send_data(stream.stream_id, bytes(view[:size]))
            view = view[size:]
            await self._flush()
        if end:
            self._h2.end_stream(stream.stream_id)
            await self._flush()

    async def _reset(self, stream: TestStream, error_code: int) -> None:
        if self.http2:
            self._h2.reset_stream(stream.stream_id, error_code)
            stream._end()
            await self._flush()
        else:
            await self.disconnect(abort=True)

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            await self._raw_send(data)

    async def _raw_send(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed.set()


@asynccontextmanager
async def open_test_client(
    app: WSGIApp,
    *,
    config: Config | None = None,
    http2: bool = False,
    h2_settings: dict[int, int] | None = None,
    pipe_capacity: int = DEFAULT_PIPE_CAPACITY,
    client_addr: tuple[str, int] = ("127.0.0.1", 50000),
    **options: Any,
) -> AsyncIterator[TestClient]:
    """Serve ``app`` over one in-memory connection and yield a client for it.

    Args:
      app: the WSGI app (wrap it in :class:`AppProbe` to see what it saw).
      config: server configuration; ``options`` override its fields.
      http2: speak HTTP/2 (prior knowledge) instead of HTTP/1.1.
      h2_settings: the client's HTTP/2 SETTINGS, e.g.
        ``{h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}`` for a zero window.
      pipe_capacity: bytes buffered per direction before a writer blocks.

    On exit the connection is closed and the server side waits for every app
    thread it started, so nothing outlives the block.
    """
    config = (config or Config()).replace(**options) if options else (config or Config())
    ctx: ServerContext = context_from_config(app, config)
    client_end, server_end = memory_connection(pipe_capacity)
    info = ConnectionInfo(
        scheme="http",
        server_name="testserver",
        server_port="80",
        client_addr=client_addr[0],
        client_port=str(client_addr[1]),
        root_path=ctx.root_path,
    )
    client = TestClient(client_end, http2, "testserver")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_end, ctx, info)
        if http2:
            await client._h2_start(h2_settings)
            nursery.start_soon(client._h2_reader_task)
        try:
            yield client
        except BaseException:
            client.stream.abort()  # cancel whatever the server still runs for us
            raise
        else:
            await client.stream.aclose()
