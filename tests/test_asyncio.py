"""examples/with_asyncio.py: an asyncio component beside trioserve through trio-asyncio.

The WSGI app awaits an asyncio coroutine from its worker thread
(``trio.from_thread.run(trio_asyncio.aio_as_trio(...))``). Checked here: the
response carries the asyncio result, an asyncio exception becomes an error
response, and a client that goes away while the coroutine waits cancels the
coroutine (it sees ``asyncio.CancelledError``) and the app thread (it sees
``trio.Cancelled``), over an HTTP/2 RST_STREAM and an HTTP/1.1 disconnect in
memory, and over a real TCP reset in the example's own ``--demo`` run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio_asyncio

from examples.with_asyncio import PriceService, make_app
from tests.helpers import run_example
from trioserve import serve_wsgi
from trioserve.testing import AppProbe, open_test_client

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20


@asynccontextmanager
async def price_service() -> AsyncIterator[PriceService]:
    """An asyncio loop (trio-asyncio) with the PriceService running in it, as a trio task."""
    async with trio_asyncio.open_loop():
        service = PriceService()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_asyncio.aio_as_trio(service.run))
            yield service
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c-prior-knowledge"])
async def test_response_carries_the_asyncio_result(http2: bool) -> None:
    client = httpx.Client(http1=not http2, http2=http2, timeout=10)
    with trio.fail_after(TIMEOUT):
        async with price_service() as service, trio.open_nursery() as nursery:
            server = await serve_wsgi(make_app(service), nursery, bind="127.0.0.1:0")
            try:
                found = await trio.to_thread.run_sync(client.get, server.url + "/price/trio")
                missing = await trio.to_thread.run_sync(client.get, server.url + "/price/nope")
            finally:
                await trio.to_thread.run_sync(client.close)
                await server.stop(graceful_timeout=5)
    assert found.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert found.status_code == 200
    assert found.json() == {"symbol": "TRIO", "price": 35.0, "via": "asyncio"}
    # LookupError raised on the asyncio side reaches the app thread as itself.
    assert missing.status_code == 404
    assert missing.json() == {"error": "no price for NOPE"}
    assert service.answered == 1
    assert service.cancelled == []


async def test_concurrent_requests_share_the_service() -> None:
    with trio.fail_after(TIMEOUT):
        async with price_service() as service:
            probe = AppProbe(make_app(service))
            async with open_test_client(probe, http2=True) as client:
                responses = {}

                async def get(symbol: str) -> None:
                    responses[symbol] = await client.get(f"/price/{symbol}")

                async with trio.open_nursery() as nursery:
                    for symbol in ("TRIO", "ASYNCIO", "WSGI") * 3:
                        nursery.start_soon(get, symbol)
    assert {symbol: r.status for symbol, r in responses.items()} == dict.fromkeys(
        ("TRIO", "ASYNCIO", "WSGI"), 200
    )
    assert service.answered == 9
    assert len(probe.records) == 9
    assert not any(record.cancelled for record in probe.records)


@pytest.mark.parametrize("http2", [True, False], ids=["h2-rst-stream", "http1-disconnect"])
async def test_client_going_away_cancels_the_asyncio_coroutine(http2: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with price_service() as service:
            probe = AppProbe(make_app(service))
            async with open_test_client(probe, http2=http2) as client:
                stream = await client.open_stream("GET", "/price/SLOW?hold=1")
                # The app thread now waits in from_thread.run on the asyncio lookup.
                await trio_asyncio.aio_as_trio(service.wait_held)(1)
                assert service.cancelled == []
                await stream.reset()  # HTTP/2: RST_STREAM(CANCEL); HTTP/1.1: abrupt disconnect
                record = await probe.wait_finished(path="/price/SLOW")
                assert record.cancelled  # the app thread saw trio.Cancelled
                assert isinstance(record.exception, trio.Cancelled)
                # The asyncio coroutine was cancelled before the thread saw Cancelled.
                assert service.cancelled == ["SLOW"]
                assert service.held() == 0
                if http2:
                    # Only that stream: the connection and the service carry on.
                    after = await client.get("/price/TRIO")
                    assert after.status == 200
                    assert b'"via": "asyncio"' in after.body
    assert service.answered == (1 if http2 else 0)


async def test_stopping_the_service_answers_held_lookups_with_503() -> None:
    """The other direction: the asyncio side ends first; the request gets an error, not a hang."""
    with trio.fail_after(TIMEOUT):
        async with trio_asyncio.open_loop():
            service = PriceService()
            probe = AppProbe(make_app(service))
            service_scope = trio.CancelScope()

            async def run_service() -> None:
                with service_scope:
                    await trio_asyncio.aio_as_trio(service.run)()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_service)
                async with open_test_client(probe, http2=True) as client:
                    stream = await client.open_stream("GET", "/price/SLOW?hold=1")
                    await trio_asyncio.aio_as_trio(service.wait_held)(1)
                    service_scope.cancel()  # stop the asyncio service, not the request
                    response = await stream.read_response()
    assert response.status == 503
    assert b"the price service stopped" in response.body
    assert service.cancelled == []
    assert not probe.records[0].cancelled


@pytest.mark.parametrize(
    "command",
    [["examples/with_asyncio.py", "--demo"], ["-m", "examples.with_asyncio", "--demo"]],
    ids=["script", "module"],
)
async def test_demo_runs_to_completion(command: list[str]) -> None:
    """The example's own run: real sockets, and a client that resets its TCP connection."""
    lines = await run_example(command, TIMEOUT)
    assert lines[0].startswith("server: listening on http://127.0.0.1:")
    assert (
        'client: GET /price/TRIO -> 200 {"symbol": "TRIO", "price": 35.0, "via": "asyncio"}'
        in lines
    )
    assert 'client: GET /price/NOPE -> 404 {"error": "no price for NOPE"}' in lines
    assert "service: lookups that received asyncio.CancelledError: ['SLOW']" in lines
    assert "app: GET /price/SLOW cancelled: trio.Cancelled in the worker thread" in lines
    assert "client: server stopped" in lines
    assert "service: stopped after answering 2 lookups" in lines
    assert lines[-1] == "main: every task has finished; exiting"
