"""The two fronts against each other: the same generated request, sent to a gateway that serves it on
the fast path and to one that hands every request to aiohttp, must get the same status and reply
body, and put the same bytes on the upstream connection (the request id aside).

Hypothesis draws requests from the parts the edges are made of: look-alike paths, identity and
forwarding headers in other spellings, repeated single headers, transfer codings, bodies. The
gateways, their upstream and Redis run on an event loop in a thread of their own, so that
hypothesis drives plain function calls and shrinks what it finds.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import build_settings
from gateway.server import GatewayServer

from support.gateways import base_config
from support.keys import MASTER_KEY
from support.rawhttp import Client, Reply
from support.rawupstream import RawConn, RawRequest, RawUpstream, answer

T = TypeVar("T")
BAD_KEY = "B" * 64
REPLY_GUARD = 5.0  # seconds: a request neither front answers counts as "no reply" on both


@pytest.fixture
def front() -> str:
    return "fast"  # each test here runs both fronts itself


def plain_echo(conn: RawConn, request: RawRequest) -> bytes:
    """The same reply whichever connection carried the request."""
    return answer(json.dumps({"method": request.method, "path": request.target, "size": len(request.body)}).encode(),
                  extra="Content-Type: application/json\r\n")


@dataclass
class Pair:
    loop: asyncio.AbstractEventLoop
    upstream: RawUpstream
    fast: GatewayServer
    aiohttp: GatewayServer

    def run(self, job: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(job, self.loop).result(60)


async def _start(redis_url: str) -> tuple[RawUpstream, GatewayServer, GatewayServer]:
    upstream = RawUpstream(plain_echo)
    await upstream.start()
    prefix = "{gwdiff-" + uuid.uuid4().hex[:12] + "}:"
    servers = []
    for fast_path in (True, False):
        server = GatewayServer(build_settings(base_config(upstream.url, redis_url, prefix)), fast_path=fast_path)
        await server.start("127.0.0.1", 0)
        servers.append(server)
    return upstream, servers[0], servers[1]


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[Pair]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream, fast, slow = asyncio.run_coroutine_threadsafe(_start(redis_url), loop).result(60)
    made = Pair(loop, upstream, fast, slow)
    made.standard_key = made.run(_standard_key(fast))  # type: ignore[attr-defined]
    yield made
    made.run(fast.close())
    made.run(slow.close())
    made.run(upstream.close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def _standard_key(server: GatewayServer) -> str:
    body = json.dumps([{"ttl": 3600, "access": {"type": 0}, "info": "differential"}]).encode()
    reply = await _exchange(server.port, b"POST /platform/tokens HTTP/1.1\r\nHost: gw.test\r\nAuthorization: "
                            b"FlespiToken " + MASTER_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert reply is not None and reply.status == 200, reply
    key: str = reply.json()["result"][0]["key"]
    return key


async def _exchange(port: int, data: bytes) -> Reply | None:
    client = await Client.connect(port)
    try:
        client.writer.write(data)
        async with asyncio.timeout(REPLY_GUARD):
            reply = await client.reply(head_only=data.startswith(b"HEAD "))
            while reply.status == 100:
                reply = await client.reply()
            return reply
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
    finally:
        client.close()


REQUEST_ID = re.compile(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n", re.IGNORECASE)


def normalised(data: bytes) -> list[bytes]:
    """The messages on the wire, each as its request line, its header fields (fields of one name
    in their order; distinct names sorted, their order means nothing) and its body bytes."""
    messages: list[bytes] = []
    data = REQUEST_ID.sub(b"\r\nX-Request-ID: <id>\r\n", data)
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        fields.sort(key=lambda field: field.partition(b":")[0].lower())
        lengths = [field for field in fields if field.lower().startswith(b"content-length:")]
        if lengths:
            size = int(lengths[0].partition(b":")[2])
            body, data = data[:size], data[size:]
        elif any(field.lower().startswith(b"transfer-encoding:") for field in fields):
            body, _, data = data.partition(b"\r\n0\r\n\r\n")
            body = _dechunked(body + b"\r\n0\r\n\r\n")
        else:
            body = b""
        messages.append(b"\r\n".join([line, *fields]) + separator + body)
    return messages


def _dechunked(data: bytes) -> bytes:
    """A chunked body as its bytes (chunk sizes are each writer's own choice)."""
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2:]
    return body


async def _both(pair: Pair, data: bytes) -> list[tuple[int | None, bytes, list[bytes]]]:
    outcomes = []
    for server in (pair.fast, pair.aiohttp):
        before = [len(conn.received) for conn in pair.upstream.connections]
        reply = await _exchange(server.port, data)
        await asyncio.sleep(0)  # what the upstream read is recorded by its own task
        sent = b"".join(bytes(conn.received[before[index] if index < len(before) else 0:])
                        for index, conn in enumerate(pair.upstream.connections))
        body = reply.body if reply is not None and reply.header("Content-Type") == "application/json" else b""
        outcomes.append((reply.status if reply is not None else None, body, normalised(sent)))
    return outcomes


# -- what a request is made of -----------------------------------------------------------------------

SEGMENTS = ["gw", "devices", "1,2", "platform", "Platform", "auth", "AUTH", "info", "tokens", "x.json", "a%20b",
            "%2e", "..", ".", "%2F", "a;b", "~u", "%C3%A9", "%ZZ", "_gateway", "health", "platform.", ""]
HEADERS = [
    ("X-Token-Id", "1"), ("X_Token_Id", "1"), ("x_account_id", "9"), ("X-Request-ID", "abc"), ("X_Request_Id", "abc"),
    ("x-flespi-cid", "0"), ("x-flespi-cid", "1"), ("x-flespi-cid", "9" * 30), ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6"), ("X-Forwarded-For", "6.6.6.6"), ("X_Forwarded_For", "6.6.6.6"),
    ("X-HTTP-Method-Override", "DELETE"), ("X-Method-Override", "PUT"), ("Connection", "close"),
    ("Connection", "X-Custom"), ("X-Custom", "v"), ("Keep-Alive", "5"), ("TE", "trailers"), ("Host", "other.test"),
    ("Content-Type", "text/plain"), ("Accept", "*/*"), ("Cookie", "a=b"), ("X-Flespi-App", "app"),
    ("Proxy-Authorization", "Basic x"), ("Upgrade", "h2c"), ("Expect", "100-continue"),
]
FRAMINGS = ["none", "length", "chunked", "gzip-chunked", "two-lengths"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "GET", "POST"]))
    path = "/" + "/".join(draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4)))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["a=1", "a=%20b&c", "q=%ZZ", ""]))
    key = draw(st.sampled_from(["master", "standard", "bad", "none"]))
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=5))
    body = draw(st.sampled_from([b"", b"abc", b"x" * 100]))
    framing = draw(st.sampled_from(FRAMINGS))
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if key != "none":
        lines.append(f"Authorization: FlespiToken {({'master': MASTER_KEY, 'bad': BAD_KEY}.get(key, key))}")
    payload = b""
    if framing == "length" or (framing == "none" and body):
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing in ("chunked", "gzip-chunked"):
        lines.append("Transfer-Encoding: " + ("chunked" if framing == "chunked" else "gzip, chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "two-lengths":
        lines += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=requests())
def test_both_fronts_treat_a_request_alike(pair: Pair, data: bytes) -> None:
    standard = pair.standard_key  # type: ignore[attr-defined]
    data = data.replace(b"FlespiToken standard", b"FlespiToken " + standard.encode())
    fast, slow = pair.run(_both(pair, data))
    assert fast[0] == slow[0], (data, fast, slow)  # the status
    assert fast[1] == slow[1], (data, fast, slow)  # a JSON reply (the gateway's own, or the upstream's echo)
    assert fast[2] == slow[2], data  # what reached the upstream
