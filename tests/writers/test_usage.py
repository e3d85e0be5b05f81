"""The blocking rule on its own (heaviest first until the rest fits, for calls and for traffic), and
which counts reach Redis."""
from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.checks import Checks, mqtt_facts
from gateway.config import LogSettings, RedisSettings, UsageSettings
from gateway.errors import Denied, Undecided
from gateway.store.accounts import AccountDirectory, AccountStore, AccountTree, Limits
from gateway.store.tokens import RedisStore, connect_redis
from gateway.tokens import Token, TokenType
from gateway.writers.logs import LogWriter
from gateway.writers.usage import Block, UsageMeter, choose_blocked, parse_usage


@pytest.mark.parametrize(("usage", "already", "calls", "traffic", "expected"), [
    ({1: (30, 0), 2: (5, 0)}, set(), 20, 0, [1]),
    ({1: (10, 0), 2: (9, 0), 3: (8, 0)}, set(), 10, 0, [1, 2]),
    ({1: (10, 0), 2: (9, 0)}, set(), 19, 0, []),
    ({1: (1, 900), 2: (50, 10)}, set(), 0, 500, [1]),
    ({1: (40, 10), 2: (1, 900)}, set(), 30, 500, [1, 2]),
    ({1: (30, 0), 2: (25, 0)}, {1}, 20, 0, [2]),
    ({1: (30, 0), 2: (5, 0)}, {1}, 20, 0, []),
    ({1: (30, 0)}, set(), 0, 0, []),
    ({2: (10, 0), 1: (10, 0)}, set(), 15, 0, [1]),  # ties: lower id first, deterministic on every instance
])
def test_choose_blocked(usage: dict[int, tuple[int, int]], already: set[int], calls: int, traffic: int,
                        expected: list[int]) -> None:
    assert [token for token, _ in choose_blocked(usage, already, calls, traffic)] == expected


def test_reason_names_the_limit() -> None:
    [(_, reason)] = choose_blocked({1: (5, 2000)}, set(), 0, 1000)
    assert reason == "its account is over the limit of 1000 bytes of traffic"


def test_parse_usage() -> None:
    assert parse_usage({b"c:1": b"3", b"b:1": b"100", b"c:2": b"1"}) == {1: (3, 100), 2: (1, 0)}


@given(usage=st.dictionaries(st.integers(1, 50), st.tuples(st.integers(0, 1000), st.integers(0, 10 ** 6)), max_size=20),
       calls=st.integers(0, 5000), traffic=st.integers(0, 10 ** 7))
def test_what_is_left_fits_and_no_lighter_token_is_blocked_needlessly(usage: dict[int, tuple[int, int]], calls: int,
                                                                      traffic: int) -> None:
    blocked = {token for token, _ in choose_blocked(usage, set(), calls, traffic)}
    left = [counts for token, counts in usage.items() if token not in blocked]
    if calls:
        assert sum(c for c, _ in left) <= calls
    if traffic:
        assert sum(b for _, b in left) <= traffic
    if not calls and not traffic:
        assert not blocked


# -- what reaches Redis ---------------------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_counts_of_an_account_without_limit_are_held_until_a_limit_comes(
        redis_client: aioredis.Redis, redis_url: str, key_prefix: str) -> None:
    """Counts of accounts with no limit stay in process for the window (up to `max_held` tokens,
    past that they are written); a limit set during the window brings them all to Redis, and so
    does the final flush at shutdown; a window that ended unlimited is dropped."""
    client = connect_redis(RedisSettings(url=redis_url))
    store = RedisStore(client, key_prefix)
    directory = AccountDirectory(AccountStore(client, key_prefix), 60.0)
    directory.tree = AccountTree({}, {})
    clock = Clock(6_000_000.0)  # window 100,000 of 60 s
    meter = UsageMeter(store, UsageSettings(), directory, LogWriter(LogSettings(path="off"), []), clock=clock,
                       max_held=2)

    def tokens(*ids: int) -> list[Token]:
        return [Token(id=n, digest=f"{n:064x}", cid=5, type=TokenType.STANDARD, enabled=True, expire=0, ttl=0,
                      created=0, accessed=0, record_json=b"{}") for n in ids]

    def served(token: Token, size: int) -> None:  # as a request: counted as it passes, its bytes at its end
        meter.check(token, clock.now)
        meter.record(token, 5, size, clock.now)

    async def stored(window: int) -> dict[int, tuple[int, int]]:
        return parse_usage(await redis_client.hgetall(f"{key_prefix}usage:{window}:5"))

    try:
        one, two, three = tokens(1, 2, 3)
        for token, size in ((one, 10), (two, 20), (one, 5)):
            served(token, size)
        await meter.flush()
        assert await stored(100_000) == {}  # held: no limit, nobody reads them
        served(three, 7)  # a third token: past max_held, written at once
        served(one, 1)  # held already: stays held
        await meter.flush()
        assert await stored(100_000) == {3: (1, 7)}

        directory.tree = AccountTree({}, {5: Limits(api_calls=1000)})  # a limit comes mid-window
        served(three, 3)
        await meter.flush()
        assert await stored(100_000) == {1: (3, 16), 2: (1, 20), 3: (2, 10)}  # the whole window

        directory.tree = AccountTree({}, {})
        clock.now += 60  # window 100,001: held again, and dropped once it is over
        served(two, 4)
        await meter.flush()
        clock.now += 60
        served(two, 6)
        await meter.flush()
        served(one, 8)
        await meter.flush(final=True)  # shutdown: what is held goes to Redis
        assert await stored(100_001) == {}
        assert await stored(100_002) == {1: (1, 8), 2: (1, 6)}
    finally:
        await client.aclose()


async def test_a_recheck_counts_nothing_and_never_waits(redis_client: aioredis.Redis, redis_url: str,
                                                        key_prefix: str) -> None:
    """A live MQTT session's re-check (`facts.recheck`) makes no call: past the lease it neither
    waits nor counts; only a block refuses it. A counted check past the lease still waits."""
    client = connect_redis(RedisSettings(url=redis_url))
    directory = AccountDirectory(AccountStore(client, key_prefix), 60.0)
    directory.tree = AccountTree({}, {5: Limits(api_calls=10)})
    clock = Clock(6_000_000.0)
    meter = UsageMeter(RedisStore(client, key_prefix), UsageSettings(), directory,
                       LogWriter(LogSettings(path="off"), []), clock=clock)
    checks = Checks(meter=meter)
    token = Token(id=1, digest="1" * 64, cid=5, type=TokenType.STANDARD, enabled=True, expire=0, ttl=0, created=0,
                  accessed=0, record_json=b"{}")
    try:
        checks.run(token, mqtt_facts("127.0.0.1", clock.now))  # the CONNECT: the one call of the first share
        recheck = mqtt_facts("127.0.0.1", clock.now)
        recheck.recheck = True
        for _ in range(50):
            checks.run(token, recheck)
        with pytest.raises(Undecided):
            checks.run(token, mqtt_facts("127.0.0.1", clock.now))  # a counted call past the lease waits
        await meter.flush(final=True)
        assert parse_usage(await redis_client.hgetall(f"{key_prefix}usage:100000:5")) == {1: (1, 0)}
        meter.blocked[1] = Block(clock.now + 30, "its account is over the limit of 10 API calls", 5)
        with pytest.raises(Denied) as refused:
            checks.run(token, recheck)
        assert refused.value.status == 429
    finally:
        await client.aclose()
