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

from ._client import FrameInfo, TestClient, TestResponse, TestStream
from ._pipe import DEFAULT_PIPE_CAPACITY, MemoryEndpoint, memory_connection
from ._probe import AppProbe, AppRecord
from ._server import TestServer, open_test_client, open_test_server

__all__ = [
    "DEFAULT_PIPE_CAPACITY",
    "AppProbe",
    "AppRecord",
    "FrameInfo",
    "MemoryEndpoint",
    "TestClient",
    "TestResponse",
    "TestServer",
    "TestStream",
    "memory_connection",
    "open_test_client",
    "open_test_server",
]
