"""Subaccounts, usage blocking, expiry, recycle bin and token logs, on two instances."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway.writers.usage import parse_usage

from support.gateways import GatewayFactory, GatewayHandle, error
from support.servers import Upstream
from support.usage import room_in_window


async def until(predicate: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def data(**options: Any) -> dict[str, str]:
    return {"data": orjson.dumps(options).decode()}


# -- subaccounts --------------------------------------------------------------------------------

async def test_subaccount_tree_and_acting_account(gw: GatewayHandle, upstream: Upstream) -> None:
    status, body = await gw.call("POST", "/platform/subaccounts", json=[{"name": "child"}])
    assert status == 200
    child = body["result"][0]
    assert child["cid"] == 0 and child["name"] == "child"
    status, body = await gw.call("POST", "/platform/subaccounts", json={"name": "grandchild"},
                                 headers={"x-flespi-cid": str(child["id"])})
    grandchild = body["result"][0]
    assert grandchild["cid"] == child["id"]
    listed = (await gw.call("GET", "/platform/subaccounts/all"))[1]["result"]
    assert [a["id"] for a in listed] == [child["id"], grandchild["id"]]
    # a master token of the child account, made through x-flespi-cid
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 600, "access": {"type": 1}}],
                                 headers={"x-flespi-cid": str(child["id"])})
    child_master = body["result"][0]
    assert child_master["cid"] == child["id"]
    # the root master does not see it without acting as the child
    root_ids = [t["id"] for t in (await gw.call("GET", "/platform/tokens/all"))[1]["result"]]
    assert child_master["id"] not in root_ids
    child_ids = [t["id"] for t in (await gw.call("GET", "/platform/tokens/all",
                                                  headers={"x-flespi-cid": str(child["id"])}))[1]["result"]]
    assert child_ids == [child_master["id"]]
    # the child's token may act as its descendant, and the upstream learns the effective account
    status, _ = await gw.call("GET", "/things", key=child_master["key"],
                              headers={"x-flespi-cid": str(grandchild["id"])})
    assert status == 200
    assert upstream.last.headers["x-account-id"] == [str(grandchild["id"])]
    assert upstream.last.headers["x-token-id"] == [str(child_master["id"])]
    # ... but never as its parent or an unknown account
    for foreign in (0, 999):
        assert await gw.call("GET", "/things", key=child_master["key"], headers={"x-flespi-cid": str(foreign)}) == (
            403, error(403, f"access to account {foreign} is denied for this token"))
    assert (await gw.call("GET", "/things", key=child_master["key"], headers={"x-flespi-cid": "x1"}))[0] == 400


async def test_subaccount_validation_and_delete_cascade(gw: GatewayHandle) -> None:
    status, body = await gw.call("POST", "/platform/subaccounts",
                                 json=[{"name": ""}, {"name": "ok", "limits": {"api_calls": -1, "bogus": 1}}])
    assert status == 400
    assert sorted((e["field"], e.get("index")) for e in body["errors"]) == [
        ("limits.api_calls", 1), ("limits.bogus", 1), ("name", 0)]
    child = (await gw.call("POST", "/platform/subaccounts", json={"name": "c"}))[1]["result"][0]
    status, body = await gw.call("PUT", f"/platform/subaccounts/{child['id']}",
                                 json={"name": "renamed", "limits": {"traffic": 1000}})
    assert status == 200 and body["result"][0]["name"] == "renamed"
    assert body["result"][0]["limits"] == {"traffic": 1000}
    assert (await gw.call("PUT", f"/platform/subaccounts/{child['id']}", json={"cid": 5}))[0] == 400
    assert (await gw.call("GET", f"/platform/subaccounts/{child['id']}", params={"fields": "name"}))[1] == {
        "result": [{"name": "renamed"}]}
    token = (await gw.call("POST", "/platform/tokens", json={"ttl": 600},
                           headers={"x-flespi-cid": str(child["id"])}))[1]["result"][0]
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
    assert (await gw.call("DELETE", f"/platform/subaccounts/{child['id']}"))[1] == {"result": [{"id": child["id"]}]}
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 401


# -- usage blocking -----------------------------------------------------------------------------

async def test_heaviest_token_blocked_across_instances(make_gateway: GatewayFactory) -> None:
    window = 4
    config = {"usage": {"window": window, "flush_interval": 0.1}}
    a, b = await make_gateway(**config), await make_gateway(**config)
    await room_in_window(window, window)  # a fresh window: the whole exchange fits in one
    account = (await a.call("POST", "/platform/subaccounts", json={"name": "limited", "limits": {"api_calls": 20}}))
    cid = account[1]["result"][0]["id"]
    make = {"ttl": 600}
    heavy = (await a.call("POST", "/platform/tokens", json=make, headers={"x-flespi-cid": str(cid)}))[1]["result"][0]
    light = (await a.call("POST", "/platform/tokens", json=make, headers={"x-flespi-cid": str(cid)}))[1]["result"][0]
    await asyncio.sleep(0.3)  # both instances have the account's limits
    for gw in (a, b):  # 2 x 10 = 20 calls on the heavy token, split over both instances: the limit
        for _ in range(10):
            assert (await gw.call("GET", "/x", key=heavy["key"]))[0] == 200
    for _ in range(3):  # 23 in all: over, and the heavy one goes
        assert (await b.call("GET", "/x", key=light["key"]))[0] == 200

    async def heavy_blocked() -> bool:
        async with a.request("GET", "/x", key=heavy["key"]) as r1, b.request("GET", "/x", key=heavy["key"]) as r2:
            return r1.status == 429 and r2.status == 429
    await until(heavy_blocked, timeout=2.0)
    async with b.request("GET", "/x", key=heavy["key"]) as response:
        body = await response.json()
        assert body["errors"][0]["reason"].startswith("token is blocked: ")
        assert 1 <= int(response.headers["Retry-After"]) <= window
    assert (await a.call("GET", "/x", key=light["key"]))[0] == 200  # the light one keeps working

    async def unblocked() -> bool:
        return (await a.call("GET", "/x", key=heavy["key"]))[0] == 200
    await until(unblocked, timeout=window + 1.0)
    assert (await b.call("GET", "/x", key=heavy["key"]))[0] == 200

    async def events() -> list[int]:
        logs = (await a.call("GET", "/platform/logs", headers={"x-flespi-cid": str(cid)}))[1]["result"]
        return [e["event_code"] for e in logs if e["event_code"] in (20, 21) and e["token_id"] == heavy["id"]]

    async def both_events() -> bool:
        return await events() == [20, 21]
    await until(both_events, timeout=3.0)


async def test_limit_set_during_a_window_counts_the_whole_window(make_gateway: GatewayFactory, redis_client: Any,
                                                                key_prefix: str) -> None:
    """Without a limit an account's counts stay in each instance (Redis gets none of them); a
    limit set halfway through the window brings both instances' counts of the whole window to
    Redis, and the heaviest token is blocked for calls made before the limit existed."""
    window = 6
    config = {"usage": {"window": window, "flush_interval": 0.1}}
    a, b = await make_gateway(**config), await make_gateway(**config)
    await room_in_window(window, window)
    cid = (await a.call("POST", "/platform/subaccounts", json={"name": "later"}))[1]["result"][0]["id"]
    acting = {"x-flespi-cid": str(cid)}
    heavy = (await a.call("POST", "/platform/tokens", json={"ttl": 600}, headers=acting))[1]["result"][0]
    light = (await a.call("POST", "/platform/tokens", json={"ttl": 600}, headers=acting))[1]["result"][0]
    for gw in (a, b):
        for _ in range(12):
            assert (await gw.call("GET", "/x", key=heavy["key"]))[0] == 200
    assert (await b.call("GET", "/x", key=light["key"]))[0] == 200
    await asyncio.sleep(0.4)  # several flushes
    assert [key async for key in redis_client.scan_iter(match=f"{key_prefix}usage:*:{cid}")] == []

    status, _ = await a.call("PUT", f"/platform/subaccounts/{cid}", json={"limits": {"api_calls": 20}})
    assert status == 200

    async def counted() -> dict[int, tuple[int, int]]:
        found: dict[int, tuple[int, int]] = {}
        async for key in redis_client.scan_iter(match=f"{key_prefix}usage:*:{cid}"):
            found.update(parse_usage(await redis_client.hgetall(key)))
        return found

    async def whole_window() -> bool:
        counts = await counted()
        return counts.get(heavy["id"], (0, 0))[0] == 24 and counts.get(light["id"], (0, 0))[0] == 1
    await until(whole_window, timeout=3.0)

    async def heavy_blocked() -> bool:  # by calls made before the limit existed
        async with a.request("GET", "/x", key=heavy["key"]) as r1, b.request("GET", "/x", key=heavy["key"]) as r2:
            return r1.status == 429 and r2.status == 429
    await until(heavy_blocked, timeout=2.0)
    assert (await a.call("GET", "/x", key=light["key"]))[0] == 200


# -- expiry -------------------------------------------------------------------------------------

async def test_expired_tokens_deleted_once(make_gateway: GatewayFactory) -> None:
    config = {"housekeeping": {"sweep_interval": 0.2, "grace": 0.5}}
    a, b = await make_gateway(**config), await make_gateway(**config)
    short = await a.create_token(ttl=2)  # one-second resolution: at least a second of validity
    kept = await a.create_token(ttl=600)
    assert (await b.call("GET", "/x", key=short["key"]))[0] == 200

    async def gone() -> bool:
        return (await a.call("GET", f"/platform/tokens/{short['id']}"))[1]["result"] == []
    await until(gone, timeout=6.0)
    await asyncio.sleep(1.0)  # let every sweeper have its chance to delete it again
    logs = (await b.call("GET", "/platform/logs", params=data(token_id=short["id"])))[1]["result"]
    expired = [e for e in logs if e["event_code"] == 600]
    assert len(expired) == 1
    assert expired[0]["reason"] == "token expired and has been deleted"
    assert (await a.call("GET", f"/platform/tokens/{kept['id']}"))[1]["result"]
    bin_ids = [t["id"] for t in (await a.call("GET", "/platform/recycle-bin/tokens/all"))[1]["result"]]
    assert short["id"] not in bin_ids  # expired tokens are deleted for good



async def test_ttl_token_in_use_outlives_its_first_expiry(make_gateway: GatewayFactory) -> None:
    """Using a ttl token does not move it in the expiry index; the sweeper must see the use and
    keep it (moving it forward), on either instance, and delete it once the uses stop."""
    config = {"housekeeping": {"sweep_interval": 0.2, "grace": 0.5}}
    a, b = await make_gateway(**config), await make_gateway(**config)
    token = await a.create_token(ttl=2)
    deadline = time.monotonic() + 5.0  # two and a half times its ttl
    while time.monotonic() < deadline:
        status, _ = await (a if int(time.monotonic() * 2) % 2 else b).call("GET", "/x", key=token["key"])
        assert status == 200
        await asyncio.sleep(0.4)
    assert (await a.call("GET", f"/platform/tokens/{token['id']}"))[1]["result"]

    async def gone() -> bool:
        return (await a.call("GET", f"/platform/tokens/{token['id']}"))[1]["result"] == []
    await until(gone, timeout=8.0)
    assert (await b.call("GET", "/x", key=token["key"]))[0] == 401

    async def logged_once() -> bool:
        logs = (await b.call("GET", "/platform/logs", params=data(token_id=token["id"])))[1]["result"]
        return [e["event_code"] for e in logs].count(600) == 1
    await until(logged_once, timeout=3.0)

# -- recycle bin --------------------------------------------------------------------------------

async def test_restore_from_recycle_bin_with_old_key(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="binned", ttl=60)
    await gw.call("DELETE", f"/platform/tokens/{token['id']}")
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 401
    binned = (await gw.call("GET", f"/platform/recycle-bin/tokens/{token['id']}"))[1]["result"]
    assert binned[0]["info"] == "binned" and binned[0]["deleted"] > 0 and "key" not in binned[0]
    status, body = await gw.call("POST", f"/platform/recycle-bin/tokens/{token['id']}/restore")
    assert status == 200 and body["result"][0]["id"] == token["id"]
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 200
    assert (await gw.call("GET", "/platform/recycle-bin/tokens/all"))[1]["result"] == []
    # purge: gone for good
    await gw.call("DELETE", f"/platform/tokens/{token['id']}")
    assert (await gw.call("DELETE", f"/platform/recycle-bin/tokens/{token['id']}"))[0] == 200
    assert (await gw.call("POST", f"/platform/recycle-bin/tokens/{token['id']}/restore"))[1] == {"result": []}
    assert (await gw.call("GET", "/x", key=token["key"]))[0] == 401


async def test_recycle_bin_retention(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(housekeeping={"sweep_interval": 0.2, "recycle_bin_days": 1 / 86400})
    token = await gw.create_token()
    await gw.call("DELETE", f"/platform/tokens/{token['id']}")

    async def purged() -> bool:
        return (await gw.call("GET", "/platform/recycle-bin/tokens/all"))[1]["result"] == []
    await until(purged, timeout=5.0)


# -- token logs ---------------------------------------------------------------------------------

async def test_token_logs_by_token_and_time(gw: GatewayHandle) -> None:
    first = await gw.create_token()
    second = await gw.create_token()
    await gw.call("GET", "/a", key=first["key"])
    await asyncio.sleep(1.1)
    middle = time.time()
    await gw.call("GET", "/b?secret=1", key=first["key"])
    await gw.call("GET", "/c", key=second["key"])
    await gw.call("PUT", f"/platform/tokens/{first['id']}", json={"info": "changed"})

    async def logged() -> bool:
        logs = (await gw.call("GET", f"/platform/tokens/{first['id']}/logs"))[1]["result"]
        return [(e["event_code"], e.get("uri")) for e in logs] == [(1, None), (1000, "/a"), (1000, "/b"), (2, None)]
    await until(logged, timeout=3.0)
    recent = (await gw.call("GET", f"/platform/tokens/{first['id']}/logs", params=data(**{"from": middle})))[1]
    assert [e.get("uri") for e in recent["result"]] == ["/b", None]
    newest = (await gw.call("GET", f"/platform/tokens/{first['id']}/logs", params=data(count=1)))[1]["result"]
    assert [e["event_code"] for e in newest] == [2]
    platform = (await gw.call("GET", "/platform/logs", params=data(token_id=second["id"])))[1]["result"]
    assert [(e["event_code"], e.get("uri")) for e in platform] == [(1, None), (1000, "/c")]
    status, body = await gw.call("GET", "/platform/logs", params={"data": '{"from": "x", "bad": 1}'})
    assert status == 400 and sorted(e["field"] for e in body["errors"]) == ["data.bad", "data.from"]


async def test_token_log_lists_keep_only_their_cap(make_gateway: GatewayFactory, redis_client: Any,
                                                   key_prefix: str) -> None:
    gw = await make_gateway(token_logs={"per_token": 3}, log={"path": "off", "flush_interval": 0.1})
    token = await gw.create_token()
    for batch in range(3):  # the first batch leaves the list under its cap, the later ones push it over
        for n in range(2 + batch):
            assert (await gw.call("GET", f"/p{batch}-{n}", key=token["key"]))[0] == 200
        await asyncio.sleep(0.3)

    async def trimmed() -> bool:
        logs = (await gw.call("GET", f"/platform/tokens/{token['id']}/logs"))[1]["result"]
        return [e.get("uri") for e in logs] == ["/p2-1", "/p2-2", "/p2-3"]
    await until(trimmed, timeout=3.0)
    assert await redis_client.llen(f"{key_prefix}logs:tok:{token['id']}") == 3


async def test_traffic_limit_blocks_the_heaviest_downloader(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(usage={"window": 30, "flush_interval": 0.1})
    await room_in_window(5, 30)  # all of it inside one window
    cid = (await gw.call("POST", "/platform/subaccounts", json={"name": "t", "limits": {"traffic": 50_000}}))[1][
        "result"][0]["id"]
    acting = {"x-flespi-cid": str(cid)}
    heavy = (await gw.call("POST", "/platform/tokens", json={"ttl": 60}, headers=acting))[1]["result"][0]
    light = (await gw.call("POST", "/platform/tokens", json={"ttl": 60}, headers=acting))[1]["result"][0]
    await asyncio.sleep(0.3)
    async with gw.request("GET", "/big/60000", key=heavy["key"]) as response:
        assert len(await response.read()) == 60_000

    async def blocked() -> bool:
        return (await gw.call("GET", "/x", key=heavy["key"]))[0] == 429
    await until(blocked, timeout=2.0)
    assert (await gw.call("GET", "/x", key=light["key"]))[0] == 200


async def test_usage_of_many_tokens_is_counted_once_each(make_gateway: GatewayFactory, redis_client: Any,
                                                         key_prefix: str) -> None:
    """More tokens than one usage pipeline holds (the increments go out in several). A default
    limit: without one, counts stay in process."""
    gw = await make_gateway(usage={"flush_interval": 0.2, "api_calls": 10 ** 6})
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 3600}] * 200)
    assert status == 200
    tokens = body["result"]
    for token in tokens:
        assert (await gw.call("GET", "/counted", key=token["key"]))[0] == 200

    async def counted() -> bool:
        calls: dict[str, int] = {}
        async for key in redis_client.scan_iter(match=f"{key_prefix}usage:*"):
            for field, value in (await redis_client.hgetall(key)).items():
                if field.startswith(b"c:"):
                    calls[field.decode()[2:]] = calls.get(field.decode()[2:], 0) + int(value)
        return all(calls.get(str(token["id"])) == 1 for token in tokens)
    await until(counted, timeout=5.0)


async def test_embedded_store_runs_the_batched_writes(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    """The log, usage and accessed writes are Lua scripts and raw batches: the embedded store
    (fakeredis with lupa) must run them as Redis does."""
    window = 30
    gw = await make_gateway(redis={"url": "memory://", "data_file": str(tmp_path / "data.json")},
                            usage={"window": window, "flush_interval": 0.1}, log={"path": "off", "flush_interval": 0.1},
                            token_logs={"per_token": 3}, accessed_flush_interval=0.1)
    await room_in_window(5, window)  # all of it inside one window
    cid = (await gw.call("POST", "/platform/subaccounts", json={"name": "t", "limits": {"api_calls": 4}}))[1][
        "result"][0]["id"]
    acting = {"x-flespi-cid": str(cid)}
    token = (await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers=acting))[1]["result"][0]
    await asyncio.sleep(0.3)  # the gateway knows the account's limits
    for n in range(4):  # the limit
        assert (await gw.call("GET", f"/e{n}", key=token["key"]))[0] == 200
    # The fifth waits for the exchange, which finds the limit reached: the token is blocked on it.
    status, body = await gw.call("GET", "/e4", key=token["key"])
    assert status == 429 and body["errors"][0]["reason"].startswith("token is blocked: "), body

    async def logged() -> bool:  # LOG_PUSH appended and trimmed to the cap
        logs = (await gw.call("GET", f"/platform/tokens/{token['id']}/logs", headers=acting))[1]["result"]
        # The account's block (an event without a uri) may already be among the newest three.
        uris = [e["uri"] for e in logs if "uri" in e]
        return len(logs) == 3 and uris == ["/e2", "/e3", "/e4"][3 - len(uris):]
    await until(logged, timeout=3.0)

    async def blocked() -> bool:  # usage went through USAGE_EXCHANGE
        return (await gw.call("GET", "/x", key=token["key"]))[0] == 429
    await until(blocked, timeout=3.0)

    async def accessed() -> bool:  # the accessed ZADD reached the store
        record = (await gw.call("GET", f"/platform/tokens/{token['id']}", headers=acting))[1]
        return record["result"][0]["accessed"] >= token["created"]
    await until(accessed, timeout=3.0)
