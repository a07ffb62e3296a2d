"""Slow readers against a trioserve at its defaults: does a good client still get served?

    python bench/slow_readers.py --attackers 80 --seconds 20
    python bench/slow_readers.py --attackers 200 --mib 10 --seconds 30 --spill-after 0

Starts ``trioserve bench.apps:stream`` (default settings, plus the flags after
``--``) on a loopback port, then opens ATTACKERS connections that each ask for a
MIB-mebibyte streamed response and then read it badly, a quarter each way:
HTTP/1.1 not reading at all, HTTP/1.1 reading 1 KiB every 50 ms (20 KiB/s),
HTTP/2 with a zero window, HTTP/2 granting 1 KiB of window every 50 ms. Meanwhile
a good client asks for a 13-byte response on a new connection every 0.2 s. Every
second it samples the server's RSS, its OS threads and the disk its spilled
responses take (the unlinked files it holds open).

Prints the good client's latencies (median, max) and the samples; exits 1 if a
good request failed or took longer than ``--good-limit`` (1 s). Loopback only;
bounded by ``--seconds``; every process and connection it opens, it closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    spilled = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if "trioserve-spill-" in target:
                spilled += os.stat(fd).st_size
        except OSError:
            continue
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "spill_mib": spilled / MiB,
    }


async def h1_attacker(port: int, size: int, trickle: bool, stop: trio.Event) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        while not stop.is_set():
            if trickle:
                if not await stream.receive_some(KiB):
                    return
            await trio.sleep(0.05)


async def h2_attacker(port: int, size: int, trickle: bool, stop: trio.Event) -> None:
    try:
        await _h2_attack(port, size, trickle, stop)
    except (h2.exceptions.ProtocolError, trio.BrokenResourceError) as exc:
        print(f"HTTP/2 attacker ended: {exc!r}", flush=True)


async def _h2_attack(port: int, size: int, trickle: bool, stop: trio.Event) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"),
         (b":path", f"/?size={size}".encode())],
        end_stream=True,
    )
    async with stream:
        await stream.send_all(conn.data_to_send())
        while not stop.is_set():
            next_turn = trio.current_time() + 0.05
            with trio.move_on_at(next_turn):
                while True:  # whatever arrives until the next turn
                    data = await stream.receive_some(64 * KiB)
                    if not data:
                        return
                    for event in conn.receive_data(data):
                        if isinstance(
                            event, h2.events.ConnectionTerminated | h2.events.StreamReset
                        ):
                            print(f"HTTP/2 attacker got {event}", flush=True)
                            return
            if trickle:
                conn.increment_flow_control_window(KiB, stream_id=1)
                conn.increment_flow_control_window(KiB)
            pending = conn.data_to_send()
            if pending:
                await stream.send_all(pending)


async def good_request(port: int) -> float:
    started = time.monotonic()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /?size=13 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200 ") or b"\r\n\r\nd\r\n" + b"x" * 13 not in data:
        raise RuntimeError(f"bad answer: {data[:80]!r}")
    return time.monotonic() - started


async def run(args: argparse.Namespace, port: int, pid: int) -> int:
    size = args.mib * MiB
    stop = trio.Event()
    latencies: list[float] = []
    samples: list[dict[str, float]] = []
    failures: list[str] = []
    baseline = process_sample(pid)
    kinds = [
        (h1_attacker, False, "HTTP/1.1 stalled"),
        (h1_attacker, True, "HTTP/1.1 20 KiB/s"),
        (h2_attacker, False, "HTTP/2 zero window"),
        (h2_attacker, True, "HTTP/2 20 KiB/s"),
    ]
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(args.attackers):
            attack, trickle, _ = kinds[i % 4]
            nursery.start_soon(attack, port, size, trickle, stop)
        deadline = started + args.seconds
        next_sample = started
        while time.monotonic() < deadline:
            try:
                with trio.fail_after(30):
                    latencies.append(await good_request(port))
            except Exception as exc:  # reported; the run goes on
                print("good request failed:", repr(exc), flush=True)
                failures.append(repr(exc))
            if time.monotonic() >= next_sample:
                samples.append(process_sample(pid))
                next_sample += 1
            await trio.sleep(0.2)
        stop.set()
    print(f"attackers: {args.attackers} x {args.mib} MiB, a quarter each of: "
          + ", ".join(kind for _, _, kind in kinds))
    if latencies:
        print(f"good requests: {len(latencies)}, failed {len(failures)}; latency median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    else:
        print(f"good requests: none answered, {len(failures)} failed")
    peak = {key: max(sample[key] for sample in samples) for key in baseline}
    print(f"server before: RSS {baseline['rss_mib']:.1f} MiB, {baseline['threads']:.0f} threads")
    print(f"server peak:   RSS {peak['rss_mib']:.1f} MiB (+{peak['rss_mib'] - baseline['rss_mib']:.1f}),"
          f" {peak['threads']:.0f} threads, {peak['spill_mib']:.0f} MiB spilled on disk")
    last = samples[-1]
    print(f"server last:   RSS {last['rss_mib']:.1f} MiB, {last['threads']:.0f} threads, "
          f"{last['spill_mib']:.0f} MiB spilled")
    for failure in failures[:5]:
        print("failure:", failure)
    slow = [latency for latency in latencies if latency > args.good_limit]
    return 1 if failures or slow else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attackers", type=int, default=80)
    parser.add_argument("--mib", type=int, default=10, help="size of each attacker's response")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--good-limit", type=float, default=1.0)
    parser.add_argument("server_args", nargs="*", help="more trioserve flags (after --)")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "trioserve", "bench.apps:stream", "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", *args.server_args],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        return trio.run(run, args, port, server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
