"""A raw HTTP/1.1 client on real sockets, for what aiohttp's client cannot say: pipelining,
half-written bodies, malformed bytes, disconnects. Timeouts here are hang guards only."""
from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .keys import MASTER_KEY

GUARD = 30.0  # seconds: only so that a hang fails instead of stalling the run


def http(method: str, path: str, *, key: str | None = MASTER_KEY,
         headers: Iterable[tuple[str, str]] | dict[str, str] = (), body: bytes | None = None,
         version: str = "1.1", host: str = "gw.test") -> bytes:
    """One request as bytes; a body gets a Content-Length unless `headers` frame it otherwise."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    if key is not None:
        lines.append(f"Authorization: FlespiToken {key}")
    lines += [f"{name}: {value}" for name, value in pairs]
    framed = any(name.lower() in ("content-length", "transfer-encoding") for name, _ in pairs)
    if body is not None and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


@dataclass
class Reply:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_head(head: bytes) -> Reply:
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, code, *reason = status_line.split(" ", 2)
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    return Reply(version, int(code), reason[0] if reason else "", headers)


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, framing checked strictly."""
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def read_reply(reader: asyncio.StreamReader, head_only: bool = False) -> Reply:
    reply = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if head_only or reply.status in (204, 304) or reply.status < 200:
        return reply
    encoding, length = reply.header("Transfer-Encoding"), reply.header("Content-Length")
    if encoding is not None:
        assert encoding.lower() == "chunked" and length is None, reply.headers
        reply.body = await read_chunked(reader)
    elif length is not None:
        reply.body = await reader.readexactly(int(length))
    else:
        reply.body = await reader.read()  # close-delimited
    return reply


class Client:
    """One client connection to a gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, limit: int = 2 ** 16) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(GUARD):
            await self.writer.drain()

    async def reply(self, head_only: bool = False) -> Reply:
        async with asyncio.timeout(GUARD):
            return await read_reply(self.reader, head_only)

    async def ask(self, method: str, path: str, **kwargs: Any) -> Reply:
        await self.send(http(method, path, **kwargs))
        return await self.reply(head_only=method == "HEAD")

    async def rest(self) -> bytes:
        """Everything until the gateway closes the connection (a hang guard fails a connection left open)."""
        async with asyncio.timeout(GUARD):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def reset(client: Client) -> None:
    """Leave as a crashed client does: the connection is reset (RST), not closed."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(GUARD):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


