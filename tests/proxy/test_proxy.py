"""What the upstream receives and what the client gets back (the recording upstream is the oracle)."""
from __future__ import annotations

import gzip

import aiohttp
import pytest
from yarl import URL

from support.gateways import GatewayFactory, GatewayHandle, error
from support.keys import MASTER_KEY
from support.servers import Upstream, free_port


async def test_path_and_query_forwarded_exactly(gw: GatewayHandle, upstream: Upstream) -> None:
    raw = "/gw/devices/1,2/messages?data=%7B%22count%22%3A5%7D&fields=a,b&x=%20y+z&empty="
    async with gw.session.get(URL(gw.url + raw, encoded=True), headers={"Authorization": f"FlespiToken {MASTER_KEY}"},
                              skip_auto_headers=("User-Agent",)) as response:
        assert response.status == 200
    assert upstream.last.raw_path == raw


async def test_key_never_reaches_upstream_and_identity_is_added(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(access={"type": 0})
    spoof = {"X-Token-Id": "1", "X-Account-Id": "999", "X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6",
             "Forwarded": "for=6.6.6.6", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "https"}
    status, _ = await gw.call("GET", "/a", key=token["key"], headers=spoof)
    assert status == 200
    seen = upstream.last.headers
    assert "authorization" not in seen
    assert all(token["key"] not in value for values in seen.values() for value in values)
    assert seen["x-token-id"] == [str(token["id"])]
    assert seen["x-account-id"] == ["0"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [gw.url.removeprefix("http://")]
    assert "x-real-ip" not in seen and "forwarded" not in seen
    assert len(seen["x-request-id"][0]) == 32


async def test_request_id_kept_only_from_trusted_proxy(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    untrusted = await make_gateway()
    async with untrusted.request("GET", "/a", headers={"X-Request-ID": "abc-123"}) as response:
        assert response.headers["X-Request-ID"] != "abc-123"
    assert upstream.last.headers["x-request-id"] != ["abc-123"]
    trusted = await make_gateway(trusted_proxies=["127.0.0.1"])
    async with trusted.request("GET", "/a", headers={"X-Request-ID": "abc-123", "X-Forwarded-For": "10.1.1.1"}) as r:
        assert r.headers["X-Request-ID"] == "abc-123"
    assert upstream.last.headers["x-request-id"] == ["abc-123"]
    assert upstream.last.headers["x-forwarded-for"] == ["10.1.1.1, 127.0.0.1"]


async def test_hop_by_hop_headers_removed_both_ways(gw: GatewayHandle, upstream: Upstream) -> None:
    headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "private", "Keep-Alive": "timeout=3", "TE": "trailers",
               "Proxy-Authorization": "Basic abc", "X-End": "kept"}
    async with gw.request("GET", "/hop", headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Public"] == "ok"
        assert "X-Private" not in response.headers
        assert "timeout" not in response.headers.get("Keep-Alive", "")
    seen = upstream.last.headers
    for name in ("x-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-end"] == ["kept"]


@pytest.mark.parametrize("code", [200, 201, 301, 400, 404, 409, 500, 503])
async def test_status_and_headers_pass_through(gw: GatewayHandle, code: int) -> None:
    async with gw.request("GET", f"/status/{code}") as response:
        assert response.status == code
        assert response.headers["X-Status"] == str(code)
        assert await response.text() == f"status {code}"


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(gw: GatewayHandle, code: int) -> None:
    async with gw.request("GET", f"/status/{code}") as response:
        assert response.status == code
        assert await response.read() == b""
        assert "Transfer-Encoding" not in response.headers


async def test_head_has_no_body_but_keeps_length(gw: GatewayHandle) -> None:
    async with gw.request("HEAD", "/big/1000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"
        assert await response.read() == b""


async def test_content_encoding_untouched(gw: GatewayHandle) -> None:
    async with gw.request("GET", "/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await response.read()) == b'{"zipped": true}'


async def test_chunked_reply_streamed(gw: GatewayHandle) -> None:
    async with gw.request("GET", "/chunked") as response:
        assert await response.read() == b"one,two,three"


async def test_request_body_forwarded_with_length(gw: GatewayHandle, upstream: Upstream) -> None:
    status, body = await gw.call("POST", "/things", data=b"x" * 12345, headers={"Content-Type": "text/plain"})
    assert status == 200 and body["size"] == 12345
    assert upstream.last.headers["content-length"] == ["12345"]
    assert upstream.last.headers["content-type"] == ["text/plain"]
    assert upstream.last.body == b"x" * 12345


async def test_chunked_request_body(gw: GatewayHandle, upstream: Upstream) -> None:
    async def parts():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"y" * 1000

    status, body = await gw.call("PUT", "/upload", data=parts())
    assert status == 200 and body["received"] == 10000


async def test_upstream_connection_reused(gw: GatewayHandle, upstream: Upstream) -> None:
    for _ in range(5):
        assert (await gw.call("GET", "/reuse"))[0] == 200
    ports = {r.peer_port for r in upstream.requests if r.raw_path == "/reuse"}
    assert len(ports) == 1


async def test_upstream_down_is_502(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(upstream=f"http://127.0.0.1:{free_port()}")
    assert await gw.call("GET", "/x") == (502, error(502, "upstream unavailable"))


async def test_upstream_slow_is_504(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(proxy={"read_timeout": 0.3})
    assert await gw.call("GET", "/slow/2") == (504, error(504, "upstream timeout"))
    assert (await gw.call("GET", "/slow/0"))[0] == 200


async def test_routes_longest_prefix_and_prefix_replacement(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(upstream=None, routes={"/": upstream.url, "/api/": upstream.url + "/v2/",
                                                    "/api/raw/": upstream.url})
    assert (await gw.call("GET", "/api/items?q=1"))[1]["path"] == "/v2/items?q=1"
    assert (await gw.call("GET", "/api/raw/items"))[1]["path"] == "/api/raw/items"
    assert (await gw.call("GET", "/other"))[1]["path"] == "/other"


async def test_websocket_is_proxied(gw: GatewayHandle, upstream: Upstream) -> None:
    async with gw.session.ws_connect(gw.url + "/ws", headers={"Authorization": f"FlespiToken {MASTER_KEY}"},
                                     protocols=("echo",)) as ws:
        assert ws.protocol == "echo"
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"
    assert "authorization" not in upstream.last.headers


async def test_websocket_without_token_refused(gw: GatewayHandle, upstream: Upstream) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with gw.session.ws_connect(gw.url + "/ws"):
            pass
    assert refused.value.status == 401
    assert upstream.requests == []
