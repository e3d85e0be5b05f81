"""The compiled planner of cluster batches (`store/slots.py`): slots as Redis computes them, and
each master sent exactly the keys it holds, checked against a real cluster."""
from __future__ import annotations

import hashlib

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot
from redis.exceptions import ResponseError

from gateway.store.keys import TOKEN_BUCKETS, USED_BUCKETS, ClusterKeys, token_bucket, used_bucket
from gateway.store.slots import group_by_master, key_slot, plan_loads, touch_calls, touched

from support.cluster import RedisClusterSet

KEYS = ClusterKeys("{gw}:")
BUCKET_KEYS = [KEYS.token(f"{bucket:03x}")[:-3] for bucket in range(TOKEN_BUCKETS)]
BUCKET_SLOTS = [key_slot(KEYS.token(f"{bucket:03x}")) for bucket in range(TOKEN_BUCKETS)]
USED_KEYS = [KEYS.used_bucket(bucket) for bucket in range(USED_BUCKETS)]
USED_SLOTS = [key_slot(name) for name in USED_KEYS]


def digests(count: int, seed: str = "") -> list[str]:
    return [hashlib.sha256(f"{seed}{n}".encode()).hexdigest() for n in range(count)]


@given(st.text(alphabet=st.sampled_from("ab{}:é\udcff"), max_size=12))
def test_a_slot_is_the_one_redis_py_computes(key: str) -> None:
    assert key_slot(key) == redis_py_key_slot(key.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("key", ["{}", "{a}", "a{}b{c}", "{{a}}", "x{a", "}a{b}", "{gw}:tok:{t.abc}0"])
def test_hash_tags_as_redis_reads_them(key: str) -> None:
    assert key_slot(key) == redis_py_key_slot(key.encode())


def test_every_key_of_a_batch_goes_to_the_master_of_its_slot_once() -> None:
    nodes = {name: type("Node", (), {"name": name})() for name in ("a:1", "b:2", "c:3")}
    slots = {slot: [nodes[("a:1", "b:2", "c:3")[slot * 3 // 16384]]] for slot in range(16384)}
    batch = digests(200)
    plan = plan_loads(batch, slots, BUCKET_SLOTS, BUCKET_KEYS, USED_SLOTS, USED_KEYS)
    assert plan is not None and set(plan) == {"a:1", "b:2", "c:3"}
    got: list[int] = []
    used: list[int] = []
    for name, part in plan.items():
        answered: list[int] = []  # what a failure of this master's part must fail
        for command, target in zip(part.commands, part.targets, strict=True):
            assert slots[key_slot(command[1])][0].name == name
            if command[0] == "GET":
                assert command[1] == KEYS.token(batch[target])
                got.append(target)
                answered.append(target)
            else:
                assert command[0] == "HMGET" and command[1] == KEYS.used_of(batch[target[0]])
                assert list(command[2:]) == [batch[index] for index in target]
                used += target
                answered += target
        assert sorted(touched(part.targets)) == sorted(answered)
    assert sorted(got) == sorted(used) == list(range(len(batch)))


def test_an_unknown_slot_plans_nothing() -> None:
    node = type("Node", (), {"name": "a:1"})()
    slots = {slot: [node] for slot in range(16384)}
    batch = digests(50)
    del slots[BUCKET_SLOTS[token_bucket(batch[7])]]
    assert plan_loads(batch, slots, BUCKET_SLOTS, BUCKET_KEYS, USED_SLOTS, USED_KEYS) is None
    slots[BUCKET_SLOTS[token_bucket(batch[7])]] = [node]
    del slots[USED_SLOTS[used_bucket(batch[3])]]
    assert plan_loads(batch, slots, BUCKET_SLOTS, BUCKET_KEYS, USED_SLOTS, USED_KEYS) is None
    assert group_by_master([KEYS.used_of(batch[3])], slots) is None


def test_touch_calls_cover_every_token_once_in_chunks_of_one_bucket() -> None:
    accessed = {digest: 1_700_000_000 + n for n, digest in enumerate(digests(3000))}
    calls = touch_calls(accessed, USED_KEYS, 7)
    seen: dict[str, int] = {}
    for keys, pairs in calls:
        assert len(keys) == 1 and 0 < len(pairs) <= 14
        for digest, when in zip(pairs[::2], pairs[1::2], strict=True):
            assert keys[0] == KEYS.used_of(digest) and digest not in seen
            seen[digest] = when
    assert seen == accessed


def test_each_master_holds_what_it_is_sent(redis_cluster: RedisClusterSet) -> None:
    """Planned with redis-py's slot map of the real cluster, every GET and HMGET runs on the
    master it is sent to: none is redirected (MOVED)."""
    cluster = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        batch = digests(300, "real")
        plan = plan_loads(batch, cluster.nodes_manager.slots_cache, BUCKET_SLOTS, BUCKET_KEYS, USED_SLOTS, USED_KEYS)
        assert plan is not None and len(plan) == 3
        for name, part in plan.items():
            host, port = name.rsplit(":", 1)
            with redis.Redis(host=host, port=int(port)) as node:
                for command in part.commands:
                    try:
                        node.execute_command(*command)
                    except ResponseError as exc:
                        pytest.fail(f"{name} refused {command[:2]}: {exc}")
        groups = group_by_master(USED_KEYS, cluster.nodes_manager.slots_cache)
        assert groups is not None and sum(len(indexes) for indexes in groups.values()) == USED_BUCKETS
    finally:
        cluster.close()
