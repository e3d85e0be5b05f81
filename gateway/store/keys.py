"""Every Redis key and channel name the gateway uses, in one place.

Each name starts with the configured prefix (`{gw}:` by default). The prefix's hash tag puts
every key in one Redis Cluster slot, so transactions and scripts that touch several of them
run there too.

- `tok:<sha256 of key>`          the record as JSON (never the key itself)
- `ids`                          hash: token id -> key digest
- `cid:<account id>`             set: ids of the account's tokens
- `used`                         hash: key digest -> last `accessed` (`TOUCH` keeps the newest)
- `accessed`                     sorted set: the same, as earlier builds kept it; still read on
                                 loads and folded into `used` by the housekeeper
- `expiry`                       sorted set: token id -> when it stops being valid (the sweeper's)
- `next_id`                      counter for token ids, never reused
- `bin`, `bin_times`             hash: token id -> JSON of a deleted record; sorted set: when
- `accounts`, `next_account_id`  hash: account id -> JSON; counter
- `usage:<window>:<account>`     hash: `c:<token>` calls, `b:<token>` bytes
- `lease:<window>:<account>`     hash: `g:<instance>` calls it may serve, `e:<instance>` until (ms)
- `lease_instances`              hash: instance -> when it last leased calls (ms)
- `blocked:<window>`, `unblocked:<window>`  hashes: token id -> why (made once by HSETNX)
- `logs:tok:<id>`, `logs:acct:<cid>`        capped lists of JSON log records
- `group:<group>:<uri>`, `groups`           sets kept by the upstream application (ACL groups)
- `writes`                       counter, bumped before each WAIT (what the replicas must hold)
- `invalidate`                   pub/sub channel: digests whose cached records must be dropped,
                                 and `accounts`
"""
from __future__ import annotations


class Keys:
    """The names under one prefix. Plain attributes for the fixed names (read on hot paths),
    methods for the ones that carry an id."""

    __slots__ = ("prefix", "token_prefix", "ids", "used", "legacy_accessed", "expiry", "next_id", "bin",
                 "bin_times", "accounts", "next_account_id", "groups", "writes", "lease_instances",
                 "channel")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.token_prefix = f"{prefix}tok:"
        self.ids = f"{prefix}ids"
        self.used = f"{prefix}used"
        self.legacy_accessed = f"{prefix}accessed"
        self.expiry = f"{prefix}expiry"
        self.next_id = f"{prefix}next_id"
        self.bin = f"{prefix}bin"
        self.bin_times = f"{prefix}bin_times"
        self.accounts = f"{prefix}accounts"
        self.next_account_id = f"{prefix}next_account_id"
        self.groups = f"{prefix}groups"
        self.writes = f"{prefix}writes"
        self.lease_instances = f"{prefix}lease_instances"
        self.channel = f"{prefix}invalidate"

    def token(self, digest: str) -> str:
        return self.token_prefix + digest

    def account_tokens(self, cid: int) -> str:
        return f"{self.prefix}cid:{cid}"

    def token_logs(self, token_id: int) -> str:
        return f"{self.prefix}logs:tok:{token_id}"

    def account_logs(self, cid: int) -> str:
        return f"{self.prefix}logs:acct:{cid}"

    def usage(self, window: int, cid: int) -> str:
        return f"{self.prefix}usage:{window}:{cid}"

    def lease(self, window: int, cid: int) -> str:
        """The calls each instance may serve for an account before it exchanges again (usage.py)."""
        return f"{self.prefix}lease:{window}:{cid}"

    def blocked(self, window: int) -> str:
        return f"{self.prefix}blocked:{window}"

    def unblocked(self, window: int) -> str:
        return f"{self.prefix}unblocked:{window}"

    def group_members(self, group_id: int, uri: str) -> str:
        """The set holding the ids of the items of `uri` that belong to group `group_id`."""
        return f"{self.prefix}group:{group_id}:{uri}"
