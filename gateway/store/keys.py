"""Every Redis key and channel name the gateway uses, in one place.

Two layouts. `Keys`, for one Redis, Sentinel and the embedded store: each name starts with the
configured prefix (`{gw}:` by default), whose hash tag would put every key in one Redis Cluster
slot. `ClusterKeys`, for `redis.cluster`: the data is spread over the cluster's slots (below).

The one-Redis layout:

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
- `lease_instances`              hash: instance -> when it last leased calls (ms), any account
- `blocked:<window>`, `unblocked:<window>`  hashes: token id -> why (made once by HSETNX)
- `logs:tok:<id>`, `logs:acct:<cid>`        capped lists of JSON log records
- `group:<group>:<uri>`, `groups`           sets kept by the upstream application (ACL groups)
- `writes`                       counter, bumped before each WAIT (what the replicas must hold)
- `invalidate`                   pub/sub channel: digests whose cached records must be dropped,
                                 and `accounts`
- `migrating`                    string, while `gateway migrate` copies from this store: the API
                                 refuses changes and the housekeeper pauses (a TTL it refreshes)
- `migrated_from`                string: the source a `gateway migrate` into this store copied

The cluster layout (`ClusterKeys`). `<base>` is the prefix without its braces (`gw:`); a hash
tag `{...}` names the slot group of each key, and every script or MULTI touches one such group:

- `<base>tok:{t.<b>}<digest>`    the record; `<b>`: the digest's first three hex digits (4096
                                 token buckets), so records spread over every master by digest
- `<base>used:{u.<uu>}`          hash: digest -> last `accessed`; `<uu>` (hex): the digest's first
                                 five bits (32 buckets: an `accessed` flush is at most 32 script
                                 calls, not one per token nor one per few tokens; at 3,000,000
                                 tokens a bucket holds ~94,000)
- `<base>ids:{i.<n>}`            hash: token id -> digest; `<n>`: the id modulo ID_BUCKETS (256)
- `<base>expiry:{i.<n>}`         sorted set: token id -> when it stops being valid
- `<base>bin:{i.<n>}`, `<base>bin_times:{i.<n>}`  the recycle bin, by id bucket too
- `<base>cid:{a.<cid>}`          set: ids of the account's tokens
- `<base>usage:{a.<cid>}:<window>`                the account's usage counters
- `<base>lease:{a.<cid>}:<window>`                the account's leases (as `lease:<window>:<account>`)
- `<base>lease_instances:{a.<cid>}`               hash: instance -> when it last leased the
                                 account's calls (ms), per account so that the script that adds to
                                 its usage grants its leases in the same slot; across windows, so
                                 a window's first grant is already a share
- `<base>logs:acct:{a.<cid>}`, `<base>logs:tok:{a.<cid>}<id>`  logs, in their account's slot
                                 (a token's log lines carry its account; one LOG_PUSH per account)
- one slot, the prefix's own (`{gw}:`), for what is small and used one key at a time:
  `next_id`, `accounts`, `next_account_id`, `blocked:<window>`, `unblocked:<window>`, `writes`,
  and the `invalidate` channel (PUBLISH on a cluster reaches every node's subscribers anyway)
- `<base>writes:{w.<n>}`         counters, one on each master (the first `<n>` whose slot it
                                 holds), bumped before a WAIT there
- `group:<group>:<uri>`, `groups`: as in the one-Redis layout (the upstream application's)
- `migrating`, `migrated_from`: in the prefix's slot too (the names of the one-Redis layout)

Each kind of key is a family (`FAMILIES`); `Keys.patterns()` gives, per layout, a SCAN pattern
for each, so what walks a whole store (`gateway migrate`, the census in the tests) is told here
of a new family, and the parsers below (`record_digest`, `account_of`, ...) read the names back.

No legacy `accessed` sorted set on a cluster: that layout is new (`gateway migrate` folds it).
"""
from __future__ import annotations

import re
import zlib

TOKEN_BUCKETS = 4096  # the cluster layout's token buckets: the first three hex digits of a digest
USED_SHIFT = 7  # its `used` buckets: a token bucket shifted right by this (32: the first five bits)
USED_BUCKETS = TOKEN_BUCKETS >> USED_SHIFT
ID_BUCKETS = 256  # the cluster layout's id buckets (ids, expiry, recycle bin)

# The families (module docstring): the names `Keys.patterns()` gives a SCAN pattern for.
TOKENS, IDS, USED, LEGACY_ACCESSED, EXPIRY = "tok", "ids", "used", "accessed", "expiry"
BIN, BIN_TIMES, ACCOUNT_TOKENS, USAGE, LEASE = "bin", "bin_times", "cid", "usage", "lease"
BLOCKED, UNBLOCKED, TOKEN_LOGS, ACCOUNT_LOGS = "blocked", "unblocked", "logs:tok", "logs:acct"
GROUP_MEMBERS, GROUPS, NEXT_ID, ACCOUNTS, NEXT_ACCOUNT_ID = "group", "groups", "next_id", "accounts", "next_account_id"
WRITES, WRITES_IN, LEASE_INSTANCES = "writes", "writes_in", "lease_instances"
MIGRATING, MIGRATED_FROM = "migrating", "migrated_from"
# The hashes and sorted sets that are one key on one Redis and id or digest buckets on a cluster.
INDEXES = (IDS, USED, LEGACY_ACCESSED, EXPIRY, BIN, BIN_TIMES)
FAMILIES = (TOKENS, *INDEXES, ACCOUNT_TOKENS, USAGE, LEASE, BLOCKED, UNBLOCKED, TOKEN_LOGS, ACCOUNT_LOGS,
            GROUP_MEMBERS, GROUPS, NEXT_ID, ACCOUNTS, NEXT_ACCOUNT_ID, WRITES, WRITES_IN, LEASE_INSTANCES,
            MIGRATING, MIGRATED_FROM)


def glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


class Keys:
    """The names under one prefix. Plain attributes for the fixed names (read on hot paths),
    methods for the ones that carry an id."""

    sharded = False

    __slots__ = ("prefix", "token_prefix", "ids", "used", "legacy_accessed", "expiry", "next_id", "bin",
                 "bin_times", "accounts", "next_account_id", "groups", "writes", "lease_instances",
                 "channel", "migrating", "migrated_from")

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
        self.migrating = f"{prefix}{MIGRATING}"
        self.migrated_from = f"{prefix}{MIGRATED_FROM}"

    def token(self, digest: str) -> str:
        return self.token_prefix + digest

    def patterns(self) -> dict[str, str]:
        """A SCAN MATCH pattern for each family of this layout (`FAMILIES`; on a cluster, not the
        legacy `accessed`): every key the gateway writes matches one."""
        p = glob_escape(self.prefix)
        found = {family: f"{p}{family}:*" for family in (
            TOKENS, ACCOUNT_TOKENS, USAGE, LEASE, BLOCKED, UNBLOCKED, TOKEN_LOGS, ACCOUNT_LOGS, GROUP_MEMBERS)}
        for family in (*INDEXES, GROUPS, NEXT_ID, ACCOUNTS, NEXT_ACCOUNT_ID, WRITES, LEASE_INSTANCES, MIGRATING,
                       MIGRATED_FROM):
            found[family] = p + family
        return found

    def index_keys(self, family: str) -> list[str]:
        """Every key of one of the `INDEXES` (some may not exist): here the one key."""
        return [self.prefix + family]

    def index_of(self, family: str, token_id: int) -> str:
        """The key of `ids`, `expiry`, `bin` or `bin_times` that holds token `token_id`."""
        return self.prefix + family

    def used_of(self, digest: str) -> str:
        """The `used` key that holds a digest's `accessed`."""
        return self.used

    def record_digest(self, name: str) -> str | None:
        """The digest of a token record's key name; None for a name of the other layout (under a
        prefix without braces both start alike)."""
        rest = name[len(self.token_prefix):] if name.startswith(self.token_prefix) else ""
        return rest if rest and not rest.startswith("{") else None

    def account_of(self, family: str, name: str) -> int | None:
        """The account of an `ACCOUNT_TOKENS` or `ACCOUNT_LOGS` key name; None if it is not one."""
        start = f"{self.prefix}{family}:"
        return _number(name[len(start):]) if name.startswith(start) else None

    def token_logs_id(self, name: str) -> int | None:
        """The token id of a `TOKEN_LOGS` key name; None if it is not one."""
        start = f"{self.prefix}{TOKEN_LOGS}:"
        return _number(name[len(start):]) if name.startswith(start) else None

    def usage_of(self, name: str) -> tuple[int, int] | None:
        """(window, account) of a `USAGE` key name; None if it is not one."""
        start = f"{self.prefix}{USAGE}:"
        window, _, cid = name[len(start):].partition(":") if name.startswith(start) else ("", "", "")
        window_id, cid_id = _number(window), _number(cid)
        return None if window_id is None or cid_id is None else (window_id, cid_id)

    def account_tokens(self, cid: int) -> str:
        return f"{self.prefix}cid:{cid}"

    def token_logs(self, token_id: int) -> str:
        return f"{self.prefix}logs:tok:{token_id}"

    def token_logs_of(self, token_id: int, cid: int) -> str:
        """The token's log list, where lines of the account `cid` go (the account matters only on a cluster)."""
        return self.token_logs(token_id)

    def account_logs(self, cid: int) -> str:
        return f"{self.prefix}logs:acct:{cid}"

    def usage(self, window: int, cid: int) -> str:
        return f"{self.prefix}usage:{window}:{cid}"

    def lease(self, window: int, cid: int) -> str:
        """The calls each instance may serve for an account before it exchanges again (usage.py)."""
        return f"{self.prefix}lease:{window}:{cid}"

    def lease_instances_of(self, cid: int) -> str:
        """The instances that lease the calls of account `cid` (here: of every account)."""
        return self.lease_instances

    def blocked(self, window: int) -> str:
        return f"{self.prefix}blocked:{window}"

    def unblocked(self, window: int) -> str:
        return f"{self.prefix}unblocked:{window}"

    def group_members(self, group_id: int, uri: str) -> str:
        """The set holding the ids of the items of `uri` that belong to group `group_id`."""
        return f"{self.prefix}group:{group_id}:{uri}"


def token_bucket(digest: str) -> int:
    """The token bucket (cluster layout) of a key digest: its first three hex digits."""
    try:
        return int(digest[:3], 16)
    except ValueError:  # not a hex digest (never made by the gateway): any fixed bucket will do
        return zlib.crc32(digest.encode("utf-8", "surrogateescape")) % TOKEN_BUCKETS


def used_bucket(digest: str) -> int:
    """The `used` bucket (cluster layout) of a key digest: its token bucket >> USED_SHIFT (its first five bits)."""
    return token_bucket(digest) >> USED_SHIFT


_CLUSTER_RECORD = re.compile(r"\{t\.[0-9a-f]+\}(.+)$")
_ACCOUNT_TAG = re.compile(r"\{a\.(\d+)\}(.*)")


class ClusterKeys(Keys):
    """The cluster layout (module docstring): per-digest, per-id-bucket and per-account hash tags.
    Names that still exist as plain attributes (`ids`, `used`, `expiry`, `bin`, `bin_times`,
    `legacy_accessed`, `lease_instances`) are not keys here: use the methods that take a digest,
    an id or an account."""

    sharded = True

    __slots__ = ("base",)

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.base = prefix.replace("{", "").replace("}", "")
        self.token_prefix = f"{self.base}tok:"

    def token(self, digest: str) -> str:
        return "%s{t.%x}%s" % (self.token_prefix, token_bucket(digest), digest)  # noqa: UP031

    def used_bucket(self, bucket: int) -> str:
        return "%sused:{u.%02x}" % (self.base, bucket)  # noqa: UP031

    def used_of(self, digest: str) -> str:
        return self.used_bucket(used_bucket(digest))

    def patterns(self) -> dict[str, str]:
        found = super().patterns()
        del found[LEGACY_ACCESSED]  # not on a cluster (module docstring)
        b = glob_escape(self.base)
        found.update({TOKENS: b + "tok:{t.*}*", USED: b + "used:{u.*}", ACCOUNT_TOKENS: b + "cid:{a.*}",
                      USAGE: b + "usage:{a.*}:*", TOKEN_LOGS: b + "logs:tok:{a.*}*",
                      ACCOUNT_LOGS: b + "logs:acct:{a.*}", WRITES_IN: b + "writes:{w.*}",
                      LEASE: b + "lease:{a.*}:*", LEASE_INSTANCES: b + "lease_instances:{a.*}"})
        for family in (IDS, EXPIRY, BIN, BIN_TIMES):
            found[family] = f"{b}{family}:{{i.*}}"
        return found

    def index_keys(self, family: str) -> list[str]:
        if family == LEGACY_ACCESSED:
            return []
        if family == USED:
            return [self.used_bucket(bucket) for bucket in range(USED_BUCKETS)]
        return [f"{self.base}{family}:{{i.{bucket}}}" for bucket in range(ID_BUCKETS)]

    def index_of(self, family: str, token_id: int) -> str:
        return f"{self.base}{family}:{{i.{int(token_id) % ID_BUCKETS}}}"

    def record_digest(self, name: str) -> str | None:
        match = _CLUSTER_RECORD.match(name, len(self.token_prefix)) if name.startswith(self.token_prefix) else None
        return match.group(1) if match is not None else None

    def account_of(self, family: str, name: str) -> int | None:
        match = _ACCOUNT_TAG.fullmatch(name[len(self.base) + len(family) + 1:]) \
            if name.startswith(f"{self.base}{family}:") else None
        return int(match.group(1)) if match is not None and not match.group(2) else None

    def token_logs_id(self, name: str) -> int | None:
        start = f"{self.base}{TOKEN_LOGS}:"
        match = _ACCOUNT_TAG.fullmatch(name[len(start):]) if name.startswith(start) else None
        return _number(match.group(2)) if match is not None else None

    def usage_of(self, name: str) -> tuple[int, int] | None:
        start = f"{self.base}{USAGE}:"
        match = _ACCOUNT_TAG.fullmatch(name[len(start):]) if name.startswith(start) else None
        window = _number(match.group(2)[1:]) if match is not None and match.group(2).startswith(":") else None
        return None if match is None or window is None else (window, int(match.group(1)))

    def ids_bucket(self, bucket: int) -> str:
        return f"{self.base}ids:{{i.{bucket}}}"

    def writes_in(self, group: int) -> str:
        """A `writes` counter in slot group `group`: bumped before a WAIT on the master that
        holds it (`ReplicaWait`)."""
        return f"{self.base}writes:{{w.{group}}}"

    def ids_of(self, token_id: int) -> str:
        return self.ids_bucket(int(token_id) % ID_BUCKETS)

    def expiry_bucket(self, bucket: int) -> str:
        return f"{self.base}expiry:{{i.{bucket}}}"

    def expiry_of(self, token_id: int) -> str:
        return self.expiry_bucket(int(token_id) % ID_BUCKETS)

    def bin_bucket(self, bucket: int) -> str:
        return f"{self.base}bin:{{i.{bucket}}}"

    def bin_of(self, token_id: int) -> str:
        return self.bin_bucket(int(token_id) % ID_BUCKETS)

    def bin_times_bucket(self, bucket: int) -> str:
        return f"{self.base}bin_times:{{i.{bucket}}}"

    def bin_times_of(self, token_id: int) -> str:
        return self.bin_times_bucket(int(token_id) % ID_BUCKETS)

    def account_tokens(self, cid: int) -> str:
        return f"{self.base}cid:{{a.{cid}}}"

    def token_logs(self, token_id: int) -> str:
        raise TypeError("on a cluster a token's logs are found by its account too: token_logs_of")

    def token_logs_of(self, token_id: int, cid: int) -> str:
        return f"{self.base}logs:tok:{{a.{cid}}}{token_id}"

    def account_logs(self, cid: int) -> str:
        return f"{self.base}logs:acct:{{a.{cid}}}"

    def usage(self, window: int, cid: int) -> str:
        return f"{self.base}usage:{{a.{cid}}}:{window}"

    def lease(self, window: int, cid: int) -> str:
        return f"{self.base}lease:{{a.{cid}}}:{window}"

    def lease_instances_of(self, cid: int) -> str:
        return f"{self.base}lease_instances:{{a.{cid}}}"


def keys_for(prefix: str, cluster: bool) -> Keys:
    return ClusterKeys(prefix) if cluster else Keys(prefix)
