"""The floor of a Python HTTP server here: uvloop and httptools (what the fast path is built on)
answering every request with a fixed decision-shaped 200, nothing else. bench/decision.py runs it
beside the gateway so that the decision endpoint can be read against what any server written in
Python on this stack can do on this machine, not only against nginx.

    python bench/floor_server.py --port N
"""
from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

REPLY = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Token-Id: 1\r\nX-Account-Id: 1\r\n"
         b"X-Request-ID: 0000000000000000\r\nX-Authorized-Uri: /bench/ping\r\n\r\n")


class FixedReply(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport, a WriteTransport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(REPLY)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(FixedReply, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
