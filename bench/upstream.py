"""A minimal fast upstream for machines without nginx: every request gets `200 ok`, keep-alive.

    python bench/upstream.py --port 9000

Raw asyncio protocol (uvloop when installed): it only finds the end of each request's headers,
skips a Content-Length body if there is one, and answers. Good enough for GET load tests.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal

REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class Answer(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            match = LENGTH.search(self.buffer, 0, end + 2)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self.buffer) < total:
                break
            self.buffer = self.buffer[total:]
            replies += 1
        if replies and self.transport is not None:
            self.transport.write(REPLY * replies)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, host, port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__)
    parse.add_argument("--host", default="127.0.0.1")
    parse.add_argument("--port", type=int, required=True)
    args = parse.parse_args()
    try:
        import uvloop
        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
