"""trioserve.testing itself: the client's own guarantees, which other tests rely on."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests import apps
from trioserve.testing import AppProbe, open_test_client, open_test_server


async def test_ping_waits_for_the_ack_and_fails_when_the_connection_ends() -> None:
    with trio.fail_after(5):
        async with open_test_client(apps.hello, http2=True) as client:
            await client.ping()  # answered: returns
            client.stream.abort()  # the connection dies before the next ACK
            with pytest.raises(trio.BrokenResourceError):
                await client.ping()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_complete_tells_a_finished_response_from_a_cut_off_one(http2: bool) -> None:
    def endless(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        while True:
            yield b"x" * 1000

    with trio.fail_after(5):
        async with open_test_client(apps.hello, http2=http2) as client:
            assert (await client.get("/")).complete
        async with open_test_client(endless, http2=http2) as client:
            stream = await client.open_stream("GET", "/")
            await stream.receive_data()
            await stream.reset()
            assert not stream.response.complete


async def test_connections_of_one_test_server_share_its_thread_limiter() -> None:
    token = trio.lowlevel.current_trio_token()
    release = trio.Event()

    def waits(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trio.from_thread.run(release.wait, trio_token=token)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    probe = AppProbe(waits)
    with trio.fail_after(5):
        async with (
            open_test_server(probe, threads=1) as server,
            server.connect() as first,
            server.connect(http2=True) as second,
        ):
            one = await first.open_stream("GET", "/one")
            two = await second.open_stream("GET", "/two")
            await probe.wait_started()
            await trio.testing.wait_all_tasks_blocked()
            # One thread for the whole server: the second request waits for it.
            assert [record.path for record in probe.records] == ["/one"]
            assert server.context.limiter.statistics().tasks_waiting == 1
            release.set()
            assert (await one.read_response()).body == b"done"
            assert (await two.read_response()).body == b"done"
        assert probe.find("/two") is not None


async def test_record_frames_logs_what_arrived() -> None:
    with trio.fail_after(5):
        async with open_test_client(apps.hello, http2=True, record_frames=True) as client:
            await client.get("/")
    assert client.frames is not None
    kinds = [(frame.type, frame.stream_id) for frame in client.frames]
    assert ("SETTINGS", 0) in kinds
    assert ("HEADERS", 1) in kinds
    assert ("DATA", 1) in kinds
