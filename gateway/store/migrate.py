"""`gateway migrate`: copy a store between the one-Redis layout and the cluster layout.

Both key layouts are in `store/keys.py`. The copy reads the source family by family (SCAN,
HSCAN, ZSCAN: never one command for a whole index) and writes the target in the order a running
gateway writes a new token: counters first (`next_id` and `next_account_id` never go backwards:
the target keeps the larger), then accounts, indexes and the recycle bin, `accessed` (the newer
time kept), and the records last. Every write sets what the source holds (SET, HSET, SADD, ZADD,
a log list replaced whole), so a second run gives the same result.

A target that holds data is refused, unless it holds only what a migration from this very source
wrote (the `migrated_from` marker) or `force` is given.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from redis.cluster import ClusterNode, RedisCluster

from gateway.config import ClusterSettings
from gateway.store.keys import ClusterKeys, Keys
from gateway.store.scripts import TOUCH

BATCH = 1000
MARKER = "migrated_from"


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


def _glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


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


# -- what each layout calls a family's keys ---------------------------------------------------

def _sharded_pattern(side: Side, family: str) -> str:
    return _glob(side.keys.base if isinstance(side.keys, ClusterKeys) else side.keys.prefix) + family


def _family_keys(side: Side, family: str) -> list[str]:
    """The keys of one of the hashes or sorted sets that are one key on one Redis and buckets on
    a cluster: `ids`, `used`, `expiry`, `bin`, `bin_times`, `accessed` (the old sorted set)."""
    if isinstance(side.keys, ClusterKeys):
        if family == "accessed":
            return []
        return [key for key in side.scan(_sharded_pattern(side, f"{family}:{{*}}"))]
    return [side.keys.prefix + family]


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


def _account_of(key: str, sharded: bool, family_prefix: str) -> tuple[int, str]:
    """(account id, the rest) of an account-tagged key name."""
    rest = key[len(family_prefix):]
    if sharded:
        match = re.match(r"\{a\.(\d+)\}(.*)$", rest)
        if match is None:
            raise ValueError(key)
        return int(match.group(1)), match.group(2)
    return int(rest.split(":", 1)[0]), rest.split(":", 1)[1] if ":" in rest else ""


# -- the copy ---------------------------------------------------------------------------------

def is_empty(side: Side, records_only: bool = False) -> bool:
    """No counter, no accounts, no token record (`records_only`: no record, for a copy in place,
    whose counters and accounts are the source's own)."""
    keys = side.keys
    if not records_only and any(side.client.exists(name) for name in (keys.next_id, keys.accounts)):
        return False
    pattern = _sharded_pattern(side, "tok:*")
    return next(side.scan(pattern), None) is None


def migrate(source: Side, target: Side, *, usage: bool = False, logs: bool = False, force: bool = False,
            say: Callable[[str], None] = print) -> Report:
    marker = target.keys.prefix + MARKER
    in_place = source.client is target.client  # a cluster's one-slot layout into its sharded one
    if not is_empty(target, records_only=in_place):
        previous = target.client.get(marker)
        if not force and (previous is None or _text(previous) != source.name):
            raise MigrationRefused(
                f"the target ({target.name}) already holds data"
                + (f" (migrated from {_text(previous)})" if previous is not None else "")
                + "; give --force to copy over it")
    report = Report()
    _counters(source, target, report)
    _globals(source, target, report, usage)
    _indexes(source, target, report)
    _accounts_sets(source, target, report)
    _used(source, target, report)
    _records(source, target, report)
    if usage:
        _usage(source, target, report)
    if logs:
        _logs(source, target, report)
    target.client.set(marker, source.name)
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


def _globals(source: Side, target: Side, report: Report, usage: bool) -> None:
    """Accounts, the groups the upstream application keeps, and (with usage) the blocked tokens:
    the same names in both layouts."""
    prefix = source.keys.prefix
    if source.client.exists(source.keys.accounts):
        _copy_key_as_is(source, target, source.keys.accounts, "hash")
        report.add("accounts", int(source.client.hlen(source.keys.accounts)))
    groups = 0
    if source.client.exists(source.keys.groups):
        _copy_key_as_is(source, target, source.keys.groups, "set")
    for name in source.scan(_glob(prefix) + "group:*"):
        _copy_key_as_is(source, target, name, "set")
        groups += 1
    report.add("group sets", groups)
    if usage:
        for family in ("blocked:*", "unblocked:*"):
            for name in source.scan(_glob(prefix) + family):
                _copy_key_as_is(source, target, name, "hash")
                report.add("blocked/unblocked hashes", 1)


def _indexes(source: Side, target: Side, report: Report) -> None:
    """ids, expiry, bin, bin_times: one key here, id buckets there."""
    keys = target.keys
    for family, kind in (("ids", "hash"), ("expiry", "zset"), ("bin", "hash"), ("bin_times", "zset")):
        count = 0
        for key in _family_keys(source, family):
            batches = _hash_items(source, key) if kind == "hash" else _zset_items(source, key)
            for batch in batches:
                commands: list[tuple[Any, ...]] = []
                for member, value in batch:
                    token_id = int(member)
                    name = _by_id(keys, family, token_id)
                    if kind == "hash":
                        commands.append(("HSET", name, member, value))
                    else:
                        commands.append(("ZADD", name, value, member))
                target.pipeline(commands)
                count += len(batch)
        report.add(family, count)


def _by_id(keys: Keys, family: str, token_id: int) -> str:
    if isinstance(keys, ClusterKeys):
        return {"ids": keys.ids_of, "expiry": keys.expiry_of, "bin": keys.bin_of,
                "bin_times": keys.bin_times_of}[family](token_id)
    return {"ids": keys.ids, "expiry": keys.expiry, "bin": keys.bin, "bin_times": keys.bin_times}[family]


def _accounts_sets(source: Side, target: Side, report: Report) -> None:
    family_prefix = (source.keys.base if isinstance(source.keys, ClusterKeys) else source.keys.prefix) + "cid:"
    count = 0
    for name in source.scan(_glob(family_prefix) + "*"):
        cid = (_account_of(name, True, family_prefix)[0] if source.sharded else int(name[len(family_prefix):]))
        members = [member for member in source.client.sscan_iter(name, count=BATCH)]
        for start in range(0, len(members), BATCH):
            target.client.sadd(target.keys.account_tokens(cid), *members[start:start + BATCH])
        count += 1
    report.add("account token sets", count)


def _used(source: Side, target: Side, report: Report) -> None:
    """`accessed` times (and the old sorted set's): the newer of source and target kept."""
    count = 0
    for family in ("used", "accessed"):
        for key in _family_keys(source, family):
            batches: Iterator[list[tuple[str, Any]]] = (
                _hash_items(source, key) if family == "used" else _zset_items(source, key))
            for batch in batches:
                by_key: dict[str, list[Any]] = {}
                for digest, when in batch:
                    name = target.keys.used_of(digest) if isinstance(target.keys, ClusterKeys) else target.keys.used
                    by_key.setdefault(name, []).extend((digest, int(float(when))))
                target.pipeline([("EVAL", TOUCH, 1, name, *pairs) for name, pairs in by_key.items()])
                count += len(batch)
    report.add("accessed times", count)


def _records(source: Side, target: Side, report: Report) -> None:
    """The records last: a grace copy keeps its end (PXAT); one that ended meanwhile is skipped."""
    skeys, tkeys = source.keys, target.keys
    pattern = _glob(skeys.token_prefix) + "*"
    count = 0
    batch: list[str] = []

    def flush() -> int:
        replies = source.pipeline([command for key in batch for command in (("GET", key), ("PTTL", key))])
        now_ms = int(time.time() * 1000)
        commands: list[tuple[Any, ...]] = []
        for key, raw, ttl in zip(batch, replies[::2], replies[1::2], strict=True):
            if raw is None or int(ttl) == -2:
                continue
            digest = key.split("}", 1)[1] if source.sharded else key[len(skeys.token_prefix):]
            command: tuple[Any, ...] = ("SET", tkeys.token(digest), raw)
            if int(ttl) > 0:
                command += ("PXAT", now_ms + int(ttl))
            commands.append(command)
        target.pipeline(commands)
        return len(commands)
    for key in source.scan(pattern):
        if source.sharded and "}" not in key:
            continue
        if not source.sharded and key[len(skeys.token_prefix):].startswith("{"):
            continue  # the cluster layout's, under a prefix without braces
        batch.append(key)
        if len(batch) >= BATCH:
            count += flush()
            batch = []
    if batch:
        count += flush()
    report.add("token records", count)


def _usage(source: Side, target: Side, report: Report) -> None:
    family_prefix = (source.keys.base if isinstance(source.keys, ClusterKeys) else source.keys.prefix) + "usage:"
    count = 0
    for name in source.scan(_glob(family_prefix) + "*"):
        if source.sharded:
            cid, rest = _account_of(name, True, family_prefix)
            window = int(rest.lstrip(":"))
        else:
            window_text, _, cid_text = name[len(family_prefix):].partition(":")
            window, cid = int(window_text), int(cid_text)
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
    base = source.keys.base if isinstance(source.keys, ClusterKeys) else source.keys.prefix
    lists: dict[str, list[bytes]] = {}
    for name in source.scan(_glob(base) + "logs:acct:*"):
        cid = (_account_of(name, True, base + "logs:acct:")[0] if source.sharded
               else int(name[len(base + "logs:acct:"):]))
        lists.setdefault(target.keys.account_logs(cid), []).extend(source.client.lrange(name, 0, -1))
    for name in source.scan(_glob(base) + "logs:tok:*"):
        if source.sharded:
            _, rest = _account_of(name, True, base + "logs:tok:")
            token_id = int(rest)
        else:
            token_id = int(name[len(base + "logs:tok:"):])
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
