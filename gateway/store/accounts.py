"""Accounts: a tree of subaccounts, each with optional per-minute usage limits.

The root account (id 0) always exists. Records live in Redis (`accounts` hash id -> JSON,
`next_account_id`, named in `store/keys.py`); every instance keeps the whole tree in memory (accounts are few), reloads
it when an `accounts` message arrives on the invalidation channel, and at least every `max_age`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.typing import EncodableT, FieldT

from gateway.aio import wait_event
from gateway.errors import Denied, StoreUnavailable
from gateway.store.tokens import RedisStore

log = logging.getLogger("gateway.store.accounts")
ROOT_ACCOUNT = 0
CHANGED_MESSAGE = "accounts"


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits per usage window; None means the configured default, 0 means unlimited."""

    api_calls: int | None = None
    traffic: int | None = None


@dataclass(frozen=True, slots=True)
class AccountTree:
    parents: dict[int, int] = field(default_factory=dict)
    limits: dict[int, Limits] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> AccountTree:
        parents, limits = {}, {}
        for record in records:
            if record.get("cid") is None:  # the root account's own record (name, metadata): no parent
                continue
            parents[int(record["id"])] = int(record["cid"])
            raw = record.get("limits") or {}
            limits[int(record["id"])] = Limits(raw.get("api_calls"), raw.get("traffic"))
        return cls(parents, limits)

    def is_within(self, cid: int, ancestor: int) -> bool:
        """True if `cid` is `ancestor` or one of its descendants."""
        seen = 0
        while seen <= len(self.parents) + 1:
            if cid == ancestor:
                return True
            if cid not in self.parents:
                return False
            cid = self.parents[cid]
            seen += 1
        return False

    def descendants(self, cid: int) -> list[int]:
        return sorted(child for child in self.parents if child != cid and self.is_within(child, cid))


class AccountStore(RedisStore):
    def __init__(self, client: Any, prefix: str) -> None:
        super().__init__(client, prefix)
        self._accounts = self.keys.accounts
        self._next_id = self.keys.next_account_id

    async def all(self) -> list[dict[str, Any]]:
        raw = await self.call(lambda: self.client.hvals(self._accounts))
        return sorted((orjson.loads(value) for value in raw), key=lambda record: int(record["id"]))

    async def get(self, account_id: int) -> dict[str, Any] | None:
        raw = await self.call(lambda: self.client.hget(self._accounts, str(account_id)))
        return None if raw is None else dict(orjson.loads(raw))

    async def allocate_ids(self, count: int) -> list[int]:
        last = int(await self.call(lambda: self.client.incrby(self._next_id, count)))
        return list(range(last - count + 1, last + 1))

    async def save(self, records: list[dict[str, Any]]) -> None:
        mapping: dict[FieldT, EncodableT] = {str(record["id"]): orjson.dumps(record) for record in records}
        await self.call(lambda: self.client.hset(self._accounts, mapping=mapping))
        await self.publish([CHANGED_MESSAGE])
        await self.changed()

    async def delete(self, ids: list[int]) -> None:
        await self.call(lambda: self.client.hdel(self._accounts, *(str(i) for i in ids)))
        await self.publish([CHANGED_MESSAGE])
        await self.changed()


class AccountDirectory:
    """The in-memory tree the hot path reads; refreshed in the background, never per request."""

    def __init__(self, store: AccountStore, max_age: float) -> None:
        self._store = store
        self._max_age = max_age
        self.tree: AccountTree | None = None
        self.loaded = 0.0
        self._changed = asyncio.Event()

    def mark_changed(self) -> None:
        self._changed.set()

    async def reload(self) -> AccountTree:
        tree = AccountTree.from_records(await self._store.all())
        self.tree, self.loaded = tree, time.monotonic()
        return tree

    def current(self) -> AccountTree:
        """The tree for a request; without a fresh enough one the request cannot be decided."""
        if self.tree is None or time.monotonic() - self.loaded > self._max_age:
            raise StoreUnavailable("account tree not loaded")
        return self.tree

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.reload()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("account tree reload failed")
            await wait_event(self._changed, interval)
            self._changed.clear()


def check_acting_account(directory: AccountDirectory, token_cid: int, acting: int | None) -> None:
    if acting is None or acting == token_cid:
        return
    if not directory.current().is_within(acting, token_cid):
        raise Denied(403, f"access to account {acting} is denied for this token")
