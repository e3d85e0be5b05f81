"""The embedded store: an in-process Redis (fakeredis) snapshotted to a local JSON file.

It lets one gateway run with no Redis server. Every API change is saved before the API answers;
`accessed` updates are saved in the background every few seconds and at shutdown. Writes go to a
temporary file that replaces the old one, so a crash never leaves a half-written snapshot.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import fakeredis
import orjson

log = logging.getLogger("gateway.store.embedded")


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _bytes(value: str) -> bytes:
    return value.encode("latin-1")


class Snapshotter:
    def __init__(self, client: fakeredis.FakeAsyncRedis, path: Path) -> None:
        self.client = client
        self.path = path
        self.dirty = False
        self._lock = asyncio.Lock()

    async def load(self) -> int:
        if not self.path.exists():
            return 0
        data = orjson.loads(self.path.read_bytes())
        async with self.client.pipeline(transaction=True) as pipe:
            for key, (kind, value) in data.items():
                _restore(pipe, _bytes(key), kind, value)
            await pipe.execute()
        return len(data)

    async def save(self) -> None:
        async with self._lock:
            self.dirty = False
            data = {_text(key): await self._dump(key) async for key in self.client.scan_iter(count=1000)}
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_bytes(orjson.dumps(data))
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)

    async def _dump(self, key: bytes) -> tuple[str, Any]:
        kind = (await self.client.type(key)).decode()
        if kind == "string":
            return kind, _text(await self.client.get(key))
        if kind == "hash":
            return kind, {_text(k): _text(v) for k, v in (await self.client.hgetall(key)).items()}
        if kind == "zset":
            return kind, [[_text(m), s] for m, s in await self.client.zrange(key, 0, -1, withscores=True)]
        if kind == "set":
            return kind, sorted(_text(m) for m in await self.client.smembers(key))
        if kind == "list":
            return kind, [_text(v) for v in await self.client.lrange(key, 0, -1)]
        raise ValueError(f"embedded store: cannot snapshot a {kind}")

    async def run(self, interval: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.dirty:
                try:
                    await self.save()
                except Exception:
                    log.exception("embedded store snapshot failed")

    def mark_dirty(self) -> None:
        self.dirty = True


def _restore(pipe: Any, key: bytes, kind: str, value: Any) -> None:
    if kind == "string":
        pipe.set(key, _bytes(value))
    elif kind == "hash" and value:
        pipe.hset(key, mapping={_bytes(k): _bytes(v) for k, v in value.items()})
    elif kind == "zset" and value:
        pipe.zadd(key, {_bytes(m): s for m, s in value})
    elif kind == "set" and value:
        pipe.sadd(key, *(_bytes(m) for m in value))
    elif kind == "list" and value:
        pipe.rpush(key, *(_bytes(v) for v in value))


def open_embedded(data_file: str) -> tuple[fakeredis.FakeAsyncRedis, Snapshotter]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return client, Snapshotter(client, Path(data_file))
