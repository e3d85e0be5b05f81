"""`gateway migrate`: copy a store between the one-Redis layout and the cluster layout.

Both key layouts are in `store/keys.py`, with the families this copy reads (`Keys.patterns`,
`index_keys` and the name parsers). The source is locked first, then the target
(`MigrationLock`: the store's `migrating` marker, with a TTL this process extends): every gateway
on either refuses API changes and pauses its housekeeping until the end (a gateway started on
the target too early would otherwise make tokens the copy overwrites, and its orphan sweep drop
the ids whose records are not copied yet), and the copy begins MIGRATION_SETTLE seconds later,
once the changes already past their check have landed. The copy reads the source family by
family (SCAN, HSCAN, ZSCAN: never one command for a whole index) and writes the target in the
order a running gateway writes a new token: counters first (`next_id` and `next_account_id` never go backwards:
the target keeps the larger), then accounts, indexes and the recycle bin, `accessed` (the newer
time kept), and the records last. Every write sets what the source holds (SET, HSET, SADD, ZADD,
a log list replaced whole), so a second run gives the same result.

A target that holds data is refused, unless it holds only what a migration from this very source
wrote (the `migrated_from` marker) or `force` is given; so is a source or target another
migration holds.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from redis.cluster import ClusterNode, RedisCluster

from gateway.config import ClusterSettings
from gateway.store.keys import (
    ACCOUNT_LOGS,
    ACCOUNT_TOKENS,
    BIN,
    BIN_TIMES,
    BLOCKED,
    EXPIRY,
    GROUP_MEMBERS,
    IDS,
    LEGACY_ACCESSED,
    TOKEN_LOGS,
    TOKENS,
    UNBLOCKED,
    USAGE,
    USED,
    ClusterKeys,
    Keys,
)
from gateway.store.scripts import DELETE_IF_HELD, EXTEND_IF_HELD, TOUCH
from gateway.store.tokens import MIGRATION_SETTLE

BATCH = 1000
# The locks' TTL (`MigrationLock`): short, so that a migration killed midway holds up the API
# changes on its source and target for LOCK_TTL seconds at most; extended every LOCK_TTL / 5
# seconds, so four extensions in a row may fail (a slow or briefly unreachable Redis) before the
# lock is lost.
LOCK_TTL = 15.0


class MigrationRefused(Exception):
    pass


@dataclass
class Side:
    """One end of a migration: a client and the layout of its keys."""

    client: Any  # redis.Redis or redis.cluster.RedisCluster (the same commands)
    keys: Keys
    name: str

    @property
    def sharded(self) -> bool:
        return self.keys.sharded

    def scan(self, pattern: str) -> Iterator[str]:
        """Every key matching `pattern` (on a cluster, on every master)."""
        if isinstance(self.client, RedisCluster):
            for node in self.client.get_primaries():  # type: ignore[no-untyped-call]
                for key in self.client.scan_iter(match=pattern, count=BATCH, target_nodes=node):
                    yield _text(key)
            return
        for key in self.client.scan_iter(match=pattern, count=BATCH):
            yield _text(key)

    def pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not commands:
            return []
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, family: str, count: int) -> None:
        self.counts[family] = self.counts.get(family, 0) + count


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_single(url: str, prefix: str, timeout: float = 10.0) -> Side:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    shown = re.sub(r"//[^@/]*@", "//", url)  # no credentials in what is printed or stored
    return Side(client, Keys(prefix), f"{shown} prefix {prefix}")


def one_slot_side(cluster: Side) -> Side:
    """The same cluster read in the one-Redis layout, as builds before the sharded layout wrote
    it there (every key under the prefix's hash tag, in one slot)."""
    name = cluster.name.replace(" prefix ", " (one-slot layout) prefix ")
    return Side(cluster.client, Keys(cluster.keys.prefix), name)


def open_cluster_side(cluster: ClusterSettings, prefix: str, timeout: float = 10.0) -> Side:
    client = RedisCluster(startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                                         for host, port in cluster.nodes],
                          socket_timeout=timeout, socket_connect_timeout=timeout, **cluster.connection_options())
    nodes = ",".join(f"{host}:{port}" for host, port in cluster.nodes)
    return Side(client, ClusterKeys(prefix), f"cluster {nodes} prefix {prefix}")


# -- the locks on the source and the target --------------------------------------------------------

class MigrationLock:
    """A store's `migrating` marker (`role`: the source or the target), held for the whole copy:
    while it is there every gateway on that store refuses API changes (503) and pauses its
    housekeeping (`PlatformApi`, `Housekeeper`). Set with a TTL (`ttl`, LOCK_TTL) that a thread
    extends every `ttl / 5` seconds: a migration killed midway unlocks the store by itself within
    `ttl`. A lock this
    migration can no longer show it held all along (its marker gone or another's, or not extended
    for `ttl`) is lost: the copy stops (`check`), since changes may have been made meanwhile."""

    def __init__(self, side: Side, ttl: float, description: str, role: str = "source") -> None:
        self._side = side
        self.role = role
        self._key = side.keys.migrating
        self._ttl_ms = max(1, round(ttl * 1000))
        self.value = f"{description} [{uuid.uuid4().hex}]"  # the random part: this run's own
        self._stop = threading.Event()
        self._lost = ""
        self._held_from = 0.0  # when the last extension that succeeded was sent (monotonic)
        self._thread = threading.Thread(target=self._keep, name="migrate-lock", daemon=True)

    def acquire(self) -> None:
        sent = time.monotonic()
        if not self._side.client.set(self._key, self.value, nx=True, px=self._ttl_ms):
            held = self._side.client.get(self._key)
            raise MigrationRefused(
                f"the {self.role} ({self._side.name}) is being migrated already"
                + (f" ({_text(held)})" if held is not None else "")
                + f"; a migration that died unlocks it within {self._ttl_ms / 1000:g} s")
        self._held_from = sent
        self._thread.start()

    def _keep(self) -> None:
        every = self._ttl_ms / 5000
        while not self._stop.wait(every):
            sent = time.monotonic()
            try:
                extended = self._side.client.eval(EXTEND_IF_HELD, 1, self._key, self.value, self._ttl_ms)
            except (OSError, redis.RedisError):
                extended = None  # tried again; lost once `ttl` passes without one (`check`)
            if extended == 0:
                self._lost = "its marker was removed or taken over"
                return
            if extended:
                self._held_from = sent

    def check(self) -> None:
        """Raise if the lock may have lapsed at some moment since it was taken."""
        if not self._lost and time.monotonic() - self._held_from >= self._ttl_ms / 1000:
            self._lost = f"it could not be extended for {self._ttl_ms / 1000:g} s"
        if self._lost:
            meanwhile = ("may be missing from the target" if self.role == "source"
                         else "may have been overwritten by the copy")
            raise MigrationRefused(f"the lock on the {self.role} was lost ({self._lost}): changes made on it "
                                   f"meanwhile {meanwhile}; run the migration again")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        # A source that does not answer: the marker ends with its TTL, and the error that ended
        # the copy is the one to tell.
        with contextlib.suppress(OSError, redis.RedisError):
            self._side.client.eval(DELETE_IF_HELD, 1, self._key, self.value)


def _holder(target: Side) -> str:
    return (f"gateway migrate on {socket.gethostname()} pid {os.getpid()} into {target.name} "
            f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


# -- the copy ---------------------------------------------------------------------------------

def _records_of(side: Side) -> Iterator[tuple[str, str]]:
    """(key name, digest) of every token record of the side's layout."""
    for name in side.scan(side.keys.patterns()[TOKENS]):
        digest = side.keys.record_digest(name)
        if digest is not None:  # None: the other layout's, under a prefix without braces
            yield name, digest


def _hash_items(side: Side, key: str) -> Iterator[list[tuple[str, bytes]]]:
    batch: list[tuple[str, bytes]] = []
    for name, value in side.client.hscan_iter(key, count=BATCH):
        batch.append((_text(name), value))
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _zset_items(side: Side, key: str) -> Iterator[list[tuple[str, float]]]:
    batch: list[tuple[str, float]] = []
    for member, score in side.client.zscan_iter(key, count=BATCH):
        batch.append((_text(member), float(score)))
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def is_empty(side: Side, records_only: bool = False) -> bool:
    """No counter, no accounts, no token record (`records_only`: no record, for a copy in place,
    whose counters and accounts are the source's own)."""
    keys = side.keys
    if not records_only and any(side.client.exists(name) for name in (keys.next_id, keys.accounts)):
        return False
    return next(_records_of(side), None) is None


def migrate(source: Side, target: Side, *, usage: bool = False, logs: bool = False, force: bool = False,
            say: Callable[[str], None] = print, lock_ttl: float = LOCK_TTL, settle: float = MIGRATION_SETTLE,
            while_locked: Callable[[], None] | None = None) -> Report:
    """Copy `source` into `target`, both locked throughout (`MigrationLock`; in place, the one
    store once): after taking the locks, `settle` seconds for the API changes already past their
    check to land (MIGRATION_SETTLE, `store/tokens.py`), then `while_locked` (the tests hold a
    migration there), then the copy."""
    marker = target.keys.migrated_from
    in_place = source.client is target.client  # a cluster's one-slot layout into its sharded one
    if not is_empty(target, records_only=in_place):
        previous = target.client.get(marker)
        if not force and (previous is None or _text(previous) != source.name):
            raise MigrationRefused(
                f"the target ({target.name}) already holds data"
                + (f" (migrated from {_text(previous)})" if previous is not None else "")
                + "; give --force to copy over it")
    locks = [MigrationLock(source, lock_ttl, _holder(target))]
    if not in_place:  # in place the target is the source's own store, its marker the same key
        locks.append(MigrationLock(target, lock_ttl, _holder(target), role="target"))
    held: list[MigrationLock] = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        say(f"{' and '.join(lock.role for lock in locks)} locked: API changes refused "
            f"{'on both' if len(locks) > 1 else 'there'} until the end; waiting {settle:g} s for those under way")
        time.sleep(settle)
        if while_locked is not None:
            while_locked()
        report = Report()
        for step in (_counters, _globals_of(usage), _indexes, _accounts_sets, _used, _records,
                     *((_usage,) if usage else ()), *((_logs,) if logs else ())):
            for lock in locks:
                lock.check()
            step(source, target, report)
        for lock in locks:
            lock.check()  # held to the end: nothing was changed behind the copy
        target.client.set(marker, source.name)
    finally:
        for lock in reversed(held):
            lock.release()
    for family, count in report.counts.items():
        say(f"{family}: {count}")
    return report


def _counters(source: Side, target: Side, report: Report) -> None:
    for name in (source.keys.next_id, source.keys.next_account_id):
        value = source.client.get(name)
        if value is None:
            continue
        target_name = target.keys.prefix + name[len(source.keys.prefix):]
        held = target.client.get(target_name)
        if held is None or int(held) < int(value):
            target.client.set(target_name, int(value))
        report.add(name[len(source.keys.prefix):], int(value))


def _copy_key_as_is(source: Side, target: Side, name: str, kind: str) -> None:
    """A key whose name is the same in both layouts (under the prefix): hash, set or string."""
    target_name = target.keys.prefix + name[len(source.keys.prefix):]
    ttl = int(source.client.pttl(name))
    if kind == "hash":
        values = source.client.hgetall(name)
        if values:
            target.client.hset(target_name, mapping=values)
    elif kind == "set":
        members = source.client.smembers(name)
        if members:
            target.client.sadd(target_name, *members)
    if ttl > 0:
        target.client.pexpire(target_name, ttl)


def _globals_of(usage: bool) -> Callable[[Side, Side, Report], None]:
    return lambda source, target, report: _globals(source, target, report, usage)


def _globals(source: Side, target: Side, report: Report, usage: bool) -> None:
    """Accounts, the groups the upstream application keeps, and (with usage) the blocked tokens:
    the same names in both layouts."""
    patterns = source.keys.patterns()
    if source.client.exists(source.keys.accounts):
        _copy_key_as_is(source, target, source.keys.accounts, "hash")
        report.add("accounts", int(source.client.hlen(source.keys.accounts)))
    groups = 0
    if source.client.exists(source.keys.groups):
        _copy_key_as_is(source, target, source.keys.groups, "set")
    for name in source.scan(patterns[GROUP_MEMBERS]):
        _copy_key_as_is(source, target, name, "set")
        groups += 1
    report.add("group sets", groups)
    if usage:
        for family in (BLOCKED, UNBLOCKED):
            for name in source.scan(patterns[family]):
                _copy_key_as_is(source, target, name, "hash")
                report.add("blocked/unblocked hashes", 1)


def _indexes(source: Side, target: Side, report: Report) -> None:
    """ids, expiry, bin, bin_times: one key here, id buckets there."""
    keys = target.keys
    for family, kind in ((IDS, "hash"), (EXPIRY, "zset"), (BIN, "hash"), (BIN_TIMES, "zset")):
        count = 0
        for key in source.keys.index_keys(family):
            batches = _hash_items(source, key) if kind == "hash" else _zset_items(source, key)
            for batch in batches:
                commands: list[tuple[Any, ...]] = []
                for member, value in batch:
                    token_id = int(member)
                    name = keys.index_of(family, token_id)
                    if kind == "hash":
                        commands.append(("HSET", name, member, value))
                    else:
                        commands.append(("ZADD", name, value, member))
                target.pipeline(commands)
                count += len(batch)
        report.add(family, count)


def _accounts_sets(source: Side, target: Side, report: Report) -> None:
    count = 0
    for name in source.scan(source.keys.patterns()[ACCOUNT_TOKENS]):
        cid = source.keys.account_of(ACCOUNT_TOKENS, name)
        if cid is None:  # the other layout's, under a prefix without braces
            continue
        members = [member for member in source.client.sscan_iter(name, count=BATCH)]
        for start in range(0, len(members), BATCH):
            target.client.sadd(target.keys.account_tokens(cid), *members[start:start + BATCH])
        count += 1
    report.add("account token sets", count)


def _used(source: Side, target: Side, report: Report) -> None:
    """`accessed` times (and the old sorted set's): the newer of source and target kept."""
    count = 0
    for family in (USED, LEGACY_ACCESSED):
        for key in source.keys.index_keys(family):
            batches: Iterator[list[tuple[str, Any]]] = (
                _hash_items(source, key) if family == USED else _zset_items(source, key))
            for batch in batches:
                by_key: dict[str, list[Any]] = {}
                for digest, when in batch:
                    name = target.keys.used_of(digest)
                    by_key.setdefault(name, []).extend((digest, int(float(when))))
                target.pipeline([("EVAL", TOUCH, 1, name, *pairs) for name, pairs in by_key.items()])
                count += len(batch)
    report.add("accessed times", count)


def _records(source: Side, target: Side, report: Report) -> None:
    """The records last: a grace copy keeps its end (PXAT); one that ended meanwhile is skipped."""
    tkeys = target.keys
    count = 0
    batch: list[tuple[str, str]] = []

    def flush() -> int:
        replies = source.pipeline([command for key, _ in batch for command in (("GET", key), ("PTTL", key))])
        now_ms = int(time.time() * 1000)
        commands: list[tuple[Any, ...]] = []
        for (_, digest), raw, ttl in zip(batch, replies[::2], replies[1::2], strict=True):
            if raw is None or int(ttl) == -2:
                continue
            command: tuple[Any, ...] = ("SET", tkeys.token(digest), raw)
            if int(ttl) > 0:
                command += ("PXAT", now_ms + int(ttl))
            commands.append(command)
        target.pipeline(commands)
        return len(commands)
    for key, digest in _records_of(source):
        batch.append((key, digest))
        if len(batch) >= BATCH:
            count += flush()
            batch = []
    if batch:
        count += flush()
    report.add("token records", count)


def _usage(source: Side, target: Side, report: Report) -> None:
    count = 0
    for name in source.scan(source.keys.patterns()[USAGE]):
        found = source.keys.usage_of(name)
        if found is None:  # the other layout's, under a prefix without braces
            continue
        window, cid = found
        values = source.client.hgetall(name)
        ttl = int(source.client.pttl(name))
        if not values:
            continue
        target_name = target.keys.usage(window, cid)
        target.client.hset(target_name, mapping=values)
        if ttl > 0:
            target.client.pexpire(target_name, ttl)
        count += 1
    report.add("usage hashes", count)


def _logs(source: Side, target: Side, report: Report) -> None:
    """Log lists, replaced whole. A token's lines go to the list of their own account (`cid`) on
    a cluster; into the token's one list, by time, on one Redis."""
    skeys, patterns = source.keys, source.keys.patterns()
    lists: dict[str, list[bytes]] = {}
    for name in source.scan(patterns[ACCOUNT_LOGS]):
        cid = skeys.account_of(ACCOUNT_LOGS, name)
        if cid is not None:  # None: the other layout's, under a prefix without braces
            lists.setdefault(target.keys.account_logs(cid), []).extend(source.client.lrange(name, 0, -1))
    for name in source.scan(patterns[TOKEN_LOGS]):
        token_id = skeys.token_logs_id(name)
        if token_id is None:
            continue
        for line in source.client.lrange(name, 0, -1):
            cid = int(orjson.loads(line).get("cid") or 0)
            lists.setdefault(target.keys.token_logs_of(token_id, cid), []).append(line)
    for name, lines in lists.items():
        lines.sort(key=lambda line: float(orjson.loads(line).get("timestamp") or 0))
        commands: list[tuple[Any, ...]] = [("DEL", name)]
        for start in range(0, len(lines), BATCH):
            commands.append(("RPUSH", name, *lines[start:start + BATCH]))
        target.pipeline(commands)
    report.add("log lists", len(lists))
