"""`redis.wait_replicas` with one Redis (`redis.url`): API changes wait for that server's replicas."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.errors import NOT_REPLICATED
from gateway.store.keys import Keys
from gateway.tokens import key_digest

from support.gateways import GatewayFactory, error
from support.servers import RedisProcess


async def test_changes_wait_for_the_replicas_of_one_redis(make_gateway: GatewayFactory, key_prefix: str) -> None:
    master = RedisProcess()
    master.start()
    replica = RedisProcess(extra=["--replicaof", "127.0.0.1", str(master.port)])
    try:
        gw = await make_gateway(redis={"url": master.url, "wait_replicas": 1, "wait_timeout": 1.0,
                                       "socket_timeout": 2.0})
        # No replica yet: the change is made, and said not to be safe.
        status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "info": "alone"}])
        assert (status, body) == (503, error(503, NOT_REPLICATED))
        replica.start()
        async with aioredis.Redis(port=master.port) as on_master:
            for _ in range(400):  # until the master counts the replica online (it may resync once)
                info = await on_master.info("replication")
                if info.get("slave0", {}).get("state") == "online":
                    break
                await asyncio.sleep(0.05)
        async with aioredis.Redis(port=replica.port) as on_replica:
            token = await gw.create_token()  # 200: the replica confirmed it
            assert await on_replica.exists(Keys(key_prefix).token(key_digest(token["key"]))) == 1
    finally:
        replica.cleanup()
        master.cleanup()
