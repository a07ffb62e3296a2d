from __future__ import annotations

import pytest
import trio

from tests import apps
from trioserve.testing import AppProbe, open_test_client


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_get(http2: bool) -> None:
    async with open_test_client(apps.hello, http2=http2) as client:
        response = await client.get("/")
        assert response.status == 200
        assert response.body == b"Hello, world!\n"
        response = await client.get("/again")
        assert response.status == 200


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_echo(http2: bool) -> None:
    async with open_test_client(apps.echo, http2=http2) as client:
        body = bytes(range(256)) * 4000
        response = await client.post("/", body)
        assert response.status == 200
        assert response.body == body


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_stream(http2: bool) -> None:
    async with open_test_client(apps.stream, http2=http2) as client:
        response = await client.get("/?n=100&size=1000")
        assert response.status == 200
        assert len(response.body) == 100_000


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_reset_cancels_app(http2: bool) -> None:
    def forever(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "text/plain")])
        while True:
            yield b"x" * 1000

    probe = AppProbe(forever)
    async with open_test_client(probe, http2=http2) as client:
        stream = await client.open_stream("GET", "/")
        await stream.receive_headers()
        await stream.receive_data()
        await stream.reset()
        record = await probe.wait_finished()
        assert record.cancelled
        assert record.closed
    await trio.testing.wait_all_threads_completed()
    assert trio.testing.active_thread_count() == 0
