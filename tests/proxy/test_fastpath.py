"""The fast path (`gateway/proxy/listener.py`, `gateway/proxy/upstream.py`) and its hand-over to aiohttp,
on real sockets. What the two paths share (the request's rules, refusals, upstream failures) runs
through both fronts; what is the fast path's own (its counters, pipelining, its pool, connection
handling) is `fast_only`.

Clients are raw `asyncio.open_connection` sockets where aiohttp's client cannot say what is needed
(pipelining, half-written bodies, malformed bytes, disconnects). Upstreams are the recording one of
`tests/support/servers.py` or, where an upstream must misbehave, a `ScriptedUpstream` below: a plain asyncio
server whose handler plays each connection. Timeouts here are hang guards only.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.proxy.listener import FastLane
from gateway.server import GatewayServer
from gateway.tokens import key_digest

from support.gateways import GatewayFactory, GatewayHandle, error
from support.keys import MASTER_KEY
from support.rawhttp import GUARD, Client, Reply, chunked, eventually, http, read_chunked, reset
from support.servers import Upstream, free_port

BAD_KEY = "B" * 64


# The fast path's own tests (what it serves, its counters, pipelining, its pool): the production
# front only. The rest run through both fronts (`front`, tests/proxy/conftest.py).
fast_only = pytest.mark.parametrize("front", ["fast"])


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[GatewayHandle | GatewayServer], Awaitable[Client]]]:
    opened: list[Client] = []

    async def connect(target: GatewayHandle | GatewayServer) -> Client:
        server = target.server if isinstance(target, GatewayHandle) else target
        client = await Client.connect(server.port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def lane_of(target: GatewayHandle | GatewayServer) -> FastLane:
    server = target.server if isinstance(target, GatewayHandle) else target
    assert server.site is not None and server.site.lane is not None
    return server.site.lane


class Counts:
    """`served_fast` and `handed_over` of a gateway, as changes since the last look."""

    def __init__(self, target: GatewayHandle | GatewayServer) -> None:
        self.lane = lane_of(target)
        self.fast, self.handed = self.lane.served_fast, self.lane.handed_over

    def delta(self) -> tuple[int, int]:
        fast, handed = self.lane.served_fast, self.lane.handed_over
        change = (fast - self.fast, handed - self.handed)
        self.fast, self.handed = fast, handed
        return change


# -- a scripted upstream --------------------------------------------------------------------------

@dataclass
class UpRequest:
    method: str
    target: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class UpConn:
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[UpRequest] = field(default_factory=list)
    got_head: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self) -> UpRequest | None:
        """The next request (its whole body), or None when the gateway closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as partial:
            if partial.partial:
                raise
            return None
        self.got_head.set()
        line, *lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers: dict[str, list[str]] = {}
        for item in lines:
            name, _, value = item.partition(":")
            headers.setdefault(name.lower(), []).append(value.strip())
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            body = await read_chunked(self.reader)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", ["0"])[0]))
        request = UpRequest(method, target, headers, body)
        self.requests.append(request)
        return request

    async def answer(self, body: bytes = b"ok", status: str = "200 OK", extra: str = "") -> None:
        self.writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Wait for the gateway to close its side (whatever else it sends is ignored)."""
        while await self.reader.read(65536):
            pass


Handler = Callable[[UpConn], Awaitable[None]]


class ScriptedUpstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: list[UpConn] = []
        self.open_now = 0
        self.max_open = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def requests(self) -> list[UpRequest]:
        return [request for conn in self.connections for request in conn.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpConn(len(self.connections), reader, writer)
        self.connections.append(conn)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            conn.ended.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            conn.writer.close()
        await self.server.wait_closed()


async def serve_ok(conn: UpConn) -> None:
    """A well-behaved keep-alive upstream: answers each request with its target and connection."""
    while (request := await conn.read_request()) is not None:
        body = json.dumps({"path": request.target, "conn": conn.index, "size": len(request.body)}).encode()
        await conn.answer(body, extra="Content-Type: application/json\r\n")


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Awaitable[ScriptedUpstream]]]:
    servers: list[ScriptedUpstream] = []

    async def start(handler: Handler) -> ScriptedUpstream:
        server = ScriptedUpstream(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


ScriptedFactory = Callable[[Handler], Awaitable[ScriptedUpstream]]
ClientFactory = Callable[[GatewayHandle | GatewayServer], Awaitable[Client]]


# == 1. which path serves what ====================================================================

@fast_only
async def test_plain_requests_are_fast_and_the_rest_handed_over(gw: GatewayHandle, clients: ClientFactory,
                                                                 upstream: Upstream) -> None:
    counts = Counts(gw)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        client = await clients(gw)
        reply = await client.ask(method, "/plain", body=b"{}" if method != "GET" else None)
        assert reply.status == 200 and reply.json()["method"] == method
        assert counts.delta() == (1, 0), method

    async def handed(raw: bytes, status: int, head_only: bool = False) -> Reply:
        client = await clients(gw)
        await client.send(raw)
        reply = await client.reply(head_only)
        assert reply.status == status, (raw, reply)
        assert counts.delta() == (0, 1), raw
        return reply

    reply = await handed(http("GET", "/platform/tokens"), 200)
    assert "bootstrap master token" in [token.get("info") for token in reply.json()["result"]]
    assert (await handed(http("GET", "/auth/info"), 200)).json()["result"]
    assert (await handed(http("HEAD", "/big/1000"), 200, head_only=True)).header("Content-Length") == "1000"
    reply = await handed(http("GET", "/with-origin", headers={"Origin": "https://page.example"}), 200)
    assert reply.json()["path"] == "/with-origin"
    assert reply.header("Access-Control-Allow-Origin") == "https://page.example"
    reply = await handed(http("GET", "/ten", version="1.0"), 200)
    assert reply.json()["path"] == "/ten"
    assert (await handed(http("GET", "/_gateway/health", key=None), 200)).json()["result"][0]["status"] == "ok"

    client = await clients(gw)  # Expect: 100-continue is aiohttp's to answer
    await client.send(http("POST", "/expect", headers={"Expect": "100-continue", "Content-Length": "3"}))
    assert (await client.reply()).status == 100
    await client.send(b"abc")
    reply = await client.reply()
    assert reply.status == 200 and reply.json() == {"method": "POST", "path": "/expect", "size": 3}
    assert counts.delta() == (0, 1)

    # a new connection: gw.session's were handed over already
    async with aiohttp.ClientSession() as session, session.ws_connect(
            gw.url + "/ws", headers={"Authorization": f"FlespiToken {MASTER_KEY}"}, protocols=("echo",)) as ws:
        await ws.send_str("up")
        assert (await ws.receive()).data == "echo:up"
    assert counts.delta() == (0, 1)
    assert "authorization" not in upstream.last.headers


@fast_only
async def test_refusals_on_the_fast_path_are_fast(gw: GatewayHandle, clients: ClientFactory,
                                                  upstream: Upstream) -> None:
    counts = Counts(gw)
    client = await clients(gw)
    reply = await client.ask("GET", "/x", key=BAD_KEY)
    assert reply.status == 401 and reply.json() == error(401, "invalid or expired access token")
    assert reply.header("WWW-Authenticate") == f'FlespiToken realm="{gw.settings.realm}"'
    reply = await client.ask("GET", "/x", key=None)  # refused at once, before the parser reached the message's end
    assert reply.status == 401 and reply.header("Connection") is None
    reply = await client.ask("GET", "/x", key=BAD_KEY)  # a cached "no such token" this time
    assert reply.status == 401 and reply.header("Connection") is None
    assert counts.delta() == (3, 0)
    assert upstream.requests == []
    reply = await client.ask("GET", "/x")  # a refusal of a complete request keeps the connection
    assert reply.status == 200 and reply.json()["path"] == "/x"



async def test_keys_change_on_one_kept_alive_connection(gw: GatewayHandle, clients: ClientFactory,
                                                        upstream: Upstream) -> None:
    """A connection remembers its last Authorization header and that key's digest; each request
    is still decided by its own key: another token, a bad key, no key, a revoked token."""
    first, second = await gw.create_token(), await gw.create_token()
    client = await clients(gw)

    async def token_id_seen(key: str | None) -> tuple[int, str | None]:
        before = len(upstream.requests)
        reply = await client.ask("GET", "/who", key=key)
        forwarded = upstream.requests[before:]
        return reply.status, forwarded[0].headers["x-token-id"][0] if forwarded else None

    assert await token_id_seen(first["key"]) == (200, str(first["id"]))
    assert await token_id_seen(first["key"]) == (200, str(first["id"]))
    assert await token_id_seen(second["key"]) == (200, str(second["id"]))
    assert await token_id_seen(BAD_KEY) == (401, None)
    assert await token_id_seen(None) == (401, None)
    assert await token_id_seen(BAD_KEY) == (401, None)
    assert await token_id_seen(first["key"]) == (200, str(first["id"]))
    await gw.call("DELETE", f"/platform/tokens/{first['id']}")
    assert await token_id_seen(first["key"]) == (401, None)
    assert await token_id_seen(second["key"]) == (200, str(second["id"]))

# == 2. keep-alive across the hand-over ===========================================================

@fast_only
async def test_one_connection_fast_then_handed_over_then_proxied(gw: GatewayHandle, clients: ClientFactory,
                                                                 upstream: Upstream) -> None:
    counts = Counts(gw)
    client = await clients(gw)
    for index in range(3):
        reply = await client.ask("GET", f"/before/{index}")
        assert reply.status == 200 and reply.json()["path"] == f"/before/{index}"
        assert reply.header("Connection") is None
    assert counts.delta() == (3, 0)
    reply = await client.ask("GET", "/platform/tokens")
    assert reply.status == 200 and "result" in reply.json()
    assert counts.delta() == (0, 1)
    for index, method in enumerate(("GET", "POST", "GET", "DELETE")):
        reply = await client.ask(method, f"/after/{index}", body=b"[1]" if method == "POST" else None)
        assert reply.status == 200 and reply.json() == {
            "method": method, "path": f"/after/{index}", "size": 3 if method == "POST" else 0}
    assert counts.delta() == (0, 0)  # aiohttp has the connection now
    assert [r.raw_path for r in upstream.requests] == [
        "/before/0", "/before/1", "/before/2", "/after/0", "/after/1", "/after/2", "/after/3"]
    for recorded in upstream.requests:
        assert "authorization" not in recorded.headers


@fast_only
async def test_api_request_body_follows_the_hand_over(gw: GatewayHandle, clients: ClientFactory) -> None:
    counts = Counts(gw)
    record = json.dumps([{"ttl": 3600, "access": {"type": 0}, "info": "split"}]).encode()
    client = await clients(gw)
    assert (await client.ask("GET", "/first")).status == 200
    await client.send(http("POST", "/platform/tokens", body=None, headers={
        "Content-Type": "application/json", "Content-Length": str(len(record))}) + record[:10])
    await asyncio.sleep(0.05)  # the hand-over happened with the body still coming
    await client.send(record[10:])
    reply = await client.reply()
    assert reply.status == 200 and reply.json()["result"][0]["info"] == "split"
    assert counts.delta() == (1, 1)

    client = await clients(gw)  # a chunked body, re-framed for aiohttp
    await client.send(http("POST", "/platform/tokens", headers={
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"}) + b"%x\r\n%s\r\n" % (10, record[:10]))
    await asyncio.sleep(0.05)
    await client.send(chunked(record[10:20], record[20:]))
    reply = await client.reply()
    assert reply.status == 200 and reply.json()["result"][0]["info"] == "split"
    assert counts.delta() == (0, 1)
    reply = await client.ask("GET", "/auth/info", key=reply.json()["result"][0]["key"])
    assert reply.status == 200


# == 3. pipelining ================================================================================

@fast_only
async def test_pipelined_fast_requests(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    counts = Counts(gw)
    client = await clients(gw)
    paths = [f"/pipe/{index}" for index in range(12)]  # more than the 8 queued before reading pauses
    await client.send(b"".join(http("GET", path) for path in paths))
    for path in paths:
        reply = await client.reply()
        assert reply.status == 200 and reply.json()["path"] == path
    assert counts.delta() == (12, 0)
    assert [r.raw_path for r in upstream.requests] == paths
    assert (await client.ask("GET", "/after")).json()["path"] == "/after"


@fast_only
async def test_pipelined_fast_then_api_then_proxied(gw: GatewayHandle, clients: ClientFactory,
                                                    upstream: Upstream) -> None:
    counts = Counts(gw)
    client = await clients(gw)
    await client.send(http("GET", "/one") + http("POST", "/two", body=b"22") + http("GET", "/platform/tokens")
                      + http("PUT", "/three", body=b"333") + http("GET", "/four"))
    replies = [await client.reply() for _ in range(5)]
    assert [reply.status for reply in replies] == [200] * 5
    assert replies[0].json()["path"] == "/one"
    assert replies[1].json() == {"method": "POST", "path": "/two", "size": 2}
    assert "result" in replies[2].json()
    assert replies[3].json() == {"method": "PUT", "path": "/three", "size": 3}
    assert replies[4].json()["path"] == "/four"
    assert counts.delta() == (2, 1)
    assert [r.raw_path for r in upstream.requests] == ["/one", "/two", "/three", "/four"]
    assert [r.body for r in upstream.requests] == [b"", b"22", b"333", b""]


@fast_only
async def test_pipelined_bodies_then_get(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    counts = Counts(gw)
    client = await clients(gw)
    big = bytes(range(256)) * 4096  # 1 MiB: more than a socket read, so the body spans many callbacks
    await client.send(http("POST", "/first", body=big)
                      + http("POST", "/second", headers={"Transfer-Encoding": "chunked"},
                             body=chunked(b"ab", b"c" * 70000, b"d"))
                      + http("GET", "/third"))
    first, second, third = [await client.reply() for _ in range(3)]
    assert first.json() == {"method": "POST", "path": "/first", "size": len(big)}
    assert second.json() == {"method": "POST", "path": "/second", "size": 70003}
    assert third.json() == {"method": "GET", "path": "/third", "size": 0}
    assert counts.delta() == (3, 0)
    assert upstream.requests[0].body == big
    assert upstream.requests[1].body == b"ab" + b"c" * 70000 + b"d"
    assert upstream.requests[2].body == b""


async def test_pipelined_behind_a_request_whose_token_is_loaded(gw: GatewayHandle, clients: ClientFactory,
                                                                upstream: Upstream) -> None:
    token = await gw.create_token(access={"type": 0})  # not cached yet: the first request waits for Redis
    client = await clients(gw)
    await client.send(http("POST", "/slowauth", key=token["key"], body=b"x" * 5000)
                      + http("GET", "/cached"))
    first, second = await client.reply(), await client.reply()
    assert first.json() == {"method": "POST", "path": "/slowauth", "size": 5000}
    assert second.json()["path"] == "/cached"
    assert [r.raw_path for r in upstream.requests] == ["/slowauth", "/cached"]


# == 4. request bodies ============================================================================

async def test_body_in_many_small_writes(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    body = bytes(index % 251 for index in range(20000))
    client = await clients(gw)
    await client.send(http("PUT", "/trickle", body=None, headers={"Content-Length": str(len(body))}))
    for start in range(0, len(body), 333):
        await client.send(body[start:start + 333])
        await asyncio.sleep(0.002)
    reply = await client.reply()
    assert reply.json() == {"method": "PUT", "path": "/trickle", "size": len(body)}
    assert upstream.last.body == body
    assert upstream.last.headers["content-length"] == [str(len(body))]
    assert "transfer-encoding" not in upstream.last.headers


async def test_chunked_request_body(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    client = await clients(gw)
    await client.send(http("POST", "/chunks", headers={"Transfer-Encoding": "chunked"}))
    pieces = [b"first;", b"x" * 100000, b"", b"last"]
    for piece in pieces[:-2]:
        await client.send(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        await asyncio.sleep(0.01)
    await client.send(b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(pieces[-1]), pieces[-1]))
    reply = await client.reply()
    expected = b"".join(pieces)
    assert reply.json() == {"method": "POST", "path": "/chunks", "size": len(expected)}
    assert upstream.last.body == expected
    assert upstream.last.headers["transfer-encoding"] == ["chunked"]
    assert "content-length" not in upstream.last.headers
    assert (await client.ask("GET", "/next")).json()["path"] == "/next"  # the framing ended where it should


async def test_large_upload_streamed(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    size = 20 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB, not one repeated byte
    digest = hashlib.sha256()
    client = await clients(gw)
    await client.send(http("POST", "/upload-raw", body=None, headers={"Content-Length": str(size)}))
    for _ in range(size // len(block)):
        await client.send(block)
        digest.update(block)
    reply = await client.reply()
    assert reply.json()["size"] == size
    assert hashlib.sha256(upstream.last.body).hexdigest() == digest.hexdigest()

    async def parts() -> AsyncIterator[bytes]:  # aiohttp's client sends this chunked
        for _ in range(size // len(block)):
            yield block

    async with gw.request("PUT", "/upload", data=parts()) as response:
        assert response.status == 200 and await response.json() == {"received": size}
    assert upstream.last.headers["transfer-encoding"] == ["chunked"]


async def test_body_arrives_while_a_new_token_is_loaded(gw: GatewayHandle, clients: ClientFactory,
                                                        upstream: Upstream, front: str) -> None:
    counts = Counts(gw)
    cache = gw.gateway.cache
    body = bytes(range(256)) * 12288  # 3 MiB: more than the 1 MiB held while the token is awaited
    for split in (True, False):
        token = await gw.create_token(access={"type": 0})
        digest = key_digest(token["key"])
        assert cache.peek(digest) == (False, None)  # first use: a cache miss, answered by Redis
        loaded = partial(lambda digest: cache.peek(digest)[0], digest)
        client = await clients(gw)
        if split:  # head and most of the body at once: held by the exchange while the token is looked up
            await client.send(http("POST", "/late", key=token["key"], body=body)[:-1000])
            await eventually(loaded, "token loaded")
            await client.send(body[-1000:])
        else:  # the head alone; the body only once the token was loaded
            await client.send(http("POST", "/late", key=token["key"], body=None,
                                   headers={"Content-Length": str(len(body))}))
            await eventually(loaded, "token loaded")
            await client.send(body)
        reply = await client.reply()
        assert reply.json() == {"method": "POST", "path": "/late", "size": len(body)}
        assert upstream.last.body == body
        assert upstream.last.headers["x-token-id"] == [str(token["id"])]
    if front == "fast":  # the fast path's own counter
        assert counts.delta() == (2, 0)


# == 5. replies ===================================================================================

async def test_reply_with_length_and_chunked(gw: GatewayHandle, clients: ClientFactory) -> None:
    client = await clients(gw)
    reply = await client.ask("GET", "/big/100000")
    assert reply.header("Content-Length") == "100000" and reply.header("Transfer-Encoding") is None
    assert reply.body == b"x" * 100000
    reply = await client.ask("GET", "/chunked")
    assert reply.header("Transfer-Encoding") == "chunked" and reply.body == b"one,two,three"
    reply = await client.ask("GET", "/status/404")
    assert reply.status == 404 and reply.body == b"status 404" and reply.header("X-Status") == "404"


async def test_close_delimited_reply(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                     clients: ClientFactory) -> None:
    async def until_close(conn: UpConn) -> None:
        if await conn.read_request() is None:
            return
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for index in range(5):
            conn.writer.write(b"part %d;" % index)
            await conn.writer.drain()
            await asyncio.sleep(0.01)
        conn.writer.close()

    up = await scripted(until_close)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    for _ in range(2):  # the client's connection outlives the upstream's
        reply = await client.ask("GET", "/eof")
        assert reply.status == 200 and reply.body == b"part 0;part 1;part 2;part 3;part 4;"
        assert reply.header("Transfer-Encoding") == "chunked"
    assert len(up.connections) == 2


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses_keep_the_connection_in_step(gw: GatewayHandle, clients: ClientFactory,
                                                            code: int) -> None:
    client = await clients(gw)
    await client.send(http("GET", f"/status/{code}") + http("GET", "/after"))
    reply = await client.reply()
    assert reply.status == code and reply.header("X-Status") == str(code)
    assert reply.header("Content-Length") is None and reply.header("Transfer-Encoding") is None
    after = await client.reply()
    assert after.status == 200 and after.json()["path"] == "/after"


async def test_informational_replies_are_skipped(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                                 clients: ClientFactory) -> None:
    async def early(conn: UpConn) -> None:
        while await conn.read_request() is not None:
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.writer.drain()
            await asyncio.sleep(0.01)
            conn.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                              b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok")
            await conn.writer.drain()

    up = await scripted(early)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    for _ in range(2):
        await client.send(http("POST", "/hints", body=b"data"))
        reply = await client.reply()  # the first bytes the client gets are the final reply's
        assert reply.status == 201 and reply.body == b"ok"
        assert reply.header("X-Final") == "yes" and reply.header("Link") is None
    assert len(up.connections) == 1  # and the upstream connection stayed in step


async def test_large_download_to_a_slow_reader(make_gateway: GatewayFactory, clients: ClientFactory) -> None:
    # read_timeout shorter than the client's stalls: time the gateway spends not reading because its
    # client is not reading is not the upstream being slow.
    gw = await make_gateway(proxy={"read_timeout": 1.0})
    lane = lane_of(gw)
    size = 50 * 1024 * 1024
    client = await clients(gw)
    await client.send(http("GET", f"/big/{size}"))
    reply = await client.reply(head_only=True)
    assert reply.status == 200 and reply.header("Content-Length") == str(size)
    received = 0
    stalls = {1 << 20, 25 << 20}
    async with asyncio.timeout(120):
        while received < size:
            piece = await client.reader.read(65536)
            assert piece, f"connection closed after {received} of {size} bytes"
            assert piece.count(b"x") == len(piece)
            received += len(piece)
            for at in sorted(stalls):
                if received >= at:
                    stalls.discard(at)
                    await asyncio.sleep(1.5)  # the client stops reading
                    held = sum(conn.transport.get_write_buffer_size() for conn in lane.connections
                               if conn.transport is not None)
                    assert held < 8 << 20, f"{held} bytes queued for a client that does not read"
    assert received == size
    assert (await client.ask("GET", "/after")).status == 200


async def test_reply_headers_filtered(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                      clients: ClientFactory) -> None:
    async def opinionated(conn: UpConn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(b"hi", extra=(
                "Connection: keep-alive, X-Named\r\nX-Named: private\r\nKeep-Alive: timeout=5\r\n"
                "Proxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\n"
                "Access-Control-Allow-Origin: *\r\naccess-control-allow-credentials: true\r\n"
                "Access-Control-Expose-Headers: X-Secret\r\nX-Request-ID: forged\r\n"
                "Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nVary: Accept-Encoding\r\nX-Kept: yes\r\n"
                "Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"))

    up = await scripted(opinionated)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    for _ in range(2):
        reply = await client.ask("GET", "/headers")
        assert reply.status == 200 and reply.body == b"hi"
        names = {name.lower() for name, _ in reply.headers}
        for dropped in ("x-named", "keep-alive", "proxy-authenticate", "trailer", "upgrade", "te", "connection",
                        "access-control-allow-origin", "access-control-allow-credentials",
                        "access-control-expose-headers"):
            assert dropped not in names, dropped
        assert reply.header("X-Kept") == "yes" and reply.header("Vary") == "Accept-Encoding"
        assert reply.all("Set-Cookie") == ["a=1", "b=2"]
        assert reply.header("Date") == "Mon, 01 Jan 2001 00:00:00 GMT"
        request_id = reply.header("X-Request-ID")
        assert request_id is not None and re.fullmatch("[0-9a-f]{32}", request_id)
        assert up.requests[-1].headers["x-request-id"] == [request_id]
    assert len(up.connections) == 1


async def test_recording_upstream_cors_and_hop_headers_dropped(gw: GatewayHandle, clients: ClientFactory) -> None:
    client = await clients(gw)
    reply = await client.ask("GET", "/cors")
    assert reply.json() == {"cors": True} and reply.header("Vary") == "Accept-Encoding"
    assert not [name for name, _ in reply.headers if name.lower().startswith("access-control-")]
    reply = await client.ask("GET", "/hop")
    assert reply.body == b"hop" and reply.header("X-Public") == "ok"
    assert reply.header("X-Private") is None and reply.header("Keep-Alive") is None


# == 6. upstream failures =========================================================================

async def close_second(conn: UpConn) -> None:
    """The first connection answers once, then closes on the next request, unanswered: what an
    upstream whose keep-alive timeout ran out at that moment does."""
    if conn.index == 0:
        if await conn.read_request() is not None:
            await conn.answer(b"first")
            await conn.read_request()
        return
    await serve_ok(conn)


async def test_kept_alive_connection_closed_by_upstream_is_retried(make_gateway: GatewayFactory,
                                                                   scripted: ScriptedFactory,
                                                                   clients: ClientFactory) -> None:
    up = await scripted(close_second)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    assert (await client.ask("GET", "/one")).body == b"first"
    reply = await client.ask("GET", "/two")
    assert reply.status == 200 and reply.json() == {"path": "/two", "conn": 1, "size": 0}
    assert [[r.target for r in conn.requests] for conn in up.connections] == [["/one", "/two"], ["/two"]]


async def test_idle_connection_closed_by_upstream_is_not_used(make_gateway: GatewayFactory,
                                                               scripted: ScriptedFactory,
                                                               clients: ClientFactory) -> None:
    async def answer_once(conn: UpConn) -> None:
        if (request := await conn.read_request()) is not None:
            await conn.answer(f"{request.target} on {conn.index}".encode())  # then closes, idle

    up = await scripted(answer_once)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    for index in range(3):
        assert (await client.ask("POST", f"/{index}", body=b"b")).body == f"/{index} on {index}".encode()
        async with asyncio.timeout(GUARD):
            await up.connections[index].ended.wait()
        await asyncio.sleep(0.01)  # the gateway reads the close in its own time
    assert len(up.connections) == 3


async def test_request_with_body_is_not_retried(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                                clients: ClientFactory) -> None:
    up = await scripted(close_second)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    assert (await client.ask("GET", "/one")).body == b"first"
    reply = await client.ask("POST", "/once", body=b"not idempotent")
    assert reply.status == 502 and reply.json() == error(502, "upstream unavailable")
    assert [r.target for r in up.requests] == ["/one", "/once"]  # sent once, never replayed
    assert (await client.ask("GET", "/three")).json()["path"] == "/three"


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_dies_mid_reply(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                       clients: ClientFactory, framing: str) -> None:
    async def dies(conn: UpConn) -> None:
        if conn.index > 0:
            await serve_ok(conn)
            return
        if await conn.read_request() is None:
            return
        if framing == "length":
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        else:
            conn.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"a" * 1000 + b"\r\n")
        await conn.writer.drain()
        await asyncio.sleep(0.05)
        conn.writer.transport.abort()

    up = await scripted(dies)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    await client.send(http("GET", "/dies"))
    reply = await client.reply(head_only=True)
    assert reply.status == 200
    rest = await client.rest()  # the connection is closed: the only honest signal left
    if framing == "length":
        assert reply.header("Content-Length") == "100000" and rest == b"a" * 1000
    else:
        assert reply.header("Transfer-Encoding") == "chunked"
        assert rest == b"3e8\r\n" + b"a" * 1000 + b"\r\n"  # no last chunk
    healthy = await clients(gw)
    assert (await healthy.ask("GET", "/next")).json() == {"path": "/next", "conn": 1, "size": 0}


async def test_upstream_sends_garbage(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                      clients: ClientFactory) -> None:
    async def garbage(conn: UpConn) -> None:
        if conn.index > 0:
            await serve_ok(conn)
            return
        if await conn.read_request() is not None:
            conn.writer.write(b"SPAM SPAM SPAM\r\n\r\n")
            await conn.until_closed()

    up = await scripted(garbage)
    gw = await make_gateway(upstream=up.url)
    client = await clients(gw)
    reply = await client.ask("GET", "/garbage")
    assert reply.status == 502 and reply.json() == error(502, "upstream unavailable")
    async with asyncio.timeout(GUARD):
        await up.connections[0].ended.wait()  # the gateway dropped that connection
    assert (await client.ask("GET", "/next")).json() == {"path": "/next", "conn": 1, "size": 0}


async def test_read_timeout_before_the_head(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                            clients: ClientFactory) -> None:
    async def silent(conn: UpConn) -> None:
        if conn.index > 0:
            await serve_ok(conn)
            return
        if await conn.read_request() is not None:
            await conn.until_closed()

    up = await scripted(silent)
    gw = await make_gateway(upstream=up.url, proxy={"read_timeout": 0.5})
    client = await clients(gw)
    reply = await client.ask("GET", "/silent")
    assert reply.status == 504
    assert reply.body == b'{"errors":[{"code":504,"reason":"upstream timeout"}]}'
    assert reply.header("Content-Type") == "application/json"
    async with asyncio.timeout(GUARD):
        await up.connections[0].ended.wait()
    assert (await client.ask("GET", "/next")).json() == {"path": "/next", "conn": 1, "size": 0}


async def test_connect_refused(make_gateway: GatewayFactory, clients: ClientFactory) -> None:
    gw = await make_gateway(upstream=f"http://127.0.0.1:{free_port()}")
    client = await clients(gw)
    for method, body in (("GET", None), ("POST", b"x" * 100000)):
        reply = await client.ask(method, "/nowhere", body=body)
        assert reply.status == 502 and reply.json() == error(502, "upstream unavailable")
        assert reply.header("Connection") is None  # the request was read whole: keep-alive goes on


async def test_client_half_closes_after_its_request(gw: GatewayHandle, clients: ClientFactory) -> None:
    client = await clients(gw)
    await client.send(http("POST", "/half-closed", body=b"all of it"))
    client.writer.write_eof()  # nothing more to send; the reply is still wanted
    reply = await client.reply()
    assert reply.json() == {"method": "POST", "path": "/half-closed", "size": 9}
    assert await client.rest() == b""

    client = await clients(gw)  # the same with the start of a request that will never be finished behind it
    await client.send(http("GET", "/slow/0.1") + b"GET /never HTTP/1.1\r\nHo")
    client.writer.write_eof()
    assert (await client.reply()).json() == {"slow": True}
    assert await client.rest() == b""


async def test_client_leaves_mid_request(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                         clients: ClientFactory) -> None:
    up = await scripted(serve_ok)
    gw = await make_gateway(upstream=up.url)
    leaving = await clients(gw)
    await leaving.send(http("POST", "/half", body=None, headers={"Content-Length": "100000"}) + b"y" * 1000)
    await eventually(lambda: bool(up.connections) and up.connections[0].got_head.is_set(), "upstream got the head")
    leaving.close()  # a FIN mid-body: that request can never be completed
    async with asyncio.timeout(GUARD):
        await up.connections[0].ended.wait()  # the gateway closed the upstream connection with it
    client = await clients(gw)
    reply = await client.ask("GET", "/next")
    assert reply.json() == {"path": "/next", "conn": 1, "size": 0}
    assert up.connections[0].requests == []


@fast_only
@pytest.mark.parametrize("leaving_by", ["reset", "close"])
async def test_client_leaves_mid_reply(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                       clients: ClientFactory, leaving_by: str) -> None:
    async def slow_big(conn: UpConn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target != "/big":
                await conn.answer(f"{request.target} on {conn.index}".encode())
                continue
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"b" * 10000)
            await conn.writer.drain()
            if leaving_by == "reset":
                await conn.until_closed()  # the rest would come later; the gateway must not wait for it
            while True:  # the rest, slowly: the gateway finds the client gone when it writes
                await asyncio.sleep(0.01)
                conn.writer.write(b"b" * 10000)
                await conn.writer.drain()

    up = await scripted(slow_big)
    gw = await make_gateway(upstream=up.url)
    leaving = await clients(gw)
    await leaving.send(http("GET", "/big"))
    assert (await leaving.reply(head_only=True)).status == 200
    await leaving.reader.readexactly(5000)
    if leaving_by == "reset":
        reset(leaving)
    else:
        leaving.close()
    async with asyncio.timeout(GUARD):
        await up.connections[0].ended.wait()
    client = await clients(gw)
    assert (await client.ask("GET", "/next")).body == b"/next on 1"
    assert [r.target for r in up.connections[0].requests] == ["/big"]


# == 7. limits and malformed requests =============================================================

@pytest.mark.parametrize(("raw", "status", "reason"), [
    (http("GET", "/x", headers={"X-Big": "v" * 17000}), 431, "request header too large"),
    (http("GET", "/" + "u" * 9000), 414, "request URI too long"),
    (http("GET", "/x", headers=[(f"X-H{index}", "v") for index in range(300)]), 431, "request header too large"),
    (http("GET", "/x", headers=[(f"X-H{index}", "v" * 16000) for index in range(5)]), 431,
     "request header too large"),
], ids=["field", "url", "count", "total"])
async def test_head_too_large(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream, raw: bytes,
                              status: int, reason: str) -> None:
    client = await clients(gw)
    await client.send(raw)
    reply = await client.reply()
    assert reply.status == status and reply.json() == error(status, reason)
    assert reply.header("Connection") == "close" and reply.header("Content-Type") == "application/json"
    assert await client.rest() == b""
    assert upstream.requests == []


async def test_head_too_large_while_the_client_keeps_sending(gw: GatewayHandle, clients: ClientFactory) -> None:
    client = await clients(gw)
    await client.send(http("POST", "/x", headers={"X-Big": "v" * 17000, "Content-Length": str(100 << 20)}))

    async def keep_sending() -> None:
        for _ in range(1600):
            client.writer.write(b"z" * 65536)
            await client.writer.drain()

    sender = asyncio.ensure_future(keep_sending())
    try:
        reply = await client.reply()
        assert reply.status == 431 and reply.json() == error(431, "request header too large")
        assert await client.rest() == b""
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    b"GET /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\n continued\r\n\r\n",
], ids=["header-name", "tls", "length", "folded"])
async def test_malformed_request(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream, raw: bytes) -> None:
    client = await clients(gw)
    await client.send(raw)
    reply = await client.reply()
    assert reply.status == 400 and reply.json() == error(400, "malformed HTTP request")
    assert reply.header("Connection") == "close"
    assert await client.rest() == b""
    assert upstream.requests == []


@fast_only
async def test_malformed_body_after_the_head_was_forwarded(gw: GatewayHandle, clients: ClientFactory,
                                                          upstream: Upstream) -> None:
    client = await clients(gw)
    await client.send(http("POST", "/bad-chunks", headers={"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n")
    await eventually(lambda: lane_of(gw).served_fast == 0 and any(
        conn.exchange is not None and conn.exchange.conn is not None for conn in lane_of(gw).connections),
        "request forwarded")
    await client.send(b"zz\r\n")  # not a chunk size: the stream cannot be read any further
    reply = await client.reply()  # the reply had not started: the client is told, then the connection closes
    assert reply.status == 400 and reply.json() == error(400, "malformed HTTP request")
    assert reply.header("Connection") == "close"
    assert await client.rest() == b""
    assert (await (await clients(gw)).ask("GET", "/next")).status == 200
    assert [r.raw_path for r in upstream.requests] == ["/next"]  # the half request was never completed


async def test_length_and_chunked_together_refused(gw: GatewayHandle, clients: ClientFactory,
                                                   upstream: Upstream) -> None:
    client = await clients(gw)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    await client.send(http("POST", "/both", headers={"Content-Length": str(len(smuggled) + 5),
                                                     "Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n" + smuggled))
    reply = await client.reply()
    assert reply.status == 400 and reply.json() == error(400, "malformed HTTP request")
    assert await client.rest() == b""
    await asyncio.sleep(0.1)  # anything forwarded would have reached the upstream by now
    assert upstream.requests == []


async def test_chunked_in_a_second_transfer_encoding_header(gw: GatewayHandle, clients: ClientFactory,
                                                            upstream: Upstream) -> None:
    # Two Transfer-Encoding fields are one list ("gzip, chunked"): not a lone chunked, so refused
    # (forwarded as chunked it would lose its gzip), and nothing of it, nor its body, goes on.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Token-Id: 1\r\n\r\n"
    client = await clients(gw)
    await client.send(http("POST", "/te", headers=[("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
                           body=chunked(smuggled)))
    reply = await client.reply()
    assert reply.status == 501 and reply.json() == error(501, "transfer coding not supported")
    assert reply.header("Connection") == "close"
    assert await client.rest() == b""
    assert (await (await clients(gw)).ask("GET", "/after")).json()["path"] == "/after"
    assert [r.raw_path for r in upstream.requests] == ["/after"]


# Fast path only: aiohttp reads and drops a refused body for up to its lingering time (10 s)
# before it closes, so a quick client's upload ends first; the fast path ends its side at once.
@fast_only
async def test_refused_while_the_body_is_still_coming(gw: GatewayHandle, clients: ClientFactory,
                                                      upstream: Upstream) -> None:
    lane = lane_of(gw)
    before = set(lane.connections)
    client = await clients(gw)
    size = 200 * 1024 * 1024
    await client.send(http("POST", "/refused", key=BAD_KEY, body=None, headers={"Content-Length": str(size)}))

    async def keep_sending() -> None:  # a client that uploads without looking at the reply
        block = b"z" * 65536
        for _ in range(size // len(block)):
            client.writer.write(block)
            await client.writer.drain()

    sender = asyncio.ensure_future(keep_sending())
    try:
        reply = await client.reply()
        assert reply.status == 401 and reply.json() == error(401, "invalid or expired access token")
        assert reply.header("Connection") == "close"
        assert await client.rest() == b""  # the gateway's end of the stream
        assert not sender.done()  # the upload was still going on all along
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    client.writer.write_eof()
    await eventually(lambda: not (set(lane.connections) - before), "gateway closed the connection")
    assert upstream.requests == []


async def test_nothing_served_after_a_refusal_that_closes(gw: GatewayHandle, clients: ClientFactory,
                                                          upstream: Upstream) -> None:
    warm = await clients(gw)
    assert (await warm.ask("GET", "/warm")).status == 200  # an idle upstream connection waits in the pool
    assert (await warm.ask("GET", "/x", key=BAD_KEY)).status == 401  # now a cached "no such token"
    client = await clients(gw)
    request = http("POST", "/refused", key=BAD_KEY, body=b"body")
    await client.send(request[:-4])  # the head alone: refused before its body is read
    reply = await client.reply()  # the connection ends with this reply
    assert reply.status == 401 and reply.header("Connection") == "close"
    await client.send(b"body" + http("GET", "/behind"))
    assert await client.rest() == b""
    assert (await warm.ask("GET", "/later")).status == 200
    assert [r.raw_path for r in upstream.requests] == ["/warm", "/later"]  # /behind was never forwarded


@fast_only
async def test_pool_size_bounds_upstream_connections(make_gateway: GatewayFactory, scripted: ScriptedFactory,
                                                     clients: ClientFactory) -> None:
    async def slow(conn: UpConn) -> None:
        while (request := await conn.read_request()) is not None:
            await asyncio.sleep(0.2)
            await conn.answer(request.target.encode())

    up = await scripted(slow)
    gw = await make_gateway(upstream=up.url, proxy={"pool_size": 2})
    counts = Counts(gw)

    async def one(index: int) -> bytes:
        client = await clients(gw)
        reply = await client.ask("GET", f"/slow/{index}")
        assert reply.status == 200
        return reply.body

    bodies = await asyncio.gather(*(one(index) for index in range(10)))
    assert bodies == [f"/slow/{index}".encode() for index in range(10)]
    assert up.max_open <= 2 and len(up.connections) <= 2
    assert sorted(r.target for r in up.requests) == sorted(f"/slow/{index}" for index in range(10))
    assert counts.delta() == (10, 0)


@fast_only
async def test_pool_turn_passed_on_when_a_woken_waiter_leaves(make_gateway: GatewayFactory,
                                                               scripted: ScriptedFactory,
                                                               clients: ClientFactory) -> None:
    # pool_size 1: /a holds the connection, /b and /c wait for it. /b's client resets its connection
    # just before /a's reply arrives, so that in one event-loop step /b's waiter is woken (the
    # connection is free) and /b's task is cancelled (its client is gone) before it could run.
    release = asyncio.Event()
    leave: list[Callable[[], None]] = []

    async def handler(conn: UpConn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target == "/a":
                await release.wait()
                leave.pop()()
                await asyncio.sleep(0)  # the reset goes out first, the reply right after it
                conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            else:
                await conn.answer(request.target.encode())

    up = await scripted(handler)
    gw = await make_gateway(upstream=up.url, proxy={"pool_size": 1})
    first, second, third = await clients(gw), await clients(gw), await clients(gw)
    await first.send(http("GET", "/a"))
    await eventually(lambda: bool(up.connections) and up.connections[0].got_head.is_set(), "/a upstream")
    [pool] = lane_of(gw).pools()
    await second.send(http("GET", "/b"))
    await eventually(lambda: len(pool._waiters) == 1, "/b waiting for the connection")
    await third.send(http("GET", "/c"))
    await eventually(lambda: len(pool._waiters) == 2, "/c waiting for the connection")
    leave.append(lambda: reset(second))
    release.set()
    assert (await first.reply()).body == b"a"
    assert (await third.reply()).body == b"/c"  # not stuck behind a turn that was lost


# == 8. identity, request ids, logs and usage =====================================================

async def test_key_never_forwarded_nor_logged(make_gateway: GatewayFactory, upstream: Upstream,
                                              clients: ClientFactory, tmp_path: Path, front: str) -> None:
    log_path = tmp_path / "requests.log"
    gw = await make_gateway(log={"path": str(log_path), "flush_interval": 0.05})
    token = await gw.create_token(access={"type": 0}, info="logged")
    counts = Counts(gw)
    client = await clients(gw)
    plan = [("GET", "/big/1234", None, 200), ("POST", "/status/201", b"abc", 201), ("GET", "/status/204", None, 204),
            ("DELETE", "/gone?x=1", None, 200)]
    sizes = []
    for method, path, body, status in plan:
        reply = await client.ask(method, path, key=token["key"], body=body,
                                 headers={"x-flespi-app": "tests", "Proxy-Authorization": token["key"]})
        assert reply.status == status
        sizes.append(len(reply.body))
    bad = await client.ask("GET", "/denied", key=BAD_KEY)
    assert bad.status == 401
    if front == "fast":  # the fast path's own counter
        assert counts.delta() == (len(plan) + 1, 0)
    for recorded in upstream.requests:
        assert "authorization" not in recorded.headers and "proxy-authorization" not in recorded.headers
        assert not [value for values in recorded.headers.values() for value in values if token["key"] in value]
        assert recorded.headers["x-token-id"] == [str(token["id"])]
    client.close()
    async with asyncio.timeout(GUARD):
        await gw.server.close()
    text = log_path.read_text()
    assert token["key"] not in text and BAD_KEY not in text and MASTER_KEY not in text
    lines = [json.loads(line) for line in text.splitlines()]
    proxied = [line for line in lines if line.get("event_code") == 1000 and line["token_id"] == token["id"]]
    assert [(line["method"], line["uri"], line["status"]) for line in proxied] == [
        (method, path.partition("?")[0], status) for method, path, _, status in plan]
    assert [line["size"] for line in proxied] == sizes
    for line in proxied:
        assert line["app"] == "tests" and line["host"] == "127.0.0.1" and line["cid"] == token["cid"]
        assert re.fullmatch("[0-9a-f]{32}", line["request_id"])


async def test_request_ids(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    client = await clients(gw)
    await client.send(b"".join(http("GET", f"/id/{index}", headers={"X-Request-ID": "from-client"})
                               for index in range(20)))
    ids = []
    for _ in range(20):
        reply = await client.reply()
        request_id = reply.header("X-Request-ID")
        assert request_id is not None and re.fullmatch("[0-9a-f]{32}", request_id)
        ids.append(request_id)
    other = await clients(gw)
    ids.append((await other.ask("GET", "/id/other")).header("X-Request-ID") or "")
    ids.append((await other.ask("GET", "/id/denied", key=BAD_KEY)).header("X-Request-ID") or "")
    assert len(set(ids)) == len(ids) == 22
    assert [r.headers["x-request-id"] for r in upstream.requests] == [[request_id] for request_id in ids[:21]]


@pytest.mark.parametrize("cid", ["abc", "-1", "1x", "", " ", "1 2", "\u0661"])
async def test_invalid_cid_header(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream, cid: str,
                                  front: str) -> None:
    value = cid.encode().decode("latin-1")  # sent as UTF-8 bytes
    counts = Counts(gw)
    fast = await clients(gw)
    reply = await fast.ask("GET", "/cid", headers={"x-flespi-cid": value})
    assert reply.status == 400
    assert reply.json() == error(400, "invalid x-flespi-cid header: must be an account id")
    if front == "fast":  # the fast path's own counter
        assert counts.delta() == (1, 0)
    assert (await fast.ask("GET", "/still-open")).status == 200  # a refused complete request keeps the connection
    # aiohttp decides the same (Origin sends the request there)
    slow = await clients(gw)
    reply = await slow.ask("GET", "/cid", headers={"x-flespi-cid": value, "Origin": "https://page.example"})
    assert reply.status == 400
    assert reply.json() == error(400, "invalid x-flespi-cid header: must be an account id")
    if front == "fast":
        assert counts.delta() == (1, 1)
    assert [r.raw_path for r in upstream.requests] == ["/still-open"]


async def test_valid_cid_header(gw: GatewayHandle, clients: ClientFactory, upstream: Upstream) -> None:
    client = await clients(gw)
    reply = await client.ask("GET", "/cid", headers={"x-flespi-cid": " 0 "})
    assert reply.status == 200
    assert upstream.last.headers["x-account-id"] == ["0"]
    assert upstream.last.headers["x-flespi-cid"] == ["0"]


async def test_usage_counted_for_fast_requests(gw: GatewayHandle, clients: ClientFactory,
                                               redis_client: aioredis.Redis, key_prefix: str, front: str) -> None:
    # Counts reach Redis for an account with a limit (without one they are held in process).
    status, body = await gw.call("POST", "/platform/subaccounts", json={"name": "u", "limits": {"api_calls": 10 ** 6}})
    assert status == 200, body
    cid = body["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 3600, "access": {"type": 0}}],
                                 headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    token = body["result"][0]
    counts = Counts(gw)
    client = await clients(gw)
    for _ in range(3):
        assert (await client.ask("GET", "/big/1000", key=token["key"])).status == 200
    assert (await client.ask("POST", "/up", key=token["key"], body=b"u" * 500)).status == 200
    if front == "fast":  # the fast path's own counter
        assert counts.delta() == (4, 0)
    reply_size = len(json.dumps({"method": "POST", "path": "/up", "size": 500}))

    async def totals() -> tuple[int, int]:
        calls = size = 0
        async for key in redis_client.scan_iter(f"{key_prefix}usage:*:{token['cid']}"):
            values = await redis_client.hgetall(key)
            calls += int(values.get(f"c:{token['id']}".encode(), 0))
            size += int(values.get(f"b:{token['id']}".encode(), 0))
        return calls, size

    async with asyncio.timeout(GUARD):
        while (found := await totals())[0] < 4:
            await asyncio.sleep(0.05)
    assert found == (4, 3 * 1000 + 500 + reply_size)


# == 9. graceful shutdown =========================================================================

@fast_only
async def test_request_in_flight_finishes_on_close(make_gateway: GatewayFactory, upstream: Upstream,
                                                   clients: ClientFactory) -> None:
    gw = await make_gateway()
    lane, port = lane_of(gw), gw.server.port
    idle = await clients(gw)
    assert (await idle.ask("GET", "/warm")).status == 200
    busy = await clients(gw)
    await busy.send(http("GET", "/slow/1"))
    await eventually(lambda: any(r.raw_path == "/slow/1" for r in upstream.requests), "upstream got it")
    closing = asyncio.ensure_future(gw.server.close())
    try:
        await eventually(lambda: lane.closing, "shutdown started")
        assert await idle.rest() == b""  # an idle keep-alive connection is closed at once
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        reply = await busy.reply()
        assert reply.status == 200 and reply.json() == {"slow": True}
        assert reply.header("Connection") == "close"
        assert await busy.rest() == b""
    finally:
        async with asyncio.timeout(GUARD):
            await closing
