"""Redis Sentinel: the master is found through the sentinels, and followed when it moves.

redis-py's Sentinel pool asks the sentinels for the master on every new connection and drops a
connection that meets a READONLY reply; the lean client (`store/resp.py`) asks too (`locate`) and
opens a connection only to a server whose ROLE is master. Neither would notice, on its own, a
connection that is still open to a master that was paused (SIGSTOP, a stalled VM) while the
sentinels promoted a replica: that server comes back believing it is the master until the
sentinels demote it, and whatever it is sent meanwhile is lost. `MasterWatch` asks the sentinels
every `interval`; when they name another master, every connection is dropped (`on_move`), pub/sub
included, so nothing is written to, read from or listened to on the old one.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.config import RedisSettings, SentinelSettings

log = logging.getLogger("gateway.store.sentinel")
STORE_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class MasterWatch:
    def __init__(self, settings: RedisSettings, sentinel: SentinelSettings) -> None:
        timeouts = {"socket_timeout": settings.socket_timeout, "socket_connect_timeout": settings.connect_timeout}
        self._settings = settings
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinel.hosts), sentinel_kwargs={**timeouts, **sentinel.sentinel_options()},
            **sentinel.connection_options())
        self.service = sentinel.service
        self.master: tuple[str, int] | None = None
        self.on_move: list[Callable[[], None]] = []
        self._clients: list[aioredis.Redis] = []
        self._dropping: set[asyncio.Future[None]] = set()

    def client(self, socket_timeout: float, retries: int = 1) -> aioredis.Redis:
        """A redis-py client of the master, whichever server that is now; fails fast like
        `connect_redis`. `retries` 0 for pub/sub: redis-py would otherwise reconnect a
        subscription by itself, and the messages of the gap would be lost unnoticed."""
        client: aioredis.Redis = self.sentinel.master_for(
            self.service, redis_class=aioredis.Redis, socket_timeout=socket_timeout,
            socket_connect_timeout=self._settings.connect_timeout, retry=Retry(NoBackoff(), retries),
            health_check_interval=10)
        self._clients.append(client)
        return client

    async def locate(self) -> tuple[str, int]:
        """The master's address as the sentinels give it now (MasterNotFoundError, a
        ConnectionError, when none names a master that is up)."""
        host, port = await self.sentinel.discover_master(self.service)
        address = (str(host), int(port))
        self._moved_to(address)
        return address

    def _moved_to(self, address: tuple[str, int]) -> None:
        if self.master is not None and address != self.master:
            log.warning("the sentinels name a new master for %r: %s:%d", self.service, *address)
            self.master = address
            for client in self._clients:
                # In-use connections too (a subscription, a blocked WAIT): they are all the old master's.
                dropping = asyncio.ensure_future(client.connection_pool.disconnect(inuse_connections=True))
                self._dropping.add(dropping)
                dropping.add_done_callback(self._dropping.discard)
            for moved in self.on_move:
                moved()
        self.master = address

    async def run(self, interval: float) -> None:
        while True:
            with suppress(*STORE_ERRORS):
                await self.locate()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for sentinel in self.sentinel.sentinels:
            with suppress(*STORE_ERRORS):
                await sentinel.aclose()
