"""Housekeeping shared by all instances: expired tokens and the recycle bin.

An expired token (neither `expire` nor `ttl` valid) is deleted for good with event 600. The
`{gw}:expiry` sorted set says when each token stops being valid, as far as its record said when
it was last written: using a ttl token does not move it (a write per use cost Redis more than
anything else on a cache miss), so a due token is read first and, if its `accessed` shows it in
use since, moved forward instead of deleted. Whichever instance first removes
a due id from it (ZREM answers 1 to one caller only) deletes the token and logs the event, so it
happens exactly once however many instances sweep. A `grace` delay lets `accessed` writes from
other instances (at most about a second late) arrive before a token is judged. Each sweep also
folds the sorted set older versions kept `accessed` in into today's hash (a rolling upgrade).

While `gateway migrate` copies the store (its `migrating` marker, `store/migrate.py`) nothing is
written here: each step, and each batch of the expiry sweep, reads the marker first and the sweep
stops there. A step under way when the marker is set may still land after the copy read its keys;
what it does is redone by the target's own housekeeping (an expired token is expired there too,
the bin's old entries are as old), so that miss is harmless, unlike an API change's.
"""
from __future__ import annotations

import logging
import time

from gateway.aio import every
from gateway.config import HousekeepingSettings
from gateway.store.tokens import TokenStore, expires_at
from gateway.tokens import is_valid_at
from gateway.writers.logs import LogWriter

log = logging.getLogger("gateway.writers.housekeeping")
EVENT_EXPIRED = 600
BATCH = 500
SWEEP_BATCHES = 20  # at most 10,000 due tokens looked at per sweep


class Housekeeper:
    def __init__(self, store: TokenStore, settings: HousekeepingSettings, logs: LogWriter) -> None:
        self._store = store
        self._settings = settings
        self._logs = logs

    async def run(self) -> None:
        await every(self._settings.sweep_interval, self.sweep, "housekeeping sweep")

    async def sweep(self) -> int:
        now = time.time()
        if await self._paused():
            return 0
        # `accessed` as instances of earlier builds wrote it: into the hash that loads and this sweep read.
        await self._store.fold_legacy_accessed()
        deleted = await self.delete_expired(now)
        if await self._paused():
            return deleted
        await self._store.sweep_orphans()  # a cluster's: index entries a crash left without a record
        if await self._paused():
            return deleted
        await self._store.purge_bin(now - self._settings.recycle_bin_days * 86400)
        return deleted

    async def _paused(self) -> bool:
        """A migration is copying the store: no housekeeping write until it ends."""
        if not await self._store.migrating():
            return False
        log.info("housekeeping paused: the store is being migrated")
        return True

    async def delete_expired(self, now: float) -> int:
        """Delete the tokens due by `now - grace`, up to SWEEP_BATCHES batches; the ones used
        since they were indexed (the index is not moved on use) are moved forward instead."""
        deleted = 0
        for batch in range(SWEEP_BATCHES):
            if batch and await self._paused():
                break
            ids = await self._store.expiry_candidates(now - self._settings.grace, BATCH)
            deleted += await self._sweep_batch(ids, now)
            if len(ids) < BATCH:
                break
        return deleted

    async def _sweep_batch(self, ids: list[int], now: float) -> int:
        deleted = 0
        records = {int(record["id"]): record for record in await self._store.get_many(ids)}
        still_valid: dict[int, int] = {}
        for token_id in ids:
            record = records.get(token_id)
            if record is not None and is_valid_at(int(record.get("expire", 0)), int(record.get("ttl", 0)),
                                                  int(record.get("created", 0)), int(record.get("accessed", 0)),
                                                  now - self._settings.grace):
                still_valid[token_id] = expires_at(record)  # used since: not due yet
        await self._store.set_expiry(still_valid)
        for token_id in ids:
            record = records.get(token_id)
            if token_id in still_valid or not await self._store.claim_expired(token_id) or record is None:
                continue
            await self._store.remove([record], to_bin=False)
            await self._store.publish([record["digest"]], acknowledge=False)  # it expired anyway
            self._logs.emit({"timestamp": now, "event_code": EVENT_EXPIRED, "token_id": token_id,
                             "cid": record.get("cid", 0), "reason": "token expired and has been deleted"})
            deleted += 1
        return deleted
