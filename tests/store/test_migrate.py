"""`gateway migrate` for real: a store made by a gateway on one redis-server, copied into the
test session's Redis Cluster (three masters), served by a gateway on the cluster; run twice; a
target holding other data refused; and back from the cluster into one Redis. While it copies, its
source is locked: API changes refused, authentications served, a second migration refused, and a
migration killed midway unlocks it by itself; so is its target, where no bootstrap master token is
made meanwhile. And the key families of `store/keys.py` name every
key a gateway writes."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

import gateway
from gateway.cli import main
from gateway.config import build_settings
from gateway.errors import MIGRATING
from gateway.server import GatewayServer
from gateway.store.keys import FAMILIES, ClusterKeys, Keys, glob_escape
from gateway.store.migrate import (
    MigrationRefused,
    Report,
    Side,
    is_empty,
    migrate,
    open_cluster_side,
    open_single,
)

from support.cluster import RedisClusterSet
from support.gateways import GatewayHandle, base_config, error, logged_hosts, wait_for_master
from support.keys import MASTER_KEY
from support.servers import Upstream


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayHandle]]:
    handles: list[GatewayHandle] = []
    yield handles
    for handle in handles:
        await handle.session.close()
        async with asyncio.timeout(30):
            await handle.server.close()


async def start(handles: list[GatewayHandle], upstream: Upstream, redis_section: dict[str, Any],
                prefix: str, **extra: Any) -> GatewayHandle:
    config = base_config(upstream.url, "", prefix)
    config["redis"] = {**redis_section, "key_prefix": prefix}
    config["token_logs"] = {"enabled": True}
    config.update(extra)
    settings = build_settings(config)
    server = GatewayServer(settings)
    await server.start("127.0.0.1", 0)
    handle = GatewayHandle(f"http://127.0.0.1:{server.port}", settings, server,
                           aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)))
    handles.append(handle)
    await wait_for_master(handle)
    return handle


async def status_of(gw: GatewayHandle, key: str) -> int:
    async with gw.request("GET", "/x", key=key) as response:
        return response.status


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cluster_dump(redis_cluster: RedisClusterSet, prefix: str) -> dict[str, Any]:
    """Every key of the cluster layout under `prefix`, with its value (not `used`: times)."""
    base = ClusterKeys(prefix).base
    dump: dict[str, Any] = {}
    for node in redis_cluster.masters():
        with redis_cluster.client(node) as client:
            for raw in client.scan_iter(match=base + "*", count=1000):
                key = raw.decode()
                kind = client.type(key).decode()
                dump[key] = {"string": lambda k: client.get(k), "hash": lambda k: client.hgetall(k),
                             "set": lambda k: sorted(client.smembers(k)), "list": lambda k: client.lrange(k, 0, -1),
                             "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
    return dump


async def test_a_store_on_one_redis_moves_to_the_cluster_and_back(
        upstream: Upstream, redis_url: str, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle],
        tmp_path: Path) -> None:
    prefix = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    one = await start(gateways, upstream, {"url": redis_url}, prefix)
    status, body = await one.call("POST", "/platform/tokens", json=[{"ttl": 600, "info": f"t{n}"} for n in range(40)])
    assert status == 200, body
    made = body["result"]
    status, body = await one.call("POST", "/platform/subaccounts", json={"name": "customer"})
    cid = body["result"][0]["id"]
    status, body = await one.call("POST", "/platform/tokens", json=[{"ttl": 600}], headers={"x-flespi-cid": str(cid)})
    customer_token = body["result"][0]
    assert await status_of(one, customer_token["key"]) == 200
    assert await status_of(one, made[0]["key"]) == 200
    assert len(await logged_hosts(one, made[0]["id"], 1)) == 1
    status, _ = await one.call("DELETE", f"/platform/tokens/{made[1]['id']}")  # into the bin
    status, body = await one.call("POST", f"/platform/tokens/{made[2]['id']}/rotate", json={"grace": 600})
    assert status == 200, body
    rotated_key = body["result"][0]["key"]
    highest = max(token["id"] for token in [*made, customer_token])

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": upstream.url, "redis": {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix}}))
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url, "--logs")
    assert code == 0, err
    # 40 + the customer's + the bootstrap token, one of them deleted; and the rotated key's grace copy
    assert "token records: 42" in out and "ids: 41" in out and "bin: 1" in out, out
    first_copy = cluster_dump(redis_cluster, prefix)
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url, "--logs")
    assert code == 0, err  # the same source again: accepted, and the same result
    assert cluster_dump(redis_cluster, prefix) == first_copy
    # Spread over the masters like any store made on the cluster.
    assert sum(1 for key in first_copy if key.startswith(ClusterKeys(prefix).token_prefix)) == 42

    on_cluster = await start(gateways, upstream, {"cluster": {"nodes": redis_cluster.hosts[:2]}}, prefix)
    statuses = [await status_of(on_cluster, token["key"]) for token in made[3:]]
    assert set(statuses) == {200}
    assert await status_of(on_cluster, made[1]["key"]) == 401  # deleted before
    assert [await status_of(on_cluster, key) for key in (made[2]["key"], rotated_key)] == [200, 200]  # grace
    assert await status_of(on_cluster, customer_token["key"]) == 200
    status, body = await on_cluster.call("GET", "/platform/tokens/all", headers={"x-flespi-cid": str(cid)})
    assert [item["id"] for item in body["result"]] == [customer_token["id"]]
    status, body = await on_cluster.call("GET", f"/platform/tokens/{made[0]['id']}/logs")
    assert status == 200 and len(body["result"]) >= 1  # the line logged on the one Redis
    status, body = await on_cluster.call("POST", f"/platform/recycle-bin/tokens/{made[1]['id']}/restore")
    assert status == 200, body
    assert await status_of(on_cluster, made[1]["key"]) == 200
    new = await on_cluster.create_token()
    assert new["id"] > highest  # ids go on from where the one Redis was

    # Another source into the same (now used) target: refused, and nothing written.
    other = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    with redis.Redis.from_url(redis_url) as client:
        client.set(other + "next_id", 5)
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url,
                                             "--prefix", other)
    assert code == 1 and "already holds data" in err
    # And back: the cluster into one Redis, under a new prefix, served there.
    back = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--to", redis_url,
                                             "--prefix", back)
    assert code == 0, err
    returned = await start(gateways, upstream, {"url": redis_url}, back)
    assert [await status_of(returned, token["key"]) for token in (made[1], new, customer_token)] == [200] * 3
    status, body = await returned.call("GET", "/platform/tokens/all")
    assert {token["id"] for token in made} - {made[2]["id"]} <= {item["id"] for item in body["result"]}


async def test_a_cluster_kept_as_earlier_builds_kept_it_is_copied_in_place(
        upstream: Upstream, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle], tmp_path: Path) -> None:
    """Earlier builds kept everything under the prefix's hash tag, in one slot, on a cluster too:
    `--in-place` copies that into the sharded layout of the same cluster."""
    from redis.cluster import ClusterNode, RedisCluster

    from gateway.tokens import key_digest
    prefix = "{gwtest-" + uuid.uuid4().hex[:12] + "}:"
    key = "K" * 64
    record = {"id": 2, "info": "old", "enabled": True, "access": {"type": 0}, "expire": 0, "ttl": 3600,
              "created": 1_900_000_000, "accessed": 0, "ips": "", "origins": "*", "cid": 0, "metadata": {}}
    host, port = redis_cluster.hosts[0].split(":")
    with RedisCluster(startup_nodes=[ClusterNode(host, int(port))]) as client:
        client.set(prefix + "tok:" + key_digest(key), json.dumps(record))
        client.hset(prefix + "ids", "2", key_digest(key))
        client.sadd(prefix + "cid:0", "2")
        client.zadd(prefix + "expiry", {"2": 1_900_003_600})
        client.hset(prefix + "used", key_digest(key), 1_900_000_100)
        client.set(prefix + "next_id", 2)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": upstream.url, "redis": {"cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix}}))
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--in-place")
    assert code == 0, err
    assert "token records: 1" in out and "next_id: 2" in out, out
    code, out, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--in-place")
    assert code == 0, err  # again: the same
    on_cluster = await start(gateways, upstream, {"cluster": {"nodes": redis_cluster.hosts[:2]}}, prefix)
    assert await status_of(on_cluster, key) == 200
    status, body = await on_cluster.call("GET", "/platform/tokens/2")
    assert status == 200 and body["result"][0]["accessed"] == 1_900_000_100
    assert (await on_cluster.create_token())["id"] > 2


# -- the lock on the source -------------------------------------------------------------------------

def fresh_prefix() -> str:
    return "{gwtest-" + uuid.uuid4().hex[:12] + "}:"


class Hold:
    """`migrate(while_locked=...)`: the migration stops there, its source locked, until `go`."""

    def __init__(self) -> None:
        self.locked = threading.Event()
        self.go = threading.Event()

    def __call__(self) -> None:
        self.locked.set()
        assert self.go.wait(120), "the test never let the migration go on"


async def refused_changes(gw: GatewayHandle, token_id: int, binned_id: int, cid: int) -> list[tuple[int, Any, str]]:
    """Every kind of API change, each answered: (status, body, Retry-After)."""
    changes: list[tuple[str, str, Any]] = [
        ("POST", "/platform/tokens", [{"ttl": 600}]), ("PUT", f"/platform/tokens/{token_id}", {"info": "changed"}),
        ("PATCH", f"/platform/tokens/{token_id}", {"info": "changed"}),
        ("DELETE", f"/platform/tokens/{token_id}", None),
        ("POST", f"/platform/tokens/{token_id}/rotate", {"grace": 60}),
        ("POST", f"/platform/recycle-bin/tokens/{binned_id}/restore", None),
        ("DELETE", f"/platform/recycle-bin/tokens/{binned_id}", None),
        ("POST", "/platform/subaccounts", {"name": "new"}),
        ("PUT", f"/platform/subaccounts/{cid}", {"name": "renamed"}),
        ("DELETE", f"/platform/subaccounts/{cid}", None), ("PUT", "/platform/customer", {"name": "renamed"})]
    answers = []
    for method, path, body in changes:
        async with gw.request(method, path, json=body) as response:
            answers.append((response.status, await response.json(content_type=None),
                            response.headers.get("Retry-After", "")))
    return answers


async def state_of(gw: GatewayHandle) -> list[Any]:
    """What the API changes above would change, read through the API (not `accessed`, which the
    authentications move)."""
    found = []
    for path in ("/platform/tokens/all", "/platform/recycle-bin/tokens/all", "/platform/subaccounts/all",
                 "/platform/customer"):
        status, body = await gw.call("GET", path)
        assert status == 200, body  # reads go on during a migration
        found.append([{name: value for name, value in item.items() if name != "accessed"} for item in body["result"]])
    return found


async def test_while_a_migration_copies_its_source_api_changes_are_refused_and_authentications_go_on(
        upstream: Upstream, redis_url: str, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle],
        tmp_path: Path) -> None:
    prefix, into = fresh_prefix(), fresh_prefix()
    one = await start(gateways, upstream, {"url": redis_url}, prefix, housekeeping={"grace": 0})
    used, unused = await one.create_token(), await one.create_token()
    binned = await one.create_token()
    status, _ = await one.call("DELETE", f"/platform/tokens/{binned['id']}")
    status, body = await one.call("POST", "/platform/subaccounts", json={"name": "customer"})
    cid = body["result"][0]["id"]
    due = await one.create_token(expire=int(time.time()) + 1, ttl=0)  # for the housekeeper, soon
    assert await status_of(one, used["key"]) == 200
    before = await state_of(one)
    source = open_single(redis_url, prefix)
    target = Side(redis.Redis.from_url(redis_url), ClusterKeys(into), "the test's target")
    hold = Hold()
    copying = asyncio.ensure_future(asyncio.to_thread(migrate, source, target, settle=0.2, while_locked=hold,
                                                      say=lambda line: None))
    try:
        assert await asyncio.to_thread(hold.locked.wait, 60)
        answers = await refused_changes(one, used["id"], binned["id"], cid)
        assert answers == [(503, error(503, MIGRATING), "5")] * len(answers)
        # Authentications go on: a cached token, one never loaded here (a store read), an unknown key.
        assert [await status_of(one, key) for key in (used["key"], unused["key"], "N" * 64)] == [200, 200, 401]
        assert await state_of(one) == before  # nothing of the refused changes was written
        # The housekeeper writes nothing either: the due token stays.
        await asyncio.sleep(max(0.0, due["expire"] + 0.05 - time.time()))  # until it is due (not a timing check)
        assert await one.gateway.services.housekeeper.sweep() == 0
        status, body = await one.call("GET", f"/platform/tokens/{due['id']}")
        assert [item["id"] for item in body["result"]] == [due["id"]]
        # A second migration of this source is refused, as the other refusals are (exit 1).
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({"upstream": upstream.url, "redis": {
            "cluster": {"nodes": redis_cluster.hosts[:2]}, "key_prefix": prefix}}))
        code, _, err = await asyncio.to_thread(run_cli, "--config", str(config), "migrate", "--from", redis_url,
                                               "--settle", "0")
        assert code == 1 and "is being migrated already (gateway migrate on " in err, err
        assert "the test's target" in err and "unlocks it within 15 s" in err, err
    finally:
        hold.go.set()
        report: Report = await copying
    assert report.counts["token records"] == 4  # the bootstrap token, used, unused, due
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists(source.keys.migrating) == 0  # unlocked at the end
    status, body = await one.call("PUT", f"/platform/tokens/{used['id']}", json={"info": "changed"})
    assert status == 200, body  # and the API changes again
    assert (await one.create_token())["id"] > due["id"]
    await one.gateway.services.housekeeper.sweep()
    status, body = await one.call("GET", f"/platform/tokens/{due['id']}")
    assert body["result"] == []  # expired, and swept once the migration ended
    source.client.close()
    target.client.close()


async def test_a_migration_locks_its_target_too_and_no_master_token_is_made_there_meanwhile(
        upstream: Upstream, redis_url: str, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle],
        caplog: pytest.LogCaptureFixture) -> None:
    prefix, into, other = fresh_prefix(), fresh_prefix(), fresh_prefix()
    one = await start(gateways, upstream, {"url": redis_url}, prefix)
    token = await one.create_token()
    cluster = {"cluster": {"nodes": redis_cluster.hosts[:2]}}
    early = await start(gateways, upstream, cluster, into)  # started on the target before the copy
    assert early.settings.redis.cluster is not None
    source, target = open_single(redis_url, prefix), open_cluster_side(early.settings.redis.cluster, into)
    hold = Hold()
    copying = asyncio.ensure_future(asyncio.to_thread(migrate, source, target, force=True, settle=0.2,
                                                      while_locked=hold, say=lambda line: None))
    try:
        assert await asyncio.to_thread(hold.locked.wait, 60)
        for method, path, body in (("POST", "/platform/tokens", [{"ttl": 600}]),
                                   ("PUT", "/platform/customer", {"name": "early"})):
            async with early.request(method, path, json=body) as response:
                assert (response.status, await response.json(), response.headers.get("Retry-After")) == (
                    503, error(503, MIGRATING), "5")
        assert await status_of(early, MASTER_KEY) == 200  # authentications go on
        # A gateway started on the target meanwhile makes no master token of its own until the end.
        own_key = "B" * 32 + "b" * 32
        with caplog.at_level(logging.WARNING, logger="gateway"):
            late = await start(gateways, upstream, cluster, into, bootstrap_master_token=own_key)
            await asyncio.sleep(2.5)  # its retries (every second) while the lock holds: not a timing check
        assert await status_of(late, own_key) == 401
        # Said once, not at every retry: the reason stayed the same (a migration lasts minutes).
        said = [record.getMessage() for record in caplog.records if "not yet created" in record.getMessage()]
        assert len(said) == 1 and MIGRATING in said[0], said
        # A second migration into the same target is refused, and leaves its own source unlocked.
        elsewhere = open_single(redis_url, other)
        with pytest.raises(MigrationRefused, match=r"the target \(cluster .*\) is being migrated already"):
            await asyncio.to_thread(migrate, elsewhere, target, force=True, settle=0, say=lambda line: None)
        assert elsewhere.client.exists(elsewhere.keys.migrating) == 0
        elsewhere.client.close()
    finally:
        hold.go.set()
        report: Report = await copying
    assert report.counts["token records"] == 2  # the source's bootstrap token and `token`
    assert target.client.exists(target.keys.migrating) == 0  # unlocked at the end
    assert await status_of(early, token["key"]) == 200  # copied
    status, body = await early.call("POST", "/platform/tokens", json=[{"ttl": 600}])
    assert status == 200, body  # and the API changes on the target again
    deadline = time.monotonic() + 30  # the late gateway's next retry makes its token: a wait, not a check
    while await status_of(late, own_key) != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await status_of(late, own_key) == 200
    source.client.close()
    target.client.close()


async def test_no_first_master_token_is_made_on_an_empty_target_while_it_is_filled(
        upstream: Upstream, redis_url: str, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle]) -> None:
    prefix, into = fresh_prefix(), fresh_prefix()
    one = await start(gateways, upstream, {"url": redis_url}, prefix)
    await one.create_token()
    cluster = {"cluster": {"nodes": redis_cluster.hosts[:2]}}
    settings = build_settings({**base_config(upstream.url, "", into), "redis": {**cluster, "key_prefix": into}})
    assert settings.redis.cluster is not None
    source, target = open_single(redis_url, prefix), open_cluster_side(settings.redis.cluster, into)
    hold = Hold()
    copying = asyncio.ensure_future(asyncio.to_thread(migrate, source, target, settle=0.2, while_locked=hold,
                                                      say=lambda line: None))
    try:
        assert await asyncio.to_thread(hold.locked.wait, 60)
        # No bootstrap key: a store that never held a token would get a first master token.
        late = await start(gateways, upstream, cluster, into, bootstrap_master_token=None)
        await asyncio.sleep(1.5)  # its retries (every second) while the lock holds: not a timing check
        assert is_empty(target)
    finally:
        hold.go.set()
        await copying
    await asyncio.sleep(1.5)  # its next retries find the copied store: it held tokens, so none is made
    status, body = await late.call("GET", "/platform/tokens/all")
    assert status == 200, body
    assert sorted(item["info"] for item in body["result"]) == ["", "bootstrap master token"]
    source.client.close()
    target.client.close()


KILLED = """
import sys, time
import redis
from gateway.store.keys import ClusterKeys
from gateway.store.migrate import Side, migrate, open_single
url, prefix, into = sys.argv[1:4]
migrate(open_single(url, prefix), Side(redis.Redis.from_url(url), ClusterKeys(into), "target"), settle=0,
        lock_ttl=3.0, say=lambda line: print(line, flush=True), while_locked=lambda: time.sleep(600))
"""


async def test_a_migration_killed_midway_leaves_a_lock_that_ends_by_itself(
        upstream: Upstream, redis_url: str, gateways: list[GatewayHandle]) -> None:
    prefix = fresh_prefix()
    one = await start(gateways, upstream, {"url": redis_url}, prefix)
    token = await one.create_token()
    here = str(Path(gateway.__file__).resolve().parent.parent)
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED, redis_url, prefix, fresh_prefix(),
                                                   stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": here})
    try:
        assert process.stdout is not None
        line = await process.stdout.readline()
        assert line.startswith(b"source and target locked"), line
        status, body = await one.call("PUT", f"/platform/tokens/{token['id']}", json={"info": "during"})
        assert (status, body) == (503, error(503, MIGRATING))
        with redis.Redis.from_url(redis_url) as client:
            assert 0 < client.pttl(Keys(prefix).migrating) <= 3000  # it ends by itself
    finally:
        process.kill()
        await process.wait()
    deadline = time.monotonic() + 60  # a wait for the TTL to run out, generous: not a timing check
    while True:
        status, body = await one.call("PUT", f"/platform/tokens/{token['id']}", json={"info": "after"})
        if status != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200, body
    assert await status_of(one, token["key"]) == 200


# -- every key a gateway writes is of a family of store/keys.py ----------------------------------

def census(clients: list[redis.Redis], keys: Keys) -> tuple[set[str], dict[str, set[str]]]:
    """Every key under the prefix or its braceless base, and the keys each family's pattern finds."""
    def scan(pattern: str) -> set[str]:
        return {raw.decode() for client in clients for raw in client.scan_iter(match=pattern, count=1000)}
    base = keys.prefix.replace("{", "").replace("}", "")
    every = scan(glob_escape(keys.prefix) + "*") | scan(glob_escape(base) + "*")
    return every, {family: scan(pattern) for family, pattern in keys.patterns().items()}


async def fill(gw: GatewayHandle) -> None:
    """A store as a day of use leaves it: tokens made, changed, rotated in a grace, deleted and
    restored; an account with a limit, its token used past it (usage, leases, blocked); request
    logs and `accessed`."""
    made = [await gw.create_token(info=f"t{n}") for n in range(5)]
    await gw.create_token(expire=int(time.time()) + 3600, ttl=0)
    assert (await gw.call("PUT", f"/platform/tokens/{made[0]['id']}", json={"info": "changed"}))[0] == 200
    assert (await gw.call("POST", f"/platform/tokens/{made[1]['id']}/rotate", json={"grace": 600}))[0] == 200
    assert (await gw.call("DELETE", f"/platform/tokens/{made[2]['id']},{made[3]['id']}"))[0] == 200
    assert (await gw.call("POST", f"/platform/recycle-bin/tokens/{made[3]['id']}/restore"))[0] == 200
    status, body = await gw.call("POST", "/platform/subaccounts", json={"name": "limited", "limits": {"api_calls": 3}})
    assert status == 200, body
    cid = body["result"][0]["id"]
    assert (await gw.call("PUT", "/platform/customer", json={"name": "root"}))[0] == 200
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 600}], headers={"x-flespi-cid": str(cid)})
    limited = body["result"][0]
    for token in made[:2]:
        assert await status_of(gw, token["key"]) == 200
    deadline = time.monotonic() + 30  # until the account's calls are over its limit: a wait, not a check
    while await status_of(gw, limited["key"]) != 429 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await status_of(gw, limited["key"]) == 429
    assert len(await logged_hosts(gw, made[0]["id"], 1)) == 1


def assert_every_key_has_a_family(every: set[str], found: dict[str, set[str]]) -> None:
    assert set(found) <= set(FAMILIES)
    assert every - set().union(*found.values()) == set()  # a key of a family keys.py does not name
    held = {family for family, names in found.items() if names}
    assert {"tok", "ids", "cid", "used", "expiry", "bin", "bin_times", "accounts", "next_id", "next_account_id",
            "usage", "blocked", "logs:tok", "logs:acct"} <= held, held  # the fill reached them


async def test_the_families_of_keys_py_hold_every_key_of_a_store_on_one_redis(
        upstream: Upstream, redis_url: str, gateways: list[GatewayHandle]) -> None:
    prefix = fresh_prefix()
    gw = await start(gateways, upstream, {"url": redis_url}, prefix, usage={"window": 60, "flush_interval": 0.1})
    await fill(gw)
    await gw.server.close()  # its writers flushed: nothing more comes
    gateways.remove(gw)
    await gw.session.close()
    with redis.Redis.from_url(redis_url) as client:
        every, found = census([client], Keys(prefix))
    assert {"lease", "lease_instances"} <= {family for family, names in found.items() if names}
    assert_every_key_has_a_family(every, found)


async def test_the_families_of_keys_py_hold_every_key_of_a_store_on_a_cluster(
        upstream: Upstream, redis_cluster: RedisClusterSet, gateways: list[GatewayHandle]) -> None:
    prefix = fresh_prefix()
    gw = await start(gateways, upstream, {"cluster": {"nodes": redis_cluster.hosts[:2]}}, prefix,
                     usage={"window": 60, "flush_interval": 0.1})
    await fill(gw)
    await gw.server.close()
    gateways.remove(gw)
    await gw.session.close()
    clients = [redis_cluster.client(node) for node in redis_cluster.masters()]
    try:
        every, found = census(clients, ClusterKeys(prefix))
    finally:
        for client in clients:
            client.close()
    assert_every_key_has_a_family(every, found)
