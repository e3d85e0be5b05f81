"""Who gets in, and the exact error each refusal carries (docs/tokens.md, docs/errors.md)."""
from __future__ import annotations

import asyncio
import time

import pytest

from support.gateways import GatewayHandle, error
from support.keys import MASTER_KEY
from support.servers import Upstream

INVALID = error(401, "invalid or expired access token")
CHALLENGE = 'FlespiToken realm="gateway"'


async def test_no_token_is_refused_with_challenge(gw: GatewayHandle, upstream: Upstream) -> None:
    async with gw.request("GET", "/gw/devices", key=None) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        assert await response.json() == INVALID
    assert not [r for r in upstream.requests if r.raw_path == "/gw/devices"]


@pytest.mark.parametrize("authorization", [
    "Bearer " + MASTER_KEY, "Basic " + MASTER_KEY, "FlespiToken", "FlespiToken " + "x" * 63,
    "FlespiToken " + "Z" * 64, "FlespiToken " + MASTER_KEY + "x", "FlespiToken " + MASTER_KEY[:-1] + "!",
])
async def test_wrong_scheme_or_unknown_key(gw: GatewayHandle, upstream: Upstream, authorization: str) -> None:
    async with gw.request("GET", "/gw/devices", key=None, headers={"Authorization": authorization}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        assert await response.json() == INVALID
    assert upstream.requests == []


async def test_bare_key_and_scheme_case(gw: GatewayHandle) -> None:
    for value in (MASTER_KEY, "flespitoken " + MASTER_KEY, "FlespiToken  " + MASTER_KEY):
        async with gw.request("GET", "/gw/devices", key=None, headers={"Authorization": value}) as response:
            assert response.status == 200, value


async def test_standard_token_reaches_upstream_not_platform(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(access={"type": 0})
    status, body = await gw.call("GET", "/gw/devices/all", key=token["key"])
    assert status == 200 and body["path"] == "/gw/devices/all"
    status, body = await gw.call("GET", "/platform/tokens/all", key=token["key"])
    assert status == 403
    assert body == error(403, "access to platform/tokens/all (GET) is denied for standard token")
    status, body = await gw.call("GET", "/platform/customer", key=token["key"])
    assert status == 403
    assert [r.raw_path for r in upstream.requests] == ["/gw/devices/all"]


async def test_master_token_platform_paths_stay_in_the_gateway(gw: GatewayHandle, upstream: Upstream) -> None:
    status, body = await gw.call("GET", "/platform/customer")
    assert status == 200 and body["result"][0]["id"] == 0  # answered by the gateway itself
    status, body = await gw.call("GET", "/platform/devices/all")
    assert (status, body) == (404, error(404, "unknown path /platform/devices/all"))
    assert upstream.requests == []


async def test_noapi_token_cannot_make_any_request(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(access={"type": 3})
    for path in ("/gw/devices", "/auth/info", "/platform/tokens"):
        status, body = await gw.call("GET", path, key=token["key"])
        assert status == 403
        assert body == error(403, "NOAPI token cannot be used for API requests")
    assert upstream.requests == []


async def test_disabled_token(gw: GatewayHandle, upstream: Upstream) -> None:
    token = await gw.create_token(enabled=False)
    async with gw.request("GET", "/x", key=token["key"]) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        assert await response.json() == error(401, "token is disabled")
    assert upstream.requests == []


async def test_disable_then_enable_takes_effect(gw: GatewayHandle) -> None:
    token = await gw.create_token()
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
    assert (await gw.call("PUT", f"/platform/tokens/{token['id']}", json={"enabled": False}))[0] == 200
    assert await gw.call("GET", "/x", key=token["key"]) == (401, error(401, "token is disabled"))
    assert (await gw.call("PUT", f"/platform/tokens/{token['id']}", json={"enabled": True}))[0] == 200
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200


async def test_deleted_token_is_refused(gw: GatewayHandle) -> None:
    token = await gw.create_token()
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
    assert (await gw.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200
    assert await gw.call("GET", "/x", key=token["key"]) == (401, INVALID)


async def test_auth_info_for_any_api_token(gw: GatewayHandle) -> None:
    token = await gw.create_token(access={"type": 0}, info="mine")
    status, body = await gw.call("GET", "/auth/info", key=token["key"])
    assert status == 200
    [record] = body["result"]
    assert record["id"] == token["id"] and record["info"] == "mine"
    assert "key" not in record and "digest" not in record


async def test_expired_by_expire(gw: GatewayHandle) -> None:
    token = await gw.create_token(ttl=0, expire=int(time.time()) - 1)
    assert await gw.call("GET", "/x", key=token["key"]) == (401, INVALID)


async def test_expired_by_ttl(gw: GatewayHandle) -> None:
    # Times have one-second resolution: ttl 2 leaves at least one whole second of validity.
    token = await gw.create_token(ttl=2)
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
    await asyncio.sleep(3.1)
    assert await gw.call("GET", "/x", key=token["key"]) == (401, INVALID)


async def test_valid_if_either_expire_or_ttl_holds(gw: GatewayHandle) -> None:
    past, future = int(time.time()) - 10, int(time.time()) + 3600
    expire_only_valid = await gw.create_token(ttl=1, expire=future)
    ttl_only_valid = await gw.create_token(ttl=3600, expire=past)
    neither = await gw.create_token(ttl=0, expire=past)
    assert (await gw.call("GET", "/x", key=ttl_only_valid["key"]))[0] == 200
    assert (await gw.call("GET", "/x", key=neither["key"]))[0] == 401
    await __import__("asyncio").sleep(2.1)
    # ttl ran out (no use for 2 s), but expire is still ahead.
    assert (await gw.call("GET", "/x", key=expire_only_valid["key"]))[0] == 200


async def test_sliding_ttl_is_extended_by_use(gw: GatewayHandle) -> None:
    # ttl 3 with one-second resolution: each use keeps the token valid for more than 2 s.
    token = await gw.create_token(ttl=3)
    for _ in range(5):  # 5 uses 1 s apart: 5 s in all, each inside the window of the last
        assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
        await asyncio.sleep(1.0)
    await asyncio.sleep(2.2)
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 401
