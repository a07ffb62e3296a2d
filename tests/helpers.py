"""Helpers more than one test module uses (one copy each, so they cannot drift apart)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent


def has_ipv6_loopback() -> bool:
    """Can this machine bind ``::1``? (Some containers have no IPv6 at all.)"""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


async def receive_until(stream: trio.abc.Stream, buffer: bytearray, marker: bytes) -> bytes:
    """Receive into ``buffer`` until it contains ``marker``; pop and return up to it."""
    while marker not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"EOF before {marker!r}; got {bytes(buffer)!r}")
        buffer += data
    end = buffer.index(marker) + len(marker)
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


async def no_threads_left() -> None:
    """Every worker thread has ended (none leaked by the code under test)."""
    await trio.testing.wait_all_threads_completed()
    assert trio.testing.active_thread_count() == 0


class TraceMemory:
    """Peak of traced allocations (every thread, client included) inside the block,
    above what was traced when it began."""

    def __enter__(self) -> TraceMemory:
        tracemalloc.start()
        tracemalloc.reset_peak()
        self.start = tracemalloc.get_traced_memory()[0]
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = tracemalloc.get_traced_memory()[1] - self.start
        tracemalloc.stop()


@dataclass(frozen=True)
class Protocol:
    """How a real client reaches the server in the framework tests."""

    tls: bool
    http2: bool

    @property
    def server_protocol(self) -> str:
        """What the app sees in SERVER_PROTOCOL (and httpx reports as http_version)."""
        return "HTTP/2" if self.http2 else "HTTP/1.1"


PROTOCOLS = {
    "http1": Protocol(tls=False, http2=False),
    "h2c-prior-knowledge": Protocol(tls=False, http2=True),
    "http1-tls": Protocol(tls=True, http2=False),
    "h2-tls-alpn": Protocol(tls=True, http2=True),
}


async def run_example(command: list[str], timeout: float) -> list[str]:
    """Run ``python COMMAND`` from the project root; it must exit 0 and print nothing
    on stderr. Returns its stdout lines."""
    with trio.fail_after(timeout):  # a hang fails; run_process then kills the child
        result = await trio.run_process(
            [sys.executable, *command],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode()
    assert result.returncode == 0, (output, result.stderr.decode())
    assert result.stderr == b""
    return output.splitlines()
