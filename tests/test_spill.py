"""Slow clients do not hold app threads: responses spill to disk (trioserve/spill.py).

An app thread that has waited ``--spill-after`` for its client in one go writes
the rest of its response to a temporary file and moves on; the trio side reads
it back as the client takes it. Here: the file on its own (``Spill``,
``SpillBudget``), then whole servers in memory over both protocols, with the
patient mock clock (it jumps only once everything, app threads included, has
been idle for 0.1 s of real time, so ``--spill-after`` passes in mock time).

What must hold: a client that stops reading (HTTP/1.1: not reading its socket;
HTTP/2: a zero window) no longer keeps the app's thread, so a second client
is served even with one thread; the bytes that come back are exactly the app's;
the disk used is bounded per response and in total and given back; an endless
stream is still back-pressured; without room on disk nothing changes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
import trio
import trio.testing

import trioserve.spill
from tests.helpers import no_threads_left
from tests.test_flow import settle
from trioserve.spill import Spill, SpillBudget, default_directory
from trioserve.testing import AppProbe, TestClient, TestStream, open_test_server

both_protocols = pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 60
CHUNK = 64 * KiB


def pattern(size: int, seed: int = 0) -> Iterator[bytes]:
    """``size`` bytes in CHUNK pieces, different at every offset (a lost or repeated
    piece changes the digest)."""
    sent = 0
    index = 0
    while sent < size:
        piece = min(CHUNK, size - sent)
        block = hashlib.sha256(f"{seed}/{index}".encode()).digest()
        yield (block * (piece // len(block) + 1))[:piece]
        sent += piece
        index += 1


def digest_of(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size, seed):
        digest.update(piece)
    return digest.hexdigest()


def streamer(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """/stream/SIZE: SIZE bytes of ``pattern`` in 64 KiB chunks, no Content-Length;
    anything else: a short answer."""
    parts = environ["PATH_INFO"].split("/")
    if parts[1] != "stream":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        yield b"ok"
        return
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    yield from pattern(int(parts[2]))


def endless(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    while True:
        yield b"e" * CHUNK


async def stalled(client: TestClient, path: str) -> TestStream:
    """Ask for ``path``, and read nothing of the answer."""
    client.pause_reading(socket=not client.http2)
    return await client.open_stream("GET", path)


async def drain(stream: TestStream) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while data := await stream.receive_data(keep=False):
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


# ---- the file on its own ------------------------------------------------------------------


def test_a_spill_gives_back_what_was_written(tmp_path: Any) -> None:
    budget = SpillBudget(1000)
    spill = Spill(budget, limit=100, directory=str(tmp_path))
    assert spill.write(b"a" * 60)  # room for more
    assert not spill.write(b"b" * 60)  # written all the same, but now over the limit
    assert (spill.written, spill.unread, budget.used) == (120, 120, 120)
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing to clean up, ever
    assert spill.read(70) == b"a" * 60 + b"b" * 10
    assert spill.read(1000) == b"b" * 50
    assert spill.read(10) == b""
    spill.rewind()  # read back whole: the file starts again, the budget is given back
    assert (spill.written, spill.unread, budget.used) == (0, 0, 0)
    assert spill.write(b"c" * 10)
    assert spill.read(10) == b"c" * 10
    spill.close()
    spill.close()  # twice is fine
    assert budget.used == 0


def test_a_spill_says_no_more_once_the_budget_is_used_up(tmp_path: Any) -> None:
    budget = SpillBudget(100)
    first = Spill(budget, limit=1000, directory=str(tmp_path))
    second = Spill(budget, limit=1000, directory=str(tmp_path))
    assert first.write(b"x" * 60)
    assert not second.write(b"y" * 50)  # the total is passed by this one chunk at most
    assert not budget.has_room
    first.close()
    assert budget.has_room
    second.close()
    assert budget.used == 0


def test_a_failed_write_is_kept_for_the_trio_side(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    budget = SpillBudget(1000)
    spill = Spill(budget, limit=1000, directory=str(tmp_path))
    monkeypatch.setattr(trioserve.spill.os, "pwrite", full)
    assert not spill.write(b"z" * 10)
    assert spill.failed is not None
    assert spill.failed.errno == errno.ENOSPC
    assert (spill.written, budget.used) == (0, 0)
    spill.close()


def test_the_default_directory_is_on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    trioserve.spill.tempfile.tempdir = None  # forget the cached choice
    try:
        assert default_directory() == str(tmp_path)
        monkeypatch.delenv("TMPDIR")
        trioserve.spill.tempfile.tempdir = None
        if os.access("/var/tmp", os.W_OK):
            assert default_directory() == "/var/tmp"
    finally:
        trioserve.spill.tempfile.tempdir = None


# ---- servers ------------------------------------------------------------------------------


@both_protocols
async def test_a_stalled_client_no_longer_holds_the_only_thread(
    http2: bool, patient_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    """One thread; a client asks for 10 MiB and reads none of it. After --spill-after
    its app finishes into a file, a second client is served, and when the first one
    reads at last it gets exactly the app's 10 MiB (and the access log says so:
    HTTP/2's bytes taken back from the queue into the file count once)."""
    size = 10 * MiB
    probe = AppProbe(validator(streamer))
    logged: dict[str, int] = {}
    async with open_test_server(probe, threads=1, spill_dir=str(tmp_path)) as server:
        ctx = server.context
        ctx.access_log = lambda r: logged.update({r.request.target.decode(): r.bytes_sent})
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow, server.connect(http2=http2) as good:
                stream = await stalled(slow, f"/stream/{size}")
                record = await probe.wait_finished(path=f"/stream/{size}")
                await settle()  # its thread has returned to trio, too
                assert not record.cancelled
                assert record.closed
                assert ctx.limiter.borrowed_tokens == 0  # its thread is free
                spilled = ctx.spill_budget.used
                assert 8 * MiB < spilled <= size  # the bytes wait on disk...
                started = trio.current_time()
                response = await good.get("/hello")
                assert (response.status, response.body) == (200, b"ok")
                assert trio.current_time() - started < 1  # mock seconds: no waiting on a thread
                assert not stream.ended.is_set()  # ...while the slow client still reads nothing
                await slow.resume_reading()
                assert await drain(stream) == (size, digest_of(size))
                assert stream.response.complete
        assert ctx.spill_budget.used == 0  # given back when the response ended
    assert logged == {f"/stream/{size}": size, "/hello": 2}
    await no_threads_left()


@both_protocols
async def test_a_response_beyond_its_spill_limit_waits_for_the_client(
    http2: bool, patient_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    """--max-spill-per-response 1 MiB: the app spills 1 MiB, then waits until the client
    has read it all back, spills again, ... Bytes still exact; never more than the
    limit (plus one chunk) on disk."""
    size = 5 * MiB
    limit = 1 * MiB
    probe = AppProbe(validator(streamer))
    peak = 0
    async with open_test_server(
        probe, threads=1, max_spill_per_response=limit, spill_dir=str(tmp_path)
    ) as server:
        ctx = server.context
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow:
                stream = await stalled(slow, f"/stream/{size}")
                await probe.wait_started()
                await settle()  # the app waits for its client...
                await trio.sleep(1)  # (mock time: past --spill-after)
                await settle()  # ...then spills the file full and waits again
                assert limit <= ctx.spill_budget.used <= limit + CHUNK
                assert not probe.records[0].finished.is_set()  # back-pressured, not buffered
                await slow.resume_reading()
                digest = hashlib.sha256()
                total = 0
                while data := await stream.receive_data(keep=False):
                    peak = max(peak, ctx.spill_budget.used)
                    digest.update(data)
                    total += len(data)
        assert (total, digest.hexdigest()) == (size, digest_of(size))
        assert peak <= limit + CHUNK
        assert ctx.spill_budget.used == 0


@both_protocols
async def test_an_endless_stream_is_still_back_pressured(
    http2: bool, patient_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    """Spilling never means buffering without bound: an endless response to a client
    that reads nothing fills its file to the limit, and its thread then waits until
    --write-timeout resets the stream (and cancels the app)."""
    probe = AppProbe(validator(endless))
    limit = 2 * MiB
    async with open_test_server(
        probe, threads=1, max_spill_per_response=limit, write_timeout=30, spill_dir=str(tmp_path)
    ) as server:
        ctx = server.context
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow:
                await stalled(slow, "/endless")
                record = await probe.wait_started()
                await settle()
                await trio.sleep(1)  # mock time: past --spill-after
                await settle()  # the file is full; the thread waits for the client
                peak = ctx.spill_budget.used
                await record.finished.wait()  # (mock) write_timeout later: reset
        assert record.cancelled  # reset after write_timeout without progress
        assert limit <= peak <= limit + CHUNK
        assert ctx.spill_budget.used == 0


@both_protocols
async def test_without_room_on_disk_the_thread_waits_as_before(
    http2: bool, patient_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    """--max-spill-total 0 (or used up): no spilling; the app finishes only as the
    client reads."""
    size = 3 * MiB
    probe = AppProbe(validator(streamer))
    async with open_test_server(
        probe, threads=1, max_spill_total=0, spill_dir=str(tmp_path)
    ) as server:
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow:
                stream = await stalled(slow, f"/stream/{size}")
                record = await probe.wait_started()
                await trio.sleep(5)  # mock time: well past --spill-after
                assert not record.finished.is_set()
                assert server.context.limiter.borrowed_tokens == 1
                await slow.resume_reading()
                assert await drain(stream) == (size, digest_of(size))
        assert os.listdir(tmp_path) == []


@both_protocols
async def test_a_reset_while_spilling_gives_the_disk_back(
    http2: bool, patient_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    size = 4 * MiB
    probe = AppProbe(validator(streamer))
    async with open_test_server(probe, threads=1, spill_dir=str(tmp_path)) as server:
        ctx = server.context
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow:
                stream = await stalled(slow, f"/stream/{size}")
                await probe.wait_finished()
                assert ctx.spill_budget.used > 0
                await stream.reset()
                await settle()
                assert ctx.spill_budget.used == 0  # at once, not at the end of the connection


@both_protocols
async def test_a_full_disk_ends_the_response_instead_of_sending_a_hole(
    http2: bool,
    patient_clock: trio.testing.MockClock,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = 4 * MiB
    failed = threading.Event()

    def full(*args: Any) -> int:
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trioserve.spill.os, "pwrite", full)
    probe = AppProbe(validator(streamer))
    async with open_test_server(probe, threads=1, spill_dir=str(tmp_path)) as server:
        with trio.fail_after(TIMEOUT):
            async with server.connect(http2=http2) as slow:
                stream = await stalled(slow, f"/stream/{size}")
                await trio.to_thread.run_sync(failed.wait)
                await slow.resume_reading()
                total, _ = await drain(stream)
    assert total < size
    assert not stream.response.complete  # a reset (HTTP/2) or a cut connection (HTTP/1.1)
    if http2:
        assert stream.reset_code == 0x2  # INTERNAL_ERROR
    assert sum("cannot write the response" in r.getMessage() for r in caplog.records) == 1
