"""A minimal fast upstream for machines without nginx: every request gets `200 ok`, keep-alive.

    python bench/upstream.py --port 9000
    python bench/upstream.py --port 9000 --aiohttp   # the soak's upstream

Raw asyncio protocol (uvloop when installed): it only finds the end of each request's headers,
skips a Content-Length body if there is one, and answers. Good enough for GET load tests.

With --aiohttp it is an aiohttp server instead (slower, but a real HTTP server): any method and
path reads the body and answers `200 ok`, except `/soak/ws` (a WebSocket echo), `/soak/big`
(a 256 KB body, for clients that leave mid-reply) and `/soak/slow` (answers after 0.5 s).
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


BIG = b"x" * 262_144


async def serve_aiohttp(host: str, port: int) -> None:
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await socket.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/soak/big":
            return web.Response(body=BIG)
        if request.path == "/soak/slow":
            await asyncio.sleep(0.5)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/soak/ws", echo)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__)
    parse.add_argument("--host", default="127.0.0.1")
    parse.add_argument("--port", type=int, required=True)
    parse.add_argument("--aiohttp", action="store_true", help="an aiohttp server with WebSocket, big and slow paths")
    args = parse.parse_args()
    job = (serve_aiohttp if args.aiohttp else serve)(args.host, args.port)
    try:
        import uvloop
        uvloop.run(job)
    except ImportError:
        asyncio.run(job)


if __name__ == "__main__":
    main()
