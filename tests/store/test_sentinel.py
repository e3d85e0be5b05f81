"""Redis Sentinel for real: one master, one replica, three sentinels on loopback, and gateways
that find the master through them, follow a failover, and acknowledge API changes only once the
replica holds them (WAIT)."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.config import build_settings
from gateway.errors import NOT_REPLICATED, STORAGE_UNAVAILABLE
from gateway.server import GatewayServer
from gateway.store.keys import Keys
from gateway.tokens import key_digest

from support.gateways import GatewayFactory, GatewayHandle, base_config, error, wait_for_master
from support.sentinel import SERVICE, SentinelSet
from support.servers import Upstream


@pytest.fixture
async def sentinel_gateway(upstream: Upstream, sentinel_set: SentinelSet,
                           key_prefix: str) -> AsyncIterator[GatewayFactory]:
    handles: list[GatewayHandle] = []

    async def factory(**redis: Any) -> GatewayHandle:
        config = base_config(upstream.url, "", key_prefix)
        config["redis"] = {"sentinel": {"hosts": sentinel_set.hosts, "service": SERVICE}, "key_prefix": key_prefix,
                           "socket_timeout": 0.3, "connect_timeout": 0.3, **redis}
        settings = build_settings(config)
        server = GatewayServer(settings)
        await server.start("127.0.0.1", 0)
        handle = GatewayHandle(f"http://127.0.0.1:{server.port}", settings, server,
                               aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)))
        handles.append(handle)
        await wait_for_master(handle)
        return handle

    yield factory
    for handle in handles:
        await handle.session.close()
        async with asyncio.timeout(30):
            await handle.server.close()


async def status_of(gw: GatewayHandle, key: str) -> int:
    async with gw.request("GET", "/x", key=key) as response:
        return response.status


async def test_the_master_is_found_and_changes_reach_the_replica_before_the_answer(
        sentinel_gateway: GatewayFactory, sentinel_set: SentinelSet, key_prefix: str) -> None:
    gw = await sentinel_gateway()
    store = gw.gateway.services.store
    assert store.lean is not None and store.lean_loads is not None  # the lean client serves the batches
    master = sentinel_set.master_port()
    [replica] = [server.port for server in sentinel_set.servers if server.port != master]
    token = await gw.create_token()
    async with aioredis.Redis(port=replica) as on_replica:
        # Acknowledged only after WAIT: the replica holds the record at the moment of the answer.
        assert await on_replica.exists(Keys(key_prefix).token(key_digest(token["key"]))) == 1
    assert await status_of(gw, token["key"]) == 200  # a cache miss, through the lean client
    async with aioredis.Redis(port=master) as on_master:
        assert (await on_master.info("replication"))["role"] == "master"


async def test_a_change_no_replica_confirms_is_answered_503(
        sentinel_gateway: GatewayFactory, sentinel_set: SentinelSet, key_prefix: str) -> None:
    gw = await sentinel_gateway(wait_timeout=0.2, socket_timeout=1.0)  # room for WAIT on a loaded machine
    master = sentinel_set.master_port()
    [replica] = [server.port for server in sentinel_set.servers if server.port != master]
    sentinel_set.pause(replica)  # far shorter than a failover would need; only masters fail over
    try:
        started = time.monotonic()
        status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 3600, "info": "unconfirmed"}])
        waited = time.monotonic() - started
    finally:
        sentinel_set.resume(replica)
    assert (status, body) == (503, error(503, NOT_REPLICATED))
    assert waited >= 0.2  # WAIT's own timeout
    # The change was made on the master (and every instance told): listing shows it.
    status, body = await gw.call("GET", "/platform/tokens/all")
    assert status == 200 and [t["info"] for t in body["result"]].count("unconfirmed") == 1
    # Once the replica is back, changes are acknowledged again.
    await gw.create_token()


@dataclass
class Traffic:
    """Requests through several instances until stopped: every answer, with when it came."""

    answers: list[tuple[float, str, int, int]] = field(default_factory=list)  # time, key, instance, status
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, gateways: list[GatewayHandle], keys: list[str]) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            key = rng.choice(keys)
            index = rng.randrange(len(gateways))
            try:
                status = await status_of(gateways[index], key)
            except (TimeoutError, aiohttp.ClientError):
                status = -1
            self.answers.append((time.monotonic(), key, index, status))
            await asyncio.sleep(0.002)


async def _until(check: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


async def test_a_killed_master_is_failed_over_under_traffic(
        sentinel_gateway: GatewayFactory, sentinel_set: SentinelSet) -> None:
    a, b = await sentinel_gateway(), await sentinel_gateway()
    tokens = [await a.create_token(info=f"t{i}") for i in range(20)]
    refused = await a.create_token(info="deleted before")
    assert (await a.call("DELETE", f"/platform/tokens/{refused['id']}"))[0] == 200
    doomed = tokens[0]  # revoked during the failover
    traffic = Traffic()
    keys = [token["key"] for token in tokens] + [refused["key"]]
    runner = asyncio.ensure_future(traffic.run([a, b], keys))
    await asyncio.sleep(0.3)
    old = sentinel_set.master_port()
    killed_at = time.monotonic()
    killed = sentinel_set.kill(old)
    try:
        # Revoke as soon as the API can write again: until the old master is back as a replica
        # no replica confirms, so the answer is 503 NOT_REPLICATED, but the change is made.
        async def revoked() -> bool:
            status, body = await a.call("DELETE", f"/platform/tokens/{doomed['id']}")
            return status == 200 or body == error(503, NOT_REPLICATED)
        await _until(revoked, timeout=15)
        assert sentinel_set.master_port() != old
        sentinel_set.revive(killed)  # back as it was: a master, empty, until the sentinels demote it

        async def refused_everywhere() -> bool:
            return all([await status_of(gw, doomed["key"]) == 401 for gw in (a, b)])
        await _until(refused_everywhere, timeout=5)
        refused_at = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        traffic.stop.set()
        await runner
    sentinel_set.wait_healthy()
    unavailable = [when for when, _, _, status in traffic.answers if status == 503]
    assert traffic.answers and all(status in (200, 401, 503) for _, _, _, status in traffic.answers)
    # A refused token never passes; the revoked one never after it was revoked and refused.
    assert not [answer for answer in traffic.answers if answer[1] == refused["key"] and answer[3] == 200]
    late = [answer for answer in traffic.answers if answer[1] == doomed["key"] and answer[0] > refused_at]
    assert late and all(answer[3] == 401 for answer in late)
    # 503 only while no master could answer (sentinels' down-after, election, promotion).
    if unavailable:
        assert unavailable[0] >= killed_at and unavailable[-1] - killed_at < 10.0
        print(f"\n503 for {unavailable[-1] - unavailable[0]:.2f} s of the failover ({len(unavailable)} answers)")
    # Every token made before the kill works, read uncached, by an instance new after the failover.
    c = await sentinel_gateway()
    assert [await status_of(c, token["key"]) for token in tokens[1:]] == [200] * (len(tokens) - 1)
    assert await status_of(c, doomed["key"]) == 401
    # Nothing read from the old master once it came back (MGET: token loads, never replicated).
    async with aioredis.Redis(port=killed.port) as revived:
        assert "cmdstat_mget" not in await revived.info("commandstats")
    await c.create_token()  # acknowledged again: the revived server is a replica in sync


async def test_a_paused_master_is_left_behind(sentinel_gateway: GatewayFactory, sentinel_set: SentinelSet) -> None:
    a, b = await sentinel_gateway(), await sentinel_gateway()
    token, other = await a.create_token(), await a.create_token()
    assert [await status_of(gw, token["key"]) for gw in (a, b)] == [200, 200]  # cached on both
    old = sentinel_set.master_port()
    sentinel_set.pause(old)
    try:
        async def moved() -> bool:
            try:
                return sentinel_set.master_port() != old
            except Exception:
                return False
        await _until(moved, timeout=15)
        # The old master, resumed, believes itself master until the sentinels demote it.
        sentinel_set.resume(old)

        # Until the sentinels demote it, the old master may still be written to through a
        # connection opened before the move was seen: such a change is never confirmed (the
        # old master has no replica any more), so the API answers 503 and the caller repeats it.
        answers: list[int] = []

        async def deleted() -> bool:
            status, body = await b.call("DELETE", f"/platform/tokens/{token['id']}")
            assert status == 200 or body in (error(503, NOT_REPLICATED), error(503, STORAGE_UNAVAILABLE)), body
            answers.append(status)
            return status == 200
        print(f"\nconfirmed after {await _until(deleted, timeout=30):.2f} s, answers {answers}")

        seen: list[list[int]] = []

        async def refused_everywhere() -> bool:
            seen.append([await status_of(gw, token["key"]) for gw in (a, b)])
            return seen[-1] == [401, 401]
        try:
            await _until(refused_everywhere, timeout=5)
        except AssertionError:
            raise AssertionError(f"still answered: {seen[-3:]}") from None
    finally:
        sentinel_set.resume(old)
    sentinel_set.wait_healthy()
    # The deletion was made on the new master: a new instance sees it, and the other token.
    c = await sentinel_gateway()
    assert await status_of(c, token["key"]) == 401
    assert await status_of(c, other["key"]) == 200


async def test_the_lean_client_connects_only_to_a_master_and_leaves_a_demoted_one() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from gateway.store.resp import RespClient

    from support.servers import RedisProcess

    first, second = RedisProcess(), RedisProcess()
    first.start()
    second.start()
    where = [("127.0.0.1", first.port)]
    located: list[tuple[str, int]] = []

    async def locate() -> tuple[str, int]:
        located.append(where[0])
        return where[0]
    lean = RespClient("redis://sentinel-master/0", 0.5, 0.5, locate)
    try:
        assert await lean.execute([("SET", "k", "1")]) == [b"OK"]
        async with aioredis.Redis(port=first.port) as demoted:
            await demoted.replicaof("127.0.0.1", second.port)  # as the sentinels demote a master
        where[0] = ("127.0.0.1", second.port)
        with pytest.raises(ResponseError, match=r"^READONLY"):
            await lean.execute([("SET", "k", "2")])
        # The connection was dropped on READONLY: the next command asks where the master is.
        assert await lean.execute([("SET", "k", "3")]) == [b"OK"]
        assert located == [("127.0.0.1", first.port), ("127.0.0.1", second.port)]
        async with aioredis.Redis(port=second.port) as master:
            assert await master.get("k") == b"3"
        # A server that is not a master is never used, even if named.
        where[0] = ("127.0.0.1", first.port)
        lean.reset()
        with pytest.raises(RedisConnectionError, match="is not a master"):
            await lean.execute([("GET", "k")])
    finally:
        await lean.close()
        first.cleanup()
        second.cleanup()
