"""Token records on a Redis Cluster, spread over its slots (`ClusterKeys` in `store/keys.py`).

A record, its id index entry, its account's id set and its expiry entry carry different hash
tags, so one change can no longer be one transaction. Each change is a sequence of steps,
ordered so that a crash between two of them never lets a key authenticate that should not:
only the record (`tok:...`) authenticates, so

- a creation or a restore writes the indexes first (id -> digest, the account's set, expiry) and
  the record last; a restore takes the record out of the recycle bin only after that;
- a deletion puts the record in the bin first (when binned), deletes the record (and its rotated
  keys' grace copies) next, and the index entries last;
- a rotation writes the new record, then deletes the old one (or makes its grace copy), and only
  then moves the id index to the new digest, if it still names the old one (a script on the id's
  slot); a rotation that loses that race deletes its new record again.

What a crash can leave is an index entry without a record (the token is gone: it is not listed,
and its id finds nothing), and a record no index names that only a new, never-answered key opens.
The housekeeper removes index entries whose record stays missing (`sweep_orphans`). A change made
through the API is acknowledged only after its last step; repeating one that got no answer is
safe (each step is).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any, cast

import hiredis
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from gateway.errors import StoreUnavailable
from gateway.store.keys import ID_BUCKETS, TOKEN_BUCKETS, USED_BUCKETS, ClusterKeys, used_bucket
from gateway.store.resp import LeanNodes, RespClient, script_sha
from gateway.store.scripts import CLEAR_ORPHAN, SWAP_ID, TOUCH
from gateway.store.slots import fill_loads, group_by_master, key_slot, plan_loads, refused, touch_calls, touched
from gateway.store.tokens import (
    STORE_ERRORS,
    TORN_RETRIES,
    TOUCH_CHUNK,
    ScriptsFailed,
    TokenStore,
    _unavailable,
    expires_at,
    grace_copy,
    grace_digests,
    rotated,
    torn_write,
)
from gateway.tokens import records_from_replies

# Entries of the id index the housekeeper checks per sweep (~500 EXISTS: a few ms of CPU, so a
# whole pass over 3,000,000 tokens takes hours); an entry whose record is missing is removed once
# it was seen so twice, ORPHAN_AGE apart (a creation in progress writes the index a moment before
# the record).
ORPHAN_ENTRIES_PER_SWEEP = 500
MAX_SUSPECTS = 100_000
ORPHAN_AGE = 30.0
SLOT_REFRESH = 0.25


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ShardedTokenStore(TokenStore):
    """`TokenStore` on a cluster: the same methods, each a sequence of one-slot steps."""

    def __init__(self, client: aioredis.Redis, prefix: str, lean: RespClient | None = None,
                 lean_loads: RespClient | None = None) -> None:
        super().__init__(client, prefix, lean, lean_loads)
        self.shards = keys = cast(ClusterKeys, self.keys)
        self._orphan_cursor = 0  # the id bucket being checked, and the HSCAN cursor in it
        self._orphan_scan = 0
        self._suspects: dict[tuple[int, str], float] = {}
        self._refreshed = 0.0
        self._refreshing: set[asyncio.Task[None]] = set()
        # The lean clients of the masters, for `load_many_then`; None: redis-py for the loads too.
        self.lean_nodes: LeanNodes | None = None
        self.lean_script_nodes: LeanNodes | None = None  # for `scripts`, on connections of their own
        self._bucket_slots = [key_slot(keys.token(f"{bucket:03x}")) for bucket in range(TOKEN_BUCKETS)]
        # Each bucket's record key without the digest, made once: a load's key is one concatenation.
        self._bucket_keys = [keys.token(f"{bucket:03x}")[:-3] for bucket in range(TOKEN_BUCKETS)]
        self._used_keys = [keys.used_bucket(bucket) for bucket in range(USED_BUCKETS)]
        self._used_slots = [key_slot(name) for name in self._used_keys]

    # -- hot path ------------------------------------------------------------------------------

    async def load_many(self, digests: Sequence[str]) -> list[dict[str, Any] | None]:
        outcomes = await self.load_each(digests)
        for outcome in outcomes:
            if isinstance(outcome, StoreUnavailable):
                raise outcome
        return cast(list[dict[str, Any] | None], outcomes)

    async def load_each(self, digests: Sequence[str]) -> list[dict[str, Any] | StoreUnavailable | None]:
        """One pipeline: a GET per record and an HMGET per bucket of `used`; redis-py sends each
        node its commands in one write, and the nodes are asked at once. A node that does not
        answer fails only the digests it holds (StoreUnavailable in their place): the others are
        answered."""
        if not digests:
            return []
        keys = self.shards
        count = len(digests)
        buckets: dict[int, list[int]] = {}
        commands: list[tuple[Any, ...]] = []
        for index, digest in enumerate(digests):
            buckets.setdefault(used_bucket(digest), []).append(index)
            commands.append(("GET", keys.token(digest)))
        for bucket, indexes in buckets.items():
            commands.append(("HMGET", keys.used_bucket(bucket), *[digests[index] for index in indexes]))

        async def run() -> list[Any]:
            started = time.perf_counter()
            replies: list[Any] = [None] * len(commands)
            todo = list(range(len(commands)))
            for _ in range(TORN_RETRIES + 1):
                async with self.client.pipeline(transaction=False) as pipe:
                    for index in todo:
                        pipe.execute_command(*commands[index])
                    answers = await pipe.execute(raise_on_error=False)
                for index, answer in zip(todo, answers, strict=True):
                    replies[index] = answer
                # Sent again: what a connection torn down under it (`RedisStore.call`) failed.
                todo = [index for index in todo if isinstance(replies[index], redis.exceptions.ConnectionError)
                        or (isinstance(replies[index], BaseException) and torn_write(replies[index]))]
                if not todo:
                    break
            self.batch_latency.observe(time.perf_counter() - started)
            return replies
        replies = await self.call(run)
        failures: dict[int, StoreUnavailable] = {}
        for index, reply in enumerate(replies[:count]):
            if isinstance(reply, BaseException):
                failures[index] = _unavailable(reply)
        used: list[Any] = [None] * count
        for indexes, reply in zip(buckets.values(), replies[count:], strict=True):
            for position, index in enumerate(indexes):
                if isinstance(reply, BaseException):
                    failures.setdefault(index, _unavailable(reply))
                else:
                    used[index] = reply[position]
        if failures:
            self._refresh_slots_soon()
        raws = [None if index in failures else reply for index, reply in enumerate(replies[:count])]
        records: list[dict[str, Any] | StoreUnavailable | None] = list(
            records_from_replies(digests, raws, used, [None] * count))
        for index, failure in failures.items():
            records[index] = failure
        return records

    def load_many_then(self, digests: Sequence[str], callback: Callable[[Any], None]) -> bool:
        """The loads on the lean clients, a batch per master (found in redis-py's slot map), sent
        at once, answered from their replies; `callback` gets the outcomes as `load_each` gives
        them. What a master refused (a slot moved: MOVED, ASK, TRYAGAIN) or could not answer is
        asked again through redis-py, which follows redirections and reads the slot map again;
        a master that timed out fails its digests (StoreUnavailable). False, and nothing sent,
        when the slot map is not known yet or a master's connection is not open yet (it is being
        opened): `load_each` then."""
        lean_nodes = self.lean_nodes
        if lean_nodes is None or not digests:
            return False
        slots = cast(RedisCluster, self.client).nodes_manager.slots_cache
        per_node = plan_loads(digests, slots, self._bucket_slots, self._bucket_keys, self._used_slots,
                              self._used_keys)
        if per_node is None:
            return False
        clients = {address: lean_nodes.client(address) for address in per_node}
        closed = [lean for lean in clients.values() if not lean.is_open]
        if closed:
            for lean in closed:
                lean.open_soon()
            return False
        count = len(digests)
        raws: list[Any] = [None] * count
        used: list[Any] = [None] * count
        failed: dict[int, StoreUnavailable] = {}
        again: set[int] = set()
        waiting = [len(per_node)]
        started = time.perf_counter()

        def finish() -> None:
            self.batch_latency.observe(time.perf_counter() - started)
            if again:
                self._spawn_fallback(digests, raws, used, failed, sorted(again), callback)
                return
            callback(self._outcomes(digests, raws, used, failed))

        def answer_for(targets: list[Any]) -> Callable[[Any], None]:
            def answer(replies: list[Any] | BaseException) -> None:
                if isinstance(replies, redis.exceptions.TimeoutError):
                    for index in touched(targets):
                        failed[index] = _unavailable(replies)
                elif isinstance(replies, BaseException) or refused(replies):
                    again.update(touched(targets))  # a slot moved (or is moving): redis-py follows it
                else:
                    fill_loads(targets, replies, raws, used)
                waiting[0] -= 1
                if waiting[0] == 0:
                    finish()
            return answer

        for address, batch in per_node.items():
            if not clients[address].execute_then(batch.commands, answer_for(batch.targets)):
                again.update(touched(batch.targets))  # closed since: through redis-py
                waiting[0] -= 1
        if waiting[0] == 0:
            finish()
        return True

    async def pipelined(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """`RedisStore.pipelined` on the lean clients (every command here names its one key
        first): each master's commands sent at once, in order. What a master refused (a slot
        moved) or lost with its connection goes through redis-py; a master that timed out fails
        the call. Replies raw, as the lean client reads them (the commands sent here answer the
        same through either)."""
        lean_nodes = self.lean_script_nodes
        if lean_nodes is None or not commands:
            return await super().pipelined(commands)
        groups = self._by_master([command[1] for command in commands])
        if groups is None:
            return await super().pipelined(commands)
        replies: list[Any] = [None] * len(commands)
        again: list[int] = []
        for indexes, result in await self._send_by_master(lean_nodes, groups, [tuple(c) for c in commands]):
            if isinstance(result, redis.exceptions.TimeoutError):
                raise _unavailable(result)
            if isinstance(result, BaseException):
                again += indexes
                continue
            for index, reply in zip(indexes, result, strict=True):
                if isinstance(reply, hiredis.ReplyError):
                    again.append(index)
                else:
                    replies[index] = reply
        if again:
            for index, reply in zip(again, await super().pipelined([commands[index] for index in again]), strict=True):
                replies[index] = reply
        return replies

    def _by_master(self, keys: Sequence[Any]) -> dict[str, list[int]] | None:
        """Indexes of `keys` per master address, from redis-py's slot map; None if it does not
        know a slot yet."""
        names = [key if isinstance(key, str) else bytes(key).decode("utf-8", "surrogateescape") for key in keys]
        return group_by_master(names, cast(RedisCluster, self.client).nodes_manager.slots_cache)

    async def _send_by_master(self, lean_nodes: LeanNodes, groups: dict[str, list[int]],
                              commands: Sequence[tuple[Any, ...]]) -> list[tuple[list[int], Any]]:
        """Each master's commands on its lean client, all at once; per master its replies or the
        exception (a connection not open yet: opened meanwhile, and ConnectionError here)."""
        loop = asyncio.get_running_loop()
        sent: list[tuple[list[int], asyncio.Future[Any]]] = []
        for address, indexes in groups.items():
            future: asyncio.Future[Any] = loop.create_future()
            lean = lean_nodes.client(address)

            def answer(replies: Any, future: asyncio.Future[Any] = future) -> None:
                if not future.done():
                    future.set_result(replies)
            if not lean.is_open:
                lean.open_soon()
                future.set_result(redis.exceptions.ConnectionError("not open yet"))
            elif not lean.execute_then([commands[index] for index in indexes], answer):
                future.set_result(redis.exceptions.ConnectionError("closed"))
            sent.append((indexes, future))
        return [(indexes, await future) for indexes, future in sent]

    async def scripts(self, source: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """`RedisStore.scripts` on the lean clients: the calls grouped by master (redis-py's slot
        map), each master's sent at once. What a master refused (NOSCRIPT, a slot moved) or lost
        with its connection goes through redis-py (`RedisStore.scripts`, which sends the script
        whole where needed and follows redirections); a master that timed out fails its calls
        (`ScriptsFailed`, which says which ran)."""
        lean_nodes = self.lean_script_nodes
        if lean_nodes is None or not calls:
            return await super().scripts(source, calls)
        groups = self._by_master([keys[0] for keys, _ in calls])
        if groups is None:
            return await super().scripts(source, calls)
        sha = script_sha(source)
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        sent = await self._send_by_master(lean_nodes, groups, commands)
        replies: list[Any] = [None] * len(calls)
        done: set[int] = set()
        again: list[int] = []
        timed_out: BaseException | None = None
        for indexes, result in sent:
            if isinstance(result, redis.exceptions.TimeoutError):
                timed_out = result  # ran or not: unknown
            elif isinstance(result, BaseException):
                again += indexes
            else:
                for index, reply in zip(indexes, result, strict=True):
                    if isinstance(reply, hiredis.ReplyError):
                        again.append(index)
                    else:
                        replies[index] = reply
                        done.add(index)
        if timed_out is not None:
            raise ScriptsFailed(timed_out, done)
        if again:
            try:
                rest = await super().scripts(source, [calls[index] for index in again])
            except ScriptsFailed as failed:
                raise ScriptsFailed(failed, done | {again[position] for position in failed.done}) from failed
            for index, reply in zip(again, rest, strict=True):
                replies[index] = reply
        return replies

    def _outcomes(self, digests: Sequence[str], raws: list[Any], used: list[Any],
                  failed: dict[int, StoreUnavailable]) -> list[dict[str, Any] | StoreUnavailable | None]:
        count = len(digests)
        try:
            records: list[dict[str, Any] | StoreUnavailable | None] = list(
                records_from_replies(digests, raws, used, [None] * count))
        except Exception as exc:  # a record that does not parse: the whole batch fails, as on one Redis
            return [_unavailable(exc)] * count
        for index, failure in failed.items():
            records[index] = failure
        return records

    def _spawn_fallback(self, digests: Sequence[str], raws: list[Any], used: list[Any],
                        failed: dict[int, StoreUnavailable], again: list[int], callback: Callable[[Any], None]) -> None:
        async def fallback() -> None:
            try:
                outcomes = await self.load_each([digests[index] for index in again])
            except Exception as exc:
                outcomes = [exc if isinstance(exc, StoreUnavailable) else _unavailable(exc)] * len(again)
            merged = self._outcomes(digests, raws, used, failed)
            for index, outcome in zip(again, outcomes, strict=True):
                merged[index] = outcome
            callback(merged)
        task = asyncio.ensure_future(fallback())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    def _refresh_slots_soon(self) -> None:
        """A node failed some loads: read the slot map again (a failover may have moved its
        slots), at most every SLOT_REFRESH seconds, in the background."""
        now = time.monotonic()
        if now - self._refreshed < SLOT_REFRESH:
            return
        self._refreshed = now

        async def refresh() -> None:
            with suppress(*STORE_ERRORS, AttributeError):
                await cast(RedisCluster, self.client).nodes_manager.initialize()
        task = asyncio.ensure_future(refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def touch(self, accessed: dict[str, int]) -> None:
        """TOUCH per `used` bucket (USED_BUCKETS at most), each master's calls sent at once."""
        if not accessed:
            return
        await self.scripts(TOUCH, touch_calls(accessed, self._used_keys, TOUCH_CHUNK))

    async def fold_legacy_accessed(self) -> int:
        return 0  # the cluster layout has no old `accessed` sorted set

    # -- tokens API ----------------------------------------------------------------------------

    def _index_commands(self, record: dict[str, Any]) -> list[tuple[Any, ...]]:
        keys, token_id = self.shards, int(record["id"])
        return [("SADD", keys.account_tokens(int(record.get("cid", 0))), str(token_id)),
                ("HSET", keys.ids_of(token_id), str(token_id), record["digest"]),
                ("ZADD", keys.expiry_of(token_id), expires_at(record), str(token_id))]

    async def insert(self, records: list[dict[str, Any]]) -> None:
        """Indexes first, records last."""
        await self.pipelined([command for record in records for command in self._index_commands(record)])
        await self.pipelined([("SET", self.shards.token(record["digest"]), orjson.dumps(record))
                              for record in records])
        await self.changed()

    async def insert_first(self, record: dict[str, Any]) -> bool:
        """`next_id` made first (SET NX: one instance wins), then the token."""
        if not await self.call(lambda: self.client.set(self._next_id, record["id"], nx=True)):
            return False
        await self.insert([record])
        return True

    async def _write_if_absent(self, record: dict[str, Any], also: Any = None) -> bool:
        return await self._create_unless_taken(record, restoring=also is not None)

    async def _create_unless_taken(self, record: dict[str, Any], restoring: bool) -> bool:
        """Indexes, then the record if its key is free (SET NX), then (a restore) out of the bin.
        A key held by another token: the index entries written are taken back, False."""
        keys, token_id = self.shards, int(record["id"])
        await self.pipelined(self._index_commands(record))
        key = keys.token(record["digest"])
        if not await self.call(lambda: self.client.set(key, orjson.dumps(record), nx=True)):
            held = await self.call(lambda: self.client.get(key))
            if held is None or int(orjson.loads(held).get("id", -1)) != token_id:
                await self.scripts(CLEAR_ORPHAN, [([keys.ids_of(token_id), keys.expiry_of(token_id)],
                                                   [str(token_id), record["digest"]])])
                await self.pipelined([("SREM", keys.account_tokens(int(record.get("cid", 0))), str(token_id))])
                return False
            # The very token, written by an earlier attempt that got no answer: finish it.
        if restoring:
            await self.pipelined([("HDEL", keys.bin_of(token_id), str(token_id)),
                                  ("ZREM", keys.bin_times_of(token_id), str(token_id))])
        await self.changed()
        return True

    async def get_many(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        wanted = [int(token_id) for token_id in ids]
        if not wanted:
            return []
        keys = self.shards
        digests = await self.pipelined([("HGET", keys.ids_of(token_id), str(token_id)) for token_id in wanted])
        found = [_text(digest) for digest in digests if digest is not None]
        return [record for record in await self.load_many(found) if record is not None]

    def _grace_commands(self, record: dict[str, Any]) -> list[tuple[Any, ...]]:
        graced = record.get("graced") or {}
        return [("SET", self.shards.token(digest), orjson.dumps(grace_copy(record, digest, int(graced[digest]))),
                 "EXAT", int(graced[digest])) for digest in grace_digests(record)]

    async def replace(self, record: dict[str, Any]) -> None:
        """The expiry entry, the record, its grace copies (a crash between can leave a grace copy
        as it was until its grace ends; the change was not acknowledged: repeat it)."""
        keys, token_id = self.shards, int(record["id"])
        await self.pipelined([("ZADD", keys.expiry_of(token_id), expires_at(record), str(token_id)),
                              ("SET", keys.token(record["digest"]), orjson.dumps(record)),
                              *self._grace_commands(record)])
        await self.changed()

    async def rotate(self, record: dict[str, Any], new_digest: str, grace_until: int | None) -> dict[str, Any] | None:
        """New record, then the old one deleted (or its grace copy), then the id index moved if it
        still names the old digest (`SWAP_ID`); None, the new record deleted again, if not."""
        keys, token_id, old = self.shards, int(record["id"]), record["digest"]
        current = await self.call(lambda: self.client.hget(keys.ids_of(token_id), str(token_id)))
        if current is None or _text(current) != old:
            return None
        moved = rotated(record, new_digest, grace_until)
        await self.pipelined([("SET", keys.token(new_digest), orjson.dumps(moved)),
                              ("HSET", keys.used_of(new_digest), new_digest, int(record.get("accessed", 0)))])
        if grace_until is None:
            await self.pipelined([("DEL", keys.token(old)), ("HDEL", keys.used_of(old), old)])
        else:
            await self.pipelined([("SET", keys.token(old), orjson.dumps(grace_copy(moved, old, grace_until)),
                                   "EXAT", grace_until)])
        [swapped] = await self.scripts(SWAP_ID, [([keys.ids_of(token_id)], [str(token_id), old, new_digest])])
        if not swapped:
            await self.pipelined([("DEL", keys.token(new_digest)), ("HDEL", keys.used_of(new_digest), new_digest)])
            return None
        await self.changed()
        return moved

    async def remove(self, records: list[dict[str, Any]], *, to_bin: bool) -> None:
        """Into the bin first, the records (and grace copies) next, the index entries last."""
        keys, now = self.shards, int(time.time())
        binned: list[tuple[Any, ...]] = []
        gone: list[tuple[Any, ...]] = []
        unindexed: list[tuple[Any, ...]] = []
        for record in records:
            token_id = int(record["id"])
            for digest in grace_digests(record):
                gone += [("DEL", keys.token(digest)), ("HDEL", keys.used_of(digest), digest)]
            record = {name: value for name, value in record.items() if name != "graced"}
            digest = record["digest"]
            if to_bin:
                binned += [("HSET", keys.bin_of(token_id), str(token_id), orjson.dumps({**record, "deleted": now})),
                           ("ZADD", keys.bin_times_of(token_id), now, str(token_id))]
            gone.append(("DEL", keys.token(digest)))
            unindexed += [("HDEL", keys.ids_of(token_id), str(token_id)),
                          ("SREM", keys.account_tokens(int(record.get("cid", 0))), str(token_id)),
                          ("HDEL", keys.used_of(digest), digest),
                          ("ZREM", keys.expiry_of(token_id), str(token_id))]
        for step in (binned, gone, unindexed):
            await self.pipelined(step)
        await self.changed()

    async def claim_expired(self, token_id: int) -> bool:
        key = self.shards.expiry_of(token_id)
        return bool(await self.call(lambda: self.client.zrem(key, str(token_id))))

    async def expiry_candidates(self, before: float, limit: int) -> list[int]:
        """The due ids of every id bucket (one pipeline), `limit` at most."""
        replies = await self.pipelined([("ZRANGEBYSCORE", self.shards.expiry_bucket(bucket), "-inf", before,
                                         "LIMIT", 0, limit) for bucket in range(ID_BUCKETS)])
        ids = sorted(int(member) for reply in replies for member in reply)
        return ids[:limit]

    async def set_expiry(self, expiries: dict[int, int]) -> None:
        await self.pipelined([("ZADD", self.shards.expiry_of(token_id), when, str(token_id))
                              for token_id, when in expiries.items()])

    # -- recycle bin ---------------------------------------------------------------------------

    async def binned(self, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        keys = self.shards
        raw: list[Any]
        if ids is None:
            hashes = await self.pipelined([("HVALS", keys.bin_bucket(bucket)) for bucket in range(ID_BUCKETS)])
            raw = [value for values in hashes for value in values]
        else:
            raw = [value for value in await self.pipelined(
                [("HGET", keys.bin_of(int(token_id)), str(token_id)) for token_id in ids]) if value]
        return sorted((orjson.loads(value) for value in raw), key=lambda record: int(record["id"]))

    async def purge_bin(self, older_than: float, ids: Iterable[int] | None = None) -> int:
        keys = self.shards
        if ids is None:
            replies = await self.pipelined([("ZRANGEBYSCORE", keys.bin_times_bucket(bucket), "-inf", older_than)
                                            for bucket in range(ID_BUCKETS)])
            victims = [int(member) for reply in replies for member in reply]
        else:
            victims = [int(token_id) for token_id in ids]
        if not victims:
            return 0
        await self.pipelined([command for token_id in victims for command in (
            ("HDEL", keys.bin_of(token_id), str(token_id)), ("ZREM", keys.bin_times_of(token_id), str(token_id)))])
        await self.changed()
        return len(victims)

    # -- what a crash between two steps left ---------------------------------------------------

    async def sweep_orphans(self, now: float | None = None) -> int:
        """Check about ORPHAN_ENTRIES_PER_SWEEP entries of the id index, going round its buckets
        (HSCAN, a cursor kept between sweeps): an id whose digest has no record, seen so twice
        ORPHAN_AGE apart, is taken out of the id index and the expiry index (`CLEAR_ORPHAN`: only
        if the index still names that digest). How many were removed."""
        moment = time.monotonic() if now is None else now
        keys = self.shards
        bucket, cursor = self._orphan_cursor, self._orphan_scan
        next_cursor, found = await self.call(
            lambda: self.client.hscan(keys.ids_bucket(bucket), cursor, count=ORPHAN_ENTRIES_PER_SWEEP))
        self._orphan_scan = int(next_cursor)
        if self._orphan_scan == 0:  # that bucket done: the next one at the next sweep
            self._orphan_cursor = (bucket + 1) % ID_BUCKETS
        pairs = found.items() if isinstance(found, dict) else zip(found[::2], found[1::2], strict=True)
        entries = [(int(token_id), _text(digest)) for token_id, digest in pairs]
        if not entries:
            return 0
        exists = await self.pipelined([("EXISTS", keys.token(digest)) for _, digest in entries])
        missing = {entry for entry, there in zip(entries, exists, strict=True) if not int(there)}
        for entry in [entry for entry in entries if entry not in missing and entry in self._suspects]:
            del self._suspects[entry]  # its record came (a creation in progress)
        confirmed = [entry for entry in missing if moment - self._suspects.setdefault(entry, moment) >= ORPHAN_AGE]
        if len(self._suspects) > MAX_SUSPECTS:  # never more than this held: the oldest go
            for entry in list(self._suspects)[:len(self._suspects) - MAX_SUSPECTS]:
                del self._suspects[entry]
        if not confirmed:
            return 0
        replies = await self.scripts(CLEAR_ORPHAN, [([keys.ids_of(token_id), keys.expiry_of(token_id)],
                                                     [str(token_id), digest]) for token_id, digest in confirmed])
        for entry in confirmed:
            self._suspects.pop(entry, None)
        return sum(int(reply) for reply in replies)


def open_token_store(client: aioredis.Redis, prefix: str, lean: RespClient | None = None,
                     lean_loads: RespClient | None = None, lean_nodes: LeanNodes | None = None,
                     lean_script_nodes: LeanNodes | None = None) -> TokenStore:
    """The token store for `client`: the sharded one on a Redis Cluster."""
    if isinstance(client, RedisCluster):
        store = ShardedTokenStore(client, prefix, lean, lean_loads)
        store.lean_nodes, store.lean_script_nodes = lean_nodes, lean_script_nodes
        return store
    return TokenStore(client, prefix, lean, lean_loads)


class ReplicaWait:
    """WAIT on a cluster. WAIT counts the replicas of the one master it is sent to, for the writes
    made on its own connection: so, after a change, every master gets an INCR of a counter in a
    slot it holds and a WAIT behind it, on one connection of its own (the replication stream is in
    order: a replica that acknowledges the INCR holds everything written before it). All masters
    are asked at once, not only those the change touched: which those were is the store's
    business, and a master the change did not touch confirms at once."""

    def __init__(self, cluster: RedisCluster, keys: ClusterKeys, options: dict[str, Any], timeout: float,
                 connect_timeout: float) -> None:
        self._cluster = cluster
        self._keys = keys
        self._options = options
        self._timeout = timeout  # the socket timeout: above the WAIT's own
        self._connect_timeout = connect_timeout
        self._clients: dict[str, aioredis.Redis] = {}
        self._markers: dict[str, str] = {}

    def _marker(self, name: str) -> str | None:
        """A counter whose slot `name` holds (the first group found, remembered while it still does)."""
        slots = self._cluster.nodes_manager.slots_cache
        known = self._markers.get(name)
        if known is not None:
            nodes = slots.get(key_slot(known))
            if nodes and nodes[0].name == name:
                return known
        for group in range(4 * 16384):  # 16384 slots: a master with any slot has one of these
            key = self._keys.writes_in(group)
            nodes = slots.get(key_slot(key))
            if nodes and nodes[0].name == name:
                self._markers[name] = key
                return key
        return None

    async def _confirmed_by(self, name: str, host: str, port: int, replicas: int, wait_ms: int) -> bool:
        key = self._marker(name)
        if key is None:
            return False
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = aioredis.Redis(
                host=host, port=port, socket_timeout=self._timeout, socket_connect_timeout=self._connect_timeout,
                **self._options)
        async with client.pipeline(transaction=False) as pipe:  # one connection for both
            pipe.incr(key)
            pipe.execute_command("WAIT", replicas, wait_ms)
            replies = await pipe.execute()
        return int(replies[-1]) >= replicas

    async def confirmed(self, replicas: int, wait_ms: int) -> bool:
        """Whether every master's replicas (`replicas` of them at least) hold what was written on
        it before now, `wait_ms` at most. A master that cannot be asked has not confirmed."""
        masters = self._cluster.get_primaries()
        if not masters:
            return False
        answers = await asyncio.gather(*(self._confirmed_by(node.name, node.host, int(node.port), replicas, wait_ms)
                                         for node in masters), return_exceptions=True)
        return all(answer is True for answer in answers)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
