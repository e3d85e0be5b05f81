"""Token records in Redis (or the embedded store, which speaks the same protocol).

Key layout (every key carries the configured prefix, `{gw}:` by default, whose hash tag keeps all
keys in one Redis Cluster slot so that MULTI/EXEC transactions work there too):

- `{gw}:tok:<sha256 of key>`  the record as JSON (never the key itself)
- `{gw}:ids`                  hash: token id -> key digest
- `{gw}:accessed`             sorted set: key digest -> last `accessed` (ZADD GT keeps the newest)
- `{gw}:next_id`              counter for token ids, never reused
- `{gw}:bin`                  hash: token id -> JSON of a deleted record and when it was deleted
- `{gw}:invalidate`           pub/sub channel: digests whose cached records must be dropped
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import RedisSettings
from .errors import StoreUnavailable

T = TypeVar("T")
STORE_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """A client that fails fast: short socket timeouts and a single immediate retry."""
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=10,
    )


class TokenStore:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.channel = f"{prefix}invalidate"
        self._ids = f"{prefix}ids"
        self._accessed = f"{prefix}accessed"
        self._next_id = f"{prefix}next_id"
        self._bin = f"{prefix}bin"
        # The embedded store persists itself through these; Redis needs neither.
        self.after_change: Callable[[], Awaitable[None]] | None = None
        self.after_touch: Callable[[], None] | None = None

    async def _changed(self) -> None:
        if self.after_change is not None:
            await self.after_change()

    def _tok(self, digest: str) -> str:
        return f"{self.prefix}tok:{digest}"

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"token store: {type(exc).__name__}") from exc

    # -- hot path (cache misses) --------------------------------------------------------------

    async def load(self, digest: str) -> dict[str, Any] | None:
        """One round trip: the record and its accessed time."""
        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self._tok(digest)).zscore(self._accessed, digest)
                return await pipe.execute()  # type: ignore[no-any-return]
        raw, accessed = await self._call(run)
        if raw is None:
            return None
        return _merge_accessed(orjson.loads(raw), accessed)

    async def touch(self, accessed: dict[str, int]) -> None:
        """Record uses; ZADD GT means a late or slower instance never moves `accessed` back."""
        if accessed:
            await self._call(lambda: self.client.zadd(self._accessed, accessed, gt=True))
            if self.after_touch is not None:
                self.after_touch()

    async def publish(self, digests: Iterable[str]) -> None:
        async def run() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.publish(self.channel, digest)
                await pipe.execute()
        await self._call(run)

    # -- tokens API ---------------------------------------------------------------------------

    async def allocate_ids(self, count: int) -> list[int]:
        last = int(await self._call(lambda: self.client.incrby(self._next_id, count)))
        return list(range(last - count + 1, last + 1))

    async def insert(self, records: list[dict[str, Any]]) -> None:
        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for record in records:
                    pipe.set(self._tok(record["digest"]), orjson.dumps(record))
                    pipe.hset(self._ids, str(record["id"]), record["digest"])
                await pipe.execute()
        await self._call(run)
        await self._changed()

    async def insert_if_absent(self, record: dict[str, Any]) -> bool:
        """Atomically create a record unless its key exists (bootstrap from several instances)."""
        async def run() -> bool:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(self._tok(record["digest"]))
                if await pipe.exists(self._tok(record["digest"])):
                    return False
                pipe.multi()
                pipe.set(self._tok(record["digest"]), orjson.dumps(record))
                pipe.hset(self._ids, str(record["id"]), record["digest"])
                await pipe.execute()
                return True
        try:
            created = await self._call(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, redis.exceptions.WatchError):
                return False
            raise
        if created:
            await self._changed()
        return created

    async def all_ids(self) -> list[int]:
        ids = await self._call(lambda: self.client.hkeys(self._ids))
        return sorted(int(value) for value in ids)

    async def get_many(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Records for the ids that exist, in the order asked; unknown ids are skipped."""
        wanted = [str(token_id) for token_id in ids]
        if not wanted:
            return []
        digests = await self._call(lambda: self.client.hmget(self._ids, wanted))
        found = [digest.decode() for digest in digests if digest is not None]
        if not found:
            return []

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for digest in found:
                    pipe.get(self._tok(digest)).zscore(self._accessed, digest)
                return await pipe.execute()  # type: ignore[no-any-return]
        replies = await self._call(run)
        records = []
        for raw, accessed in zip(replies[::2], replies[1::2]):
            if raw is not None:
                records.append(_merge_accessed(orjson.loads(raw), accessed))
        return records

    async def replace(self, record: dict[str, Any]) -> None:
        stored = {key: value for key, value in record.items()}
        await self._call(lambda: self.client.set(self._tok(record["digest"]), orjson.dumps(stored)))
        await self._changed()

    async def remove(self, records: list[dict[str, Any]], *, to_bin: bool) -> None:
        """Delete records (all in one transaction); with `to_bin` keep them for restoring."""
        now = int(time.time())

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for record in records:
                    pipe.delete(self._tok(record["digest"]))
                    pipe.hdel(self._ids, str(record["id"]))
                    pipe.zrem(self._accessed, record["digest"])
                    if to_bin:
                        pipe.hset(self._bin, str(record["id"]), orjson.dumps({"deleted": now, "record": record}))
                await pipe.execute()
        await self._call(run)
        await self._changed()

    @asynccontextmanager
    async def subscription(self) -> AsyncIterator[Any]:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(lambda: pubsub.subscribe(self.channel))
            yield pubsub
        finally:
            try:
                await pubsub.aclose()
            except STORE_ERRORS:
                pass


def _merge_accessed(record: dict[str, Any], accessed: float | None) -> dict[str, Any]:
    if accessed is not None and int(accessed) > record.get("accessed", 0):
        record["accessed"] = int(accessed)
    return record
