"""Usage blocking holds its limit across instances: each instance serves an account's calls only
as far as its lease goes, leases are shared out of what the limit leaves, and an instance whose
lease is used up exchanges before serving more, whatever the request rate.

Each test runs on one Redis and on a Redis Cluster (`layout`): there an account's lease and the
instances it is shared among are in the account's slot, and the blocked tokens are the ones the
instance knows of. With leasing off on a cluster they fail (served past the limit, or a call
past a lease served without an exchange)."""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest

from gateway.config import ClusterSettings, LogSettings, RedisSettings, UsageSettings
from gateway.errors import Denied, Undecided
from gateway.store.accounts import AccountDirectory, AccountStore, AccountTree, Limits
from gateway.store.clients import open_cluster
from gateway.store.keys import Keys, keys_for
from gateway.store.tokens import RedisStore, connect_redis
from gateway.tokens import Token, TokenType
from gateway.writers.logs import LogWriter
from gateway.writers.usage import INITIAL_SHARE, UsageMeter, parse_usage

from support.cluster import RedisClusterSet
from support.gateways import GatewayFactory, GatewayHandle
from support.usage import room_in_window

LIMIT = 200
CLIENTS = 6  # concurrent clients per instance: at most this many requests of each are in flight


@pytest.fixture(params=["redis", "cluster"])
def layout(request: pytest.FixtureRequest) -> str:
    """One Redis, or the session's Redis Cluster (three masters, three replicas)."""
    return str(request.param)


@pytest.fixture
def gateways(layout: str, request: pytest.FixtureRequest) -> GatewayFactory:
    """Gateways on the layout's store (the cluster is only started when a test runs on it)."""
    factory: GatewayFactory = request.getfixturevalue("make_cluster_gateway" if layout == "cluster"
                                                      else "make_gateway")
    return factory


@pytest.fixture
async def store_client(layout: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A client of the layout's store: redis-py's cluster client on the cluster."""
    if layout == "cluster":
        nodes: RedisClusterSet = request.getfixturevalue("redis_cluster")
        cluster = ClusterSettings(nodes=tuple(("127.0.0.1", node.port) for node in nodes.nodes[:2]))
        client: Any = open_cluster(RedisSettings(socket_timeout=2, connect_timeout=2), cluster)
    else:
        client = connect_redis(RedisSettings(url=request.getfixturevalue("redis_url")))
    yield client
    await client.aclose()


def layout_keys(layout: str, prefix: str) -> Keys:
    return keys_for(prefix, layout == "cluster")


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


async def test_two_instances_serve_the_limit_and_barely_more(gateways: GatewayFactory, store_client: Any,
                                                            layout: str, key_prefix: str) -> None:
    window = 20
    # The default flush interval: before, the instances blocked only at an exchange, so everything
    # served during half a second went past the limit.
    config = {"usage": {"window": window, "flush_interval": 0.5}}
    a, b = await gateways(**config), await gateways(**config)
    status, body = await a.call("POST", "/platform/subaccounts", json={"name": "held", "limits": {"api_calls": LIMIT}})
    assert status == 200, body
    cid = body["result"][0]["id"]
    status, body = await a.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    token = body["result"][0]
    await asyncio.sleep(0.2)  # both instances have the account's limits (the "accounts" message)
    await room_in_window(8, window)  # the run must fit in one window
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
    stored = parse_usage(await store_client.hgetall(layout_keys(layout, key_prefix).usage(started, cid)))
    assert stored[token["id"]][0] == len(served)  # every served call counted once, none refused counted
    assert a.gateway.usage.early_exchanges + b.gateway.usage.early_exchanges > 0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("per_turn", [1, 7, None])  # calls asked of each instance between exchanges; None: no end
async def test_instances_never_serve_past_the_limit_whatever_the_rate(store_client: Any, layout: str,
                                                                     key_prefix: str, per_turn: int | None) -> None:
    """Three instances on one account, and between two rounds of exchanges each is asked for calls
    as fast as it answers (no exchange can come between them): the calls served stop at the limit,
    past it by no more than the instances serve before their first exchange of the window. Every
    call is either served, or waits for an exchange (`Undecided`), or is refused once the limit is
    reached (the token blocked)."""
    limit = 1000
    client = store_client
    directory = AccountDirectory(AccountStore(client, key_prefix), 60.0)
    directory.tree = AccountTree({}, {9: Limits(api_calls=limit)})
    clock = Clock(6_000_000.0)
    meters = [UsageMeter(RedisStore(client, key_prefix), UsageSettings(), directory,
                         LogWriter(LogSettings(path="off"), []), clock=clock) for _ in range(3)]
    token = Token(id=41, digest=f"{41:064x}", cid=9, type=TokenType.STANDARD, enabled=True, expire=0, ttl=0,
                  created=0, accessed=0, record_json=b"{}")
    served = waited = 0
    blocked: set[int] = set()
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
    stored = parse_usage(await client.hgetall(layout_keys(layout, key_prefix).usage(100_000, 9)))
    assert stored[41][0] == served  # Redis counted what was served, and nothing refused


class Outage:
    """Takes the layout's store away and brings it back: a Redis of the test's own stopped, or
    every node of the cluster paused (SIGSTOP: replicas first, resumed last, so no replica is
    promoted; with no master awake to vote none could be anyway)."""

    def __init__(self, layout: str, request: pytest.FixtureRequest) -> None:
        self.cluster: RedisClusterSet | None = None
        self.own: Any = None
        if layout == "cluster":
            self.cluster = request.getfixturevalue("redis_cluster")
        else:
            self.own = request.getfixturevalue("own_redis")

    def redis_settings(self) -> dict[str, Any]:
        fast = {"socket_timeout": 0.2, "connect_timeout": 0.2}
        return fast if self.cluster is not None else {"url": self.own.url, **fast}

    @contextmanager
    def down(self) -> Iterator[None]:
        if self.cluster is None:
            self.own.stop()
            try:
                yield
            finally:
                self.own.start()
            return
        masters = self.cluster.masters()
        nodes = [node for node in self.cluster.nodes if node not in masters] + masters
        for node in nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for node in reversed(nodes):
                assert node.process is not None
                node.process.send_signal(signal.SIGCONT)

    async def back(self) -> None:
        if self.cluster is not None:  # in a thread: the gateways keep serving meanwhile
            await asyncio.to_thread(self.cluster.wait_ok)


async def test_a_lease_that_cannot_be_renewed_stops_the_calls(gateways: GatewayFactory, layout: str,
                                                              request: pytest.FixtureRequest) -> None:
    """With Redis gone the cached token still passes its checks, but an account with a calls limit
    is served only while its lease lasts: then a call waits for an exchange that cannot happen and
    is refused (429, retry), never served unseen past what the lease allowed."""
    outage = Outage(layout, request)
    gw = await gateways(redis=outage.redis_settings(), usage={"flush_interval": 0.1})
    account = {"name": "leased", "limits": {"api_calls": 10_000}}
    status, body = await gw.call("POST", "/platform/subaccounts", json=account)
    assert status == 200, body
    cid = body["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/tokens", json={"ttl": 600}, headers={"x-flespi-cid": str(cid)})
    assert status == 200, body
    key = body["result"][0]["key"]
    # In one window: the first exchange of the next would find the store gone, and until then the
    # instance may serve a share of the limit unleased (`INITIAL_SHARE`), more than the calls here.
    await room_in_window(15)
    await asyncio.sleep(0.3)  # the gateway has the account's limits
    assert (await gw.call("GET", "/x", key=key))[0] == 200
    await asyncio.sleep(0.3)  # exchanged: a lease far larger than the calls below
    for _ in range(3):
        assert (await gw.call("GET", "/x", key=key))[0] == 200
    with outage.down():
        refused = None
        for _ in range(10):  # the lease's own time (1.5 s), then the 2 s a call may wait
            status, body = await gw.call("GET", "/x", key=key)
            if status != 200:
                refused = status, body
                break
            await asyncio.sleep(0.5)
    await outage.back()
    assert refused is not None, "served with no lease for 5 s"
    status, body = refused
    assert status == 429, body
    assert body["errors"][0]["reason"].startswith("its account's usage limit is nearly reached"), body


async def test_a_blocked_token_leaves_the_limit_to_the_others(store_client: Any, key_prefix: str) -> None:
    """The calls of a blocked token are not counted against the limit that is left: once one
    token is blocked at the limit, another of the account is served the limit again, exactly, on
    an instance that did not block it (on a cluster it learns of the block from its next exchange,
    and until then counts the blocked calls as used: it waits, it is never served more)."""
    limit = 100
    directory = AccountDirectory(AccountStore(store_client, key_prefix), 60.0)
    directory.tree = AccountTree({}, {9: Limits(api_calls=limit)})
    clock = Clock(6_000_000.0)
    meters = [UsageMeter(RedisStore(store_client, key_prefix), UsageSettings(), directory,
                         LogWriter(LogSettings(path="off"), []), clock=clock) for _ in range(2)]
    heavy, light = (Token(id=token_id, digest=f"{token_id:064x}", cid=9, type=TokenType.STANDARD, enabled=True,
                          expire=0, ttl=0, created=0, accessed=0, record_json=b"{}") for token_id in (51, 52))

    async def served_until_blocked(token: Token, meter: UsageMeter) -> int:
        """Calls asked as fast as they are answered between rounds of exchanges, until refused
        as blocked."""
        served = 0
        for _ in range(100):
            while True:
                try:
                    meter.check(token, clock.now)
                except Undecided:
                    break
                except Denied as denied:
                    assert denied.reason.startswith("token is blocked: "), denied.reason
                    return served
                served += 1
            await asyncio.gather(*(each.flush() for each in meters))
            clock.now += 0.01
        raise AssertionError(f"never blocked, {served} served")

    assert await served_until_blocked(heavy, meters[0]) == limit
    assert await served_until_blocked(light, meters[1]) == limit
