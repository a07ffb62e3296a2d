"""A lifespan shim so hypercorn's trio worker can serve the WSGI apps at all.

hypercorn 0.18 serves a plain WSGI callable natively (``WSGIWrapper``), and its
asyncio worker does so as is. Its trio worker does not start: ``WSGIWrapper``
returns at once from the ``lifespan`` scope, which closes the lifespan channels,
and ``Lifespan.wait_for_startup`` then sends ``lifespan.startup`` into a closed
channel (``trio.ClosedResourceError``; the asyncio worker tolerates the same).

The shim is an ASGI app that answers the lifespan messages itself and hands every
HTTP request to hypercorn's own ``WSGIWrapper`` with exactly the thread helpers the
trio worker passes (``trio.to_thread.run_sync``, ``trio.from_thread.run``), so the
request path measured is hypercorn's native WSGI path.

``BENCH_WSGI_MAX_BODY_SIZE`` sets the wrapper's body limit (hypercorn's
``wsgi_max_body_size``; the shim cannot read hypercorn's config).
"""

from __future__ import annotations

import os
from typing import Any

import trio
from hypercorn.app_wrappers import WSGIWrapper
from hypercorn.config import Config

from bench import apps


class TrioLifespanWSGI:
    def __init__(self, wsgi_app: Any) -> None:
        limit = int(os.environ.get("BENCH_WSGI_MAX_BODY_SIZE", Config.wsgi_max_body_size))
        self.wrapper = WSGIWrapper(wsgi_app, limit)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await self.wrapper(scope, receive, send, trio.to_thread.run_sync, trio.from_thread.run)


hello = TrioLifespanWSGI(apps.hello)
stream = TrioLifespanWSGI(apps.stream)
echo = TrioLifespanWSGI(apps.echo)
sink = TrioLifespanWSGI(apps.sink)
