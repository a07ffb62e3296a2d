"""Idle keep-alive connections for scenario 7 (run by bench/run.py on the load-generator core).

    python bench/idle_client.py PORT WARM COUNT

Opens WARM connections, each sending one ``GET /`` and reading the whole
response, then prints one JSON line and waits for a line on stdin; then opens
COUNT more the same way, prints a JSON line and waits again; then reports how
many of all connections the server still holds open, and closes them all.

The harness reads the server's RSS at each pause: the growth between the two
pauses, divided by COUNT, is the memory one idle connection costs (the WARM
connections take one-time costs such as thread-pool start-up out of the figure).
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-idle\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")
CONCURRENCY = 50  # connections being opened at once (keeps the listen backlog happy)
TIMEOUT = 30.0


async def open_one(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode("latin-1"))
    match = CONTENT_LENGTH.search(head)
    if match is None:
        writer.close()
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(match.group(1)))
    return reader, writer


async def open_many(port: int, count: int, into: list, errors: list[str]) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with limit:
            try:
                into.append(await asyncio.wait_for(open_one(port), TIMEOUT))
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))


async def pause() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit(0)  # the harness went away


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(port: int, warm: int, count: int) -> None:
    connections: list = []
    errors: list[str] = []
    await open_many(port, warm, connections, errors)
    report(phase="warm", open=len(connections), errors=len(errors), first_error=errors[:1])
    await pause()
    before = len(connections)
    await open_many(port, count, connections, errors)
    report(
        phase="open",
        open=len(connections) - before,
        errors=len(errors),
        first_error=errors[:1],
    )
    await pause()
    await asyncio.sleep(0.05)  # let any close by the server be noticed
    still_open = sum(1 for reader, _ in connections if not reader.at_eof())
    report(phase="done", still_open=still_open, total=len(connections))
    for _, writer in connections:
        writer.close()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
