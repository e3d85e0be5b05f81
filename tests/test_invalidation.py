"""Revocation when the invalidation subscription is lost: redis-py re-subscribes by itself, so the
gateway must notice the gap and re-read what it cached rather than trust it."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from gateway.store.keys import Keys
from gateway.tokens import key_digest

from support.gateways import GatewayFactory, GatewayHandle
from support.relay import running_relay
from support.servers import RedisProcess

# Long enough that only gap handling, never a refresh, can refuse a deleted token in these tests.
CACHE = {"max_age": 120, "refresh_after": 60}


async def until(predicate: Any, timeout: float, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(step)


async def status_of(gw: GatewayHandle, key: str) -> int:
    async with gw.request("GET", "/x", key=key) as response:
        return response.status


async def live(gw: GatewayHandle) -> bool:
    status, body = await gw.call("GET", "/_gateway/health", key=None)
    return status == 200 and body["result"][0]["invalidation"] is True


async def two_instances(make_gateway: GatewayFactory, redis: RedisProcess) -> tuple[GatewayHandle, GatewayHandle]:
    settings = {"url": redis.url, "socket_timeout": 0.5, "connect_timeout": 0.5}
    a, b = await make_gateway(redis=settings, cache=CACHE), await make_gateway(redis=settings, cache=CACHE)
    for gw in (a, b):
        await until(lambda gw=gw: live(gw), timeout=5.0)  # type: ignore[misc]
    return a, b


async def test_token_deleted_through_another_instance_across_a_cut_subscription(
        make_gateway: GatewayFactory, own_redis: RedisProcess) -> None:
    a, b = await two_instances(make_gateway, own_redis)
    token = await a.create_token()
    assert await status_of(b, token["key"]) == 200  # cached on b
    gaps = b.gateway.cache.invalidation_gaps
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        assert await client.client_kill_filter(_type="pubsub") >= 2
        assert (await a.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200
        await until(lambda: _refused(b, token["key"]), timeout=2.0)
    finally:
        await client.aclose()
    assert b.gateway.cache.invalidation_gaps > gaps
    await until(lambda: live(b), timeout=2.0)


async def _refused(gw: GatewayHandle, key: str) -> bool:
    return await status_of(gw, key) == 401


async def test_change_whose_announcement_was_lost_is_seen_after_the_gap(
        make_gateway: GatewayFactory, own_redis: RedisProcess, key_prefix: str) -> None:
    """The record goes with no message at all, the moment the subscription is cut: only knowing
    that invalidation was not live can make the instance re-read it."""
    _, b = await two_instances(make_gateway, own_redis)
    token = await b.create_token()
    assert await status_of(b, token["key"]) == 200
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        async with client.pipeline(transaction=True) as both:
            both.client_kill_filter(_type="pubsub")
            both.delete(Keys(key_prefix).token(key_digest(token["key"])))
            killed, deleted = await both.execute()
        assert killed >= 1 and deleted == 1
        await until(lambda: _refused(b, token["key"]), timeout=2.0)
    finally:
        await client.aclose()
    await until(lambda: live(b), timeout=2.0)
    assert await status_of(b, token["key"]) == 401


async def test_a_silent_subscription_is_not_live_and_nothing_cached_is_trusted(
        make_gateway: GatewayFactory, own_redis: RedisProcess) -> None:
    """B reaches Redis through a relay; its subscription's link goes silent (no reset, no EOF).
    Health says so within the PING deadline, and a token deleted through A meanwhile is refused
    by B, although the announcement is held on the link."""
    deadline = 0.2
    async with running_relay("127.0.0.1", own_redis.port) as relay:
        a = await make_gateway(redis={"url": own_redis.url}, cache=CACHE)
        b = await make_gateway(redis={"url": f"redis://127.0.0.1:{relay.port}/0", "socket_timeout": 0.5},
                               cache={**CACHE, "invalidation_ping": 0.05, "invalidation_deadline": deadline})
        for gw in (a, b):
            await until(lambda gw=gw: live(gw), timeout=5.0)  # type: ignore[misc]
        token = await a.create_token()
        assert await status_of(b, token["key"]) == 200  # cached on b
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            subscribers = [int(entry["addr"].rsplit(":", 1)[1]) for entry in await client.client_list(_type="pubsub")]
        finally:
            await client.aclose()
        [port] = [port for port in subscribers if port in relay.links]  # b's, through the relay
        relay.link(port).frozen = True
        await until(lambda: _not_live(b), timeout=deadline * 10)
        assert (await a.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200
        assert await status_of(b, token["key"]) == 401  # re-read: invalidation is not known live
        relay.link(port).thaw()
        await until(lambda: live(b), timeout=5.0)
        assert await status_of(b, token["key"]) == 401


async def _not_live(gw: GatewayHandle) -> bool:
    return not await live(gw)
