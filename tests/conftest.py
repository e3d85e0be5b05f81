"""Fixtures only (a real Redis, the recording upstream, gateways, all on loopback); the helpers the
test modules import live in tests/support/."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.config import build_settings
from gateway.server import GatewayServer

from support.cluster import RedisClusterSet
from support.gateways import GatewayFactory, GatewayHandle, base_config, wait_for_master
from support.sentinel import SentinelSet
from support.servers import RedisProcess, Upstream, running_upstream


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set, else a redis-server started for this test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisProcess()
    server.start()
    yield server.url
    server.cleanup()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A dedicated redis-server (keeping its data across restarts) for tests that stop it."""
    server = RedisProcess(persistent=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels, for the session; tests that fail a server over
    leave the set healthy again (a master and a replica in sync)."""
    servers = SentinelSet()
    servers.start()
    yield servers
    servers.cleanup()


@pytest.fixture(scope="session")
def cluster_set() -> Iterator[RedisClusterSet]:
    """Three masters and three replicas, for the session; a test that kills a node restores it."""
    nodes = RedisClusterSet()
    nodes.start()
    yield nodes
    nodes.cleanup()


@pytest.fixture
def redis_cluster(cluster_set: RedisClusterSet) -> RedisClusterSet:
    """The session's cluster, whole: one a test left broken is made anew first (`ensure_ok`)."""
    cluster_set.ensure_ok()
    return cluster_set


@pytest.fixture
def key_prefix() -> str:
    # A fresh prefix per test: the shared Redis is never assumed empty.
    return "{gwtest-" + uuid.uuid4().hex[:12] + "}:"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server



# -- gateways -----------------------------------------------------------------------------------

@pytest.fixture
def front() -> str:
    """Which front serves the gateway's requests: "fast" (the production server: the fast path
    where it applies, aiohttp for the rest) or "aiohttp" (every request handed to aiohttp).
    tests/proxy and tests/auth run under both (their conftest.py), and so do the gateway tests of
    tests/policy (test_acl_gateway.py, test_location.py), as uvicorn runs its tests per protocol
    class: a difference between the two paths fails a test."""
    return "fast"


async def _start_gateway(config: dict[str, Any], front: str, handles: list[GatewayHandle]) -> GatewayHandle:
    settings = build_settings(config)
    server = GatewayServer(settings, fast_path=front == "fast")
    await server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession(auto_decompress=False)
    handle = GatewayHandle(f"http://127.0.0.1:{server.port}", settings, server, session)
    handles.append(handle)
    await wait_for_master(handle)
    return handle


async def _close_gateways(handles: list[GatewayHandle]) -> None:
    for handle in handles:
        await handle.session.close()
        async with asyncio.timeout(30):  # a shutdown that hangs is a failure, not a stuck run
            await handle.server.close()


@pytest.fixture
async def make_gateway(upstream: Upstream, redis_url: str, key_prefix: str, front: str,
                       ) -> AsyncIterator[GatewayFactory]:
    handles: list[GatewayHandle] = []

    async def factory(**overrides: Any) -> GatewayHandle:
        return await _start_gateway(base_config(upstream.url, redis_url, key_prefix, **overrides), front, handles)

    yield factory
    await _close_gateways(handles)


@pytest.fixture
async def make_cluster_gateway(upstream: Upstream, redis_cluster: RedisClusterSet, key_prefix: str, front: str,
                               ) -> AsyncIterator[GatewayFactory]:
    """`make_gateway` on the session's Redis Cluster (found through two of its nodes); `redis`
    overrides are added to the cluster's settings."""
    handles: list[GatewayHandle] = []

    async def factory(**overrides: Any) -> GatewayHandle:
        redis = {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": key_prefix,
                 "socket_timeout": 0.3, "connect_timeout": 0.3, **overrides.pop("redis", {})}
        config = base_config(upstream.url, "", key_prefix, **overrides)
        config["redis"] = redis
        return await _start_gateway(config, front, handles)

    yield factory
    await _close_gateways(handles)


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> GatewayHandle:
    return await make_gateway()
