"""The token record and its compiled, cache-resident form."""
from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
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


def new_key() -> str:
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def is_valid_at(expire: int, ttl: int, created: int, accessed: int, now: float) -> bool:
    """SPEC 2: valid if either `expire` or the sliding `ttl` still holds."""
    return (expire > 0 and now < expire) or (ttl > 0 and now < max(created, accessed) + ttl)


class Matcher(Protocol):
    def matches(self, value: str) -> bool: ...


@dataclass(slots=True, eq=False)
class Token:
    """A token record compiled for the hot path: masks, origins and ACL are built once, on load.

    Only what the checks read is kept as fields; the rest of the record stays compact JSON bytes,
    parsed by `public_record()` (`/auth/info`). One is held per cached key, so every byte counts.
    """

    id: int
    digest: str  # the cache key's own string object: not a second copy
    cid: int
    type: TokenType
    enabled: bool
    expire: int
    ttl: int
    created: int
    accessed: int
    record_json: bytes  # the record without its digest
    ips: Matcher | None = None
    origins: Matcher | None = None
    acl: Any = None
    group_members: dict[str, frozenset[int]] | None = None
    # Newest `accessed` value already handed to the batched writer; avoids one write per request.
    accessed_queued: int = 0
    # Kept by TokenCache (the token is its own cache entry): when and in which epoch it was
    # loaded, and whether a background reload is running.
    loaded: float = 0.0
    epoch: int = 0
    refreshing: bool = False

    def valid_at(self, now: float) -> bool:
        return is_valid_at(self.expire, self.ttl, self.created, self.accessed, now)

    def public_record(self) -> dict[str, Any]:
        record: dict[str, Any] = orjson.loads(self.record_json)
        record["accessed"] = self.accessed
        return record
