"""ACL group membership read from a real Redis (`store/groups.py`)."""
from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.errors import Denied
from gateway.policy.acl import compile_acl
from gateway.store.groups import load_group_members
from gateway.store.keys import Keys

GET: dict[str, object] = {"uri": "gw/devices", "methods": ["GET"]}
GROUPS: dict[str, object] = {"uri": "gw/groups", "methods": ["GET"], "ids": [5]}


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


def test_the_key_layout() -> None:
    assert Keys("{gw}:").group_members(5, "gw/devices") == "{gw}:group:5:gw/devices"
    assert Keys("{gw}:").groups == "{gw}:groups"


async def _fill(client: aioredis.Redis, keys: Keys) -> None:
    await client.sadd(keys.group_members(5, "gw/devices"), 1, 2)
    await client.sadd(keys.group_members(6, "gw/devices"), 3, "junk", "0", "-4", "07")
    await client.sadd(keys.group_members(6, "gw/calcs"), 30)
    await client.sadd(keys.group_members(7, "gw/devices"), 99)
    await client.sadd(keys.group_members(8, "gw/devices"), 88)
    await client.sadd(Keys("other:").group_members(5, "gw/devices"), 77)
    await client.sadd(keys.groups, 5, 8)


async def test_members_of_the_reachable_groups(redis_client: aioredis.Redis, keys: Keys) -> None:
    await _fill(redis_client, keys)
    acl = compile_acl(
        [
            {"uri": "gw/groups", "methods": ["GET"], "ids": [5, 6]},
            {"uri": "gw/devices", "methods": ["GET"], "ids": "in-groups"},
            {"uri": "gw/calcs", "methods": ["GET"], "ids": "in-groups"},
        ]
    )
    members = await load_group_members(redis_client, keys, acl)
    assert members == {"gw/devices": frozenset({1, 2, 3}), "gw/calcs": frozenset({30})}
    assert acl.authorize("GET", "/gw/devices/all", members) == "/gw/devices/1,2,3"
    with pytest.raises(Denied):
        acl.authorize("GET", "/gw/devices/99", members)


async def test_all_groups_are_listed_in_the_groups_set(redis_client: aioredis.Redis, keys: Keys) -> None:
    await _fill(redis_client, keys)
    acl = compile_acl([{**GROUPS, "ids": "all"}, {**GET, "ids": "in-groups"}])
    assert await load_group_members(redis_client, keys, acl) == {"gw/devices": frozenset({1, 2, 88})}


async def test_decoded_replies_are_read_too(redis_url: str, keys: Keys) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await _fill(client, keys)
        acl = compile_acl([GROUPS, {**GET, "ids": "in-groups"}])
        assert await load_group_members(client, keys, acl) == {"gw/devices": frozenset({1, 2})}
    finally:
        await client.aclose()


async def test_no_reachable_group_means_no_members(redis_client: aioredis.Redis, keys: Keys) -> None:
    await _fill(redis_client, keys)
    assert await load_group_members(redis_client, keys, compile_acl([{**GET, "ids": "in-groups"}])) == {
        "gw/devices": frozenset()
    }
    await redis_client.delete(keys.groups)
    acl = compile_acl([{**GROUPS, "ids": "all"}, {**GET, "ids": "in-groups"}])
    assert await load_group_members(redis_client, keys, acl) == {"gw/devices": frozenset()}


async def test_nothing_is_read_when_no_entry_needs_groups(keys: Keys) -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"redis.{name} used")

    assert await load_group_members(Untouchable(), keys, compile_acl([GROUPS, GET])) == {}
    assert await load_group_members(Untouchable(), keys, None) == {}


async def test_one_round_trip_for_explicit_groups(redis_client: aioredis.Redis, keys: Keys) -> None:
    await _fill(redis_client, keys)
    acl = compile_acl([GROUPS, {**GROUPS, "ids": [6, 7]}, {**GET, "ids": "in-groups"}])
    async with redis_client.monitor() as monitor:  # every command the server runs, in order
        members = await load_group_members(redis_client, keys, acl)
        await redis_client.ping()  # a marker: what came before it is the load's
        seen: list[str] = []
        async for entry in monitor.listen():
            if entry["command"].upper() == "PING":
                break
            name = entry["command"].split()[0].upper()
            if name not in ("HELLO", "CLIENT"):  # a new connection's handshake
                seen.append(name)
    assert members == {"gw/devices": frozenset({1, 2, 3, 99})}
    assert seen == ["SMEMBERS"] * 3  # one per group, nothing else
