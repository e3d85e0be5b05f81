"""A batch split over a Redis Cluster's masters, compiled (`build.COMPILED`).

`ShardedTokenStore` sends each master the part of a batch whose slots it holds, on that master's
lean connection. Planning that per key in interpreted Python (a slot, a dictionary look-up and a
command tuple for each of the 20-30 keys of a cache-miss batch, and of the few hundred `used`
buckets of an `accessed` flush) cost more gateway CPU per miss than the round trips themselves:
here it is compiled. What a master holds comes from redis-py's slot map (`slots_cache`: slot ->
its nodes, the master first); None from a planner means a slot it does not know yet.
"""
from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Sequence
from typing import Any, Final

import hiredis

from gateway.store.keys import USED_SHIFT as _USED_SHIFT
from gateway.store.keys import token_bucket

SLOTS = 16384
USED_SHIFT: Final = _USED_SHIFT  # a token bucket's `used` bucket: bucket >> USED_SHIFT


def key_slot(key: str) -> int:
    """A key's cluster slot: CRC16 of its hash tag (the text between the first `{` and the next
    `}`, when not empty) or of the whole key, as Redis and redis-py compute it."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key.encode("utf-8", "surrogateescape"), 0) % SLOTS


def _token_bucket(digest: str) -> int:
    try:
        return int(digest[:3], 16)  # as keys.token_bucket, without a call into interpreted code
    except ValueError:
        return token_bucket(digest)


class Batch:
    """One master's part: its commands, and per command what its reply fills (a record's index,
    or for an HMGET of a `used` bucket the indexes whose last use it brings)."""

    __slots__ = ("commands", "targets")

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.targets: list[Any] = []


def plan_loads(digests: Sequence[str], slots: dict[int, Any], bucket_slots: list[int], bucket_keys: list[str],
               used_slots: list[int], used_keys: list[str]) -> dict[str, Batch] | None:
    """Per master address: a GET per record and an HMGET per `used` bucket of the batch."""
    per_node: dict[str, Batch] = {}
    by_used: dict[int, list[int]] = {}
    for index, digest in enumerate(digests):
        bucket = _token_bucket(digest)
        nodes = slots.get(bucket_slots[bucket])
        if not nodes:
            return None
        name: str = nodes[0].name
        batch = per_node.get(name)
        if batch is None:
            batch = per_node[name] = Batch()
        batch.commands.append(("GET", bucket_keys[bucket] + digest))
        batch.targets.append(index)
        sharing = by_used.get(bucket >> USED_SHIFT)
        if sharing is None:
            by_used[bucket >> USED_SHIFT] = [index]
        else:
            sharing.append(index)
    for used, members in by_used.items():
        nodes = slots.get(used_slots[used])
        if not nodes:
            return None
        name = nodes[0].name
        batch = per_node.get(name)
        if batch is None:
            batch = per_node[name] = Batch()
        command: list[Any] = ["HMGET", used_keys[used]]
        for member in members:
            command.append(digests[member])
        batch.commands.append(tuple(command))
        batch.targets.append(members)
    return per_node


def refused(replies: list[Any]) -> bool:
    """Whether a master refused any command of its part (a slot moved or moving, NOSCRIPT...)."""
    return any(isinstance(reply, hiredis.ReplyError) for reply in replies)


def fill_loads(targets: list[Any], replies: list[Any], raws: list[Any], used: list[Any]) -> None:
    """A master's replies into the batch's records (`raws`) and last uses (`used`)."""
    for target, reply in zip(targets, replies, strict=True):
        if isinstance(target, list):
            for position, index in enumerate(target):
                used[index] = reply[position]
        else:
            raws[target] = reply


def touched(targets: list[Any]) -> list[int]:
    """The batch indexes a master's part answers for."""
    indexes: list[int] = []
    for target in targets:
        if isinstance(target, list):
            indexes.extend(target)
        else:
            indexes.append(target)
    return indexes


def group_by_master(keys: Sequence[str], slots: dict[int, Any]) -> dict[str, list[int]] | None:
    """Indexes of `keys` per master address."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        nodes = slots.get(key_slot(key))
        if not nodes:
            return None
        name: str = nodes[0].name
        group = groups.get(name)
        if group is None:
            groups[name] = [index]
        else:
            group.append(index)
    return groups


def touch_calls(accessed: dict[str, int], used_keys: list[str], chunk: int) -> list[tuple[list[str], list[Any]]]:
    """TOUCH calls for `accessed` (digest -> time): one per `used` bucket, of `chunk` tokens at most."""
    by_bucket: dict[int, list[Any]] = {}
    for digest, when in accessed.items():
        used = _token_bucket(digest) >> USED_SHIFT
        pairs = by_bucket.get(used)
        if pairs is None:
            by_bucket[used] = [digest, when]
        else:
            pairs.append(digest)
            pairs.append(when)
    calls: list[tuple[list[str], list[Any]]] = []
    step = 2 * chunk
    for used, pairs in by_bucket.items():
        for start in range(0, len(pairs), step):
            calls.append(([used_keys[used]], pairs[start:start + step]))
    return calls
