"""Redis Cluster for real: three masters and three replicas on loopback, and two gateways that
reach it through redis-py's cluster client (MOVED/ASK, the slot map, failover).

On a cluster the gateway's data is spread over the slots (`ClusterKeys`, `store/sharded.py`):
these tests show it lands on every master, that every API operation works across slots, and
that resharding, a paused master and a killed one give no wrong answer."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis
from redis.crc import key_slot

from gateway.config import build_settings
from gateway.server import GatewayServer
from gateway.store.keys import ClusterKeys
from gateway.tokens import key_digest

from support.cluster import RedisClusterSet
from support.gateways import GatewayFactory, GatewayHandle, base_config, logged_hosts, wait_for_master
from support.servers import Upstream


@pytest.fixture
async def cluster_gateway(upstream: Upstream, redis_cluster: RedisClusterSet,
                          key_prefix: str) -> AsyncIterator[GatewayFactory]:
    handles: list[GatewayHandle] = []

    async def factory(**redis_options: Any) -> GatewayHandle:
        config = base_config(upstream.url, "", key_prefix)
        config["redis"] = {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": key_prefix,
                           "socket_timeout": 0.3, "connect_timeout": 0.3, **redis_options}
        config["housekeeping"] = {"sweep_interval": 0.3, "grace": 0}
        config["usage"] = {"window": 4, "flush_interval": 0.1}
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


async def _until(check: Any, timeout: float) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _owner(redis_cluster: RedisClusterSet, key: str) -> int:
    """The port of the master that holds `key` now."""
    with redis_cluster.client(redis_cluster.masters()[0]) as client:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
    raise AssertionError("no master owns the slot")


async def test_tokens_work_through_the_cluster_and_revocation_reaches_the_other_instance(
        cluster_gateway: GatewayFactory, redis_cluster: RedisClusterSet, key_prefix: str) -> None:
    first, second = await cluster_gateway(), await cluster_gateway()
    token = await first.create_token(info="on a cluster")
    assert await status_of(first, token["key"]) == 200 and await status_of(second, token["key"]) == 200
    # The request log, written in batches by a script on the cluster, read back through the other instance.
    assert await logged_hosts(second, token["id"], 2) == ["127.0.0.1", "127.0.0.1"]
    status, body = await second.call("GET", "/platform/tokens/all")
    assert status == 200 and token["id"] in [item["id"] for item in body["result"]]
    status, body = await second.call("PUT", f"/platform/tokens/{token['id']}", json={"info": "changed"})
    assert status == 200 and body["result"][0]["info"] == "changed"
    # The record is on the master that owns its digest's slot, and on no other master.
    record_key = ClusterKeys(key_prefix).token(key_digest(token["key"]))
    owner = _owner(redis_cluster, record_key)
    holding = []
    for node in redis_cluster.masters():
        with redis_cluster.client(node) as client:
            try:
                if client.get(record_key) is not None:
                    holding.append(node.port)
            except redis.exceptions.MovedError:  # the slot is another master's
                pass
    assert holding == [owner]
    status, _ = await first.call("DELETE", f"/platform/tokens/{token['id']}")
    assert status == 200

    async def refused_everywhere() -> bool:
        return all([await status_of(gw, token["key"]) == 401 for gw in (first, second)])
    await _until(refused_everywhere, 2)
    status, body = await second.call("GET", "/platform/recycle-bin/tokens")
    assert status == 200 and token["id"] in [item["id"] for item in body["result"]]
    status, body = await second.call("POST", f"/platform/recycle-bin/tokens/{token['id']}/restore")
    assert status == 200, body

    async def restored_on_first() -> bool:  # `first` hears of the restore over pub/sub
        return await status_of(first, token["key"]) == 200
    await _until(restored_on_first, 2)
    # Rotation with a grace period: both keys pass until it ends; without, the old key is refused.
    status, body = await first.call("POST", f"/platform/tokens/{token['id']}/rotate", json={"grace": 60})
    assert status == 200, body
    graced_key, new_key = token["key"], body["result"][0]["key"]
    assert [await status_of(second, key) for key in (graced_key, new_key)] == [200, 200]
    status, body = await second.call("POST", f"/platform/tokens/{token['id']}/rotate", json={})
    assert status == 200, body

    async def only_the_newest() -> bool:  # and the first key, whose grace has not ended
        statuses = [await status_of(gw, key) for gw in (first, second) for key in (graced_key, new_key)]
        return statuses == [200, 401, 200, 401] and await status_of(first, body["result"][0]["key"]) == 200
    await _until(only_the_newest, 2)


def _node_id(redis_cluster: RedisClusterSet, port: int) -> str:
    node = next(node for node in redis_cluster.nodes if node.port == port)
    with redis_cluster.client(node) as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


def _owned_range(redis_cluster: RedisClusterSet, slot: int) -> tuple[int, int]:
    with redis_cluster.client(redis_cluster.masters()[0]) as client:
        for start, end, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(start), int(end)
    raise AssertionError("no master owns the slot")


async def test_resharding_under_traffic_answers_no_error(
        upstream: Upstream, redis_cluster: RedisClusterSet) -> None:
    # A prefix whose slot is near the start of its master's range: `reshard` moves a master's
    # slots from its first one on, so only a few need to move for this one to go too.
    while True:
        prefix = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
        slot = key_slot((prefix + "ids").encode())
        start, _ = _owned_range(redis_cluster, slot)
        if slot - start < 40:
            break
    owner = _owner(redis_cluster, prefix + "ids")
    target = next(node.port for node in redis_cluster.masters() if node.port != owner)
    handles = []
    for _ in range(2):
        config = base_config(upstream.url, "", prefix)
        config["redis"] = {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix,
                           "socket_timeout": 0.5, "connect_timeout": 0.5}
        settings = build_settings(config)
        server = GatewayServer(settings)
        await server.start("127.0.0.1", 0)
        handles.append(GatewayHandle(f"http://127.0.0.1:{server.port}", settings, server,
                                     aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))))
    first, second = handles
    try:
        await wait_for_master(first)
        await wait_for_master(second)
        # Enough keys in the slot that moving it takes many MIGRATE steps, answered with ASK meanwhile.
        status, body = await first.call("POST", "/platform/tokens", json=[{"ttl": 600}] * 300)
        assert status == 200, body
        answers: list[int] = []
        moving = True

        unused = [token["key"] for token in body["result"]]

        async def traffic() -> None:
            # The first use of each token on `second` (a load from the slot), new tokens made
            # through `first`, and lists; until the reshard is over.
            while moving:
                if unused:
                    answers.append(await status_of(second, unused.pop()))
                if len(answers) % 10 == 0:
                    status, made = await first.call("POST", "/platform/tokens", json=[{"ttl": 600}])
                    answers.append(status)
                    if status == 200:
                        unused.append(made["result"][0]["key"])
                    answers.append((await second.call("GET", "/platform/tokens/all"))[0])
        running = asyncio.gather(*[traffic() for _ in range(4)])
        reshard = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "reshard", redis_cluster.hosts[0],
            "--cluster-from", _node_id(redis_cluster, owner), "--cluster-to", _node_id(redis_cluster, target),
            "--cluster-slots", str(slot - start + 1), "--cluster-pipeline", "5", "--cluster-yes",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(reshard.wait(), 60) == 0
        moving = False
        await running
        assert _owner(redis_cluster, prefix + "ids") == target  # the data did move
        assert len(answers) > 3 and set(answers) == {200}, answers
    finally:
        for handle in handles:
            await handle.session.close()
            await handle.server.close()


# Last: it leaves a restarted node behind, which the clients of later tests would first find down.
async def test_a_killed_master_is_replaced_and_tokens_made_before_still_work(
        cluster_gateway: GatewayFactory, redis_cluster: RedisClusterSet, key_prefix: str) -> None:
    first, second = await cluster_gateway(), await cluster_gateway()
    kept, revoked, doomed = await first.create_token(), await first.create_token(), await first.create_token()
    assert await status_of(first, doomed["key"]) == 200  # cached by `first`
    status, _ = await first.call("DELETE", f"/platform/tokens/{revoked['id']}")
    assert status == 200
    owner = _owner(redis_cluster, key_prefix + "ids")
    victim = next(node for node in redis_cluster.nodes if node.port == owner)
    try:
        victim.stop()
        started = time.monotonic()
        while True:  # a gateway that never saw `kept` must load it from the promoted replica
            fresh = await cluster_gateway()
            for gw in (fresh, second):
                assert await status_of(gw, revoked["key"]) in (401, 503)  # a refused token never passes
            answered = await status_of(fresh, kept["key"])
            if answered == 200:
                break
            assert answered == 503, answered
            assert time.monotonic() - started < 20, "no replica took over"
            await asyncio.sleep(0.2)
        assert _owner(redis_cluster, key_prefix + "ids") != owner
        token = await second.create_token()
        assert await status_of(first, token["key"]) == 200
        # The invalidation channel moved with its slot: `first` still hears of a deletion.
        status, _ = await second.call("DELETE", f"/platform/tokens/{doomed['id']}")
        assert status == 200

        async def refused_by_first() -> bool:
            return await status_of(first, doomed["key"]) == 401
        await _until(refused_by_first, 2)
    finally:
        redis_cluster.restore()
