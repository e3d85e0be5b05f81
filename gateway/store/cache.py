"""The in-process token cache: hot tokens are checked with no Redis round trip.

An entry is trusted for `max_age` seconds at most. Changes made through any instance arrive by
pub/sub and drop the entry at once; hot entries are refreshed in the background after
`refresh_after`, so a busy token never waits for Redis. The cache knows whether invalidation is
live (`invalidation_live`): the subscription is confirmed and answers a PING every
`invalidation_ping` seconds within `invalidation_deadline`. redis-py re-subscribes by itself after a
lost connection, so every confirmation after the first is a gap: messages may have been missed.
On any gap every entry loaded before it is re-read on its next use, and while invalidation is not
known live no entry is trusted without a re-read; only while the store cannot answer do entries
inside `max_age` keep serving.

Misses are loaded in batches: every key asked for during one event-loop iteration (misses,
background refreshes, revalidations) is read with one round trip (`TokenStore.load_many`), and a
key already being loaded is never asked for twice. While MAX_IN_FLIGHT batches are out, keys
missed meanwhile wait for one of them to come back (MAX_HOLD at most) and go out together: under
load a batch grows instead of every loop iteration sending a few keys, and what a batch costs
(a write and a read per Redis server, a cluster's masters each) is shared by more keys.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from itertools import islice
from typing import Any, Protocol

from gateway.aio import cancel_all
from gateway.config import CacheSettings
from gateway.errors import StoreUnavailable
from gateway.store.subscriber import follow_channel
from gateway.store.tokens import TokenStore
from gateway.tokens import Token

log = logging.getLogger("gateway.store.cache")
# Keys read by one MGET at most; more misses in the same loop iteration make several batches.
MAX_BATCH = 256
# Batches of misses out at once before the next keys wait for one to return, and how long they
# may wait at most (a master that does not answer must not hold the others' loads for long).
MAX_IN_FLIGHT = 2
MAX_HOLD = 0.002
# The epoch of entries loaded while invalidation was not known live: never the current one, so
# such an entry is re-read on every use until one is loaded while it is live.
UNTRUSTED = -1
PING_PREFIX = b"gw-live:"
# A subscription that answers no PING for this many deadlines is dropped and made again: a
# connection whose peer vanished without a reset may never answer.
RESUBSCRIBE_AFTER = 4


class Compiler(Protocol):
    async def compile_many(self, records: Sequence[dict[str, Any]]) -> list[Token | Exception]: ...

    def compile_each(self, records: Sequence[dict[str, Any]]) -> tuple[list[Token | Exception], list[int]]: ...

    async def add_group_members(self, compiled: list[Token | Exception], grouped: list[int]) -> None: ...


class Unknown:
    """A key with no token, remembered as such for `negative_ttl`. (A `Token` is its own entry.)"""

    __slots__ = ("loaded", "epoch")

    def __init__(self, loaded: float, epoch: int) -> None:
        self.loaded = loaded
        self.epoch = epoch


Outcome = Token | None | BaseException
# What waits for a key being loaded: the future of a coroutine (`lookup`), or a plain callback
# (`load_then`, the fast path's: no task per cache miss).
Waiter = asyncio.Future[Token | None] | Callable[[Outcome], None]


class TokenCache:
    def __init__(self, store: TokenStore, settings: CacheSettings, compiler: Compiler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._settings = settings
        # Read on every lookup: plain floats here, not properties of the settings object.
        self._refresh_after = settings.refresh_interval
        self._max_age = settings.max_age
        self._negative_ttl = settings.negative_ttl
        self._compiler = compiler
        self._clock = clock
        self._entries: dict[str, Token | Unknown] = {}
        # Keys being loaded, each with the futures of the requests waiting for it (none for a
        # background refresh); `_queued` ones go out with the next batch.
        self._waiters: dict[str, list[Waiter]] = {}
        self._queued: list[str] = []
        self._in_flight = 0  # batches sent and not yet answered
        self._hold: asyncio.TimerHandle | None = None  # `_queued` waits for a batch to return
        # Keys invalidated while being loaded: what the load read may predate the change.
        self._dropped: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        # Entries with an older epoch were loaded before a pub/sub gap and must be revalidated.
        self._epoch = 0
        # Invalidation is live: subscribed, confirmed, and the last PING answered in time. Set
        # only by the subscriber (`_set_live`); `subscribed` is the same fact for awaiting it.
        self._live = False
        self.subscribed = asyncio.Event()
        # On a cluster two subscriptions, on two masters (`TokenStore.subscriptions`): each live
        # one with the moment it became live, and each one's last PING answered (when it was
        # sent: everything published before that moment has arrived on it). Real time.
        self._live_since: dict[int, float] = {}
        self._heard: dict[int, float] = {}
        self.invalidation_gaps = 0  # times invalidation stopped being known live
        self._ping_interval = settings.invalidation_ping
        self._ping_deadline = settings.invalidation_deadline
        # Other messages on the channel (e.g. "accounts") and who wants them; also told after a gap.
        self.listeners: dict[str, Callable[[], None]] = {}
        # Told of every dropped entry (live MQTT sessions follow their token through it).
        self.on_invalidate: Callable[[str], None] | None = None
        self.batches = 0  # store round trips made for misses, refreshes and revalidations
        # For the metrics: lookups answered from an entry, and lookups that waited for a load.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, settings: CacheSettings, compiler: Compiler | None) -> None:
        """A reload's bounds, from the next lookup on; with a new `compiler` (origin presets or ACL
        patterns changed) every entry is compiled again on its next use, as after a pub/sub gap:
        reloaded then, or served as it was while the store cannot answer."""
        self._settings = settings
        self._refresh_after = settings.refresh_interval
        self._max_age = settings.max_age
        self._negative_ttl = settings.negative_ttl
        if compiler is not None:
            self._compiler = compiler
            self._epoch += 1
        if len(self._entries) > settings.max_entries:
            self._evict()

    async def lookup(self, digest: str) -> Token | None:
        """The token for a key digest, or None if no such token; raises StoreUnavailable."""
        entry = self._entries.get(digest)
        if entry is None:
            return await self._load(digest)
        age = self._clock() - entry.loaded
        token = entry if isinstance(entry, Token) else None
        if entry.epoch == self._epoch:
            if token is None:
                if age < self._negative_ttl:
                    self.hits += 1
                    return None
            elif age < self._refresh_after:
                self.hits += 1
                return token
            elif age < self._max_age:
                self.hits += 1
                self._refresh_in_background(digest, token)
                return token
        try:
            return await self._load(digest)
        except StoreUnavailable:
            if token is not None and age < self._max_age:
                return token
            raise

    def peek(self, digest: str, counted: bool = True) -> tuple[bool, Token | None]:
        """`(True, token or None)` when the cache can answer without Redis, else `(False, None)`.

        The synchronous twin of `lookup` for the hot path: it answers exactly when `lookup` would
        answer from the entry (starting the same background refresh), and declines otherwise.
        `counted`: False for a request that already waited for the load (its miss was counted).
        """
        entry = self._entries.get(digest)
        if entry is None or entry.epoch != self._epoch:
            return False, None
        age = self._clock() - entry.loaded
        if not isinstance(entry, Token):
            if age < self._negative_ttl:
                if counted:
                    self.hits += 1
                return True, None
            return False, None
        if age < self._refresh_after:
            if counted:
                self.hits += 1
            return True, entry
        if age < self._max_age:
            if counted:
                self.hits += 1
            self._refresh_in_background(digest, entry)
            return True, entry
        return False, None

    async def revalidate(self, digest: str) -> Token | None:
        """Reload a record that looks expired: another instance may have used it since."""
        entry = self._entries.get(digest)
        if entry is not None and self._clock() - entry.loaded < self._settings.revalidate_after:
            return entry if isinstance(entry, Token) else None
        return await self._load(digest)

    def invalidate(self, digest: str) -> None:
        self._entries.pop(digest, None)
        if digest in self._waiters:
            self._dropped.add(digest)
        if self.on_invalidate is not None:
            self.on_invalidate(digest)

    def mark_all_stale(self) -> None:
        self._epoch += 1
        for listener in self.listeners.values():
            listener()

    @property
    def invalidation_live(self) -> bool:
        """Whether a change made through any instance is known to reach this one at once: the
        one place that says so (health and readiness read it)."""
        return self._live

    def _set_live(self, live: bool) -> None:
        if live == self._live:
            return
        self._live = live
        if live:
            self.subscribed.set()
            return
        self.subscribed.clear()
        self.invalidation_gaps += 1
        self.mark_all_stale()  # what was loaded may have changed unannounced

    def _gap(self) -> None:
        """Messages may have been lost, but the subscription stands again (redis-py re-subscribed)."""
        self.invalidation_gaps += 1
        self.mark_all_stale()

    def _subscription_up(self, number: int) -> None:
        """Subscription `number` is confirmed and answers its PINGs in time."""
        if number not in self._live_since:
            now = time.monotonic()
            self._live_since[number] = now
            self._heard[number] = now
        self._set_live(True)

    @property
    def subscriptions(self) -> int:
        """How many subscriptions to hold on the channel (`TokenStore.subscriptions`)."""
        return self._store.subscriptions

    def subscription(self, number: int) -> AbstractAsyncContextManager[Any]:
        """Subscription `number`'s pub/sub, for `follow` (`TokenStore.subscription`)."""
        return self._store.subscription(number)

    def subscription_live(self, number: int) -> bool:
        """Whether subscription `number` is confirmed and answering in time."""
        return number in self._live_since

    def subscription_down(self, number: int) -> None:
        """Subscription `number` is lost, late, or was made again (what came meanwhile may be
        lost on it). No gap if another one has been live since before the last moment this one
        was known to hear everything: every message reached that one. Else a gap; and with no
        subscription live, invalidation is not live."""
        if number not in self._live_since:
            return
        del self._live_since[number]
        heard = self._heard.get(number, 0.0)
        covered = False
        for since in self._live_since.values():
            if since <= heard:
                covered = True
        if not self._live_since:
            self._set_live(False)  # a gap, as ever with one subscription
        elif not covered:
            self._gap()

    def _answered(self, number: int, sent: float) -> None:
        """Subscription `number` answered a PING sent at `sent`: it has heard all before it."""
        if number in self._live_since and sent > self._heard.get(number, 0.0):
            self._heard[number] = sent

    # -- loading: concurrent misses share one round trip -------------------------------------

    def _load(self, digest: str) -> asyncio.Future[Token | None]:
        """A future for the key's token; a key not already being loaded joins the next batch."""
        waiter: asyncio.Future[Token | None] = asyncio.get_running_loop().create_future()
        self._wait(digest, waiter)
        return waiter

    def load_then(self, digest: str, callback: Callable[[Outcome], None]) -> bool:
        """For a key with no entry at all: join (or start) its load, and `callback(outcome)` when
        the batch settles: the token, None for no such token, or the exception. It is called from
        the batch's own task, so a request waits with no task and no future of its own.

        False, and nothing done, when there is an entry: `lookup` knows what a stale one means.
        """
        if digest in self._entries:
            return False
        self._wait(digest, callback)
        return True

    def _wait(self, digest: str, waiter: Waiter) -> None:
        """The waiter joins the key's load in progress, or the key joins the next batch."""
        self.misses += 1
        waiters = self._waiters.get(digest)
        if waiters is None:
            self._waiters[digest] = [waiter]
            self._enqueue(digest)
        else:
            waiters.append(waiter)

    def _enqueue(self, digest: str) -> None:
        self._queued.append(digest)
        if len(self._queued) == 1:
            if self._in_flight < MAX_IN_FLIGHT:
                self._spawn(self._fetch_queued())
            else:
                self._hold = asyncio.get_running_loop().call_later(MAX_HOLD, self._release)

    def _release(self) -> None:
        """The held keys go out (a batch came back, or they waited MAX_HOLD)."""
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.cancel()
            self._spawn(self._fetch_queued())

    def _returned(self) -> None:
        """A batch was answered (or failed): the held keys may go."""
        self._in_flight -= 1
        if self._hold is not None:
            self._release()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_queued(self) -> None:
        """Started by the first key queued, it runs at the next loop iteration: by then every
        request that missed during this one has queued its key. A batch is answered straight from
        the Redis reply when the store can (`load_many_then`), else by a task of its own."""
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_BATCH):
            digests = queued[start:start + MAX_BATCH]
            epoch, started = (self._epoch if self._live else UNTRUSTED), self._clock()
            self.batches += 1
            self._in_flight += 1
            try:
                sent = self._store.load_many_then(
                    digests, lambda loaded, digests=digests, epoch=epoch, started=started:  # type: ignore[misc]
                    self._loaded_batch(digests, loaded, epoch, started))
            except Exception as exc:  # the connection broke as the batch was written
                self._returned()
                self._fail_batch(digests, exc)
                continue
            if not sent:
                self._spawn(self._fetch(digests, epoch, started))

    async def _fetch(self, digests: list[str], epoch: int, started: float) -> None:
        """One round trip for the batch, then every record compiled, remembered and handed out."""
        try:
            try:
                outcomes = await self._store.load_each(digests)
            finally:
                self._returned()
            records: list[dict[str, Any] | None] = []
            kept: list[str] = []
            for digest, outcome in zip(digests, outcomes, strict=True):
                if isinstance(outcome, StoreUnavailable):  # a cluster node that did not answer: the
                    self._fail_batch([digest], outcome)     # others' tokens are still served
                else:
                    records.append(outcome)
                    kept.append(digest)
            digests = kept
            compiled = await self._compiler.compile_many([record for record in records if record is not None])
            self._hand_out(digests, records, compiled, epoch, started)
        except BaseException as exc:
            self._fail_batch(digests, exc)
            if not isinstance(exc, Exception):
                raise

    def _loaded_batch(self, digests: list[str], loaded: list[dict[str, Any] | StoreUnavailable | None] | Exception,
                      epoch: int, started: float) -> None:
        """The batch's records as the Redis reply brought them (called from the connection). A
        cluster node that could not answer is a `StoreUnavailable` in its tokens' places. Whatever
        goes wrong here fails the batch's waiters: none is left waiting for an answer that will
        not come."""
        try:
            self._returned()
            self._settle_loaded(digests, loaded, epoch, started)
        except Exception as exc:
            self._fail_batch(digests, exc)

    def _settle_loaded(self, digests: list[str], loaded: list[dict[str, Any] | StoreUnavailable | None] | Exception,
                       epoch: int, started: float) -> None:
        if isinstance(loaded, Exception):
            self._fail_batch(digests, loaded)
            return
        # A cluster node that could not answer: its tokens fail, the others' are served.
        kept: list[str] = []
        records: list[dict[str, Any] | None] = []
        for digest, outcome in zip(digests, loaded, strict=True):
            if isinstance(outcome, StoreUnavailable):
                self._fail_batch([digest], outcome)
            else:
                kept.append(digest)
                records.append(outcome)
        digests, loaded_records = kept, records
        try:
            compiled, grouped = self._compiler.compile_each([record for record in loaded_records if record is not None])
            if grouped:  # ACL tokens whose group members must be read first: in a task
                self._spawn(self._with_groups(digests, loaded_records, compiled, grouped, epoch, started))
                return
            self._hand_out(digests, loaded_records, compiled, epoch, started)
        except Exception as exc:
            self._fail_batch(digests, exc)

    async def _with_groups(self, digests: list[str], records: list[dict[str, Any] | None],
                           compiled: list[Token | Exception], grouped: list[int], epoch: int, started: float) -> None:
        try:
            await self._compiler.add_group_members(compiled, grouped)
            self._hand_out(digests, records, compiled, epoch, started)
        except BaseException as exc:
            self._fail_batch(digests, exc)
            if not isinstance(exc, Exception):
                raise

    def _hand_out(self, digests: list[str], records: list[dict[str, Any] | None], compiled: list[Token | Exception],
                  epoch: int, started: float) -> None:
        """Every record of the batch remembered (unless dropped meanwhile) and told to its waiters."""
        tokens = iter(compiled)
        for digest, record in zip(digests, records, strict=True):
            outcome: Token | Exception | None = next(tokens) if record is not None else None
            if not isinstance(outcome, Exception) and digest not in self._dropped:
                self._remember(digest, Unknown(started, epoch) if outcome is None else outcome, started, epoch)
            self._settle(digest, outcome)

    def _fail_batch(self, digests: list[str], exc: BaseException) -> None:
        for digest in digests:
            if digest in self._waiters:  # not settled yet
                self._settle(digest, exc)

    def _settle(self, digest: str, outcome: Outcome) -> None:
        self._dropped.discard(digest)
        waiters = self._waiters.pop(digest, ())
        if not isinstance(outcome, BaseException):
            for waiter in waiters:
                if not isinstance(waiter, asyncio.Future):
                    _tell(waiter, outcome)
                elif not waiter.done():  # done: its request was cancelled
                    waiter.set_result(outcome)
            return
        entry = self._entries.get(digest)
        if isinstance(entry, Token):
            entry.refreshing = False  # a later use may try again
        told = False
        for waiter in waiters:
            if not isinstance(waiter, asyncio.Future):
                _tell(waiter, outcome)  # it answers its request; the error is logged here, once
            elif waiter.done():
                continue
            elif isinstance(outcome, asyncio.CancelledError):
                waiter.cancel()
            else:
                waiter.set_exception(outcome)
                told = True
        if not told and isinstance(outcome, Exception) and not isinstance(outcome, StoreUnavailable):
            log.error("loading a token record failed", exc_info=outcome)

    def _remember(self, digest: str, entry: Token | Unknown, loaded: float, epoch: int) -> None:
        entry.loaded, entry.epoch = loaded, epoch
        previous = self._entries.pop(digest, None)
        if isinstance(previous, Token) and isinstance(entry, Token):
            # Keep the newest local use: it may not have reached the store yet.
            entry.accessed = max(entry.accessed, previous.accessed)
            entry.accessed_queued = max(entry.accessed_queued, previous.accessed_queued)
        self._entries[digest] = entry
        if len(self._entries) > self._settings.max_entries:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest entries, a slice at a time: deleting them one by one from the front of
        the dict would rescan the holes earlier deletions left there, every time."""
        limit = self._settings.max_entries
        for digest in list(islice(self._entries, len(self._entries) - limit + limit // 64)):
            del self._entries[digest]

    def _refresh_in_background(self, digest: str, token: Token) -> None:
        if token.refreshing or digest in self._waiters:
            return
        token.refreshing = True
        self._waiters[digest] = []
        self._enqueue(digest)

    async def run_subscriber(self, retry_delay: float = 0.5) -> None:
        """Follow the invalidation channel for the life of the app, reconnecting after failures:
        at once after a subscription that was live, then every `retry_delay`. On a cluster on two
        masters at once (`TokenStore.subscriptions`): every message reaches both, so a master
        that dies (the channel's own) leaves this instance hearing every change. The loop is in
        `store/subscriber.py`, interpreted: compiled, cancelling it at shutdown hung or crashed."""
        await follow_channel(self, retry_delay)

    async def follow(self, pubsub: Any, number: int = 0) -> None:
        """Messages, subscription confirmations and PING answers, in the order Redis sent them:
        an answer to a PING means every message published before it has arrived. (Real time
        here, not the cache's clock, which only ages entries.)"""
        clock = time.monotonic
        confirmed = False
        pending: dict[int, float] = {}  # PINGs sent and not answered: number -> when sent
        sent = 0
        next_ping = clock()
        while True:
            now = clock()
            if now >= next_ping:
                sent += 1
                pending[sent] = now
                await pubsub.ping(PING_PREFIX + str(sent).encode())
                next_ping = now + self._ping_interval
            if pending:
                late = now - next(iter(pending.values()))
                if late > self._ping_deadline:
                    if self.subscription_live(number):
                        log.warning("token invalidation channel silent for %.3f s", late)
                    self.subscription_down(number)
                    if late > self._ping_deadline * RESUBSCRIBE_AFTER:
                        raise TimeoutError("the invalidation subscription stopped answering")
            message = await pubsub.get_message(timeout=max(0.0, next_ping - clock()))
            if message is None:
                continue
            kind, data = message.get("type"), message.get("data")
            if kind == "message":
                self.receive(data.decode() if isinstance(data, bytes) else str(data))
            elif kind == "subscribe":
                if confirmed:  # redis-py re-subscribed on a new connection: what came meanwhile is lost
                    log.warning("token invalidation channel re-subscribed; cached tokens are re-read")
                    self.subscription_down(number)
                confirmed = True
                pending.clear()  # PINGs sent on the connection before this one will not be answered
                self._subscription_up(number)
            elif kind == "pong" and isinstance(data, bytes) and data.startswith(PING_PREFIX):
                answered = int(data[len(PING_PREFIX):])
                for ping in [ping for ping in pending if ping <= answered]:
                    self._answered(number, pending.pop(ping))
                oldest = next(iter(pending.values()), None)
                if confirmed and (oldest is None or clock() - oldest <= self._ping_deadline):
                    self._subscription_up(number)

    def receive(self, text: str) -> None:
        """One invalidation message: a token digest, or the name of a listener's topic."""
        listener = self.listeners.get(text)
        if listener is not None:
            listener()
        else:
            self.invalidate(text)

    async def close(self) -> None:
        await cancel_all(list(self._background))
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        # A batch cancelled before it started leaves its keys' waiters behind: release them too.
        self._queued.clear()
        for digest in list(self._waiters):
            self._settle(digest, asyncio.CancelledError())


def _tell(callback: Callable[[Outcome], None], outcome: Outcome) -> None:
    """A callback's failure is its own: the other waiters of the batch are still told."""
    try:
        callback(outcome)
    except Exception:
        log.exception("a token load callback failed")
