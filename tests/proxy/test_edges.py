"""The edges where an upstream could read a request differently from the gateway (docs/threat-model.md).

Every test runs through both fronts (`front`, tests/proxy/conftest.py) against an upstream that
keeps the raw bytes it receives (`support.rawupstream`): what reached it is the oracle, byte for
byte, and every refusal must be flespi JSON with nothing forwarded.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import refusal_id

from support.gateways import GatewayFactory, GatewayHandle, error
from support.keys import MASTER_KEY
from support.rawhttp import Client, Reply, chunked, eventually, http
from support.rawupstream import RawConn, RawRequest, RawUpstream, answer, echo
from support.rawupstream import Reply as Answer

BAD_KEY = "B" * 64
MALFORMED = error(400, "malformed HTTP request")
INVALID_PATH = error(400, "invalid request path")


@pytest.fixture
async def start_raw() -> AsyncIterator[Callable[[Answer], Awaitable[RawUpstream]]]:
    servers: list[RawUpstream] = []

    async def start(reply: Answer = echo) -> RawUpstream:
        server = RawUpstream(reply)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def raw(start_raw: Callable[[Answer], Awaitable[RawUpstream]]) -> RawUpstream:
    return await start_raw(echo)


@pytest.fixture
async def gw(make_gateway: GatewayFactory, raw: RawUpstream) -> GatewayHandle:
    return await make_gateway(upstream=raw.url)


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


Connect = Callable[[], Awaitable[Client]]


async def ask_once(gw: GatewayHandle, method: str, path: str, **kwargs: Any) -> Reply:
    """One request on a connection of its own (a kept-alive one may already be aiohttp's)."""
    client = await Client.connect(gw.server.port)
    try:
        return await client.ask(method, path, **kwargs)
    finally:
        client.close()


async def refused(client: Client, status: int, body: object) -> None:
    reply = await client.reply()
    assert (reply.status, reply.json()) == (status, body)
    assert reply.header("Content-Type") == "application/json"


# == upstream connection hygiene ==================================================================

SMUGGLED = answer(b"not yours", extra="X-Smuggled: 1\r\n")


@pytest.mark.parametrize("extra", [SMUGGLED, SMUGGLED[:30]], ids=["whole", "partial"])
async def test_bytes_behind_the_reply_never_reach_the_next_request(make_gateway: GatewayFactory, start_raw: Callable[
        [Answer], Awaitable[RawUpstream]], extra: bytes) -> None:
    def two_replies(conn: RawConn, request: RawRequest) -> bytes:
        return echo(conn, request) + (extra if request.target == "/first" else b"")

    up = await start_raw(two_replies)
    gw = await make_gateway(upstream=up.url)
    other = await gw.create_token(info="another client")
    assert (await ask_once(gw, "GET", "/first")).json()["path"] == "/first"
    for index in range(3):  # another client, another token: never the bytes meant for nobody
        reply = await ask_once(gw, "GET", f"/next{index}", key=other["key"])
        assert reply.status == 200 and reply.header("X-Smuggled") is None
        assert b"not yours" not in reply.body and reply.json()["path"] == f"/next{index}"
    assert up.connections[0].requests[0].target == "/first"
    assert all(request.target != "/next0" for request in up.connections[0].requests)


async def test_bytes_sent_to_an_idle_connection_close_it(make_gateway: GatewayFactory, start_raw: Callable[
        [Answer], Awaitable[RawUpstream]]) -> None:
    up = await start_raw(echo)
    gw = await make_gateway(upstream=up.url)
    assert (await ask_once(gw, "GET", "/first")).status == 200
    await eventually(lambda: len(up.connections) == 1 and len(up.connections[0].requests) == 1, "first answered")
    await asyncio.sleep(0.05)  # the connection is back in the gateway's pool
    up.connections[0].writer.write(SMUGGLED)  # unasked, onto the idle connection
    async with asyncio.timeout(5):
        await up.connections[0].ended.wait()  # the gateway closed it on those bytes
    reply = await ask_once(gw, "GET", "/second")
    assert reply.status == 200 and reply.json() == {"path": "/second", "conn": 1, "size": 0}


# == never replay what is not idempotent ===========================================================

def close_on_second(conn: RawConn, request: RawRequest) -> bytes | None:
    """Connection 0 answers once, then closes on the next request: a keep-alive timeout racing it."""
    if conn.index == 0 and len(conn.requests) == 2:
        return None
    return echo(conn, request)


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("DELETE", True), ("POST", False),
                                                   ("PATCH", False)])
async def test_only_idempotent_requests_are_retried(make_gateway: GatewayFactory, start_raw: Callable[
        [Answer], Awaitable[RawUpstream]], method: str, replayed: bool) -> None:
    up = await start_raw(close_on_second)
    gw = await make_gateway(upstream=up.url)
    client = await Client.connect(gw.server.port)
    try:
        assert (await client.ask("GET", "/warm")).status == 200
        reply = await client.ask(method, "/once")  # no body, no Content-Length: as `curl -X POST` sends it
        sent = [request.target for request in up.requests if request.target == "/once"]
        if replayed:
            assert reply.status == 200 and sent == ["/once", "/once"]
        else:
            assert (reply.status, reply.json()) == (502, error(502, "upstream unavailable"))
            assert sent == ["/once"]
    finally:
        client.close()


# == client headers an upstream could take for the gateway's own ===================================

async def test_identity_and_forwarding_headers_in_any_spelling_are_dropped(gw: GatewayHandle, raw: RawUpstream,
                                                                          connect: Connect) -> None:
    token = await gw.create_token(access={"type": 0})
    spoofed = [("X_Token_Id", "1"), ("x-TOKEN-id", "1"), ("X_Account_Id", "999"), ("X_Request_ID", "spoof"),
               ("x_request_id", "spoof"), ("X_Forwarded_For", "6.6.6.6"), ("X_Forwarded_Host", "evil"),
               ("X_Forwarded_Proto", "https"), ("X-Real-IP", "6.6.6.6"), ("X_Real_IP", "6.6.6.6"),
               ("Forwarded", "for=6.6.6.6"), ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"),
               ("X-Method-Override", "DELETE"), ("X_HTTP_Method_Override", "DELETE"), ("X-Kept", "yes")]
    client = await connect()
    reply = await client.ask("POST", "/devices", key=token["key"], headers=spoofed, body=b"{}")
    assert reply.status == 200
    [request] = raw.requests
    folded = {name.lower().replace("_", "-") for name, _ in request.headers}
    assert "x-real-ip" not in folded and "forwarded" not in folded
    assert not folded & {"x-http-method-override", "x-http-method", "x-method-override"}
    assert request.method == "POST"
    assert request.all("X-Kept") == ["yes"]
    values = [value for _, value in request.headers]
    assert "6.6.6.6" not in values and "evil" not in values and "spoof" not in values and "DELETE" not in values
    seen = {name.lower(): value for name, value in request.headers}
    assert seen["x-token-id"] == str(token["id"]) and seen["x-account-id"] == "0"
    assert sum(1 for name, _ in request.headers if name.lower().replace("_", "-") == "x-token-id") == 1


@pytest.mark.parametrize("name", ["Host", "x-flespi-cid", "Authorization"])
async def test_repeated_single_headers_refused(gw: GatewayHandle, raw: RawUpstream, connect: Connect,
                                               name: str) -> None:
    values = {"Host": ("a.test", "b.test"), "x-flespi-cid": ("0", "1"),
              "Authorization": (f"FlespiToken {MASTER_KEY}", f"FlespiToken {BAD_KEY}")}[name]
    lines = ["GET /x HTTP/1.1", *(f"{name}: {value}" for value in values)]
    if name != "Host":
        lines.append("Host: gw.test")
    if name != "Authorization":
        lines.append(f"Authorization: FlespiToken {MASTER_KEY}")
    client = await connect()
    await client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    await refused(client, 400, error(400, f"repeated {name.lower()} header"))
    assert raw.received == b""


REFUSED_BY_THE_LISTENER = {
    "two-hosts": (b"GET /twice HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n"
                  b"Authorization: FlespiToken " + MASTER_KEY.encode() + b"\r\n\r\n", "/twice", 400,
                  "repeated host header"),
    "gzip-chunked": (http("POST", "/coded", headers={"Transfer-Encoding": "gzip, chunked"}, body=chunked(b"hi")),
                     "/coded", 501, "transfer coding not supported"),
    "asterisk": (http("OPTIONS", "*"), "*", 400, "invalid request path"),
}


@pytest.mark.parametrize("behind", [False, True], ids=["first", "behind-another"])
@pytest.mark.parametrize("case", list(REFUSED_BY_THE_LISTENER))
async def test_request_refusals_go_through_the_flow(make_gateway: GatewayFactory, raw: RawUpstream,
                                                    tmp_path: Path, front: str, case: str,
                                                    behind: bool) -> None:
    """Refused before anything went on, first on a connection (the listener refuses it on both
    fronts) or behind a served request (then aiohttp's `Gateway.handle` on the aiohttp front):
    either way it has a request id, a log record with its reason, and a count by kind."""
    log = tmp_path / "requests.log"
    gw = await make_gateway(upstream=raw.url, log={"path": str(log), "flush_interval": 0.05})
    data, uri, status, reason = REFUSED_BY_THE_LISTENER[case]
    kind = refusal_id(status, reason)
    refusals = gw.gateway.flow.refusals
    before = refusals.get(kind, 0)
    client = await Client.connect(gw.server.port)
    try:
        if behind:
            assert (await client.ask("GET", "/served")).status == 200
        await client.send(data)
        reply = await client.reply()
    finally:
        client.close()
    assert (reply.status, reply.json()) == (status, error(status, reason))
    request_id = reply.header("X-Request-ID")
    assert request_id
    [record] = await logged(log, lambda record: record.get("request_id") == request_id)
    if behind and front == "aiohttp" and case == "two-hosts":
        uri = ""  # refused by aiohttp's parser, which keeps nothing of the request it refused
    assert (record["uri"], record["status"], record["reason"], record["refusal"]) == (uri, status, reason, kind)
    assert refusals.get(kind, 0) - before == 1
    assert b"/twice" not in raw.received and b"/coded" not in raw.received


async def logged(path: Path, what: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The request log's records matching `what`, once there is one (or after a hang guard)."""
    async with asyncio.timeout(10):
        while True:
            lines = path.read_bytes().splitlines() if path.exists() else []
            records = [record for record in map(orjson.loads, lines) if what(record)]
            if records:
                return records
            await asyncio.sleep(0.05)


# == framing =======================================================================================

@pytest.mark.parametrize(("encoding", "status", "body"), [
    ([("Transfer-Encoding", "xchunked")], 400, MALFORMED),
    ([("Transfer-Encoding", "gzip, chunked")], 501, error(501, "transfer coding not supported")),
    ([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], 501,
     error(501, "transfer coding not supported")),
    ([("Transfer-Encoding", "chunked, chunked")], 400, MALFORMED),
], ids=["xchunked", "gzip-chunked", "two-fields", "twice"])
async def test_transfer_codings_other_than_a_lone_chunked_refused(gw: GatewayHandle, raw: RawUpstream,
                                                                  connect: Connect, encoding: list[tuple[str, str]],
                                                                  status: int, body: object) -> None:
    client = await connect()
    await client.send(http("POST", "/te", headers=encoding, body=chunked(b"hello")))
    await refused(client, status, body)
    assert await client.rest() == b""
    assert raw.received == b""


async def test_a_bad_chunk_with_its_head_forwards_nothing(gw: GatewayHandle, raw: RawUpstream,
                                                         connect: Connect) -> None:
    client = await connect()
    await client.send(http("POST", "/bad", headers={"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\nzz\r\n")
    await refused(client, 400, MALFORMED)
    assert await client.rest() == b""
    assert raw.received == b""


async def test_trailers_never_become_headers(gw: GatewayHandle, raw: RawUpstream, connect: Connect) -> None:
    client = await connect()
    body = b"5\r\nhello\r\n0\r\nX-Token-Id: 77\r\nX-Trailer: t\r\n\r\n"
    # Behind a first request, so the chunked one is parsed whole while it waits its turn.
    await client.send(http("GET", "/first") + http("POST", "/trailed", headers={"Transfer-Encoding": "chunked"})
                      + body)
    assert (await client.reply()).status == 200
    assert (await client.reply()).json()["size"] == 5
    trailed = raw.requests[1]
    assert trailed.body == b"hello"
    assert not trailed.all("X-Trailer") and trailed.all("X-Token-Id") != ["77"]
    assert b"X-Trailer" not in raw.received and b"X-Token-Id: 77" not in raw.received


async def test_no_100_continue_before_the_token_is_checked(gw: GatewayHandle, raw: RawUpstream,
                                                          connect: Connect) -> None:
    client = await connect()
    await client.send(http("POST", "/continue", key=BAD_KEY, headers={"Expect": "100-continue",
                                                                       "Content-Length": "5"}))
    reply = await client.reply()  # the refusal itself, never a 100 first
    assert (reply.status, reply.json()) == (401, error(401, "invalid or expired access token"))
    client = await connect()
    await client.send(http("POST", "/continue", headers={"Expect": "100-continue", "Content-Length": "5"}))
    assert (await client.reply()).status == 100
    await client.send(b"hello")
    reply = await client.reply()
    assert reply.status == 200 and reply.json()["size"] == 5
    assert [request.target for request in raw.requests] == ["/continue"]
    assert not raw.requests[0].all("Expect")


async def test_connection_close_is_answered_with_a_request_behind_it(gw: GatewayHandle, raw: RawUpstream,
                                                                     connect: Connect) -> None:
    client = await connect()
    await client.send(http("GET", "/closing", headers={"Connection": "close"}) + http("GET", "/behind"))
    reply = await client.reply()
    assert reply.status == 200 and reply.json()["path"] == "/closing"
    assert await client.rest() == b""
    assert [request.target for request in raw.requests] == ["/closing"]


# == every error is flespi JSON ====================================================================

@pytest.mark.parametrize(("line", "status", "body"), [
    (b"CONNECT gw.test:443 HTTP/1.1", 405, error(405, "method not allowed")),
    (b"OPTIONS * HTTP/1.1", 400, INVALID_PATH),
    (b"GET * HTTP/1.1", 400, INVALID_PATH),
    (b"GET http://gw.test/x HTTP/1.1", 400, INVALID_PATH),
    (b"GET /a\nb HTTP/1.1", 400, MALFORMED),
    (b"GET / HTTP/2.0", 505, error(505, "HTTP version not supported")),
    (b"GET / HTTP/0.9", 505, error(505, "HTTP version not supported")),
], ids=["connect", "options-star", "get-star", "absolute", "newline", "http2", "http09"])
async def test_request_lines_refused_in_json(gw: GatewayHandle, raw: RawUpstream, connect: Connect, line: bytes,
                                             status: int, body: object) -> None:
    client = await connect()
    await client.send(line + b"\r\nHost: gw.test\r\nAuthorization: FlespiToken " + MASTER_KEY.encode() + b"\r\n\r\n")
    await refused(client, status, body)
    assert raw.received == b""


async def test_http09_request_line(gw: GatewayHandle, raw: RawUpstream, connect: Connect) -> None:
    client = await connect()
    await client.send(b"GET /\r\n\r\n")  # no version at all: llhttp reads it as 0.9
    await refused(client, 505, error(505, "HTTP version not supported"))
    assert raw.received == b""


async def test_aiohttp_parser_refusals_are_json(gw: GatewayHandle, raw: RawUpstream, connect: Connect) -> None:
    # Once a connection is aiohttp's, later requests reach aiohttp's own parser unparsed.
    client = await connect()
    reply = await client.ask("GET", "/auth/info")  # an API request: aiohttp serves this connection from now on
    assert reply.status == 200
    await client.send(b"GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n")
    await refused(client, 400, MALFORMED)


async def test_aiohttp_own_pages_are_json(gw: GatewayHandle) -> None:
    async with gw.request("GET", "/_gateway/panel/no-such-file.js") as response:
        assert response.status == 404
        assert await response.json() == error(404, "unknown path /_gateway/panel/no-such-file.js")


@pytest.mark.parametrize("path", ["/platform/tokens/" + "9" * 5000, "/platform/tokens/" + "9" * 5000 + ",1"])
async def test_huge_integers_are_client_errors(gw: GatewayHandle, raw: RawUpstream, path: str) -> None:
    status, body = await gw.call("GET", "/x", headers={"x-flespi-cid": "9" * 5000})
    assert (status, body) == (400, error(400, "invalid x-flespi-cid header: must be an account id"))
    status, body = await gw.call("GET", path)
    assert status in (400, 404, 414) and body["errors"][0]["code"] == status
    assert raw.received == b""


# == platform paths, whatever their spelling =======================================================

@pytest.mark.parametrize("path", ["/Platform/tokens", "/AUTH/info", "/platform./x", "/platform.json",
                                  "/platform%20/x", "/platform%2e/tokens", "/Auth", "/_Gateway/health",
                                  "/%EF%BD%90latform/tokens"])
async def test_platform_lookalikes_reach_no_upstream(gw: GatewayHandle, raw: RawUpstream, path: str) -> None:
    standard = await gw.create_token(access={"type": 0})
    acl = await gw.create_token(access={"type": 2, "acl": [{"uri": "*", "methods": ["GET"]}]})
    for key in (standard["key"], acl["key"], MASTER_KEY):
        reply = await ask_once(gw, "GET", path, key=key)
        assert (reply.status, reply.json()) == (400, INVALID_PATH), key
    assert raw.received == b""
