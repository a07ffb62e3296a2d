"""trioserve beside an asyncio library, in one trio program, through trio-asyncio.

Run it from the repository root (needs ``pip install trio-asyncio``)::

    python examples/with_asyncio.py --demo     # start, call itself, print, stop, exit
    python examples/with_asyncio.py            # serve http://127.0.0.1:8000/price/TRIO until ^C

Many client libraries only come in an asyncio flavour (database drivers,
message-bus clients). ``trio_asyncio.open_loop()`` runs an asyncio event loop
inside a trio program, so such a library can live in the same nursery as
``serve_wsgi``. Here :class:`PriceService` stands in for it: an asyncio task
that answers price lookups from an ``asyncio.Queue``.

A WSGI app runs in a worker thread. To await an asyncio coroutine from there,
hop to trio with ``trio.from_thread.run`` and from trio to asyncio with
``trio_asyncio.aio_as_trio``::

    quote = trio.from_thread.run(trio_asyncio.aio_as_trio(service.lookup), symbol)

``trio.from_thread.run`` runs the coroutine in the request's own trio task
(trio >= 0.23), under that task's cancel scope. So when the client goes away
(an HTTP/2 ``RST_STREAM``, a dropped connection) and trioserve cancels the
request, trio-asyncio cancels the asyncio task: the coroutine receives
``asyncio.CancelledError`` where it awaits, and the app thread then gets
``trio.Cancelled`` out of ``from_thread.run``. Nothing keeps waiting for a
client that is gone, on either side. ``--demo`` shows this with a client that
resets its connection while its lookup is held.

The ``trioserve`` command does not open an asyncio loop, so this app is served
by this program (``serve_wsgi``), not by ``trioserve examples.with_asyncio:...``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio
import trio_asyncio

from trioserve import Server, serve_wsgi

DEFAULT_PRICES = {"TRIO": 35.0, "ASYNCIO": 34.0, "WSGI": 33.33}


class ServiceStopped(Exception):
    """The price service stopped before it answered."""


@dataclass
class _Lookup:
    symbol: str
    hold: bool
    future: asyncio.Future[float] = field(repr=False)


class PriceService:
    """An asyncio component: lookups go through an ``asyncio.Queue`` to the service's task.

    Every ``async def`` here is asyncio-flavoured: it runs on the asyncio loop
    of ``trio_asyncio.open_loop()``. From trio, call them through
    ``trio_asyncio.aio_as_trio``.

    A lookup with ``hold=True`` is queued but never answered (a slow query that
    only ends when its caller gives up); ``cancelled`` lists the lookups that
    received ``asyncio.CancelledError``.
    """

    def __init__(self, prices: dict[str, float] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)
        self.answered = 0
        self.cancelled: list[str] = []  # symbols whose lookup saw asyncio.CancelledError
        self._queue: asyncio.Queue[_Lookup] = asyncio.Queue()
        self._held: list[_Lookup] = []
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    async def run(self) -> None:
        """The service's own task: answer lookups until cancelled."""
        try:
            while True:
                lookup = await self._queue.get()
                if lookup.hold:
                    self._held.append(lookup)
                    self._notify()
                    continue
                await asyncio.sleep(0)  # a round trip through the asyncio loop, as I/O would be
                if lookup.future.done():  # its caller gave up meanwhile
                    continue
                price = self.prices.get(lookup.symbol)
                if price is None:
                    lookup.future.set_exception(LookupError(lookup.symbol))
                else:
                    self.answered += 1
                    lookup.future.set_result(price)
        finally:
            # Whoever still waits gets an error rather than waiting forever.
            for lookup in [*self._held, *_drain(self._queue)]:
                if not lookup.future.done():
                    lookup.future.set_exception(ServiceStopped("the price service stopped"))

    async def lookup(self, symbol: str, *, hold: bool = False) -> dict[str, Any]:
        """The price of ``symbol``; LookupError if unknown."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Lookup(symbol, hold, future))
        try:
            price = await future
        except asyncio.CancelledError:
            self.cancelled.append(symbol)
            self._notify()
            raise
        return {"symbol": symbol, "price": price, "via": "asyncio"}

    def held(self) -> int:
        """Lookups being held right now (waiting, not yet cancelled)."""
        return sum(not lookup.future.done() for lookup in self._held)

    async def wait_held(self, count: int = 1) -> None:
        """Wait until ``count`` held lookups are waiting."""
        await self._wait_until(lambda: self.held() >= count)

    async def wait_cancelled(self, count: int = 1) -> None:
        """Wait until ``count`` lookups have received asyncio.CancelledError."""
        await self._wait_until(lambda: len(self.cancelled) >= count)


def _drain(queue: asyncio.Queue[_Lookup]) -> list[_Lookup]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def make_app(service: PriceService, report: Callable[[str], None] | None = None) -> Any:
    """A WSGI app: ``GET /price/SYMBOL`` (``?hold=1``: held until the client goes away).

    ``report`` (e.g. :func:`say`) is told when a request is cancelled.
    """
    lookup = trio_asyncio.aio_as_trio(service.lookup)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if not path.startswith("/price/"):
            return _json(start_response, "404 Not Found", {"error": "try /price/TRIO"})
        symbol = path.removeprefix("/price/").upper()
        hold = "hold" in parse_qs(environ["QUERY_STRING"])
        try:
            # Worker thread -> this request's trio task -> an asyncio task on the loop.
            quote = trio.from_thread.run(functools.partial(lookup, symbol, hold=hold))
        except trio.Cancelled:
            # The client went away; the asyncio lookup has been cancelled already.
            if report is not None:
                report(f"app: GET {path} cancelled: trio.Cancelled in the worker thread")
            raise  # never swallow Cancelled: trioserve finishes the request
        except LookupError:
            return _json(start_response, "404 Not Found", {"error": f"no price for {symbol}"})
        except ServiceStopped as exc:
            return _json(start_response, "503 Service Unavailable", {"error": str(exc)})
        return _json(start_response, "200 OK", quote)

    return app


def _json(start_response: Any, status: str, data: dict[str, Any]) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


# ---------------------------------------------------------------------------
# The program: the asyncio service and the server in one nursery
# ---------------------------------------------------------------------------


def say(line: str) -> None:
    """print(), in one write: the app's worker threads report while trio prints too."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fetch(url: str) -> str:
    """A blocking HTTP GET (urllib), run in a thread so trio keeps running."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return f"{response.status} {response.read().decode()}"
    except urllib.error.HTTPError as error:
        return f"{error.code} {error.read().decode()}"


async def reset_while_waiting(server: Server, service: PriceService) -> None:
    """Send a request that is held, then reset the TCP connection while it waits."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(("127.0.0.1", server.port))
        request = f"GET /price/SLOW?hold=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
        await sock.send(request.encode())
        await trio_asyncio.aio_as_trio(service.wait_held)(1)
        say("client: the lookup is held in the asyncio service; resetting the connection")
        # Linger 0: close() sends a TCP RST, as a client that crashes or gives up does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio_asyncio.aio_as_trio(service.wait_cancelled)(1)
    say(f"service: lookups that received asyncio.CancelledError: {service.cancelled}")


async def demo(server: Server, service: PriceService) -> None:
    for path in ("/price/TRIO", "/price/asyncio", "/price/NOPE"):
        answer = await trio.to_thread.run_sync(fetch, server.url + path)
        say(f"client: GET {path} -> {answer}")
    await reset_while_waiting(server, service)
    await server.stop()
    say("client: server stopped")


async def stop_on_signal(server: Server) -> None:
    """Serve until SIGINT (^C) or SIGTERM, then stop gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            say(f"main: {signal.Signals(signum).name} received; stopping")
            await server.stop()
            return


async def run_service(service: PriceService) -> None:
    """Run the asyncio service as a trio task (cancelling the task cancels it)."""
    try:
        await trio_asyncio.aio_as_trio(service.run)()
    finally:
        say(f"service: stopped after answering {service.answered} lookups")


async def main(bind: str = "127.0.0.1:8000", *, run_demo: bool = False) -> None:
    async with trio_asyncio.open_loop():
        service = PriceService()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_service, service)
            server = await serve_wsgi(make_app(service, report=say), nursery, bind=bind)
            say(f"server: listening on {server.url}")
            if run_demo:
                await demo(server, service)
            else:
                await stop_on_signal(server)
            nursery.cancel_scope.cancel()  # stops the asyncio service too
    say("main: every task has finished; exiting")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="call itself, print, stop, exit")
    parser.add_argument("--bind", default=None, help="HOST:PORT (default 127.0.0.1:8000)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    bind = args.bind or ("127.0.0.1:0" if args.demo else "127.0.0.1:8000")
    trio.run(functools.partial(main, bind, run_demo=args.demo))
