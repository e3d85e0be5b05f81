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


PUSH_CHUNK = 512  # lines per RPUSH
PIPELINE_LINES = 2048  # lines per pipeline (one round trip)
PIPELINE_COMMANDS = 256  # commands per pipeline


class RedisLogSink:
    """Lines are grouped by list as they come (`add`) and written with one pipeline per batch
    (`flush`). Only the newest `cap` lines of each list are kept, so what is held while Redis is
    away is bounded by the caps, and by `max_retained` lines in all."""

    def __init__(self, store: RedisStore, settings: TokenLogSettings, max_retained: int = 100_000) -> None:
        self._store = store
        self._settings = settings
        self._max_retained = max_retained
        self._pending: dict[str, list[bytes]] = {}
        self._caps: dict[str, int] = {}
        self._held = 0
        self.dropped = 0

    def token_key(self, token_id: int) -> str:
        return f"{self._store.prefix}logs:tok:{token_id}"

    def account_key(self, cid: int) -> str:
        return f"{self._store.prefix}logs:acct:{cid}"

    def add(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        pending, caps = self._pending, self._caps
        per_token, per_account = self._settings.per_token, self._settings.per_account
        for record, line in zip(records, lines, strict=True):
            token_id = record.get("token_id")
            if token_id is None:
                continue
            if self._held >= self._max_retained:
                self.dropped += 1
                continue
            for key, cap in ((self.token_key(int(token_id)), per_token),
                             (self.account_key(int(record.get("cid") or 0)), per_account)):
                held = pending.get(key)
                if held is None:
                    held = pending[key] = []
                    caps[key] = cap
                held.append(line)
                self._held += 1
                if len(held) >= 2 * cap:  # the older half would be trimmed in Redis anyway
                    del held[:-cap]
                    self._held -= cap

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, caps = self._pending, self._caps
        # Several small pipelines rather than one with tens of thousands of arguments or thousands
        # of commands: packing those held the event loop for ~10 ms; requests are served between
        # these round trips.
        steps: list[list[tuple[str, list[bytes], bool]]] = [[]]
        size = 0
        for key, lines in pending.items():
            kept = lines[-caps[key]:]
            for start in range(0, len(kept), PUSH_CHUNK):
                if size >= PIPELINE_LINES or len(steps[-1]) >= PIPELINE_COMMANDS:
                    steps.append([])
                    size = 0
                chunk = kept[start:start + PUSH_CHUNK]
                steps[-1].append((key, chunk, start + PUSH_CHUNK >= len(kept)))
                size += len(chunk)

        async def push(step: list[tuple[str, list[bytes], bool]]) -> list[int]:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for key, chunk, _ in step:
                    pipe.rpush(key, *chunk)
                return await pipe.execute()

        async def trim(keys: list[str]) -> None:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.ltrim(key, -caps[key], -1)
                await pipe.execute()

        # RPUSH answers the list's length, so only lists past their cap get an LTRIM (a second
        # round trip): a token used a few times a second costs one command, not two.
        over: list[str] = []
        try:
            for step in steps:
                lengths = await self._store.call(lambda step=step: push(step))  # type: ignore[misc]
                for (key, _, last), length in zip(step, lengths, strict=True):
                    if last:
                        if int(length) > caps[key]:
                            over.append(key)
                        self._held -= len(pending.pop(key))  # written in full: not again next batch
            for start in range(0, len(over), PIPELINE_COMMANDS):
                await self._store.call(lambda keys=over[start:start + PIPELINE_COMMANDS]: trim(keys))  # type: ignore[misc]
        except StoreUnavailable:
            # The rest is kept for the next batch (a list cut between two steps may get some lines
            # twice; a list not yet trimmed is trimmed by its next write).
            return
        self._pending, self._caps, self._held = {}, {}, 0
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
