"""The canned-response limit: the fastest an HTTP/1.1 server on trio can answer.

Every read is scanned for request terminators (``\\r\\n\\r\\n``) and that many
precomputed responses are sent back in one ``send_all``. No parsing, no WSGI, no
threads: whatever a real trio-based server does on top of this is overhead.
Only bodiless requests (GET/HEAD) are understood, which is all the hello and
idle-connection scenarios send.

    python bench/canned.py -b 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import resource

import trio

TERMINATOR = b"\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: canned\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 13\r\n"
    b"\r\n"
    b"Hello, world!"
)


async def handle(stream: trio.SocketStream) -> None:
    tail = b""  # the last bytes of the previous read: a terminator may straddle reads
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer = tail + data
            count = buffer.count(TERMINATOR)
            if count:
                await stream.send_all(RESPONSE * count)
                tail = buffer[buffer.rfind(TERMINATOR) + len(TERMINATOR) :][-3:]
            else:
                tail = buffer[-3:]
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=2048)
    await trio.serve_listeners(handle, listeners)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--bind", default="127.0.0.1:8000", metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        trio.run(main, host, int(port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
