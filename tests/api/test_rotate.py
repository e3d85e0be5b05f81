"""Key rotation: a new key, the same token; the old key's grace ends on every instance."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from support.gateways import GatewayFactory, GatewayHandle


async def status_of(gw: GatewayHandle, key: str) -> tuple[int, Any]:
    return await gw.call("GET", "/gw/devices/1", key=key)


async def until_status(gw: GatewayHandle, key: str, wanted: int, timeout: float = 5.0) -> tuple[int, Any]:
    """The reply once it has the wanted status (pub/sub reaches another instance a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await status_of(gw, key)
        if status == wanted or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(0.02)


async def two_gateways(make_gateway: GatewayFactory) -> tuple[GatewayHandle, GatewayHandle]:
    return await make_gateway(), await make_gateway()  # one Redis, one key prefix


async def test_rotate_without_grace_refuses_old_key_everywhere(make_gateway: GatewayFactory) -> None:
    one, two = await two_gateways(make_gateway)
    token = await one.create_token(info="rotating", ttl=3600, metadata={"a": "b"})
    old = token["key"]
    for gw in (one, two):  # cached on both instances
        assert (await status_of(gw, old))[0] == 200
    status, body = await one.call("POST", f"/platform/tokens/{token['id']}/rotate")
    assert status == 200, body
    [rotated] = body["result"]
    new = rotated.pop("key")
    assert new != old and len(new) == 64 and new.isalnum()
    assert {k: v for k, v in rotated.items() if k != "accessed"} == {
        k: v for k, v in token.items() if k not in ("key", "accessed")}
    for gw in (one, two):
        refused = {"errors": [{"code": 401, "reason": "invalid or expired access token"}]}
        assert await until_status(gw, old, 401) == (401, refused)
        assert (await status_of(gw, new))[0] == 200
    status, listed = await two.call("GET", f"/platform/tokens/{token['id']}")
    assert "key" not in listed["result"][0] and listed["result"][0]["info"] == "rotating"
    status, info = await two.call("GET", "/auth/info", key=new)
    assert info["result"][0]["id"] == token["id"]


async def test_grace_keeps_old_key_then_ends_on_every_instance(make_gateway: GatewayFactory, redis_client: Any,
                                                               key_prefix: str) -> None:
    one, two = await two_gateways(make_gateway)
    token = await one.create_token(ttl=3600)
    old = token["key"]
    for gw in (one, two):
        assert (await status_of(gw, old))[0] == 200
    started = time.time()
    status, body = await one.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 3})
    assert status == 200, body
    new = body["result"][0]["key"]
    pattern = key_prefix.replace("{", "\\{").replace("}", "\\}") + "tok:*"
    graced = [name async for name in redis_client.scan_iter(match=pattern)]
    assert len(graced) == 3  # bootstrap master, new key, old key's copy
    ttls = sorted([await redis_client.ttl(name) for name in graced])
    assert ttls[0] == ttls[1] == -1 and 0 < ttls[2] <= 3  # only the copy expires in Redis
    for gw in (one, two):
        assert (await status_of(gw, old))[0] == 200
        assert (await status_of(gw, new))[0] == 200
    while time.time() < started + 1.5:
        await asyncio.sleep(0.1)
    # still in grace; both instances have the old key cached now
    for gw in (one, two):
        if time.time() < started + 2.5:
            assert (await status_of(gw, old))[0] == 200
    while time.time() < started + 4.1:
        await asyncio.sleep(0.1)
    for gw in (one, two):  # no message marks the end: the cached copy's own `expire` does
        assert (await status_of(gw, old))[0] == 401
        assert (await status_of(gw, new))[0] == 200


async def test_changes_and_deletion_reach_the_old_key_in_grace(make_gateway: GatewayFactory) -> None:
    one, two = await two_gateways(make_gateway)
    token = await one.create_token(ttl=3600)
    old = token["key"]
    status, body = await one.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 600})
    new = body["result"][0]["key"]
    assert (await status_of(two, old))[0] == 200
    assert (await one.call("PUT", f"/platform/tokens/{token['id']}", json={"enabled": False}))[0] == 200
    for key in (old, new):
        assert await until_status(two, key, 401) == (401, {"errors": [{"code": 401, "reason": "token is disabled"}]})
    assert (await one.call("PUT", f"/platform/tokens/{token['id']}", json={"enabled": True}))[0] == 200
    assert (await until_status(two, old, 200))[0] == 200
    # rotating again keeps both earlier keys' graces; deleting the token ends all of them
    status, body = await one.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 600})
    newest = body["result"][0]["key"]
    for key in (old, new, newest):
        assert (await until_status(two, key, 200))[0] == 200
    assert (await one.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200
    for key in (old, new, newest):
        assert (await until_status(two, key, 401))[0] == 401
    # restored from the bin: the newest key only
    status, body = await two.call("POST", f"/platform/recycle-bin/tokens/{token['id']}/restore")
    assert status == 200 and [t["id"] for t in body["result"]] == [token["id"]]
    assert (await until_status(one, newest, 200))[0] == 200
    assert (await status_of(one, old))[0] == 401 and (await status_of(one, new))[0] == 401


async def test_rotation_is_logged_and_keeps_logs(gw: GatewayHandle) -> None:
    token = await gw.create_token(ttl=3600)
    assert (await status_of(gw, token["key"]))[0] == 200
    status, body = await gw.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 60})
    assert status == 200
    deadline = time.monotonic() + 5
    while True:
        status, logs = await gw.call("GET", f"/platform/tokens/{token['id']}/logs")
        codes = [record["event_code"] for record in logs["result"]]
        if 4 in codes or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert codes[:1] == [1] and 1000 in codes and codes[-1] == 4  # created, a request, rotated
    [event] = [record for record in logs["result"] if record["event_code"] == 4]
    assert event["grace"] == 60 and event["by_token_id"] == 1 and event["token_id"] == token["id"]
    assert token["key"] not in str(logs) and body["result"][0]["key"] not in str(logs)


async def test_rotate_by_selector_and_bad_bodies(gw: GatewayHandle) -> None:
    a = await gw.create_token(info="batch")
    b = await gw.create_token(info="batch")
    other = await gw.create_token(info="kept")
    for payload, fields in [({"grace": -1}, ["grace"]), ({"grace": "1h"}, ["grace"]), ({"grace": True}, ["grace"]),
                            ({"grace": 10 ** 9}, ["grace"]), ({"grace": 1, "x": 2}, ["x"]), ([1], [""])]:
        status, body = await gw.call("POST", "/platform/tokens/info=batch/rotate", json=payload)
        assert status == 400, payload
        assert [e["field"] for e in body["errors"]] == fields
    for token in (a, b, other):  # nothing was rotated
        assert (await status_of(gw, token["key"]))[0] == 200
    status, body = await gw.call("POST", "/platform/tokens/info=batch/rotate", data=b"")
    assert status == 200 and [t["id"] for t in body["result"]] == [a["id"], b["id"]]
    assert len({t["key"] for t in body["result"]}) == 2
    assert (await status_of(gw, other["key"]))[0] == 200
    assert (await gw.call("GET", "/platform/tokens/1/rotate"))[0] == 405
    assert (await gw.call("POST", "/platform/tokens/999/rotate"))[1] == {"result": []}


async def test_rotation_on_the_embedded_store(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    gw = await make_gateway(redis={"url": "memory://", "data_file": str(tmp_path / "data.json")})
    token = await gw.create_token(ttl=3600)
    status, body = await gw.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 30})
    assert status == 200, body
    assert (await status_of(gw, token["key"]))[0] == 200
    assert (await status_of(gw, body["result"][0]["key"]))[0] == 200
    status, body = await gw.call("POST", f"/platform/tokens/{token['id']}/rotate")
    assert (await status_of(gw, body["result"][0]["key"]))[0] == 200
    assert (await status_of(gw, token["key"]))[0] == 200  # the first key's grace goes on
