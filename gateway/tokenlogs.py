"""Recent log records kept in Redis per token and per account, for the logs API.

`{gw}:logs:tok:<id>` and `{gw}:logs:acct:<cid>` are lists of JSON records, oldest first, trimmed
to the configured caps. The sink receives batches from the one LogWriter; a batch that cannot be
written (Redis away) is kept and retried with the next one, up to `max_retained` records.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .config import TokenLogSettings
from .errors import StoreUnavailable
from .store import RedisStore


class RedisLogSink:
    def __init__(self, store: RedisStore, settings: TokenLogSettings, max_retained: int = 100_000) -> None:
        self._store = store
        self._settings = settings
        self._max_retained = max_retained
        self._retry: list[dict[str, Any]] = []
        self.dropped = 0

    def token_key(self, token_id: int) -> str:
        return f"{self._store.prefix}logs:tok:{token_id}"

    def account_key(self, cid: int) -> str:
        return f"{self._store.prefix}logs:acct:{cid}"

    async def __call__(self, batch: list[dict[str, Any]], lines: list[bytes]) -> None:
        pending = self._retry + [(record, line) for record, line in zip(batch, lines, strict=True)
                                 if record.get("token_id") is not None]
        self._retry = []
        if not pending:
            return
        try:
            await self._write(pending)
        except StoreUnavailable:
            overflow = len(pending) - self._max_retained
            if overflow > 0:
                self.dropped += overflow
                pending = pending[overflow:]
            self._retry = pending

    async def _write(self, records: list[tuple[dict[str, Any], bytes]]) -> None:
        by_key: dict[str, list[bytes]] = {}
        caps: dict[str, int] = {}
        token_keys: dict[int, str] = {}
        account_keys: dict[int, str] = {}
        per_token, per_account = self._settings.per_token, self._settings.per_account
        for record, line in records:
            token_id, cid = int(record["token_id"]), int(record.get("cid") or 0)
            token_key = token_keys.get(token_id) or token_keys.setdefault(token_id, self.token_key(token_id))
            account_key = account_keys.get(cid) or account_keys.setdefault(cid, self.account_key(cid))
            by_key.setdefault(token_key, []).append(line)
            by_key.setdefault(account_key, []).append(line)
            caps[token_key], caps[account_key] = per_token, per_account

        async def run() -> None:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for key, lines in by_key.items():
                    cap = caps[key]
                    pipe.rpush(key, *lines[-cap:]).ltrim(key, -cap, -1)  # older lines would be trimmed
                await pipe.execute()
        await self._store.call(run)
        self._store.touched()

    async def read(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        async def run() -> list[Any]:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.lrange(key, 0, -1)
                return await pipe.execute()  # type: ignore[no-any-return]
        records = [orjson.loads(line) for lines in await self._store.call(run) for line in lines]
        records.sort(key=lambda record: record.get("timestamp", 0))
        return records


def select(records: list[dict[str, Any]], start: float | None, end: float | None, token_id: int | None,
           count: int | None) -> list[dict[str, Any]]:
    """Filter by time (`from` inclusive, `to` inclusive) and token; `count` keeps the newest, newest last."""
    chosen = [record for record in records
              if (start is None or record["timestamp"] >= start) and (end is None or record["timestamp"] <= end)
              and (token_id is None or record.get("token_id") == token_id)]
    return chosen[-count:] if count else chosen
