"""trioserve inside your own trio program, beside your own tasks.

Run it from the repository root (it exits by itself)::

    python examples/embedded.py        # or: python -m examples.embedded

The server is just another task in your nursery. Two spellings start it::

    server = await serve_wsgi(app, nursery, bind="127.0.0.1:0")   # returns once listening

    server = await nursery.start(serve_wsgi, app)                 # the trio idiom
    server = await nursery.start(functools.partial(serve_wsgi, app, bind="127.0.0.1:0"))

Either way you get a :class:`trioserve.Server` (``server.url``, ``server.port``);
``await server.stop()`` finishes in-flight requests, closes every connection and
returns; cancelling the nursery instead stops the server at once.

Here three tasks share one nursery: the server, a heartbeat doing "our own work",
and a client that calls the server a few times, then stops it and the heartbeat.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from typing import Any

import trio

from trioserve import Server, serve_wsgi


class Heartbeat:
    """Our program's own background work: tick until told to stop."""

    def __init__(self) -> None:
        self.ticks = 0
        self.stopped = trio.Event()

    async def run(self) -> None:
        while not self.stopped.is_set():
            self.ticks += 1
            with trio.move_on_after(0.05):
                await self.stopped.wait()
        print(f"heartbeat: stopped after {self.ticks} ticks")


def make_app(heartbeat: Heartbeat) -> Any:
    """A WSGI app that reports how far the heartbeat has got (it runs in a worker thread)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        # The app runs in a worker thread; trio.from_thread reaches back into the trio program.
        ticks = trio.from_thread.run_sync(lambda: heartbeat.ticks)
        body = (
            f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} over"
            f" {environ['SERVER_PROTOCOL']}; heartbeat at tick {ticks}\n"
        ).encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def fetch(url: str, data: bytes | None = None) -> str:
    """A blocking HTTP request (urllib), run in a thread so trio keeps running."""
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return f"{response.status} {response.read().decode().strip()}"


async def use_the_server(server: Server, heartbeat: Heartbeat) -> None:
    for path, data in [("/", None), ("/hello", None), ("/form", b"name=trio")]:
        answer = await trio.to_thread.run_sync(fetch, server.url + path, data)
        print(f"client: {path} -> {answer}")
        await trio.sleep(0.12)  # meanwhile the heartbeat keeps ticking
    print("client: stopping the server")
    await server.stop()  # graceful: in-flight requests finish first
    print("client: server stopped")
    heartbeat.stopped.set()


async def main() -> None:
    heartbeat = Heartbeat()
    async with trio.open_nursery() as nursery:
        server = await serve_wsgi(make_app(heartbeat), nursery, bind="127.0.0.1:0")
        print(f"server: listening on {server.url}")
        nursery.start_soon(heartbeat.run)
        nursery.start_soon(use_the_server, server, heartbeat)
    print("main: every task has finished; exiting")


if __name__ == "__main__":
    trio.run(main)
