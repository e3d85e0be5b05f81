"""Several instances on one Redis: invalidation, sliding ttl, hot path, and Redis going away."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from support.gateways import GatewayFactory, GatewayHandle, error
from support.servers import RedisProcess


async def until(predicate: Any, timeout: float, step: float = 0.02) -> float:
    """Seconds it took for the async predicate to hold; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


async def status_of(gw: GatewayHandle, key: str, path: str = "/x") -> int:
    async with gw.request("GET", path, key=key) as response:
        return response.status


async def test_delete_on_one_instance_seen_by_another(make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(), await make_gateway()
    token = await a.create_token()
    assert await status_of(b, token["key"]) == 200  # now cached on b
    assert (await a.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200

    async def refused() -> bool:
        return await status_of(b, token["key"]) == 401
    assert await until(refused, timeout=1.0) < 1.0


async def test_update_on_one_instance_seen_by_another(make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(), await make_gateway()
    token = await a.create_token()
    assert await status_of(b, token["key"]) == 200
    await a.call("PUT", f"/platform/tokens/{token['id']}", json={"enabled": False})

    async def disabled() -> bool:
        return await b.call("GET", "/x", key=token["key"]) == (401, error(401, "token is disabled"))
    await until(disabled, timeout=1.0)


async def test_new_token_not_hidden_by_negative_cache(make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(), await make_gateway()
    token = await a.create_token()
    await a.call("DELETE", f"/platform/tokens/{token['id']}")
    # b has never seen the key: cache a "no such token" answer there, then create a token on a.
    probe = "Q" * 64
    assert await status_of(b, probe) == 401
    created = await a.create_token()

    async def usable() -> bool:
        return await status_of(b, created["key"]) == 200
    await until(usable, timeout=1.0)


async def test_sliding_ttl_across_instances(make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(), await make_gateway()
    token = await a.create_token(ttl=3)
    assert await status_of(b, token["key"]) == 200  # b caches the token with this use
    for _ in range(5):  # 5 s of use through a only
        await asyncio.sleep(1.0)
        assert await status_of(a, token["key"]) == 200
    # b's own last use is 5 s old (> ttl), but a used it within ttl: b must accept it.
    assert await status_of(b, token["key"]) == 200
    await asyncio.sleep(3.2)
    assert await status_of(a, token["key"]) == 401
    assert await status_of(b, token["key"]) == 401


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in info.items()}


async def test_cached_token_makes_no_redis_round_trip(make_gateway: GatewayFactory, own_redis: RedisProcess) -> None:
    # periodic work (usage exchange, refreshes) is made rare, so any per-request command would show
    # (`accessed` too: its flush every 0.1 s under traffic made this count depend on the machine's speed)
    gw = await make_gateway(redis={"url": own_redis.url}, usage={"flush_interval": 60.0},
                            cache={"max_age": 120.0, "invalidation_ping": 60.0}, log={"flush_interval": 60.0},
                            accessed_flush_interval=60.0)
    token = await gw.create_token()
    assert await status_of(gw, token["key"]) == 200
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        before = await commandstats(client)
        started = time.monotonic()
        for _ in range(300):
            assert await status_of(gw, token["key"]) == 200
        await gw.gateway.accessed.flush()
        after = await commandstats(client)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    delta.pop("info", None)
    # the store probe's PUBLISH, once a second whatever the traffic (store/health.py)
    assert delta.pop("publish", 0) <= elapsed + 2, delta
    # no per-request read of the token ...
    assert delta.get("get", 0) == 0 and delta.get("zscore", 0) == 0, delta
    # ... and only batched writes and periodic refreshes: far below one command per request
    assert delta.get("zadd", 0) <= 5
    assert sum(delta.values()) <= 8, {k: v for k, v in delta.items() if v}


async def test_redis_outage_under_traffic(make_gateway: GatewayFactory, own_redis: RedisProcess) -> None:
    gw = await make_gateway(redis={"url": own_redis.url, "socket_timeout": 0.3, "connect_timeout": 0.3},
                            cache={"max_age": 30.0, "refresh_after": 1.0})
    token = await gw.create_token()
    assert await status_of(gw, token["key"]) == 200
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            statuses.append(await status_of(gw, token["key"]))
            await asyncio.sleep(0.01)

    runner = asyncio.create_task(traffic())
    own_redis.stop()
    await asyncio.sleep(1.5)  # past refresh_after: background refreshes fail, the cached record serves
    started = time.monotonic()
    assert await gw.call("GET", "/x", key="U" * 64) == (503, error(503, "token storage unavailable"))
    assert time.monotonic() - started < 3.0  # fails fast, does not hang on Redis
    assert (await gw.call("POST", "/platform/tokens", json={"ttl": 5}))[0] == 503
    own_redis.start()

    async def recovered() -> bool:
        return (await gw.call("POST", "/platform/tokens", json={"ttl": 5}))[0] == 200
    await until(recovered, timeout=10.0, step=0.2)
    assert await gw.call("GET", "/x", key="U" * 64) == (401, error(401, "invalid or expired access token"))
    stop.set()
    await runner
    assert statuses and set(statuses) == {200}, set(statuses)


async def test_invalidation_resumes_after_redis_restart(make_gateway: GatewayFactory,
                                                       own_redis: RedisProcess) -> None:
    redis = {"url": own_redis.url, "socket_timeout": 0.3, "connect_timeout": 0.3}
    a, b = await make_gateway(redis=redis), await make_gateway(redis=redis)
    own_redis.stop()
    await asyncio.sleep(0.5)
    own_redis.start()

    async def recovered() -> bool:
        return b.gateway.cache.subscribed.is_set() and (await a.call("GET", "/auth/info"))[0] == 200
    await until(recovered, timeout=10.0, step=0.1)
    token = await a.create_token()
    assert await status_of(b, token["key"]) == 200
    await a.call("DELETE", f"/platform/tokens/{token['id']}")

    async def refused() -> bool:
        return await status_of(b, token["key"]) == 401
    await until(refused, timeout=1.0)


async def test_cached_record_not_trusted_past_max_age(make_gateway: GatewayFactory, own_redis: RedisProcess) -> None:
    max_age = 3.0  # room for stopping Redis on a loaded machine, within which the entry is trusted
    gw = await make_gateway(redis={"url": own_redis.url, "socket_timeout": 0.3, "connect_timeout": 0.3},
                            cache={"max_age": max_age, "refresh_after": max_age})
    token = await gw.create_token()
    assert await status_of(gw, token["key"]) == 200
    loaded_by = time.monotonic()
    await asyncio.to_thread(own_redis.stop)  # the gateway goes on meanwhile, as with any outage
    assert await status_of(gw, token["key"]) == 200
    await asyncio.sleep(max(0.0, loaded_by + max_age + 0.2 - time.monotonic()))
    assert await gw.call("GET", "/x", key=token["key"]) == (503, error(503, "token storage unavailable"))
