"""Recent log records kept in Redis per token and per account, for the logs API.

`logs:tok:<id>` and `logs:acct:<cid>` (`store/keys.py`) are lists of JSON records, oldest first, trimmed
to the configured caps; a Lua script (`LOG_PUSH`, in `store/scripts.py`) appends to up to 64 lists in one call. The
sink receives batches from the one LogWriter; a batch that cannot be written (Redis away) is kept
and retried with the next one, up to `max_retained` records.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from gateway.config import TokenLogSettings
from gateway.errors import StoreUnavailable
from gateway.store.scripts import LOG_PUSH
from gateway.store.slots import key_slot
from gateway.store.tokens import RedisStore, ScriptsFailed

PUSH_CHUNK = 512  # lines per list and LOG_PUSH call
# Per LOG_PUSH call (one round trip), for ~0.5 ms of Redis time at most: token loads queue behind it.
CALL_LINES = 1024
CALL_KEYS = 64


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
        self._push = store.script(LOG_PUSH)

    def token_key(self, token_id: int, cid: int) -> str:
        """The list of the token's lines that carry account `cid` (on a cluster it lives in the
        account's slot; elsewhere a token has one list whatever its lines' account)."""
        return self._store.keys.token_logs_of(token_id, cid)

    def account_key(self, cid: int) -> str:
        return self._store.keys.account_logs(cid)

    def add(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        pending, caps = self._pending, self._caps
        per_token, per_account = self._settings.per_token, self._settings.per_account
        # A slice is mostly a few busy tokens: their two lists are named once per slice.
        named: dict[tuple[Any, Any], tuple[tuple[str, int], tuple[str, int]]] = {}
        for record, line in zip(records, lines, strict=True):
            token_id = record.get("token_id")
            if token_id is None:
                continue
            if self._held >= self._max_retained:
                self.dropped += 1
                continue
            cid = record.get("cid")
            lists = named.get((token_id, cid))
            if lists is None:
                lists = named[(token_id, cid)] = ((self.token_key(int(token_id), int(cid or 0)), per_token),
                                                   (self.account_key(int(cid or 0)), per_account))
            for key, cap in lists:
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
        # Several script calls rather than one with tens of thousands of arguments: packing those
        # held the event loop for ~10 ms; requests are served between these round trips.
        steps: list[list[tuple[str, list[bytes], bool]]] = [[]]
        step = steps[0]
        size = 0
        cluster = self._store.cluster
        # On a cluster each call's lists must share a slot: an account's lists (its own, its
        # tokens') do, so the lists go account by account, and a call never spans two.
        # (A slot is computed once per list: with a new token per request, a flush names thousands.)
        slot_of = {key: key_slot(key) for key in pending} if cluster else {}
        keys = sorted(pending, key=slot_of.__getitem__) if cluster else list(pending)
        slot = -1
        for key in keys:
            lines = pending[key]
            if cluster and slot_of[key] != slot:
                slot = slot_of[key]
                if step:
                    step = []
                    steps.append(step)
                    size = 0
            # Copied only when cut: most lists (one line a token, under cache-miss traffic) go as they are.
            kept = lines if len(lines) <= caps[key] else lines[-caps[key]:]
            for start in range(0, len(kept), PUSH_CHUNK):
                if size >= CALL_LINES or len(step) >= CALL_KEYS:
                    step = []
                    steps.append(step)
                    size = 0
                chunk = kept if len(kept) <= PUSH_CHUNK else kept[start:start + PUSH_CHUNK]
                step.append((key, chunk, start + PUSH_CHUNK >= len(kept)))
                size += len(chunk)
        calls: list[tuple[list[str], list[Any]]] = []
        for step in steps:
            args: list[Any] = []
            for key, chunk, _ in step:
                args.append(caps[key])
                args.append(len(chunk))
                args.extend(chunk)
            calls.append(([key for key, _, _ in step], args))
        if cluster:
            # Every call in one pipeline: a round trip per node, not per account.
            try:
                await self._store.scripts(LOG_PUSH, calls)
            except ScriptsFailed as failed:
                for index in failed.done:
                    for key, _, last in steps[index]:
                        if last and key in pending:
                            self._held -= len(pending.pop(key))
                return
            except StoreUnavailable:
                return
            self._pending, self._caps, self._held = {}, {}, 0
            return
        try:
            for step, (keys_of_call, args) in zip(steps, calls, strict=True):
                await self._push(keys_of_call, args)
                for key, _, last in step:
                    if last:
                        self._held -= len(pending.pop(key))  # written in full: not again next batch
        except StoreUnavailable:
            # The rest is kept for the next batch (a list cut between two calls may get some lines
            # twice).
            return
        self._pending, self._caps, self._held = {}, {}, 0

    async def read(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        async def run() -> list[Any]:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.lrange(key, 0, -1)
                return await pipe.execute()
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
