"""An upstream that keeps every byte it receives, per connection, and answers as a test says.

What the gateway sends is the oracle of the edge tests: `RawConn.received` is the byte stream of
one upstream connection as it arrived, `RawConn.requests` the messages llhttp (httptools, the
parser uvicorn uses) reads in it. `reply` decides each answer (bytes to write, and whether to
close); the default answers 200 with the request's target and the connection's index as JSON.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httptools


@dataclass
class RawRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]  # as sent: names in their own case, in order
    body: bytes = b""

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class RawConn:
    index: int
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    requests: list[RawRequest] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    broken: bool = False  # llhttp refused what arrived


Reply = Callable[[RawConn, RawRequest], bytes | None]  # None: no answer, the connection is closed


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def echo(conn: RawConn, request: RawRequest) -> bytes:
    return answer(json.dumps({"path": request.target, "conn": conn.index, "size": len(request.body)}).encode(),
                  extra="Content-Type: application/json\r\n")


class _Messages:
    """httptools callbacks: the messages of one connection."""

    def __init__(self, conn: RawConn, done: Callable[[RawRequest], None]) -> None:
        self.conn, self.done = conn, done
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        request = RawRequest(self.parser.get_method().decode(), self.url.decode("latin-1"), self.headers,
                             bytes(self.body))
        self.conn.requests.append(request)
        self.done(request)


class RawUpstream:
    def __init__(self, reply: Reply = echo) -> None:
        self.reply = reply
        self.connections: list[RawConn] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def requests(self) -> list[RawRequest]:
        return [request for conn in self.connections for request in conn.requests]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(conn.received) for conn in self.connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(len(self.connections), writer)
        self.connections.append(conn)
        closing = False

        def done(request: RawRequest) -> None:
            nonlocal closing
            data = self.reply(conn, request)
            if data is None:
                closing = True
            else:
                writer.write(data)

        messages = _Messages(conn, done)
        try:
            while not closing and (data := await reader.read(65536)):
                conn.received += data
                try:
                    messages.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    conn.broken = True
                    break
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            conn.ended.set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            conn.writer.close()
        await self.server.wait_closed()


@asynccontextmanager
async def raw_upstream(reply: Reply = echo) -> AsyncIterator[RawUpstream]:
    server = RawUpstream(reply)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
