"""Whether the token store answers, and whether invalidation is live: readiness, outage log lines,
and the store's and the channel's metrics, decided in one place.

A probe every `interval` publishes one message on the invalidation channel (`PUBLISH` answers, so
the store answers), named for this process only: when its own subscriber hears it back, the time
it took is the invalidation lag. Cached tokens make no Redis round trip, so without the probe an
outage would go unnoticed by the gateway until a request missed the cache.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from gateway.counters import BATCH_BOUNDS, Buckets
from gateway.errors import StoreUnavailable
from gateway.store.cache import TokenCache
from gateway.store.tokens import TokenStore

log = logging.getLogger("gateway.store")
STORE_UNREACHABLE = "token storage unavailable"
INVALIDATION_DOWN = "token invalidation channel not subscribed"
PROBE_INTERVAL = 1.0


class StoreMonitor:
    def __init__(self, store: TokenStore, cache: TokenCache, timeout: float, interval: float = PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._cache = cache
        self._timeout = timeout
        self._interval = interval
        self._clock = clock
        self.available = True  # until a probe says otherwise: the start itself needed the store
        self.down_since: float | None = None
        self.outages = 0
        self.probe_latency = Buckets(BATCH_BOUNDS)
        # The heartbeat: published under this process's own name, timed when heard back.
        self._topic = f"heartbeat:{os.getpid()}:{id(self):x}"
        self._sent_at: float | None = None
        self.lag: float | None = None
        cache.listeners[self._topic] = self._heard

    # -- what readiness and the metrics read ---------------------------------------------------------

    def invalidation_live(self) -> bool:
        """The cache's own word on its subscription (the one place it is read)."""
        return self._cache.invalidation_live

    def not_ready(self) -> str | None:
        """Why the gateway should get no traffic now, or None when it should."""
        if not self.available:
            return STORE_UNREACHABLE
        if not self.invalidation_live():
            return INVALIDATION_DOWN
        return None

    def invalidation_lag(self) -> float | None:
        """The last heartbeat's round trip, or how long the one in flight has been waiting if longer."""
        if self._sent_at is not None:
            waiting = self._clock() - self._sent_at
            if self.lag is None or waiting > self.lag:
                return waiting
        return self.lag

    # -- probing ------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)

    async def probe(self) -> bool:
        """Ask the store once (bounded by `timeout`); log and count a change of state."""
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                await self._store.heartbeat(self._topic)
        except (StoreUnavailable, TimeoutError) as exc:
            self._down(exc)
            return False
        self.probe_latency.observe(self._clock() - started)
        if self._sent_at is None:
            self._sent_at = started
        self._up()
        return True

    def _heard(self) -> None:
        # The cache also tells every listener of a gap in the subscription (it is not subscribed
        # then): that is no heartbeat heard.
        if self._sent_at is not None and self.invalidation_live():
            self.lag = self._clock() - self._sent_at
            self._sent_at = None

    def _down(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self.down_since = self._clock()
        self.outages += 1
        cause = exc.__cause__ or exc
        log.warning("token store unreachable (%s): requests whose token is not cached get 503 until it is back",
                    type(cause).__name__)

    def _up(self) -> None:
        if self.available:
            return
        away = self._clock() - (self.down_since or self._clock())
        self.available = True
        self.down_since = None
        log.warning("token store reachable again after %.1f s", away)
