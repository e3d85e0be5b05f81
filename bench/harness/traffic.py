"""Mixed client traffic for the soak: every way in, connections opened and closed all the time.

Each action opens its own connection(s) and closes or abandons them; `Traffic.run` starts
actions at a fixed rate with at most `concurrency` in flight, each cut off after ACTION_TIMEOUT.
What came back is counted per action: `ok` (the status the action expects), `abandoned` (the
client left on purpose before the reply), or what else happened (`status 502`, `error Timeout`).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .tokens import random_keys

ACTION_TIMEOUT = 15.0


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def read_reply(reader: asyncio.StreamReader, head_only: bool = False) -> Reply:
    """One reply: its head, then a body by Content-Length, chunks, or up to the close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status < 200 or status in (204, 304):
        return Reply(status, headers, b"")
    if b"content-length" in headers:
        return Reply(status, headers, await reader.readexactly(int(headers[b"content-length"])))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                    pass
                return Reply(status, headers, b"".join(chunks))
            chunks.append((await reader.readexactly(size + 2))[:-2])
    return Reply(status, headers, await reader.read())


def request(method: str, path: str, host: str, key: str | None = None, body: bytes = b"",
            headers: tuple[tuple[str, str], ...] = (), version: str = "1.1", length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    if key is not None:
        lines.append(f"Authorization: FlespiToken {key}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body or length is not None:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Traffic:
    host: str
    port: int
    key: str  # a standard token's
    master_key: str
    websocket: bool  # whether the upstream upgrades /soak/ws
    rate: float  # actions started per second
    concurrency: int
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    _next_start: float = 0.0

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def note(self, action: str, outcome: str) -> None:
        self.outcomes.setdefault(action, Counter())[outcome] += 1

    def expect(self, action: str, reply: Reply, status: int) -> None:
        self.note(action, "ok" if reply.status == status else f"status {reply.status}")

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    @staticmethod
    async def close(writer: asyncio.StreamWriter, abort: bool = False) -> None:
        if abort:
            writer.transport.abort()  # RST, as a client that crashed
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass

    # -- the fast path: plain proxied requests and refusals -----------------------------------

    async def fast_get(self, label: str) -> None:
        reader, writer = await self.connect()
        try:
            for index in range(random.randint(1, 5)):
                writer.write(request("GET", f"/soak/get?i={index}", self.authority, self.key))
                self.expect(label, await read_reply(reader), 200)
        finally:
            await self.close(writer)

    async def fast_post(self, label: str) -> None:
        reader, writer = await self.connect()
        try:
            for _ in range(random.randint(1, 3)):
                body = json.dumps({"data": "x" * random.randint(10, 4000)}).encode()
                writer.write(request("POST", "/soak/post", self.authority, self.key, body,
                                     (("Content-Type", "application/json"),)))
                self.expect(label, await read_reply(reader), 200)
        finally:
            await self.close(writer)

    async def no_key(self, label: str) -> None:
        await self.one(label, request("GET", "/soak/get", self.authority), 401)

    async def bad_key(self, label: str) -> None:
        await self.one(label, request("GET", "/soak/get", self.authority, random_keys(1)[0]), 401)

    # -- handed to aiohttp -----------------------------------------------------------------------

    async def api_list(self, label: str) -> None:
        await self.one(label, request("GET", "/platform/tokens/all", self.authority, self.master_key), 200)

    async def api_create_delete(self, label: str) -> None:
        reader, writer = await self.connect()
        try:
            body = json.dumps([{"ttl": 600, "info": "soak"}]).encode()
            writer.write(request("POST", "/platform/tokens", self.authority, self.master_key, body,
                                 (("Content-Type", "application/json"),)))
            created = await read_reply(reader)
            self.expect(label, created, 200)
            if created.status == 200:
                token_id = json.loads(created.body)["result"][0]["id"]
                writer.write(request("DELETE", f"/platform/tokens/{token_id}", self.authority, self.master_key))
                self.expect(label, await read_reply(reader), 200)
        finally:
            await self.close(writer)

    async def auth_info(self, label: str) -> None:
        await self.one(label, request("GET", "/auth/info", self.authority, self.key), 200)

    async def with_origin(self, label: str) -> None:
        await self.one(label, request("GET", "/soak/cors", self.authority, self.key,
                                      headers=(("Origin", "http://soak.example"),)), 200)

    async def head(self, label: str) -> None:
        await self.one(label, request("HEAD", "/soak/head", self.authority, self.key), 200, head_only=True)

    async def http10(self, label: str) -> None:
        await self.one(label, request("GET", "/soak/old", self.authority, self.key, version="1.0"), 200)

    async def websocket_echo(self, label: str) -> None:
        import aiohttp
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.ws_connect(f"http://{self.authority}/soak/ws",
                                          headers={"Authorization": f"FlespiToken {self.key}"}) as socket:
                for index in range(3):
                    await socket.send_str(f"soak {index}")
                    message = await socket.receive(timeout=5)
                    if message.data != f"soak {index}":
                        self.note(label, f"wrong echo {str(message.data)[:20]!r}")
                        return
        self.note(label, "ok")

    # -- clients that leave -------------------------------------------------------------------------

    async def idle_after_request(self, label: str) -> None:
        """A keep-alive connection, one request, then the client forgets it for a few seconds."""
        reader, writer = await self.connect()
        try:
            writer.write(request("GET", "/soak/get", self.authority, self.key))
            self.expect(label, await read_reply(reader), 200)
            await asyncio.sleep(random.uniform(2, 8))
        finally:
            await self.close(writer, abort=random.random() < 0.5)

    async def idle_silent(self, label: str) -> None:
        """Connected, says nothing, leaves."""
        _, writer = await self.connect()
        await asyncio.sleep(random.uniform(1, 5))
        await self.close(writer, abort=random.random() < 0.5)
        self.note(label, "abandoned")

    async def half_body(self, label: str, api: bool) -> None:
        """Content-Length 2000, 1000 bytes sent, then the client is gone."""
        _, writer = await self.connect()
        path, key = ("/platform/tokens", self.master_key) if api else ("/soak/post", self.key)
        writer.write(request("POST", path, self.authority, key, b"[" + b" " * 999, length=2000))
        await writer.drain()
        await asyncio.sleep(random.uniform(0.05, 1.0))
        await self.close(writer, abort=random.random() < 0.5)
        self.note(label, "abandoned")

    async def half_head(self, label: str) -> None:
        _, writer = await self.connect()
        writer.write(b"GET /soak/get HTTP/1.1\r\nHost: " + self.authority.encode() + b"\r\nAuthoriz")
        await writer.drain()
        await asyncio.sleep(random.uniform(0.05, 0.5))
        await self.close(writer)
        self.note(label, "abandoned")

    async def mid_reply(self, label: str, origin: bool) -> None:
        """A 256 KB reply of which the client reads the head and a little, then leaves."""
        reader, writer = await self.connect()
        try:
            extra = (("Origin", "http://soak.example"),) if origin else ()
            writer.write(request("GET", "/soak/big", self.authority, self.key, headers=extra))
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read(1024)
            status = head.split(b" ", 2)[1].decode()
            self.note(label, "ok" if status == "200" else f"status {status}")
        finally:
            await self.close(writer, abort=random.random() < 0.5)

    async def before_reply(self, label: str) -> None:
        """The upstream takes 0.5 s; the client leaves after 0.1 s."""
        _, writer = await self.connect()
        writer.write(request("GET", "/soak/slow", self.authority, self.key))
        await writer.drain()
        await asyncio.sleep(0.1)
        await self.close(writer)
        self.note(label, "abandoned")

    async def one(self, action: str, data: bytes, status: int, head_only: bool = False) -> None:
        reader, writer = await self.connect()
        try:
            writer.write(data)
            self.expect(action, await read_reply(reader, head_only), status)
        finally:
            await self.close(writer)

    # -- running ---------------------------------------------------------------------------------

    def mix(self) -> list[tuple[str, Callable[[str], Awaitable[None]], int]]:
        """(label, action, weight): about a third of the connections end up with aiohttp."""
        actions: list[tuple[str, Callable[[str], Awaitable[None]], int]] = [
            ("fast-path GET", self.fast_get, 20),
            ("fast-path POST", self.fast_post, 10),
            ("refused: no key", self.no_key, 4),
            ("refused: bad key", self.bad_key, 4),
            ("API GET /platform/tokens/all", self.api_list, 4),
            ("API POST+DELETE /platform/tokens", self.api_create_delete, 2),
            ("GET /auth/info", self.auth_info, 4),
            ("GET with Origin", self.with_origin, 4),
            ("HEAD", self.head, 3),
            ("HTTP/1.0 GET", self.http10, 3),
            ("idle keep-alive, abandoned", self.idle_after_request, 3),
            ("silent connection, abandoned", self.idle_silent, 2),
            ("half a body, fast path", lambda label: self.half_body(label, api=False), 3),
            ("half a body, API", lambda label: self.half_body(label, api=True), 2),
            ("half a request head", self.half_head, 2),
            ("left mid-reply, fast path", lambda label: self.mid_reply(label, origin=False), 3),
            ("left mid-reply, aiohttp (Origin)", lambda label: self.mid_reply(label, origin=True), 2),
            ("left before the reply", self.before_reply, 3),
        ]
        if self.websocket:
            actions.append(("WebSocket", self.websocket_echo, 3))
        return actions

    async def _start_slot(self) -> None:
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 1 / self.rate
        await asyncio.sleep(start - now)

    async def _worker(self, mix: list[tuple[str, Callable[[str], Awaitable[None]], int]], until: float) -> None:
        weights = [weight for _, _, weight in mix]
        while True:
            await self._start_slot()
            if time.monotonic() >= until:
                return
            label, action, _ = random.choices(mix, weights)[0]
            try:
                await asyncio.wait_for(action(label), ACTION_TIMEOUT)
            except Exception as exc:  # counted, and the soak goes on: what failed is the figure
                self.note(label, f"error {type(exc).__name__}")

    async def run(self, seconds: float) -> None:
        mix = self.mix()
        until = time.monotonic() + seconds
        self._next_start = time.monotonic()
        await asyncio.gather(*(self._worker(mix, until) for _ in range(self.concurrency)))


async def upgrades(host: str, port: int, key: str) -> bool:
    """Whether a WebSocket to /soak/ws through the gateway opens (the upstream must support it)."""
    import aiohttp
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://{host}:{port}/soak/ws", headers={"Authorization": f"FlespiToken {key}"},
                timeout=aiohttp.ClientWSTimeout(ws_receive=5)) as socket:
            await socket.send_str("probe")
            return bool((await socket.receive(timeout=5)).data == "probe")
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False

