"""Slow readers end to end: 2 x --threads of them, at the default settings, real sockets.

Issue 11's attack: clients that ask for a 10 MiB streamed response and then stall
(HTTP/1.1: never read; HTTP/2: a zero window) or trickle-read (a KiB at a time).
Before spilling, each held an app thread until --write-timeout (stallers) or for
as long as it liked (tricklers), so 40 of them denied service. Here 80 attack
(a quarter each way) a server with every option at its default; what must hold:

* every attacker's app finishes (nobody cancelled) while the attackers are
  still attached and the stallers have read nothing: the threads are free;
* a good client, on a real socket with ``http.client``, is served meanwhile;
* the disk the responses took is bounded and given back once they end.

Figures under load (good-client latency, RSS, disk) come from
``bench/slow_readers.py``, not from here: speed is not asserted in tests.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any
from wsgiref.validate import validator

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
import trio.lowlevel
import trio.testing

from tests.helpers import no_threads_left
from trioserve import serve_wsgi
from trioserve.testing import AppProbe

KiB = 1024
MiB = 1024 * KiB
THREADS = 40  # Config's default, which the server below keeps
ATTACKERS = 2 * THREADS
SIZE = 10 * MiB
TIMEOUT = 90


def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    if environ["PATH_INFO"] == "/good":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        yield b"good"
        return
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    chunk = b"s" * (64 * KiB)
    for _ in range(SIZE // len(chunk)):
        yield chunk


async def http1_attacker(port: int, trickle: bool, done: trio.Event) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = 0
    async with stream:
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        if trickle:
            while not done.is_set():  # 1 KiB every 50 ms: 20 KiB/s
                received += len(await stream.receive_some(KiB))
                with trio.move_on_after(0.05):
                    await done.wait()
        await done.wait()
    return received


async def http2_attacker(port: int, trickle: bool, done: trio.Event) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    conn.initiate_connection()
    path = b"/big"
    head = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path)]
    conn.send_headers(1, head, end_stream=True)
    ended = False  # the whole response came (a trickler can get it all, in time)
    async with stream:
        await stream.send_all(conn.data_to_send())
        while not done.is_set():
            with trio.move_on_after(0.05):
                events = conn.receive_data(await stream.receive_some(64 * KiB))
                ended = ended or any(isinstance(e, h2.events.StreamEnded) for e in events)
            if trickle and not ended:
                # A KiB more of window, for the stream and the connection, every
                # 50 ms at most (20 KiB/s), however fast the data comes.
                conn.increment_flow_control_window(KiB, stream_id=1)
                conn.increment_flow_control_window(KiB)
                await stream.send_all(conn.data_to_send())
                with trio.move_on_after(0.05):
                    await done.wait()
            if pending := conn.data_to_send():
                await stream.send_all(pending)


def good_request(port: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/good")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def test_slow_readers_do_not_deny_service_at_the_defaults() -> None:
    probe = AppProbe(validator(app))
    done = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as server_nursery:
            server = await serve_wsgi(probe, server_nursery, bind="127.0.0.1:0")
            ctx = server._context
            assert ctx is not None
            assert ctx.limiter.total_tokens == THREADS
            kinds = [
                (http1_attacker, False),
                (http1_attacker, True),
                (http2_attacker, False),
                (http2_attacker, True),
            ]
            async with trio.open_nursery() as attackers:
                for i in range(ATTACKERS):
                    attack, trickle = kinds[i % 4]
                    attackers.start_soon(attack, server.port, trickle, done)
                # Every attacker's app finishes into a spill file, with the attackers
                # still attached and reading nothing (or a KiB at a time).
                await probe.wait_started(ATTACKERS)
                for record in probe.records:
                    await record.finished.wait()
                assert not any(record.cancelled for record in probe.records)
                spilled = ctx.spill_budget.used
                assert spilled > ATTACKERS // 2 * (SIZE - MiB)  # the stallers' at least
                assert spilled <= ATTACKERS * (SIZE + 64 * KiB)
                status, body = await trio.to_thread.run_sync(good_request, server.port)
                assert (status, body) == (200, b"good")
                assert len(probe.records) == ATTACKERS + 1
                done.set()
            while ctx.open_connections:  # the attackers' connections wind down
                await ctx.wait_connections_changed()
            assert ctx.spill_budget.used == 0  # and the disk is given back
            server_nursery.cancel_scope.cancel()
    await no_threads_left()
