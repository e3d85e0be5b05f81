"""Tokens written straight into the bench Redis, as the tokens API would have made them."""
from __future__ import annotations

import asyncio
import os
import time

from . import PREFIX

_TABLE = bytes(ord(c) for c in (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" * 5)[:256])


def random_keys(count: int) -> list[str]:
    """64-character [A-Za-z0-9] keys from os.urandom (a byte maps to one character)."""
    raw = os.urandom(64 * count).translate(_TABLE).decode("ascii")
    return [raw[i:i + 64] for i in range(0, len(raw), 64)]


async def fill_tokens(redis_url: str, keys: list[str], batch: int = 5000) -> None:
    """The records exactly as the tokens API creates them, written by the gateway's own TokenStore,
    and their `accessed` a minute ago."""
    from gateway.config import RedisSettings
    from gateway.store.tokens import TokenStore, connect_redis
    from gateway.tokens import key_digest
    from gateway.api.validation import DEFAULTS

    client = connect_redis(RedisSettings(url=redis_url, socket_timeout=30, connect_timeout=5))
    store = TokenStore(client, PREFIX)
    try:
        ids = await store.allocate_ids(len(keys))
        now = int(time.time())
        pending: list[asyncio.Task[None]] = []
        for start in range(0, len(keys), batch):
            records = [{**DEFAULTS, "ttl": 3600, "info": "", "id": token_id, "digest": key_digest(key),
                        "created": now, "accessed": 0, "cid": 0}
                       for token_id, key in zip(ids[start:start + batch], keys[start:start + batch])]
            pending.append(asyncio.ensure_future(store.insert(records)))
            # Each used a minute ago, as in a store in use (bench/cluster.py does the same).
            pending.append(asyncio.ensure_future(store.touch({record["digest"]: now - 60 for record in records})))
            if len(pending) >= 4:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await client.aclose()

