"""Usage blocking: per account and window, count API calls and traffic across every instance.

Requests only bump in-process counters. Every `flush_interval` a Lua script (`USAGE_EXCHANGE`,
one call per 128 tokens) adds them to `usage:<window>:<account>` (hash `c:<token>` calls,
`b:<token>` bytes), and its last call reads back, in the same round trip, the totals of the
accounts this instance served and the set of blocked tokens. Counts of an account with no limit
are held in process for the current window instead, and written only if a limit comes before the
window ends. Over a limit,
the heaviest tokens are blocked until the rest fit (`HSETNX blocked:<window>` makes the block,
and its event 20, happen once whichever instance sees it first); at the next window they work
again and event 21 is logged once (`HSETNX unblocked:<window>`; names in `store/keys.py`).

Between exchanges each instance watches its limited accounts (`Watch`): the totals the last
exchange brought plus its own count since. Near a limit it exchanges early, once its own count
reaches a quarter of what is left, and when the total it knows plus its own count passes the
limit it blocks on its own at once (provisionally, until the next exchange confirms it from the
totals).

Calls are also leased: an instance serves an account with a calls limit only as many calls as
its lease (`lease:<window>:<account>`) allows, granted by the exchange in the same script from
what the limit leaves after every call counted and the other instances' leases, shared among
the instances that want calls. It exchanges again once half of its lease is used (on demand, not
on the timer), and a call past the lease asks for an exchange and waits for it (`Undecided`: the
request is decided again after it, and refused with 429 if it cannot be within a bound): the
calls served, over every instance, never pass the limit by more than what instances serve before
their first exchange of a window (`INITIAL_SHARE`), whatever the request rate. Once the limit is
reached and a call waited for it, the heaviest tokens are blocked as before. A lease ends
(`LEASE_INTERVALS` flush intervals, 2 s at least) unless renewed, which every exchange does: a
lost store stops an account's calls once its lease is over, rather than serving past the limit
unseen. An account far from its limit still makes no Redis call per request.

On a Redis Cluster the same script leases, one call per account in the account's slot: its lease
hash is `<base>lease:{a.<cid>}:<window>` and the instances it is shared among are the account's
own registry (`<base>lease_instances:{a.<cid>}`), both beside its usage hash. `blocked:<window>`
is in another slot, so the instance passes the account's tokens it knows are blocked (read in
the previous exchange, or blocked by it); a block it does not know of yet counts as used, which
makes the grant smaller, never larger: the limit holds there as on one Redis.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import Any

import orjson

from gateway.aio import wait_event
from gateway.config import UsageSettings
from gateway.errors import Denied, StoreUnavailable, Undecided
from gateway.store.accounts import AccountDirectory, Limits
from gateway.store.scripts import USAGE_EXCHANGE
from gateway.store.tokens import RedisStore, ScriptsFailed
from gateway.tokens import Token
from gateway.writers.logs import LogWriter

log = logging.getLogger("gateway.writers.usage")
EVENT_BLOCKED, EVENT_UNBLOCKED = 20, 21


@dataclass(frozen=True, slots=True)
class Block:
    until: float
    reason: str
    cid: int
    provisional: bool = False  # decided by this instance alone; the next exchange confirms or lifts it


NEVER = 1 << 62
# Near a limit an instance exchanges once its own count since the last exchange reaches this
# fraction (1/NEAR_SHARE) of what is left: each round brings what is left down by a share.
NEAR_SHARE = 4
# Before its first exchange in a window an instance may serve this fraction of an account's calls
# limit (at least one call): the only calls served without a lease, so what every other instance
# serves this way bounds how far past the limit an account can go.
INITIAL_SHARE = 200
# A lease lasts this many flush intervals (2 s at least) unless renewed; the instance itself stops
# using it after LEASE_USE of that time, ahead of the others' clocks.
LEASE_INTERVALS = 4
LEASE_USE = 0.75
# With the rest leased to others, an instance waiting for calls asks again after this fraction of
# a flush interval (not at every call), or when the timer comes.
ASK_SOONER = 10
SHARE_USED = "its account's usage limit is nearly reached: this instance's share is used up; retry"


class Watch:
    """One account in one window as this instance sees it: every instance's usage as of the last
    exchange (`usage`), this instance's count not yet in it (`calls`, `size`), and the counts at
    which it must exchange early or decide on its own (`NEVER` for an account with no limit)."""

    __slots__ = ("cid", "window", "calls_limit", "traffic_limit", "usage", "calls", "size", "exchange_calls",
                 "exchange_size", "stop_calls", "stop_size", "lease_left", "lease_until", "lease_least", "wanted",
                 "ask_after")

    def __init__(self, cid: int, window: int, calls_limit: int, traffic_limit: int) -> None:
        self.cid = cid
        self.window = window
        self.calls_limit = calls_limit
        self.traffic_limit = traffic_limit
        self.usage: dict[int, tuple[int, int]] = {}
        self.calls = 0
        self.size = 0
        # Not exchanged yet: the first count asks for an exchange (the total is unknown), and the
        # instance stops alone when its own count passes the limit.
        self.exchange_calls = 1 if calls_limit else NEVER
        self.exchange_size = 1 if traffic_limit else NEVER
        self.stop_calls = calls_limit + 1 if calls_limit else NEVER
        self.stop_size = traffic_limit + 1 if traffic_limit else NEVER
        # Calls this instance may still serve (its lease), and until when (the clock of `check`).
        self.lease_left = NEVER
        self.lease_until = float(NEVER)
        self.lease_least = 0  # what it may serve while an exchange is in flight
        self.wanted: dict[int, int] = {}  # token id -> calls refused for want of a lease since the last exchange
        # A call waiting for a lease asks for an exchange at once, unless the last one found the
        # rest leased by other instances: then not before this (they exchange as they use it).
        self.ask_after = 0.0
        self.lease_calls(calls_limit)

    def lease_calls(self, calls_limit: int) -> None:
        """The lease of an account whose calls limit is now `calls_limit` (0: none, no lease)."""
        if not calls_limit:
            self.lease_left, self.lease_until = NEVER, float(NEVER)
        elif self.lease_left == NEVER:  # not exchanged yet: the share served before the first exchange
            self.lease_left = max(1, calls_limit // INITIAL_SHARE)

    def aim(self, blocked: dict[int, Block], usage: dict[int, tuple[int, int]] | None = None) -> None:
        """The next thresholds, from what the tokens that are not blocked used: `usage` when it
        holds this instance's own counts already, else the exchange's plus the own count."""
        unblocked = [counts for token_id, counts in (self.usage if usage is None else usage).items()
                     if token_id not in blocked]
        mine = (self.calls, self.size) if usage is None else (0, 0)
        calls = sum(counts[0] for counts in unblocked) + mine[0]
        size = sum(counts[1] for counts in unblocked) + mine[1]
        self.exchange_calls, self.stop_calls = _thresholds(self.calls, calls, self.calls_limit)
        self.exchange_size, self.stop_size = _thresholds(self.size, size, self.traffic_limit)


def _thresholds(mine: int, total: int, limit: int) -> tuple[int, int]:
    """(exchange at, stop at) for the own count `mine`, when the unblocked total is `total`."""
    if not limit:
        return NEVER, NEVER
    left = limit - total
    return mine + max(1, left // NEAR_SHARE), mine + max(1, left + 1)


def choose_blocked(usage: dict[int, tuple[int, int]], already: set[int], calls_limit: int,
                   traffic_limit: int) -> list[tuple[int, str]]:
    """Heaviest first, until what is left (not blocked) fits every limit; 0 = no limit."""
    blocked = set(already)
    chosen: list[tuple[int, str]] = []
    for metric, limit, label in ((0, calls_limit, "API calls"), (1, traffic_limit, "bytes of traffic")):
        if limit <= 0:
            continue
        remaining = sum(counts[metric] for token_id, counts in usage.items() if token_id not in blocked)
        for token_id in sorted(usage, key=lambda tid: (-usage[tid][metric], tid)):
            if remaining <= limit:
                break
            if token_id in blocked:
                continue
            blocked.add(token_id)
            remaining -= usage[token_id][metric]
            chosen.append((token_id, f"its account is over the limit of {limit} {label}"))
    return chosen


# Tokens whose counts an instance holds for accounts with no limit, at most (~25 MB).
MAX_HELD = 250_000
HELD_SHIFT = 40  # no instance makes 2**40 calls with one token in a window
HELD_CALLS = (1 << HELD_SHIFT) - 1
# Tokens per USAGE_EXCHANGE call: ~0.5 ms of Redis time (512 held it for 2.5 ms, token loads queued behind).
SCRIPT_TOKENS = 128

def parse_usage(raw: dict[bytes, bytes]) -> dict[int, tuple[int, int]]:
    usage: dict[int, list[int]] = {}
    for field, value in raw.items():
        kind, _, token_id = field.decode().partition(":")
        counts = usage.setdefault(int(token_id), [0, 0])
        counts[0 if kind == "c" else 1] += int(value)
    return {token_id: (counts[0], counts[1]) for token_id, counts in usage.items()}


def _as_hash(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL's reply as a script returns it (field, value, field, value ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class UsageMeter:
    def __init__(self, store: RedisStore, settings: UsageSettings, directory: AccountDirectory, logs: LogWriter,
                 clock: Callable[[], float] = time.time, max_held: int = MAX_HELD) -> None:
        self._store = store
        self._settings = settings
        self._window_length = float(settings.window)  # read twice a request: native, not the settings' attribute
        self._directory = directory
        self._logs = logs
        self._clock = clock
        self._counts: dict[tuple[int, int, int], list[int]] = {}
        # (window, account) -> token id -> calls + (bytes << HELD_SHIFT), for accounts with no limit
        # (`_to_send`): a dict of ints only is not tracked by the garbage collector, so a quarter of
        # a million of them add nothing to its passes, where lists did.
        self._held: dict[tuple[int, int], dict[int, int]] = {}
        self._held_tokens = 0
        self._max_held = max_held
        self.blocked: dict[int, Block] = {}
        self.blocks = 0  # tokens this process was the first to block (event 20), for the metrics
        self._keys = store.keys
        self._exchange_script = store.script(USAGE_EXCHANGE)
        self._watches: dict[int, Watch] = {}  # account -> its watch for the current window
        self._sending: dict[tuple[int, int, int], list[int]] = {}  # counts of the exchange under way
        self._wake = asyncio.Event()  # an exchange is wanted before the interval is over
        self.early_exchanges = 0  # exchanges made sooner because an account neared its limit
        # This instance's name in the lease hashes, and how long a lease lasts.
        self.instance = secrets.token_hex(8)
        self._lease_ttl = max(2.0, LEASE_INTERVALS * settings.flush_interval)
        # Leasing works on one Redis and on a cluster alike: there the lease and the instances it
        # is shared among are the account's, in its slot (`_exchange_by_account`), so one script
        # call still adds the counts, reads the totals and grants the lease together.
        self.share_waits = 0  # calls that waited for an exchange because this instance's lease was used up
        self._exchanged: asyncio.Future[None] | None = None  # what they wait for: the next exchange's end
        self._unreachable = False  # the last exchange found the store unavailable: no lease can come

    def window(self, now: float) -> int:
        return int(now // self._window_length)

    def check_blocked(self, token: Token, now: float) -> None:
        """Refuse a blocked token, and nothing else: a live MQTT session checked again makes no
        call, so it counts none and does not ask for (or wait for) a lease."""
        block = self.blocked.get(token.id)
        if block is not None and now < block.until:
            retry = max(1, math.ceil(block.until - now))
            raise Denied(429, f"token is blocked: {block.reason}", {"Retry-After": str(retry)})

    def check(self, token: Token, now: float) -> None:
        """Refuse a blocked token; else count the call now, as it passes the last check, so that
        requests still in flight are in the count when the limit is reached, not after."""
        self.check_blocked(token, now)
        window = self.window(now)
        watch = self._watch(token.cid, window)
        if watch.lease_left <= 0 or now >= watch.lease_until:
            # Past this instance's lease: not to be served before an exchange brings a new one.
            watch.wanted[token.id] = watch.wanted.get(token.id, 0) + 1
            self.share_waits += 1
            if now >= watch.ask_after:
                self._wake.set()
            refusal = Denied(429, SHARE_USED, {"Retry-After": "1"})
            if self._unreachable:
                raise refusal  # refused at once: waiting would hold the request for nothing
            raise Undecided(self.exchanged, refusal)
        self._count_in(watch, token.id, token.cid, window, 1, 0)

    def record(self, token: Token, cid: int, size: int, now: float) -> None:
        """The traffic of a request that was served (its call was counted by `check`)."""
        if size:
            self._count(token.id, cid, self.window(now), 0, size)

    def record_message(self, token: Token, cid: int, size: int, now: float) -> None:
        """One MQTT message, a call and its bytes (no request check counted it)."""
        self._count(token.id, cid, self.window(now), 1, size)

    def _watch(self, cid: int, window: int) -> Watch:
        watch = self._watches.get(cid)
        if watch is None or watch.window != window:
            calls_limit, traffic_limit = self.limits_for(cid)
            watch = self._watches[cid] = Watch(cid, window, calls_limit, traffic_limit)
        return watch

    def _count(self, token_id: int, cid: int, window: int, calls: int, size: int) -> None:
        self._count_in(self._watch(cid, window), token_id, cid, window, calls, size)

    def _count_in(self, watch: Watch, token_id: int, cid: int, window: int, calls: int, size: int) -> None:
        counts = self._counts.get((window, cid, token_id))
        if counts is None:
            self._counts[(window, cid, token_id)] = [calls, size]
        else:
            counts[0] += calls
            counts[1] += size
        watch.calls += calls
        watch.size += size
        watch.lease_left -= calls
        if watch.calls >= watch.exchange_calls or watch.size >= watch.exchange_size:
            self._nearing(watch)

    def _nearing(self, watch: Watch) -> None:
        self._wake.set()
        if watch.calls >= watch.stop_calls or watch.size >= watch.stop_size:
            self._decide_alone(watch)

    def _decide_alone(self, watch: Watch) -> None:
        """Over a limit by what this instance knows: block as the exchange would, at once."""
        usage = dict(watch.usage)
        for counts in (self._sending, self._counts):
            for (window, cid, token_id), (calls, size) in counts.items():
                if window == watch.window and cid == watch.cid:
                    known = usage.get(token_id, (0, 0))
                    usage[token_id] = (known[0] + calls, known[1] + size)
        already = {token_id for token_id in usage if token_id in self.blocked}
        until = (watch.window + 1) * self._settings.window
        for token_id, reason in choose_blocked(usage, already, watch.calls_limit, watch.traffic_limit):
            self.blocked[token_id] = Block(until, reason, watch.cid, provisional=True)
        watch.aim(self.blocked, usage)

    async def exchanged(self) -> None:
        """Returns once the next exchange is over, whatever it brought."""
        if self._exchanged is None:
            self._exchanged = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._exchanged)  # a waiter that gives up leaves it to the others

    def _tell_exchanged(self) -> None:
        waiting, self._exchanged = self._exchanged, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def limits_for(self, cid: int) -> tuple[int, int]:
        tree = self._directory.tree
        limits = tree.limits.get(cid, Limits()) if tree is not None else Limits()
        calls = self._settings.api_calls if limits.api_calls is None else limits.api_calls
        traffic = self._settings.traffic if limits.traffic is None else limits.traffic
        return calls, traffic

    async def run(self) -> None:
        """Exchange every `flush_interval`, or as soon as an account nears its limit."""
        interval = self._settings.flush_interval
        while True:
            early = await wait_event(self._wake, interval)
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable:
                early = False
                await asyncio.sleep(interval)  # not at once again, however often it is asked for
            except Exception:
                log.exception("usage flush failed")
                await asyncio.sleep(interval)
            if early:
                self.early_exchanges += 1

    async def flush(self, final: bool = False) -> None:
        """Exchange counts with Redis; `final` (shutdown) also writes what is held in process.
        Calls waiting for a lease are told when it is over, whether it succeeded or not."""
        try:
            await self._flush(final)
        finally:
            self._tell_exchanged()

    async def _flush(self, final: bool) -> None:
        now = self._clock()
        window = self.window(now)
        pending, self._counts = self._counts, {}
        counts = self._to_send(pending, window, final)
        self._watches = {cid: watch for cid, watch in self._watches.items() if watch.window == window}
        leases: list[tuple[int, int, int, bool]] = []  # account, calls limit, least grant, wants more
        refused: dict[int, dict[int, int]] = {}  # account -> calls waiting for a lease as this exchange is sent
        for watch in self._watches.values():  # a limit set or changed since
            watch.calls_limit, watch.traffic_limit = self.limits_for(watch.cid)
            watch.lease_calls(watch.calls_limit)
            if watch.calls_limit:
                # While this exchange is in flight the instance serves half of what its lease has
                # left at most (all of it for a single call), and the new lease covers that; one
                # that served nothing since the last exchange gives its lease back.
                wants = watch.calls > 0 or bool(watch.wanted)
                refused[watch.cid], watch.wanted = watch.wanted, {}  # later ones are for the next exchange
                left = max(0, watch.lease_left)
                watch.lease_left = watch.lease_least = (left + 1) // 2 if wants else 0
                leases.append((watch.cid, watch.calls_limit, watch.lease_least, wants))
        limited = {cid for cid in {cid for (win, cid, _) in counts if win == window} if any(self.limits_for(cid))}
        limited.update(cid for cid, _, _, _ in leases)
        self._sending = counts
        try:
            totals, blocked_raw, grants = await self._exchange(counts, window, sorted(limited), leases, now)
            self._unreachable = False
        except StoreUnavailable:
            self._unreachable = True
            for key, (calls, size) in counts.items():  # keep them for the next flush
                mine = self._counts.setdefault(key, [0, 0])
                mine[0] += calls
                mine[1] += size
            for cid, waiting in refused.items():  # and the calls still wanting a lease
                held = self._watches.get(cid)
                if held is not None:
                    for token_id, count in waiting.items():
                        held.wanted[token_id] = held.wanted.get(token_id, 0) + count
            raise
        finally:
            self._sending = {}
        sent: dict[int, list[int]] = {}
        for (win, cid, _), (calls, size) in counts.items():
            if win == window:
                mine = sent.setdefault(cid, [0, 0])
                mine[0] += calls
                mine[1] += size
        for cid, raw in totals.items():  # what was sent is in the totals now, not the own count
            seen = self._watches.get(cid)
            if seen is not None:
                seen.usage = parse_usage(raw)
                calls, size = sent.get(cid, (0, 0))
                seen.calls, seen.size = max(0, seen.calls - calls), max(0, seen.size - size)
        reached: dict[int, dict[int, int]] = {}  # account -> calls refused past its limit, by token
        for (cid, _, least, _), (grant, others) in zip(leases, grants, strict=True):
            seen = self._watches.get(cid)
            if seen is None:
                continue
            # What was served since the exchange was sent came out of `least`: the grant covers it.
            seen.lease_left = int(grant) - (least - seen.lease_left)
            seen.lease_until = now + self._lease_ttl * LEASE_USE
            wanted = refused.get(cid)
            if int(grant) == 0 and int(others) > 0:
                seen.ask_after = now + self._settings.flush_interval / ASK_SOONER
            if int(grant) == 0 and int(others) == 0 and wanted:
                reached[cid] = wanted  # nothing left to lease, and calls were refused: over the limit
        blocked = {int(token_id): orjson.loads(value) for token_id, value in blocked_raw.items()}
        await self._block_over_limit(window, totals, blocked, now, reached)
        for token_id in [token_id for token_id, block in self.blocked.items()
                         if block.provisional and token_id not in blocked]:
            del self.blocked[token_id]  # the totals did not bear it out (or its window is over)
        until = (window + 1) * self._settings.window
        await self._unblock_expired(now)
        for token_id, info in blocked.items():
            self.blocked[token_id] = Block(until, info["reason"], int(info["cid"]))
        for watch in self._watches.values():
            watch.aim(self.blocked)
            if watch.calls_limit:  # exchange again once half the lease is used
                watch.exchange_calls = min(watch.exchange_calls, watch.calls + max(1, watch.lease_left // 2))
            if watch.calls >= watch.stop_calls or watch.size >= watch.stop_size:
                self._decide_alone(watch)  # counted during the exchange, past the limit already

    def _to_send(self, pending: dict[tuple[int, int, int], list[int]], window: int,
                 final: bool) -> dict[tuple[int, int, int], list[int]]:
        """What goes to Redis: the counts of accounts with a limit, joined by what was held for
        them while they had none (a limit set during a window still counts the whole window).

        The counts of an account with no limit are only read if a limit comes, so for the current
        window they are held here (up to MAX_HELD tokens; past that they are written, which is as
        exact) and dropped when the window is over. Writing them cost Redis two counters a token:
        with a new token per request, more than anything but the token's load and log list."""
        held = self._held
        for past in [account for account in held if account[0] < window]:
            self._held_tokens -= len(held.pop(past))
        send: dict[tuple[int, int, int], list[int]] = {}
        limited: dict[int, bool] = {}
        for key, counts in pending.items():
            win, cid, token_id = key
            account_limited = limited.get(cid)
            if account_limited is None:
                account_limited = limited[cid] = any(self.limits_for(cid))
            if account_limited or final:
                send[key] = counts
            elif win == window:
                tokens = held.get((win, cid))
                if tokens is None:
                    tokens = held[(win, cid)] = {}
                packed = tokens.get(token_id)
                if packed is not None:
                    tokens[token_id] = packed + counts[0] + (counts[1] << HELD_SHIFT)
                elif self._held_tokens < self._max_held:
                    tokens[token_id] = counts[0] + (counts[1] << HELD_SHIFT)
                    self._held_tokens += 1
                else:
                    send[key] = counts
            # else: a past window of an account with no limit: nobody will ever read it
        for account in [account for account in held if final or any(self.limits_for(account[1]))]:
            tokens = held.pop(account)
            self._held_tokens -= len(tokens)
            for token_id, packed in tokens.items():
                entry = (account[0], account[1], token_id)
                calls, size = packed & HELD_CALLS, packed >> HELD_SHIFT
                sent = send.get(entry)
                if sent is None:
                    send[entry] = [calls, size]
                else:
                    sent[0] += calls
                    sent[1] += size
        return send

    async def _exchange(self, counts: dict[tuple[int, int, int], list[int]], window: int, accounts: list[int],
                        leases: list[tuple[int, int, int, bool]], now: float,
                        ) -> tuple[dict[int, dict[bytes, bytes]], dict[bytes, bytes], list[tuple[int, int]]]:
        if self._store.cluster:  # one call per account's slot, its lease in it
            return await self._exchange_by_account(counts, window, accounts, leases, now)
        # The increments go in script calls of at most SCRIPT_TOKENS tokens, one after the other:
        # with a new token per request, half a second's tokens are thousands of them.
        by_hash: dict[str, list[tuple[int, int, int]]] = {}
        for entry in counts:
            win, cid, _ = entry
            by_hash.setdefault(self._keys.usage(win, cid), []).append(entry)
        rows = [(key, entry) for key, entries in by_hash.items() for entry in entries]
        # The last call reads back the accounts' totals and the blocked tokens, after every add.
        reads = [self._keys.usage(window, cid) for cid in accounts] + [self._keys.blocked(window)]
        leasing: list[Any] = []  # the last call's lease arguments (scripts.py), and the lease hashes
        if leases:
            leasing = [len(leases), int(now * 1000), int(self._lease_ttl * 1000), self.instance]
            position = {cid: index + 1 for index, cid in enumerate(accounts)}
            for cid, limit, least, wants in leases:
                leasing += (position[cid], limit, least, 1 if wants else 0)
            reads += [self._keys.lease(window, cid) for cid, _, _, _ in leases] + [self._keys.lease_instances]
        starts = list(range(0, len(rows), SCRIPT_TOKENS)) or [0]
        done = 0
        replies: list[Any] = []
        try:
            for start in starts:
                chunk = rows[start:start + SCRIPT_TOKENS]
                keys: list[str] = []
                args: list[int] = [self._settings.window * 3, 0]
                for key, group in groupby(chunk, key=itemgetter(0)):
                    entries = [entry for _, entry in group]
                    keys.append(key)
                    args.append(len(entries))
                    for entry in entries:
                        args += (entry[2], *counts[entry])
                args[1] = len(keys)
                last = start == starts[-1]
                replies = await self._exchange_script(keys + reads if last else keys, args + leasing if last else args)
                done = start + len(chunk)
        except StoreUnavailable:
            for _, entry in rows[:done]:  # in Redis already: not to be counted again
                del counts[entry]
            raise
        grants = [(int(grant), int(others)) for grant, others in replies.pop()] if leases else []
        hashes = [_as_hash(flat) for flat in replies]
        return dict(zip(accounts, hashes[:-1], strict=True)), hashes[-1], grants

    async def _exchange_by_account(self, counts: dict[tuple[int, int, int], list[int]], window: int,
                                   accounts: list[int], leases: list[tuple[int, int, int, bool]], now: float,
                                   ) -> tuple[dict[int, dict[bytes, bytes]], dict[bytes, bytes], list[tuple[int, int]]]:
        """`_exchange` on a cluster, where an account's usage hashes, its lease hash and its own
        lease registry share a slot (the account's) and `blocked:<window>` is in another: a script
        call per account (SCRIPT_TOKENS tokens at most, the account's totals read back and its
        lease granted by its last call), all in one pipeline (a round trip per node), and the
        blocked tokens read beside them. The script excludes from the used count the account's
        tokens this instance knows are blocked (the previous exchange's read, and its own blocks;
        not the provisional ones, which the totals may not bear out): a block it does not know of
        yet counts as used, so the grant errs small. A call that ran is not sent again."""
        by_account: dict[int, list[tuple[int, int, int]]] = {}
        for entry in counts:
            by_account.setdefault(entry[1], []).append(entry)
        for cid in accounts:
            by_account.setdefault(cid, [])
        wanted = set(accounts)
        leased = {lease[0]: lease for lease in leases}
        known = self._blocked_by_account(now)
        calls: list[tuple[list[str], list[Any]]] = []
        sent: list[list[tuple[int, int, int]]] = []
        reads: dict[int, int] = {}  # account -> the call that reads its totals
        for cid, entries in by_account.items():
            entries.sort()
            starts = list(range(0, len(entries), SCRIPT_TOKENS)) or [0]
            for start in starts:
                chunk = entries[start:start + SCRIPT_TOKENS]
                keys: list[str] = []
                args: list[Any] = [self._settings.window * 3, 0]
                for win, group in groupby(chunk, key=itemgetter(0)):
                    members = list(group)
                    keys.append(self._keys.usage(win, cid))
                    args.append(len(members))
                    for entry in members:
                        args += (entry[2], *counts[entry])
                args[1] = len(keys)
                if start == starts[-1] and cid in wanted:
                    reads[cid] = len(calls)
                    keys.append(self._keys.usage(window, cid))
                    lease = leased.get(cid)
                    if lease is not None:  # one lease, on the hash just read; the blocked ids after it
                        _, limit, least, wants = lease
                        blocked_ids = known.get(cid, [])
                        keys += (self._keys.lease(window, cid), self._keys.lease_instances_of(cid))
                        args += (1, int(now * 1000), int(self._lease_ttl * 1000), self.instance,
                                 1, limit, least, 1 if wants else 0, len(blocked_ids), *blocked_ids)
                calls.append((keys, args))
                sent.append(chunk)

        async def blocked() -> Any:
            return await self._store.client.hgetall(self._keys.blocked(window))
        replies, blocked_raw = await asyncio.gather(self._store.scripts(USAGE_EXCHANGE, calls),
                                                    self._store.call(blocked), return_exceptions=True)
        if isinstance(replies, ScriptsFailed):
            for index in replies.done:  # in Redis already: not to be counted again
                for entry in sent[index]:
                    del counts[entry]
        if isinstance(replies, BaseException):
            raise replies
        if isinstance(blocked_raw, BaseException):
            counts.clear()  # every count is in Redis: only the answer is missing
            raise blocked_raw
        totals = {cid: _as_hash(replies[index][0]) for cid, index in reads.items()}
        grants = [(int(grant), int(others)) for cid, _, _, _ in leases for grant, others in replies[reads[cid]][1]]
        return {cid: totals.get(cid, {}) for cid in accounts}, dict(blocked_raw), grants

    def _blocked_by_account(self, now: float) -> dict[int, list[int]]:
        """The tokens known blocked in the current window, confirmed by Redis, by account."""
        known: dict[int, list[int]] = {}
        for token_id, block in self.blocked.items():
            if not block.provisional and now < block.until:
                known.setdefault(block.cid, []).append(token_id)
        return known

    async def _block_over_limit(self, window: int, totals: dict[int, dict[bytes, bytes]],
                                blocked: dict[int, dict[str, Any]], now: float,
                                reached: dict[int, dict[int, int]]) -> None:
        """Block what is over a limit: the totals, with the calls refused at a reached limit added
        (held to their leases, the instances never count past it)."""
        decisions: list[tuple[int, int, str]] = []
        for cid, raw in totals.items():
            usage = parse_usage(raw)
            for token_id, refused in reached.get(cid, {}).items():
                calls, size = usage.get(token_id, (0, 0))
                usage[token_id] = (calls + refused, size)
            calls, traffic = self.limits_for(cid)
            already = {token_id for token_id in usage if token_id in blocked}
            chosen = choose_blocked(usage, already, calls, traffic)
            decisions.extend((cid, token_id, reason) for token_id, reason in chosen)
        if not decisions:
            return
        key = self._keys.blocked(window)

        async def run() -> list[Any]:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for cid, token_id, reason in decisions:
                    pipe.hsetnx(key, str(token_id), orjson.dumps({"cid": cid, "reason": reason}))
                pipe.expire(key, self._settings.window * 3)
                return await pipe.execute()
        replies = await self._store.call(run)
        until = (window + 1) * self._settings.window
        for (cid, token_id, reason), first in zip(decisions, replies[:-1], strict=True):  # last: expire
            blocked[token_id] = {"cid": cid, "reason": reason}
            if first:
                self.blocks += 1
                self._logs.emit({"timestamp": now, "event_code": EVENT_BLOCKED, "token_id": token_id, "cid": cid,
                                 "reason": reason, "until": until})

    async def _unblock_expired(self, now: float) -> None:
        ended = [(token_id, block) for token_id, block in self.blocked.items() if now >= block.until]
        if not ended:
            return

        async def run() -> list[Any]:
            async with self._store.client.pipeline(transaction=False) as pipe:
                for token_id, block in ended:
                    key = self._keys.unblocked(self.window(block.until - 1))
                    pipe.hsetnx(key, str(token_id), 1)
                    pipe.expire(key, self._settings.window * 3)
                return await pipe.execute()
        replies = await self._store.call(run)
        for (token_id, block), first in zip(ended, replies[::2], strict=True):  # hsetnx, expire, ...
            del self.blocked[token_id]
            if first:
                self._logs.emit({"timestamp": now, "event_code": EVENT_UNBLOCKED, "token_id": token_id,
                                 "cid": block.cid})
