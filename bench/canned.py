"""The canned-response limit: the fastest an HTTP/1.1 server on trio can answer.

Every read is scanned for request terminators (``\\r\\n\\r\\n``) and that many
precomputed responses are sent back in one ``send_all``. No parsing, no WSGI, no
threads: whatever a real trio-based server does on top of this is overhead.
Only bodiless requests (GET/HEAD) are understood, which is all the hello and
idle-connection scenarios send.

    python bench/canned.py -b 127.0.0.1:8000
    python bench/canned.py -b 127.0.0.1:8000 --shaped

``--shaped`` answers the same way but through trioserve's task shape, still with
no parsing and no WSGI: a nursery per connection running a reader task, a
sender task and a request task that answers the requests in turn, each
response coming back from a worker thread (``trio.to_thread.run_sync`` under
a ``CapacityLimiter``, the thread under ``SCHED_BATCH`` and the limiter
bounding how far the event loop runs ahead, as the trioserve command's
defaults have it: trioserve.app_threads), on non-blocking socket calls as
trioserve's, the reader waiting for input through trioserve's watch on busy
sockets (trioserve.readiness). What that costs is the floor trioserve's design
puts under any HTTP/1.1 request, and its idle connections (which doze after
DOZE_AFTER, as trioserve's do: their tasks end, and trioserve's keeper of
dozing connections starts one again when the socket turns readable) show the
floor of its memory per connection.
"""

from __future__ import annotations

import argparse
import math
import os
import resource

import trio

from trioserve.app_threads import app_thread_limiter, batch_this_thread
from trioserve.dozing import DozingConnections
from trioserve.readiness import SocketWatch, WatchedSocket
from trioserve.wakeup import Wakeup

TERMINATOR = b"\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: canned\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 13\r\n"
    b"\r\n"
    b"Hello, world!"
)


async def handle(stream: trio.SocketStream) -> None:
    tail = b""  # the last bytes of the previous read: a terminator may straddle reads
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer = tail + data
            count = buffer.count(TERMINATOR)
            if count:
                await stream.send_all(RESPONSE * count)
                tail = buffer[buffer.rfind(TERMINATOR) + len(TERMINATOR) :][-3:]
            else:
                tail = buffer[-3:]
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


# --shaped: trioserve's threads (its default --threads) and its write timeout.
LIMITER_TOKENS = 40
WRITE_TIMEOUT = 30.0
# --shaped: idle this long, a connection dozes as trioserve's do (its tasks
# end until the socket is readable again; trioserve.dozing.DOZE_AFTER).
DOZE_AFTER = 0.1
READ_SIZE = 64 * 1024  # trioserve.connection.READ_SIZE


def _answer() -> bytes:
    batch_this_thread()  # as the command's app threads are (Linux)
    return RESPONSE


class ShapedConnection:
    """Reader, sender and request task, as trioserve.connection runs them for HTTP/1.1.

    The socket is read and written with non-blocking system calls, waiting on
    the event loop only when the kernel says so (trioserve's ``_SocketIO``), and
    input waited for through the server's one edge-triggered watch while the
    connection has tasks.
    One long-lived request task answers the requests in turn, each in the
    cancel scope the task lends it (a new one only after a cancellation), and
    the tasks sleep on reusable wake-ups.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        limiter: trio.CapacityLimiter,
        dozing: DozingConnections,
        watch: SocketWatch,
    ) -> None:
        self.stream = stream
        self.keeper = dozing
        self.watch = watch
        self.watched: WatchedSocket | None = None  # while it has tasks, as trioserve's
        self.fd = stream.socket.fileno()
        self.limiter = limiter
        self.output: list[bytes] = []
        self.output_wanted = Wakeup()
        self.waiting = 0  # requests read, not yet taken by the request task
        self.requests_wanted = Wakeup()
        self.in_flight = 0  # requests not yet answered
        self.idle_since = trio.current_time()
        self.read_scope: trio.CancelScope | None = None
        self.dozing = False

    async def run(self) -> None:
        """Serve until the connection ends, or dozes: then, with no task left, the
        keeper starts ``resume`` once the socket is readable (no keep-alive time)."""
        listed = False
        try:
            await self.run_tasks()
            if self.dozing:
                listed = self.keeper.add(self.fd, math.inf, self.resume)
        finally:
            if not listed:
                await trio.aclose_forcefully(self.stream)

    async def resume(self, readable: bool) -> None:
        if not readable:  # the keeper was cancelled
            await trio.aclose_forcefully(self.stream)
            return
        self.dozing = False
        await self.run()

    async def run_tasks(self) -> None:
        self.watched = self.watch.add(self.fd)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reader, nursery)
                nursery.start_soon(self.sender, nursery)
                nursery.start_soon(self.requests)
        finally:
            self.watch.remove(self.watched)
            self.watched = None

    async def reader(self, nursery: trio.Nursery) -> None:
        tail = b""
        drained = True
        while True:
            # trioserve's idle scope: one per reader, its deadline moved only
            # earlier (by the sender), stale ones found out when they fire.
            with trio.CancelScope() as self.read_scope:
                while True:
                    if drained:
                        watched = self.watched
                        if watched is None:
                            await trio.lowlevel.wait_readable(self.fd)
                        else:
                            await watched.wait_readable()
                    try:
                        data = os.read(self.fd, READ_SIZE)
                    except BlockingIOError:
                        drained = True
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                    drained = len(data) < READ_SIZE
                    buffer = tail + data
                    count = buffer.count(TERMINATOR)
                    if count:
                        self.in_flight += count
                        self.waiting += count
                        self.requests_wanted.set()
                    tail = buffer[-3:]
            idle = not self.in_flight and not self.output
            if idle and trio.current_time() >= self.idle_since + DOZE_AFTER:
                self.dozing = True
                nursery.cancel_scope.cancel()
                return

    async def requests(self) -> None:
        while True:
            with trio.CancelScope() as scope:  # lent to each request, as trioserve's
                while not scope.cancel_called:
                    if not self.waiting:
                        await self.requests_wanted.wait()
                        continue
                    self.waiting -= 1
                    response = await trio.to_thread.run_sync(_answer, limiter=self.limiter)
                    self.output.append(response)
                    self.in_flight -= 1
                    self.output_wanted.set()

    async def sender(self, nursery: trio.Nursery) -> None:
        with trio.CancelScope() as write_scope:  # trioserve's write-timeout scope
            while True:
                if not self.output:
                    await self.output_wanted.wait()
                    continue
                data = memoryview(b"".join(self.output))
                self.output.clear()
                while data:
                    try:
                        data = data[os.write(self.fd, data) :]
                    except BlockingIOError:
                        write_scope.deadline = trio.current_time() + WRITE_TIMEOUT
                        await trio.lowlevel.wait_writable(self.fd)
                    except OSError:
                        nursery.cancel_scope.cancel()
                        return
                write_scope.deadline = math.inf
                if not self.in_flight and not self.output:
                    self.idle_since = trio.current_time()
                    scope = self.read_scope
                    if scope is not None and scope.deadline == math.inf:
                        scope.deadline = self.idle_since + DOZE_AFTER


async def main(host: str, port: int, shaped: bool = False) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=2048)
    if not shaped:
        await trio.serve_listeners(handle, listeners)
        return
    limiter = app_thread_limiter(trio.CapacityLimiter(LIMITER_TOKENS), "batch")
    dozing = DozingConnections()
    watch = SocketWatch()

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # (Not trio.serve_listeners: it closes a connection once its task returns,
        # and a dozing connection's task has returned.)
        while True:
            stream = await listener.accept()
            nursery.start_soon(ShapedConnection(stream, limiter, dozing, watch).run)

    async with trio.open_nursery() as nursery:
        await nursery.start(dozing.keep)
        await nursery.start(watch.watch)
        for listener in listeners:
            nursery.start_soon(accept, listener, nursery)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--bind", default="127.0.0.1:8000", metavar="HOST:PORT")
    parser.add_argument(
        "--shaped", action="store_true", help="answer through trioserve's task shape"
    )
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        trio.run(main, host, int(port), args.shaped)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
