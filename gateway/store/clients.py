"""The Redis clients a process uses, for one Redis (`redis.url`) or a Sentinel-managed master
(`redis.sentinel`): redis-py for the API, pub/sub and housekeeping, one with a longer timeout for
WAIT, and the lean client (`store/resp.py`) for the batched traffic where it can serve (no TLS)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.config import ClusterSettings, RedisSettings
from gateway.store.keys import ClusterKeys
from gateway.store.resp import LeanNodes, RespClient, lean_client
from gateway.store.scripts import BATCHED_SCRIPTS
from gateway.store.sentinel import MasterWatch
from gateway.store.sharded import ReplicaWait
from gateway.store.tokens import connect_redis

# How often the sentinels are asked where the master is (a failover is seen within this).
SENTINEL_POLL = 0.25


@dataclass(slots=True)
class Clients:
    client: aioredis.Redis  # a RedisCluster with redis.cluster (it speaks the same commands)
    waiter: aioredis.Redis | None = None  # WAIT blocks up to redis.wait_timeout: a timeout above it
    listener: aioredis.Redis | None = None  # pub/sub, when not `client`
    lean: RespClient | None = None
    lean_loads: RespClient | None = None
    watch: MasterWatch | None = None
    lean_nodes: LeanNodes | None = None  # a cluster's: one lean client per master, for the loads
    lean_script_nodes: LeanNodes | None = None  # and others for the batched scripts
    replica_wait: ReplicaWait | None = None  # a cluster's WAIT, on every master
    owned: list[aioredis.Redis] = field(default_factory=list)

    async def close(self) -> None:
        for lean in (self.lean, self.lean_loads):
            if lean is not None:
                await lean.close()
        for nodes in (self.lean_nodes, self.lean_script_nodes):
            if nodes is not None:
                await nodes.close()
        for client in self.owned:
            await client.aclose()
        if self.watch is not None:
            await self.watch.close()
        if self.replica_wait is not None:
            await self.replica_wait.close()


def open_clients(settings: RedisSettings) -> Clients:
    """Nothing is connected yet: every client connects on first use."""
    if settings.cluster is not None:
        cluster = open_cluster(settings, settings.cluster)
        # redis-py for everything: it follows MOVED/ASK and the slot map, which the lean client
        # (one connection to one server) does not. Pub/sub: PUBLISH on any node of a cluster
        # reaches the subscribers on every node, so one connection to one node hears it all.
        # Cache-miss loads only: the lean client, one per master, found through redis-py's slot
        # map (`ShardedTokenStore.load_many_then`); not with TLS, which it does not speak.
        # The batched scripts (`accessed`, logs, usage) on connections of their own, as on one
        # Redis: loads, which requests wait for, do not queue behind them.
        loads, scripts = (None if settings.cluster.ssl else LeanNodes(
            settings.cluster.username, settings.cluster.password, settings.socket_timeout, settings.connect_timeout,
            preload=preload) for preload in ((), BATCHED_SCRIPTS))
        replica_wait = ReplicaWait(cluster, ClusterKeys(settings.key_prefix), settings.cluster.connection_options(),
                                   settings.socket_timeout + settings.wait_timeout, settings.connect_timeout) \
            if settings.replicas_to_wait > 0 else None
        return Clients(cast(aioredis.Redis, cluster), lean_nodes=loads, lean_script_nodes=scripts,
                       replica_wait=replica_wait, owned=[cast(aioredis.Redis, cluster)])
    waits = settings.replicas_to_wait > 0
    wait_timeout = settings.socket_timeout + settings.wait_timeout
    sentinel = settings.sentinel
    if sentinel is None:
        client = connect_redis(settings)
        waiter = aioredis.Redis.from_url(settings.url, socket_timeout=wait_timeout,
                                         socket_connect_timeout=settings.connect_timeout,
                                         retry=Retry(NoBackoff(), 1)) if waits else None
        lean, lean_loads = (lean_client(settings.url, settings.socket_timeout, settings.connect_timeout)
                            for _ in range(2))
        clients = Clients(client, waiter, None, lean, lean_loads)
        clients.owned = [client] + ([waiter] if waiter is not None else [])
        return clients
    watch = MasterWatch(settings, sentinel)
    client, listener = watch.client(settings.socket_timeout), watch.client(settings.socket_timeout, retries=0)
    waiter = watch.client(wait_timeout) if waits else None
    clients = Clients(client, waiter, listener, watch=watch,
                      owned=[client, listener] + ([waiter] if waiter is not None else []))
    if not sentinel.ssl:  # the lean client speaks no TLS: redis-py pipelines then, as for rediss://
        url = _lean_url(sentinel.username, sentinel.password, sentinel.db)
        clients.lean = RespClient(url, settings.socket_timeout, settings.connect_timeout, watch.locate)
        clients.lean_loads = RespClient(url, settings.socket_timeout, settings.connect_timeout, watch.locate)
        for lean in (clients.lean, clients.lean_loads):
            watch.on_move.append(lean.reset)
    return clients


def open_cluster(settings: RedisSettings, cluster: ClusterSettings) -> RedisCluster:
    """A cluster client that fails fast like `connect_redis`: a command whose node does not
    answer is retried once, after the slot map is read again (a failover moves the slot)."""
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
        socket_timeout=settings.socket_timeout, socket_connect_timeout=settings.connect_timeout,
        retry=Retry(NoBackoff(), 1), health_check_interval=10,
        # A MOVED patches the slot map for that slot (redis-py's `move_slot`), never re-reads it
        # whole: a re-read closes every node connection first (`aclose`), under the commands of
        # every other request, which then fail as torn connections. (No transaction runs on a
        # cluster, so nothing needs the whole map fresher; a lost node still makes redis-py read
        # it again.)
        reinitialize_steps=0, **cluster.connection_options())


def _lean_url(username: str, password: str, db: int) -> str:
    """The credentials and database for the lean client; the address comes from the sentinels."""
    auth = f"{quote(username, safe='')}:{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}sentinel-master/{db}"
