"""Batched `accessed` updates: a request only notes the use; one writer flushes many at once."""
from __future__ import annotations

import asyncio
import logging

from gateway.errors import StoreUnavailable
from gateway.store.tokens import TokenStore
from gateway.tokens import Token

log = logging.getLogger("gateway.writers.accessed")


class AccessedWriter:
    """`accessed` has one-second resolution, so a token causes at most one write per second.

    Only `accessed` is written: the expiry index is not moved on use. It may say a ttl token is
    due earlier than it is, never later; the housekeeper reads `accessed` before it deletes
    anything and moves a token still in use forward then (expiry.py). Moving it here cost Redis
    more than anything else a first use does (~17 µs a token in a million-member index)."""

    def __init__(self, store: TokenStore, interval: float, max_pending: int = 1_000_000) -> None:
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._pending: dict[str, int] = {}
        self.dropped = 0
        self.writes = 0

    def note(self, token: Token, now: int) -> None:
        if now > token.accessed:
            token.accessed = now
        if now <= token.accessed_queued:
            return
        if len(self._pending) >= self._max_pending and token.digest not in self._pending:
            self.dropped += 1
            return
        token.accessed_queued = now
        self._pending[token.digest] = now

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._store.touch(batch)
            self.writes += 1
        except StoreUnavailable:
            # Keep the uses for the next flush; newer values noted meanwhile win.
            pending = self._pending
            for name, when in batch.items():
                if when > pending.get(name, 0):
                    pending[name] = when
        except Exception:
            log.exception("accessed flush failed")
