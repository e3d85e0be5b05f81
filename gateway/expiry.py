"""Housekeeping shared by all instances: expired tokens and the recycle bin.

An expired token (neither `expire` nor `ttl` valid) is deleted for good with event 600. The
`{gw}:expiry` sorted set says when each token stops being valid; whichever instance first removes
a due id from it (ZREM answers 1 to one caller only) deletes the token and logs the event, so it
happens exactly once however many instances sweep. A `grace` delay lets `accessed` writes from
other instances (at most about a second late) arrive before a token is judged.
"""
from __future__ import annotations

import logging
import time

from .aio import every
from .config import HousekeepingSettings
from .logs import LogWriter
from .store import TokenStore, expires_at
from .tokens import is_valid_at

log = logging.getLogger("gateway.expiry")
EVENT_EXPIRED = 600
BATCH = 500


class Housekeeper:
    def __init__(self, store: TokenStore, settings: HousekeepingSettings, logs: LogWriter) -> None:
        self._store = store
        self._settings = settings
        self._logs = logs

    async def run(self) -> None:
        await every(self._settings.sweep_interval, self.sweep, "housekeeping sweep")

    async def sweep(self) -> int:
        now = time.time()
        deleted = await self.delete_expired(now)
        await self._store.purge_bin(now - self._settings.recycle_bin_days * 86400)
        return deleted

    async def delete_expired(self, now: float) -> int:
        deleted = 0
        ids = await self._store.expiry_candidates(now - self._settings.grace, BATCH)
        records = {int(record["id"]): record for record in await self._store.get_many(ids)}
        for token_id in ids:
            record = records.get(token_id)
            if record is not None and is_valid_at(int(record.get("expire", 0)), int(record.get("ttl", 0)),
                                                  int(record.get("created", 0)), int(record.get("accessed", 0)),
                                                  now - self._settings.grace):
                await self._store.set_expiry(token_id, expires_at(record))  # used since: not due yet
                continue
            if not await self._store.claim_expired(token_id) or record is None:
                continue
            await self._store.remove([record], to_bin=False)
            await self._store.publish([record["digest"]])
            self._logs.emit({"timestamp": now, "event_code": EVENT_EXPIRED, "token_id": token_id,
                             "cid": record.get("cid", 0), "reason": "token expired and has been deleted"})
            deleted += 1
        return deleted
