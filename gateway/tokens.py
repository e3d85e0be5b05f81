"""The token record and its compiled, cache-resident form."""
from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, Protocol

import orjson

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 64
# The record as stored and served by the API; `accessed` is merged in from the accessed index.
PUBLIC_FIELDS = (
    "id", "info", "enabled", "access", "expire", "ttl", "created", "accessed", "ips", "origins", "cid", "metadata",
)


class TokenType(IntEnum):
    STANDARD = 0
    MASTER = 1
    ACL = 2
    NOAPI = 3


# `TokenType(value)` goes through the Enum machinery (~2 µs); a cache miss asks this instead.
TOKEN_TYPES: dict[Any, TokenType] = {kind.value: kind for kind in TokenType}


def new_key() -> str:
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def is_valid_at(expire: int, ttl: int, created: int, accessed: int, now: float) -> bool:
    """Valid if either `expire` or the sliding `ttl` still holds (docs/tokens.md, validity in time)."""
    return (expire > 0 and now < expire) or (ttl > 0 and now < max(created, accessed) + ttl)


class Matcher(Protocol):
    def matches(self, value: str) -> bool: ...


class Token:
    """A token record compiled for the hot path: masks, origins and ACL are built once, on load.

    Only what the checks read is kept as fields; the rest of the record stays compact JSON bytes,
    parsed by `public_record()` (`/auth/info`). One is held per cached key, so every byte counts.
    A plain class, not a dataclass: compiled, a dataclass is initialised by its generated Python
    `__init__`, and one is made per cache miss.
    """

    __slots__ = ("id", "digest", "cid", "type", "enabled", "expire", "ttl", "created", "accessed", "record_json",
                 "ips", "origins", "acl", "group_members", "accessed_queued", "loaded", "epoch", "refreshing")

    def __init__(self, id: int, digest: str, cid: int, type: TokenType, enabled: bool, expire: int, ttl: int,
                 created: int, accessed: int, record_json: bytes, ips: Matcher | None = None,
                 origins: Matcher | None = None, acl: Any = None,
                 group_members: dict[str, frozenset[int]] | None = None) -> None:
        self.id = id
        self.digest = digest  # the cache key's own string object: not a second copy
        self.cid = cid
        self.type = type
        self.enabled = enabled
        self.expire = expire
        self.ttl = ttl
        self.created = created
        self.accessed = accessed
        self.record_json = record_json  # the record without its digest
        self.ips = ips
        self.origins = origins
        self.acl = acl
        self.group_members = group_members
        # Newest `accessed` value already handed to the batched writer; avoids one write per request.
        self.accessed_queued = 0
        # Kept by TokenCache (the token is its own cache entry): when and in which epoch it was
        # loaded, and whether a background reload is running.
        self.loaded = 0.0
        self.epoch = 0
        self.refreshing = False

    def __repr__(self) -> str:
        return f"Token(id={self.id}, cid={self.cid}, type={self.type.name})"

    def valid_at(self, now: float) -> bool:
        return is_valid_at(self.expire, self.ttl, self.created, self.accessed, now)

    def public_record(self) -> dict[str, Any]:
        record: dict[str, Any] = orjson.loads(self.record_json)
        record["accessed"] = self.accessed
        return record


# -- records as a cache-miss load brings them (compiled: run once per miss) -------------------

def records_from_replies(digests: Sequence[str], raws: list[Any], used: list[Any],
                         legacy: list[Any]) -> list[dict[str, Any] | None]:
    """MGET, HMGET and ZMSCORE replies as records; a record's `digest` is the very string asked for."""
    records: list[dict[str, Any] | None] = []
    for digest, raw, when, old in zip(digests, raws, used, legacy, strict=True):
        if raw is None:
            records.append(None)
            continue
        record = merge_accessed(orjson.loads(raw), when, old)
        record["digest"] = digest
        records.append(record)
    return records


def merge_accessed(record: dict[str, Any], used: Any, legacy: Any) -> dict[str, Any]:
    """The newest of the record's own `accessed`, the `used` hash's (an HMGET reply: bytes) and
    the old sorted set's (a ZMSCORE reply: a float through redis-py, bytes through the lean client)."""
    if used is not None:
        record["accessed"] = max(int(used), record.get("accessed", 0))
    if legacy is not None:
        record["accessed"] = max(int(float(legacy)), record.get("accessed", 0))
    return record
