"""`gateway migrate` for real: a store made by a gateway on one redis-server, copied into the
test session's Redis Cluster (three masters), served by a gateway on the cluster; run twice; a
target holding other data refused; and back from the cluster into one Redis."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from gateway.cli import main
from gateway.config import build_settings
from gateway.server import GatewayServer
from gateway.store.keys import ClusterKeys

from support.cluster import RedisClusterSet
from support.gateways import GatewayHandle, base_config, logged_hosts, wait_for_master
from support.servers import Upstream


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayHandle]]:
    handles: list[GatewayHandle] = []
    yield handles
    for handle in handles:
        await handle.session.close()
        async with asyncio.timeout(30):
            await handle.server.close()


async def start(handles: list[GatewayHandle], upstream: Upstream, redis_section: dict[str, Any],
                prefix: str) -> GatewayHandle:
    config = base_config(upstream.url, "", prefix)
    config["redis"] = {**redis_section, "key_prefix": prefix}
    config["token_logs"] = {"enabled": True}
    settings = build_settings(config)
    server = GatewayServer(settings)
    await server.start("127.0.0.1", 0)
    handle = GatewayHandle(f"http://127.0.0.1:{server.port}", settings, server,
                           aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)))
    handles.append(handle)
    await wait_for_master(handle)
    return handle


async def status_of(gw: GatewayHandle, key: str) -> int:
    async with gw.request("GET", "/x", key=key) as response:
        return response.status


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cluster_dump(redis_cluster: RedisClusterSet, prefix: str) -> dict[str, Any]:
    """Every key of the cluster layout under `prefix`, with its value (not `used`: times)."""
    base = ClusterKeys(prefix).base
    dump: dict[str, Any] = {}
    for node in redis_cluster.masters():
        with redis_cluster.client(node) as client:
            for raw in client.scan_iter(match=base + "*", count=1000):
                key = raw.decode()
                kind = client.type(key).decode()
                dump[key] = {"string": lambda k: client.get(k), "hash": lambda k: client.hgetall(k),
                             "set": lambda k: sorted(client.smembers(k)), "list": lambda k: client.lrange(k, 0, -1),
                             "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
    return dump


async def test_a_store_on_one_redis_moves_to_the_cluster_and_back(
        upstream: Upstream, redis_url: str, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle],
        tmp_path: Path) -> None:
    prefix = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    one = await start(gateways, upstream, {"url": redis_url}, prefix)
    status, body = await one.call("POST", "/platform/tokens", json=[{"ttl": 600, "info": f"t{n}"} for n in range(40)])
    assert status == 200, body
    made = body["result"]
    status, body = await one.call("POST", "/platform/subaccounts", json={"name": "customer"})
    cid = body["result"][0]["id"]
    status, body = await one.call("POST", "/platform/tokens", json=[{"ttl": 600}], headers={"x-flespi-cid": str(cid)})
    customer_token = body["result"][0]
    assert await status_of(one, customer_token["key"]) == 200
    assert await status_of(one, made[0]["key"]) == 200
    assert len(await logged_hosts(one, made[0]["id"], 1)) == 1
    status, _ = await one.call("DELETE", f"/platform/tokens/{made[1]['id']}")  # into the bin
    status, body = await one.call("POST", f"/platform/tokens/{made[2]['id']}/rotate", json={"grace": 600})
    assert status == 200, body
    rotated_key = body["result"][0]["key"]
    highest = max(token["id"] for token in [*made, customer_token])

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": upstream.url, "redis": {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix}}))
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url, "--logs")
    assert code == 0, err
    # 40 + the customer's + the bootstrap token, one of them deleted; and the rotated key's grace copy
    assert "token records: 42" in out and "ids: 41" in out and "bin: 1" in out, out
    first_copy = cluster_dump(redis_cluster, prefix)
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url, "--logs")
    assert code == 0, err  # the same source again: accepted, and the same result
    assert cluster_dump(redis_cluster, prefix) == first_copy
    # Spread over the masters like any store made on the cluster.
    assert sum(1 for key in first_copy if key.startswith(ClusterKeys(prefix).token_prefix)) == 42

    on_cluster = await start(gateways, upstream, {"cluster": {"nodes": redis_cluster.hosts[:2]}}, prefix)
    statuses = [await status_of(on_cluster, token["key"]) for token in made[3:]]
    assert set(statuses) == {200}
    assert await status_of(on_cluster, made[1]["key"]) == 401  # deleted before
    assert [await status_of(on_cluster, key) for key in (made[2]["key"], rotated_key)] == [200, 200]  # grace
    assert await status_of(on_cluster, customer_token["key"]) == 200
    status, body = await on_cluster.call("GET", "/platform/tokens/all", headers={"x-flespi-cid": str(cid)})
    assert [item["id"] for item in body["result"]] == [customer_token["id"]]
    status, body = await on_cluster.call("GET", f"/platform/tokens/{made[0]['id']}/logs")
    assert status == 200 and len(body["result"]) >= 1  # the line logged on the one Redis
    status, body = await on_cluster.call("POST", f"/platform/recycle-bin/tokens/{made[1]['id']}/restore")
    assert status == 200, body
    assert await status_of(on_cluster, made[1]["key"]) == 200
    new = await on_cluster.create_token()
    assert new["id"] > highest  # ids go on from where the one Redis was

    # Another source into the same (now used) target: refused, and nothing written.
    other = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    with redis.Redis.from_url(redis_url) as client:
        client.set(other + "next_id", 5)
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url,
                                             "--prefix", other)
    assert code == 1 and "already holds data" in err
    # And back: the cluster into one Redis, under a new prefix, served there.
    back = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--to", redis_url,
                                             "--prefix", back)
    assert code == 0, err
    returned = await start(gateways, upstream, {"url": redis_url}, back)
    assert [await status_of(returned, token["key"]) for token in (made[1], new, customer_token)] == [200] * 3
    status, body = await returned.call("GET", "/platform/tokens/all")
    assert {token["id"] for token in made} - {made[2]["id"]} <= {item["id"] for item in body["result"]}


async def test_a_cluster_kept_as_earlier_builds_kept_it_is_copied_in_place(
        upstream: Upstream, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle], tmp_path: Path) -> None:
    """Earlier builds kept everything under the prefix's hash tag, in one slot, on a cluster too:
    `--in-place` copies that into the sharded layout of the same cluster."""
    from redis.cluster import ClusterNode, RedisCluster

    from gateway.tokens import key_digest
    prefix = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    key = "K" * 64
    record = {"id": 2, "info": "old", "enabled": True, "access": {"type": 0}, "expire": 0, "ttl": 3600,
              "created": 1_900_000_000, "accessed": 0, "ips": "", "origins": "*", "cid": 0, "metadata": {}}
    host, port = redis_cluster.hosts[0].split(":")
    with RedisCluster(startup_nodes=[ClusterNode(host, int(port))]) as client:
        client.set(prefix + "tok:" + key_digest(key), json.dumps(record))
        client.hset(prefix + "ids", "2", key_digest(key))
        client.sadd(prefix + "cid:0", "2")
        client.zadd(prefix + "expiry", {"2": 1_900_003_600})
        client.hset(prefix + "used", key_digest(key), 1_900_000_100)
        client.set(prefix + "next_id", 2)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": upstream.url, "redis": {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix}}))
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--in-place")
    assert code == 0, err
    assert "token records: 1" in out and "next_id: 2" in out, out
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--in-place")
    assert code == 0, err  # again: the same
    on_cluster = await start(gateways, upstream, {"cluster": {"nodes": redis_cluster.hosts[:2]}}, prefix)
    assert await status_of(on_cluster, key) == 200
    status, body = await on_cluster.call("GET", "/platform/tokens/2")
    assert status == 200 and body["result"][0]["accessed"] == 1_900_000_100
    assert (await on_cluster.create_token())["id"] > 2
