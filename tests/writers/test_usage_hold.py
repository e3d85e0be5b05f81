"""Usage blocking holds its limit across instances: each instance serves an account's calls only
as far as its lease goes, leases are shared out of what the limit leaves, and an instance whose
lease is used up exchanges before serving more, whatever the request rate."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.config import LogSettings, RedisSettings, UsageSettings
from gateway.errors import Denied, Undecided
from gateway.store.accounts import AccountDirectory, AccountStore, AccountTree, Limits
from gateway.store.keys import Keys
from gateway.store.tokens import RedisStore, connect_redis
from gateway.tokens import Token, TokenType
from gateway.writers.logs import LogWriter
from gateway.writers.usage import INITIAL_SHARE, UsageMeter, parse_usage

from support.gateways import GatewayFactory, GatewayHandle

LIMIT = 200
CLIENTS = 6  # concurrent clients per instance: at most this many requests of each are in flight


async def hammer(gw: GatewayHandle, key: str, session: aiohttp.ClientSession, served: list[int]) -> None:
    """Requests one after the other until the token has been refused a few times running."""
    refused = 0
    while refused < 3:
        async with session.get(gw.url + "/x", headers={"Authorization": f"FlespiToken {key}"}) as reply:
            await reply.read()
            if reply.status == 200:
                served.append(1)
                refused = 0
            else:
                assert reply.status == 429, reply.status
                refused += 1


async def test_two_instances_serve_the_limit_and_barely_more(make_gateway: GatewayFactory, redis_client: Any,
                                                            key_prefix: str) -> None:
    window = 20
    # The default flush interval: before, the instances blocked only at an exchange, so everything
    # served during half a second went past the limit.
    config = {"usage": {"window": window, "flush_interval": 0.5}}
    a, b = await make_gateway(**config), await make_gateway(**config)
    status, body = await a.call("POST", "/platform/subaccounts", json={"name": "held", "limits": {"api_calls": LIMIT}})
    assert status == 200, body
    cid = body["result"][0]["id"]
    status, body = await a.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    token = body["result"][0]
    await asyncio.sleep(0.2)  # both instances have the account's limits (the "accounts" message)
    if time.time() % window > window - 8:  # the run must fit in one window
        await asyncio.sleep(window - time.time() % window + 0.05)
    started = a.gateway.usage.window(time.time())
    served: list[int] = []
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(hammer(gw, token["key"], session, served) for gw in (a, b) for _ in range(CLIENTS)))
    assert a.gateway.usage.window(time.time()) == started, "the window ended during the run"
    # Never blocked before the limit; past it at most what the other instance served before its
    # first exchange of the window (one call here). Before leases, what the other instance served
    # before its next exchange brought it the total; before that, some 550 were served.
    assert LIMIT <= len(served) <= LIMIT + max(1, LIMIT // INITIAL_SHARE), len(served)
    for gw in (a, b):
        await gw.gateway.usage.flush()
    stored = parse_usage(await redis_client.hgetall(Keys(key_prefix).usage(started, cid)))
    assert stored[token["id"]][0] == len(served)  # every served call counted once, none refused counted
    assert a.gateway.usage.early_exchanges + b.gateway.usage.early_exchanges > 0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("per_turn", [1, 7, None])  # calls asked of each instance between exchanges; None: no end
async def test_instances_never_serve_past_the_limit_whatever_the_rate(redis_url: str, key_prefix: str,
                                                                     per_turn: int | None) -> None:
    """Three instances on one account, and between two rounds of exchanges each is asked for calls
    as fast as it answers (no exchange can come between them): the calls served stop at the limit,
    past it by no more than the instances serve before their first exchange of the window. Every
    call is either served, or waits for an exchange (`Undecided`), or is refused once the limit is
    reached (the token blocked)."""
    limit = 1000
    client = connect_redis(RedisSettings(url=redis_url))
    directory = AccountDirectory(AccountStore(client, key_prefix), 60.0)
    directory.tree = AccountTree({}, {9: Limits(api_calls=limit)})
    clock = Clock(6_000_000.0)
    meters = [UsageMeter(RedisStore(client, key_prefix), UsageSettings(), directory,
                         LogWriter(LogSettings(path="off"), []), clock=clock) for _ in range(3)]
    token = Token(id=41, digest=f"{41:064x}", cid=9, type=TokenType.STANDARD, enabled=True, expire=0, ttl=0,
                  created=0, accessed=0, record_json=b"{}")
    served = waited = 0
    blocked: set[int] = set()
    try:
        for _ in range(500):
            for index, meter in enumerate(meters):
                asked = 0
                while per_turn is None or asked < per_turn:
                    asked += 1
                    try:
                        meter.check(token, clock.now)
                    except Undecided:
                        waited += 1
                        break
                    except Denied as denied:
                        assert denied.reason.startswith("token is blocked: "), denied.reason
                        blocked.add(index)
                        break
                    served += 1
            if len(blocked) == len(meters):
                break
            await asyncio.gather(*(meter.flush() for meter in meters))
            clock.now += 0.01
        assert blocked == {0, 1, 2}, (served, waited)
        assert limit <= served <= limit + (len(meters) - 1) * max(1, limit // INITIAL_SHARE), served
        assert waited > 0
        for meter in meters:
            await meter.flush()
        stored = parse_usage(await client.hgetall(Keys(key_prefix).usage(100_000, 9)))
        assert stored[41][0] == served  # Redis counted what was served, and nothing refused
    finally:
        await client.aclose()


async def test_a_lease_that_cannot_be_renewed_stops_the_calls(make_gateway: GatewayFactory, own_redis: Any) -> None:
    """With Redis gone the cached token still passes its checks, but an account with a calls limit
    is served only while its lease lasts: then a call waits for an exchange that cannot happen and
    is refused (429, retry), never served unseen past what the lease allowed."""
    gw = await make_gateway(redis={"url": own_redis.url, "socket_timeout": 0.2, "connect_timeout": 0.2},
                            usage={"flush_interval": 0.1})
    account = {"name": "leased", "limits": {"api_calls": 10_000}}
    status, body = await gw.call("POST", "/platform/subaccounts", json=account)
    assert status == 200, body
    cid = body["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    key = body["result"][0]["key"]
    await asyncio.sleep(0.3)  # the gateway has the account's limits
    assert (await gw.call("GET", "/x", key=key))[0] == 200
    await asyncio.sleep(0.3)  # exchanged: a lease far larger than the calls below
    for _ in range(3):
        assert (await gw.call("GET", "/x", key=key))[0] == 200
    own_redis.stop()
    try:
        refused = None
        for _ in range(10):  # the lease's own time (1.5 s), then the 2 s a call may wait
            status, body = await gw.call("GET", "/x", key=key)
            if status != 200:
                refused = status, body
                break
            await asyncio.sleep(0.5)
        assert refused is not None, "served with no lease for 5 s"
        status, body = refused
        assert status == 429, body
        assert body["errors"][0]["reason"].startswith("its account's usage limit is nearly reached"), body
    finally:
        own_redis.start()
