"""The in-memory transport: a connected pair of streams with bounded buffers.

Each direction is a bounded byte buffer, so a peer that stops reading really
does push back on the writer, as a TCP peer would; ``abort()`` fails both
sides' next operations, like a TCP reset.
"""

from __future__ import annotations

import trio

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
