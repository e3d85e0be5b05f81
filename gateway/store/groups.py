"""ACL group membership, read from Redis when an ACL token is loaded (the ACL itself, in
`policy/acl.py`, only matches against what is read here).

The upstream application keeps the sets: `group:<group>:<uri>` holds the ids of the items of `uri`
that belong to the group, and `groups` lists every group id (read when a token reaches `"all"`
groups); names in `store/keys.py`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.policy.acl import CompiledAcl
from gateway.store.keys import Keys

_NO_IDS: frozenset[int] = frozenset()


async def load_group_members(redis: Any, keys: Keys, acl: CompiledAcl | None) -> dict[str, frozenset[int]]:
    """The members of every group the token reaches, per uri that needs them, in one pipeline."""
    uris = acl.groups_needed() if acl is not None else None
    if acl is None or uris is None:
        return {}
    groups = await _reachable_group_ids(redis, keys, acl)
    names = [(uri, keys.group_members(group, uri)) for group in sorted(groups) for uri in uris]
    replies = await _smembers_all(redis, [name for _, name in names]) if names else []
    found: dict[str, set[int]] = {uri: set() for uri in uris}
    for (uri, _), reply in zip(names, replies, strict=True):
        found[uri] |= _member_ids(reply)
    return {uri: frozenset(ids) for uri, ids in found.items()}


async def _reachable_group_ids(redis: Any, keys: Keys, acl: CompiledAcl) -> frozenset[int]:
    reachable = acl.reachable_groups()
    if isinstance(reachable, frozenset):
        return reachable
    if reachable is None:
        return _NO_IDS
    return _member_ids(await redis.smembers(keys.groups))


async def _smembers_all(redis: Any, names: list[str]) -> list[Iterable[bytes | str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.smembers(name)
        replies: list[Iterable[bytes | str]] = await pipe.execute()
    return replies


def _member_ids(members: Iterable[bytes | str]) -> frozenset[int]:
    """Set members as ids; anything that is not a positive decimal id is ignored, never granted."""
    ids: set[int] = set()
    for member in members:
        text = member.decode("ascii", "replace") if isinstance(member, bytes) else member
        if text.isascii() and text.isdigit() and text[0] != "0":
            ids.add(int(text))
    return frozenset(ids)
