"""TokenCache against a real redis-server: batched misses, negative answers, refreshes, outages."""
from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.api.validation import DEFAULTS
from gateway.auth.authenticator import Authenticator
from gateway.auth.checks import Checks, RequestFacts
from gateway.auth.compiler import TokenCompiler
from gateway.config import CacheSettings, RedisSettings, Settings
from gateway.errors import Denied, StoreUnavailable
from gateway.store.cache import MAX_BATCH, MAX_HOLD, MAX_IN_FLIGHT, TokenCache
from gateway.store.keys import Keys
from gateway.store.tokens import TokenStore, connect_redis
from gateway.tokens import Token, TokenType, key_digest, new_key
from gateway.writers.accessed import AccessedWriter

from support.servers import RedisProcess


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    redis: RedisProcess
    client: aioredis.Redis
    store: TokenStore
    cache: TokenCache
    clock: Clock
    prefix: str
    subscribers: list[asyncio.Task[None]]

    async def add(self, count: int, **fields: Any) -> list[tuple[str, dict[str, Any]]]:
        """`count` tokens written as the tokens API writes them: (key, record) pairs."""
        ids = await self.store.allocate_ids(count)
        made = []
        for token_id in ids:
            key = new_key()
            record = {**DEFAULTS, "ttl": 3600, "info": f"token {token_id}", "id": token_id,
                      "digest": key_digest(key), "created": int(time.time()), "accessed": 0, "cid": 7, **fields}
            made.append((key, record))
        await self.store.insert([record for _, record in made])
        return made

    async def build(self, **settings: Any) -> TokenCache:
        """A cache following the invalidation channel: until it is live it trusts no entry."""
        self.cache = TokenCache(self.store, CacheSettings(**settings), TokenCompiler(Settings(routes=()), self.store),
                                clock=self.clock)
        self.subscribers.append(asyncio.create_task(self.cache.run_subscriber()))
        async with asyncio.timeout(5):
            await self.cache.subscribed.wait()
        return self.cache

    async def commands(self) -> dict[str, int]:
        watcher = aioredis.Redis.from_url(self.redis.url)
        try:
            info = await watcher.info("commandstats")
        finally:
            await watcher.aclose()
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in info.items()}

    async def commands_since(self, before: dict[str, int]) -> dict[str, int]:
        """Commands run since `before`, less our own INFO and connection upkeep (handshakes, health checks)."""
        after = await self.commands()
        delta = {name: after[name] - before.get(name, 0) for name in after}
        return {name: count for name, count in delta.items()
                if count and name not in ("info", "ping") and not name.startswith(("hello", "client"))}


@pytest.fixture
async def env(own_redis: RedisProcess, key_prefix: str) -> AsyncIterator[Env]:
    client = connect_redis(RedisSettings(url=own_redis.url, socket_timeout=0.3, connect_timeout=0.3))
    store = TokenStore(client, key_prefix)
    clock = Clock()
    made = Env(own_redis, client, store, None, clock, key_prefix, [])  # type: ignore[arg-type]
    await made.build()
    yield made
    for task in made.subscribers:
        task.cancel()
    await asyncio.gather(*made.subscribers, return_exceptions=True)
    await made.cache.close()
    await client.aclose()


async def lookup_all(cache: TokenCache, digests: list[str]) -> list[Any]:
    return list(await asyncio.gather(*(cache.lookup(digest) for digest in digests), return_exceptions=True))


async def test_concurrent_misses_share_one_round_trip(env: Env) -> None:
    present = await env.add(120)
    unknown = [key_digest(new_key()) for _ in range(80)]
    asked = [key_digest(key) for key, _ in present] + unknown
    asked += [key_digest(present[0][0])] * 3  # the same key asked by several requests at once
    random.Random(6).shuffle(asked)
    expected = {record["digest"]: record["id"] for _, record in present}

    before = await env.commands()
    found = await lookup_all(env.cache, asked)
    # one batch: one MGET of the records, one HMGET of their accessed times and one ZMSCORE of
    # the sorted set earlier builds kept them in, nothing else
    assert await env.commands_since(before) == {"mget": 1, "hmget": 1, "zmscore": 1}
    assert env.cache.batches == 1
    for digest, token in zip(asked, found, strict=True):
        if digest in expected:
            assert isinstance(token, Token) and token.id == expected[digest] and token.digest == digest
        else:
            assert token is None
    first = [token for digest, token in zip(asked, found, strict=True) if digest == key_digest(present[0][0])]
    assert len(first) == 4 and all(token is first[0] for token in first)
    assert len(env.cache) == 200  # unknown keys are remembered as unknown too

    # all answered from memory now, the unknown ones as well (negative_ttl)
    before = await env.commands()
    again = await lookup_all(env.cache, asked)
    assert await env.commands_since(before) == {}
    assert all(a is b for a, b in zip(found, again, strict=True))


async def test_more_misses_than_a_batch_holds(env: Env) -> None:
    count = 2 * MAX_BATCH + 10
    present = await env.add(count)
    before = await env.commands()
    found = await lookup_all(env.cache, [key_digest(key) for key, _ in present])
    assert await env.commands_since(before) == {"mget": 3, "hmget": 3, "zmscore": 3}
    assert [token.id for token in found] == [record["id"] for _, record in present]


async def test_a_loaded_token_is_lean_and_keeps_the_record(env: Env) -> None:
    [(key, record)] = await env.add(1, metadata={"team": "ops"}, ips="10.0.0.0/8", origins=["https://a.example"])
    await env.client.hset(f"{env.prefix}used", record["digest"], 1_900_000_000)
    digest = key_digest(key)
    token = await env.cache.lookup(digest)
    assert token is not None and token.digest is digest  # the cache key's own string, not a copy
    assert (token.id, token.cid, token.type, token.ttl, token.accessed) == (record["id"], 7, TokenType.STANDARD,
                                                                           3600, 1_900_000_000)
    assert token.ips is not None and token.ips.matches("10.1.2.3") and not token.ips.matches("11.1.2.3")
    assert token.origins is not None and token.origins.matches("https://a.example")
    assert token.group_members is None and token.acl is None
    public = {k: v for k, v in record.items() if k != "digest"}
    assert token.public_record() == {**public, "accessed": 1_900_000_000}
    token.accessed = 1_950_000_000  # a local use
    assert token.public_record()["accessed"] == 1_950_000_000


async def test_accessed_kept_by_earlier_builds_is_read_then_folded(env: Env) -> None:
    """Earlier builds kept `accessed` in a sorted set: loads take the newest of it and the hash,
    the housekeeper's fold moves it into the hash (the newer time winning, in chunks), and a
    deleted token leaves neither behind."""
    from gateway.store.tokens import FOLD_CHUNK

    (_, a), (_, b), (_, c) = await env.add(3)
    used, legacy = f"{env.prefix}used", f"{env.prefix}accessed"
    await env.client.zadd(legacy, {a["digest"]: 1_900_000_000, b["digest"]: 1_800_000_000, c["digest"]: 2_000_000_000})
    await env.client.hset(used, mapping={b["digest"]: 1_950_000_000, c["digest"]: 1_700_000_000})
    filler = {f"{n:064x}": 1_600_000_000 + n for n in range(2 * FOLD_CHUNK + 5)}
    await env.client.zadd(legacy, filler)

    records = await env.store.load_many([a["digest"], b["digest"], c["digest"]])
    assert [record["accessed"] for record in records if record] == [1_900_000_000, 1_950_000_000, 2_000_000_000]

    assert await env.store.fold_legacy_accessed() == 3 + len(filler)
    assert not await env.client.exists(legacy)
    assert await env.client.hmget(used, [a["digest"], b["digest"], c["digest"]]) == [
        b"1900000000", b"1950000000", b"2000000000"]
    assert await env.client.hget(used, f"{7:064x}") == b"1600000007"
    records = await env.store.load_many([a["digest"], b["digest"], c["digest"]])
    assert [record["accessed"] for record in records if record] == [1_900_000_000, 1_950_000_000, 2_000_000_000]
    assert await env.store.fold_legacy_accessed() == 0  # nothing left: one command

    await env.client.zadd(legacy, {a["digest"]: 1_990_000_000})  # an old instance still writing
    await env.store.remove([a], to_bin=False)
    assert await env.client.hget(used, a["digest"]) is None and not await env.client.exists(legacy)


async def test_acl_tokens_in_a_batch_get_their_group_members(env: Env) -> None:
    await env.client.sadd(Keys(env.prefix).group_members(5, "gw/devices"), 1, 2)
    acl = [{"uri": "gw/groups", "methods": ["GET"], "ids": [5]},
           {"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"}]
    with_groups = await env.add(3, access={"type": 2, "acl": acl})
    plain = await env.add(3)
    found = await lookup_all(env.cache, [key_digest(key) for key, _ in with_groups + plain])
    assert [token.group_members for token in found] == [{"gw/devices": frozenset({1, 2})}] * 3 + [None] * 3
    assert found[0].acl.authorize("GET", "/gw/devices/all", found[0].group_members) == "/gw/devices/1,2"


@pytest.mark.parametrize("damage", [
    {"access": "standard"}, {"access": {"type": "zero"}}, {"access": {"type": 2, "acl": 7}}, {"id": "seven"},
    {"cid": [1]}, {"ttl": None}, {"enabled": {"x": 1}, "created": "yesterday"}, {"origins": 5},
])
async def test_a_malformed_stored_record_fails_alone_in_the_compiled_compiler(env: Env, damage: dict[str, Any]) -> None:
    """`auth/compiler.py` is compiled: whatever a stored record holds, a bad one raises for its own
    requests only (they are denied), and the batch's other records load."""
    good = await env.add(2)
    bad_key = new_key()
    bad = {**good[0][1], "id": 998, "digest": key_digest(bad_key), **damage}
    await env.client.set(f"{env.prefix}tok:{bad['digest']}", orjson.dumps(bad))
    found = await lookup_all(env.cache, [key_digest(good[0][0]), key_digest(bad_key), key_digest(good[1][0])])
    assert isinstance(found[1], Exception)
    assert [token.id for token in (found[0], found[2])] == [record["id"] for _, record in good]
    assert len(env.cache) == 2


async def test_a_bad_record_fails_alone_and_denies(env: Env) -> None:
    good = await env.add(4)
    bad_key = new_key()
    bad = {**good[0][1], "id": 999, "digest": key_digest(bad_key), "ips": "300.1.2.3"}
    await env.client.set(f"{env.prefix}tok:{bad['digest']}", orjson.dumps(bad))
    asked = [key_digest(key) for key, _ in good[:2]] + [key_digest(bad_key)] + [key_digest(key) for key, _ in good[2:]]
    found = await lookup_all(env.cache, asked)
    assert isinstance(found[2], ValueError)
    assert [token.id for token in found[:2] + found[3:]] == [record["id"] for _, record in good]
    assert len(env.cache) == 4  # nothing remembered for the bad record

    auth = Authenticator(env.cache, AccessedWriter(env.store, 60.0), Checks())
    facts = RequestFacts(method="GET", path="/x", forward_path="/x", query="", client_ip="127.0.0.1", origin=None,
                         acting_cid=None, now=time.time())
    with pytest.raises(Denied) as denied:
        await auth.authenticate(bad_key, facts)
    assert denied.value.status == 500
    assert bad_key not in str(denied.value) and bad_key not in repr(denied.value)
    assert (await auth.authenticate(good[0][0], facts)).id == good[0][1]["id"]


async def test_token_invalidated_while_loading_is_not_kept(env: Env) -> None:
    [(key, record)] = await env.add(1)
    digest = key_digest(key)
    pending = asyncio.ensure_future(env.cache.lookup(digest))
    while env.cache.batches == 0:  # until the batch has been sent
        await asyncio.sleep(0)
    env.cache.invalidate(digest)  # as a pub/sub message would, while the reply is on its way
    token = await pending
    assert token is not None and token.id == record["id"]  # the request asked before the change
    assert len(env.cache) == 0  # but what it read may predate the change: not cached
    assert (await env.cache.lookup(digest)) is not token
    assert env.cache.batches == 2 and len(env.cache) == 1


async def test_stale_tokens_refresh_in_one_batch_in_background(env: Env) -> None:
    made = await env.add(20)
    digests = [key_digest(key) for key, _ in made]
    old = await lookup_all(env.cache, digests)
    for _, record in made:
        await env.store.replace({**record, "info": "changed"})  # not published: only a refresh sees it
    env.clock.now += CacheSettings().refresh_interval + 1  # stale, still inside max_age
    batches = env.cache.batches
    served = await lookup_all(env.cache, digests)
    assert all(a is b for a, b in zip(old, served, strict=True))  # served at once, from memory
    for _ in range(500):
        if env.cache.batches == batches + 1:  # only then look: a lookup could start a batch of its own
            fresh = await lookup_all(env.cache, digests)
            if all(token is not old_token for token, old_token in zip(fresh, old, strict=True)):
                break
        await asyncio.sleep(0.01)
    fresh = await lookup_all(env.cache, digests)
    assert env.cache.batches == batches + 1  # the 20 refreshes went out together
    assert all(token.public_record()["info"] == "changed" for token in fresh)


async def test_store_away_during_a_batch(env: Env) -> None:
    [(cached_key, cached), (absent_key, absent)] = await env.add(2)
    cached_digest = key_digest(cached_key)
    token = await env.cache.lookup(cached_digest)
    env.redis.stop()
    env.cache.mark_all_stale()  # e.g. the subscription dropped: every entry must be reloaded
    asked = [cached_digest, key_digest(absent_key), key_digest(new_key())]
    found = await lookup_all(env.cache, asked)
    assert found[0] is token  # inside max_age: still served
    assert isinstance(found[1], StoreUnavailable) and isinstance(found[2], StoreUnavailable)
    env.clock.now += CacheSettings().max_age + 1
    with pytest.raises(StoreUnavailable):
        await env.cache.lookup(cached_digest)  # too old to be trusted any more
    env.redis.start()
    found = await lookup_all(env.cache, asked)
    assert [getattr(token, "id", token) for token in found] == [cached["id"], absent["id"], None]


async def test_the_oldest_entries_make_room(env: Env) -> None:
    cache = await env.build(max_entries=64)
    made = await env.add(200)
    digests = [key_digest(key) for key, _ in made]
    for start in range(0, len(digests), 50):
        await lookup_all(cache, digests[start:start + 50])
    assert 0 < len(cache) <= 64
    batches = cache.batches
    assert (await cache.lookup(digests[-1])).id == made[-1][1]["id"]
    assert cache.batches == batches  # the newest is still cached
    assert (await cache.lookup(digests[0])).id == made[0][1]["id"]
    assert cache.batches == batches + 1  # the oldest was dropped


async def test_closing_releases_waiting_requests(env: Env) -> None:
    [(key, _)] = await env.add(1)
    pending = asyncio.ensure_future(env.cache.lookup(key_digest(key)))
    await asyncio.sleep(0)  # queued; its batch has not started yet
    await env.cache.close()
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_callbacks_wait_for_a_batch_without_tasks(env: Env) -> None:
    """`load_then` (the fast path's miss): callbacks join the batch that futures join."""
    [(key, record), (other_key, other)] = await env.add(2)
    digest, unknown = key_digest(key), key_digest(new_key())
    told: list[tuple[str, Any]] = []

    def broken(outcome: Any) -> None:
        raise RuntimeError("a request's own bug")

    before = await env.commands()
    assert env.cache.load_then(digest, lambda outcome: told.append(("a", outcome)))
    assert env.cache.load_then(digest, broken)  # fails alone: the next waiter is still told
    assert env.cache.load_then(digest, lambda outcome: told.append(("b", outcome)))
    assert env.cache.load_then(unknown, lambda outcome: told.append(("unknown", outcome)))
    awaited = await env.cache.lookup(key_digest(other_key))  # a coroutine's miss, in the same batch
    assert await env.commands_since(before) == {"mget": 1, "hmget": 1, "zmscore": 1}
    assert awaited.id == other["id"]
    assert [name for name, _ in told] == ["a", "b", "unknown"]
    assert told[0][1] is told[1][1] and told[0][1].id == record["id"]
    assert told[2][1] is None
    # Now there are entries (a token, an unknown key): `lookup` decides what they mean.
    assert not env.cache.load_then(digest, told.append)
    assert not env.cache.load_then(unknown, told.append)
    assert len(told) == 3


async def test_callbacks_hear_failures_and_shutdown(env: Env) -> None:
    [(key, _)] = await env.add(1)
    told: list[Any] = []
    env.redis.stop()
    assert env.cache.load_then(key_digest(key), told.append)
    while not told:
        await asyncio.sleep(0.01)
    assert isinstance(told[0], StoreUnavailable) and len(env.cache) == 0
    env.redis.start()
    assert env.cache.load_then(key_digest(key), told.append)
    await env.cache.close()  # before its batch ran: released, not left waiting
    assert len(told) == 2 and isinstance(told[1], asyncio.CancelledError)


async def test_misses_wait_for_a_batch_out_and_go_together(env: Env) -> None:
    """With MAX_IN_FLIGHT batches out (Redis paused, so none comes back), keys missed one loop
    turn after another do not each make a batch: they wait, MAX_HOLD at most, and go out as one.
    When Redis answers, every key gets its token."""
    present = await env.add(2 + 4)
    digests = [key_digest(key) for key, _ in present]
    process = env.redis.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        lookups = []
        for digest in digests:  # one key a loop turn, as requests arriving one by one
            lookups.append(asyncio.ensure_future(env.cache.lookup(digest)))
            for _ in range(3):
                await asyncio.sleep(0)
        assert env.cache.batches == MAX_IN_FLIGHT  # the four later keys are held
        await asyncio.sleep(MAX_HOLD + 0.02)
        assert env.cache.batches == MAX_IN_FLIGHT + 1  # and went out together, the first two still out
    finally:
        process.send_signal(signal.SIGCONT)
    found = await asyncio.gather(*lookups)
    assert [token.id for token in found] == [record["id"] for _, record in present]
