"""Every connection's resources are bounded and given back (`limits` in the configuration).

Counted, not timed: descriptors of this process (the gateway and the upstream run in it) and
asyncio tasks come back to where they were once the clients have gone; every limit is answered
with a flespi-style error and a close. Timeouts below are hang guards, or the gateway's own
(small) limits under test.
"""
from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest
import yaml

from support.gateways import GatewayFactory, GatewayHandle, error
from support.rawhttp import GUARD, Client, chunked, eventually, http, reset
from support.servers import Upstream, free_port, run_gateway_process, wait_for_port

BAD_KEY = "B" * 64


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_tasks() -> int:
    return len(asyncio.all_tasks())


async def settled(expected_fds: int, expected_tasks: int) -> tuple[int, int]:
    """Descriptors and tasks once they stop falling to `expected` (or the guard runs out)."""
    deadline = asyncio.get_running_loop().time() + GUARD
    while True:
        gc.collect()
        now = (open_descriptors(), open_tasks())
        if now <= (expected_fds, expected_tasks) or asyncio.get_running_loop().time() > deadline:
            return now
        await asyncio.sleep(0.05)


@pytest.fixture
async def connect(gw: GatewayHandle) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    opened: list[Client] = []

    async def factory() -> Client:
        client = await Client.connect(gw.server.port)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        client.close()


async def one_of_each(gw: GatewayHandle, connect: Callable[[], Awaitable[Client]], key: str) -> None:
    """One connection of every kind, each closed by its client (or reset) when done."""
    async def ask_and_leave(raw: bytes, head_only: bool = False) -> int:
        client = await connect()
        await client.send(raw)
        status = (await client.reply(head_only)).status
        client.close()
        return status

    assert await ask_and_leave(http("GET", "/fast", key=key)) == 200  # fast path
    assert await ask_and_leave(http("POST", "/fast", key=key, body=b"x" * 5000)) == 200
    assert await ask_and_leave(http("GET", "/platform/tokens/all")) == 200  # the API, through aiohttp
    assert await ask_and_leave(http("GET", "/auth/info", key=key)) == 200
    assert await ask_and_leave(http("GET", "/page", key=key, headers={"Origin": "https://a.example"})) == 200
    assert await ask_and_leave(http("HEAD", "/head", key=key), head_only=True) == 200
    assert await ask_and_leave(http("GET", "/old", key=key, version="1.0")) == 200
    assert await ask_and_leave(http("GET", "/refused", key=BAD_KEY)) == 401  # a refusal
    assert await ask_and_leave(http("GET", "/platform/tokens/all", key=BAD_KEY)) == 401

    # Idle keep-alive connections on both paths, abandoned by their clients.
    for raw in (http("GET", "/idle", key=key), http("GET", "/auth/info", key=key)):
        client = await connect()
        await client.send(raw)
        await client.reply()
        client.close()

    # Gone mid-request: half a body, then a close or a reset.
    for leave in (Client.close, reset):
        client = await connect()
        await client.send(http("POST", "/upload", key=key, headers={"Content-Length": "100000"}) + b"x" * 1000)
        await asyncio.sleep(0.02)
        leave(client)

    # Gone mid-reply, on each path.
    for headers in ({}, {"Origin": "https://a.example"}):
        client = await connect()
        await client.send(http("GET", "/big/20000000", key=key, headers=headers))
        await client.reply(head_only=True)
        await client.reader.read(100000)
        reset(client)

    # A WebSocket through the aiohttp relay.
    async with aiohttp.ClientSession() as session, session.ws_connect(
            gw.url + "/ws", headers={"Authorization": f"FlespiToken {key}"}, protocols=("echo",)) as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=GUARD)).data == "echo:hi"


async def test_descriptors_and_tasks_come_back(gw: GatewayHandle, connect: Callable[[], Awaitable[Client]]) -> None:
    key = (await gw.create_token(info="connections"))["key"]
    await one_of_each(gw, connect, key)  # warm-up: pools, cached token, the relay's session
    before = await settled(10**6, 10**6)
    await asyncio.sleep(0.2)
    before = (open_descriptors(), open_tasks())
    held = gw.gateway.open_connections()  # the test's own API session keeps one
    for _ in range(15):
        await one_of_each(gw, connect, key)
    after = await settled(*before)
    # Fails when a connection of any kind outlives its client: 15 rounds of 20 connections each.
    assert after[0] <= before[0], f"descriptors: {before[0]} before, {after[0]} after"
    assert after[1] <= before[1], f"tasks: {before[1]} before, {after[1]} after"
    assert gw.gateway.open_connections() <= held


async def test_upstream_gone_gives_everything_back(make_gateway: GatewayFactory,
                                                   upstream: Upstream) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(upstream=None, routes={"/": upstream.url, "/gone/": closed})
    key = (await gw.create_token(info="gone"))["key"]

    async def round_trip() -> None:
        for headers in ({}, {"Origin": "https://a.example"}):  # the fast path, then aiohttp's relay
            client = await Client.connect(gw.server.port)
            await client.send(http("GET", "/gone/x", key=key, headers=headers))
            reply = await client.reply()
            assert reply.status == 502 and reply.json() == error(502, "upstream unavailable")
            client.close()

    await round_trip()
    before = await settled(10**6, 10**6)
    await asyncio.sleep(0.2)
    before = (open_descriptors(), open_tasks())
    for _ in range(20):
        await round_trip()
    after = await settled(*before)
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)


async def test_idle_connections_closed_after_keepalive_timeout(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"keepalive_timeout": 0.3})
    key = (await gw.create_token(info="idle"))["key"]
    for raw in (http("GET", "/x", key=key), http("GET", "/auth/info", key=key)):  # both paths
        client = await Client.connect(gw.server.port)
        await client.send(raw)
        assert (await client.reply()).status == 200
        assert await client.rest() == b""  # the gateway closed it: the guard would fail a hang
        client.close()
    await eventually(lambda: gw.gateway.open_connections() == 0, "every connection closed")


async def test_head_must_arrive_within_header_timeout(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"header_timeout": 0.3})
    client = await Client.connect(gw.server.port)
    await client.send(b"GET /slow-loris HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")  # and never the end
    reply = await client.reply()
    assert reply.status == 408 and reply.json() == error(408, "request header timeout")
    assert reply.header("Connection") == "close"
    assert await client.rest() == b""


async def test_header_timeout_on_a_connection_aiohttp_serves(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"header_timeout": 0.3})
    key = (await gw.create_token(info="slow"))["key"]
    client = await Client.connect(gw.server.port)
    assert (await client.ask("GET", "/auth/info", key=key)).status == 200  # handed to aiohttp
    await client.send(b"GET /auth/info HTTP/1.1\r\nHost: x\r\n")  # the next head never ends
    reply = await client.reply()
    assert reply.status == 408 and reply.json() == error(408, "request header timeout")
    assert await client.rest() == b""


@pytest.mark.parametrize("tail", [b"X-Endless: " + b"v" * 300_000, b"X-" + b"n" * 300_000],
                         ids=["value", "name"])
async def test_head_that_never_ends_is_bounded(gw: GatewayHandle, upstream: Upstream, tail: bytes) -> None:
    client = await Client.connect(gw.server.port)
    client.writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n" + tail)  # no CRLF, ever
    # Without a bound the parser would hold it all and answer nothing (the guard would fail).
    reply = await client.reply()
    assert reply.status == 431 and reply.json() == error(431, "request header too large")
    assert reply.header("Connection") == "close"
    assert upstream.requests == []
    client.close()


async def test_memory_comes_back_after_huge_heads_and_bodies(tmp_path: Path, upstream: Upstream) -> None:
    """Measured on a gateway process of its own, as an operator would: its RSS, not this one's."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port}, "upstream": upstream.url,
                                      "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")},
                                      "log": {"path": "off"}}))
    process = run_gateway_process(config)
    try:
        wait_for_port(port)

        async def huge(index: int) -> None:
            client = await Client.connect(port)
            try:
                if index % 2:
                    client.writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 200_000)
                else:  # a body for a key nobody has: refused, then read and dropped
                    client.writer.write(http("POST", "/x", key=BAD_KEY, headers={"Content-Length": "2000000"})
                                        + b"b" * 400_000)
                await client.writer.drain()
                await client.reply()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                reset(client)

        for index in range(40):  # warm-up: allocator arenas, parser objects, the cached unknown key
            await huge(index)
        before = process_rss_kb(process.pid)
        baseline = open_sockets(process.pid)
        for start in range(0, 1000, 50):
            await asyncio.gather(*(huge(index) for index in range(start, start + 50)))
        await eventually(lambda: open_sockets(process.pid) <= baseline, "every refused connection closed")
        grown = process_rss_kb(process.pid) - before
        assert grown < 8 * 1024, f"RSS grew by {grown} KB after 1,000 refused connections"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def process_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_sockets(pid: int) -> int:
    """The process's sockets: its listener and the upstream pool's, once the clients are gone."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):  # a descriptor closed while we look
            count += os.readlink(fd).startswith("socket:")
    return count


async def test_too_many_connections_refused_cleanly(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"max_connections": 3})
    key = (await gw.create_token(info="many"))["key"]
    await gw.session.close()  # its kept-alive connection would count
    gw.session = aiohttp.ClientSession()
    await eventually(lambda: gw.gateway.open_connections() == 0, "the API session's connection closed")
    held = [await Client.connect(gw.server.port) for _ in range(3)]
    await eventually(lambda: gw.gateway.open_connections() == 3, "three connections held")
    extra = await Client.connect(gw.server.port)
    reply = await extra.reply()
    assert reply.status == 503 and reply.json() == error(503, "too many connections")
    assert reply.header("Connection") == "close"
    extra.close()
    for client in held:  # those held are still served
        assert (await client.ask("GET", "/held", key=key)).status == 200
        client.close()


@pytest.mark.parametrize("origin", [None, "https://a.example"], ids=["fast", "aiohttp"])
async def test_body_size_limit(make_gateway: GatewayFactory, upstream: Upstream, origin: str | None) -> None:
    gw = await make_gateway(limits={"max_body_size": 1000})
    key = (await gw.create_token(info="bodies"))["key"]
    headers = {"Origin": origin} if origin else {}
    client = await Client.connect(gw.server.port)
    reply = await client.ask("POST", "/upload", key=key, headers=headers, body=b"x" * 1000)
    assert reply.status == 200
    await client.send(http("POST", "/upload", key=key, headers=headers, body=b"x" * 1001))
    reply = await client.reply()
    assert reply.status == 413 and reply.json() == error(413, "request body too large")
    client.close()
    client = await Client.connect(gw.server.port)  # chunked: refused once past the limit
    await client.send(http("POST", "/upload", key=key, headers={**headers, "Transfer-Encoding": "chunked"})
                      + chunked(b"y" * 600, b"y" * 600))
    # Head and body came in one piece: refused before either path started on the request.
    reply = await client.reply()
    assert reply.status == 413 and reply.json() == error(413, "request body too large")
    assert await client.rest() == b""
    client.close()
    assert len(upstream.requests) == 1


async def test_api_body_size_limit(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits={"api_body_size": 2000})
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "info": "i" * 3000}])
    assert (status, body) == (413, error(413, "request body larger than 2000 bytes"))
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "info": "small"}])
    assert status == 200


async def test_waiting_for_an_upstream_connection_is_bounded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(proxy={"pool_size": 1, "pool_timeout": 0.3})
    key = (await gw.create_token(info="pool"))["key"]
    holder = await Client.connect(gw.server.port)
    await holder.send(http("GET", "/slow/3", key=key))  # holds the one upstream connection
    await asyncio.sleep(0.2)
    waiting = await Client.connect(gw.server.port)
    reply = await waiting.ask("GET", "/next", key=key)
    assert reply.status == 504 and reply.json() == error(504, "upstream timeout")
    assert (await holder.reply()).status == 200
    assert (await waiting.ask("GET", "/next", key=key)).status == 200
    holder.close()
    waiting.close()


@pytest.mark.parametrize("origin", [None, "https://a.example"], ids=["fast", "aiohttp"])
async def test_client_that_stops_reading_is_dropped(make_gateway: GatewayFactory, origin: str | None) -> None:
    gw = await make_gateway(proxy={"pool_size": 1, "pool_timeout": 20}, limits={"send_timeout": 0.3})
    key = (await gw.create_token(info="stalled"))["key"]
    # The API call's keep-alive connection would stay open for the client session's 15 s.
    await gw.session.close()
    headers = {"Origin": origin} if origin else {}
    sock = socket.create_connection(("127.0.0.1", gw.server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(http("GET", "/big/200000000", key=key, headers=headers))  # and never read
    try:
        # The gateway drops it after `send_timeout`, and the upstream connection is given back:
        # the next request gets the pool's one connection.
        client = await Client.connect(gw.server.port)
        reply = await client.ask("GET", "/after", key=key, headers=headers)
        assert reply.status == 200
        client.close()
        await eventually(lambda: gw.gateway.open_connections() == 0, "the stalled client dropped")
    finally:
        sock.close()
