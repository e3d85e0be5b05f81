"""The in-process token cache: hot tokens are checked with no Redis round trip.

An entry is trusted for `max_age` seconds at most. Changes made through any instance arrive by
pub/sub and drop the entry at once; hot entries are refreshed in the background after
`refresh_after`, so a busy token never waits for Redis. If the subscription was lost, every entry
loaded before the loss is revalidated on its next use (messages may have been missed meanwhile),
and while the store is unreachable entries inside `max_age` keep serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .aio import cancel_all
from .config import CacheSettings
from .errors import StoreUnavailable
from .store import TokenStore
from .tokens import Token

log = logging.getLogger("gateway.cache")
Compiler = Callable[[dict[str, Any]], Awaitable[Token]]


class Entry:
    __slots__ = ("token", "loaded", "epoch", "refreshing")

    def __init__(self, token: Token | None, loaded: float, epoch: int) -> None:
        self.token = token
        self.loaded = loaded
        self.epoch = epoch
        self.refreshing = False


class TokenCache:
    def __init__(self, store: TokenStore, settings: CacheSettings, compile_token: Compiler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._settings = settings
        self._compile = compile_token
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._inflight: dict[str, asyncio.Future[Token | None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Entries with an older epoch were loaded before a pub/sub gap and must be revalidated.
        self._epoch = 0
        self.subscribed = asyncio.Event()
        # Other messages on the channel (e.g. "accounts") and who wants them; also told after a gap.
        self.listeners: dict[str, Callable[[], None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, digest: str) -> Token | None:
        """The token for a key digest, or None if no such token; raises StoreUnavailable."""
        entry = self._entries.get(digest)
        if entry is None:
            return await self._load(digest)
        age = self._clock() - entry.loaded
        if entry.epoch == self._epoch:
            if entry.token is None:
                if age < self._settings.negative_ttl:
                    return None
            elif age < self._settings.refresh_interval:
                return entry.token
            elif age < self._settings.max_age:
                self._refresh_in_background(digest, entry)
                return entry.token
        try:
            return await self._load(digest)
        except StoreUnavailable:
            if entry.token is not None and age < self._settings.max_age:
                return entry.token
            raise

    def peek(self, digest: str) -> tuple[bool, Token | None]:
        """`(True, token or None)` when the cache can answer without Redis, else `(False, None)`.

        The synchronous twin of `lookup` for the hot path: it answers exactly when `lookup` would
        answer from the entry (starting the same background refresh), and declines otherwise.
        """
        entry = self._entries.get(digest)
        if entry is None or entry.epoch != self._epoch:
            return False, None
        age = self._clock() - entry.loaded
        if entry.token is None:
            return (True, None) if age < self._settings.negative_ttl else (False, None)
        if age < self._settings.refresh_interval:
            return True, entry.token
        if age < self._settings.max_age:
            self._refresh_in_background(digest, entry)
            return True, entry.token
        return False, None

    async def revalidate(self, digest: str) -> Token | None:
        """Reload a record that looks expired: another instance may have used it since."""
        entry = self._entries.get(digest)
        if entry is not None and self._clock() - entry.loaded < self._settings.revalidate_after:
            return entry.token
        return await self._load(digest)

    def invalidate(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def mark_all_stale(self) -> None:
        self._epoch += 1
        for listener in self.listeners.values():
            listener()

    async def _load(self, digest: str) -> Token | None:
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Token | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            token = await self._fetch(digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # the waiters (if any) re-raise it; don't warn when there are none
            raise
        else:
            future.set_result(token)
            return token
        finally:
            del self._inflight[digest]

    async def _fetch(self, digest: str) -> Token | None:
        epoch, started = self._epoch, self._clock()
        record = await self._store.load(digest)
        token = await self._compile(record) if record is not None else None
        self._remember(digest, Entry(token, started, epoch))
        return token

    def _remember(self, digest: str, entry: Entry) -> None:
        previous = self._entries.pop(digest, None)
        if previous is not None and previous.token is not None and entry.token is not None:
            # Keep the newest local use: it may not have reached the store yet.
            entry.token.accessed = max(entry.token.accessed, previous.token.accessed)
            entry.token.accessed_queued = max(entry.token.accessed_queued, previous.token.accessed_queued)
        self._entries[digest] = entry
        while len(self._entries) > self._settings.max_entries:
            del self._entries[next(iter(self._entries))]

    def _refresh_in_background(self, digest: str, entry: Entry) -> None:
        if entry.refreshing or digest in self._inflight:
            return
        entry.refreshing = True
        task = asyncio.ensure_future(self._quiet_refresh(digest, entry))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quiet_refresh(self, digest: str, entry: Entry) -> None:
        try:
            await self._load(digest)
        except StoreUnavailable:
            entry.refreshing = False
        except Exception:
            entry.refreshing = False
            log.exception("background refresh of a cached token failed")

    async def run_subscriber(self, retry_delay: float = 0.5) -> None:
        """Follow the invalidation channel for the life of the app, reconnecting after failures."""
        connected_before = False
        while True:
            try:
                async with self._store.subscription() as pubsub:
                    if connected_before:
                        self.mark_all_stale()
                    connected_before = True
                    self.subscribed.set()
                    await self._follow(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.subscribed.is_set():
                    log.warning("token invalidation channel lost (%s); retrying", type(exc).__name__)
                self.subscribed.clear()
                self.mark_all_stale()
                await asyncio.sleep(retry_delay)

    async def _follow(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                listener = self.listeners.get(text)
                if listener is not None:
                    listener()
                else:
                    self.invalidate(text)

    async def close(self) -> None:
        await cancel_all(list(self._background))
