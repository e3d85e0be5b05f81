"""The key layout is a contract with running instances of earlier builds and with the upstream
application (groups): every name, spelt out."""
from __future__ import annotations

from gateway.store.keys import Keys


def test_every_name_under_the_default_prefix() -> None:
    keys = Keys("{gw}:")
    assert (keys.ids, keys.used, keys.legacy_accessed, keys.expiry, keys.next_id) == (
        "{gw}:ids", "{gw}:used", "{gw}:accessed", "{gw}:expiry", "{gw}:next_id")
    assert (keys.bin, keys.bin_times, keys.accounts, keys.next_account_id, keys.groups, keys.channel) == (
        "{gw}:bin", "{gw}:bin_times", "{gw}:accounts", "{gw}:next_account_id", "{gw}:groups", "{gw}:invalidate")
    assert keys.token("ab12") == keys.token_prefix + "ab12" == "{gw}:tok:ab12"
    assert keys.account_tokens(7) == "{gw}:cid:7"
    assert (keys.token_logs(3), keys.account_logs(7)) == ("{gw}:logs:tok:3", "{gw}:logs:acct:7")
    assert (keys.usage(29000, 7), keys.blocked(29000), keys.unblocked(29000)) == (
        "{gw}:usage:29000:7", "{gw}:blocked:29000", "{gw}:unblocked:29000")
    assert (keys.lease(29000, 7), keys.lease_instances, keys.lease_instances_of(7)) == (
        "{gw}:lease:29000:7", "{gw}:lease_instances", "{gw}:lease_instances")  # one registry for every account
    assert keys.group_members(5, "gw/devices") == "{gw}:group:5:gw/devices"


def test_another_prefix_prefixes_everything() -> None:
    keys = Keys("app:")
    assert keys.token("x") == "app:tok:x" and keys.channel == "app:invalidate"


def test_the_cluster_layout_spreads_by_digest_id_and_account() -> None:
    from redis.crc import key_slot

    from gateway.store.keys import ClusterKeys

    keys = ClusterKeys("{gw}:")
    digest = "abc" + "0" * 61
    assert keys.token(digest) == "gw:tok:{t.abc}" + digest and keys.used_of(digest) == "gw:used:{u.15}"  # 0xabc >> 7
    assert (keys.ids_of(513), keys.expiry_of(513), keys.bin_of(513), keys.bin_times_of(513)) == (
        "gw:ids:{i.1}", "gw:expiry:{i.1}", "gw:bin:{i.1}", "gw:bin_times:{i.1}")
    assert (keys.account_tokens(7), keys.usage(29000, 7), keys.account_logs(7), keys.token_logs_of(3, 7)) == (
        "gw:cid:{a.7}", "gw:usage:{a.7}:29000", "gw:logs:acct:{a.7}", "gw:logs:tok:{a.7}3")
    assert (keys.lease(29000, 7), keys.lease_instances_of(7)) == ("gw:lease:{a.7}:29000", "gw:lease_instances:{a.7}")
    # What stays global keeps the one-Redis names, in the prefix's slot; so do the upstream's groups.
    assert (keys.next_id, keys.accounts, keys.blocked(29000), keys.channel, keys.group_members(5, "u")) == (
        "{gw}:next_id", "{gw}:accounts", "{gw}:blocked:29000", "{gw}:invalidate", "{gw}:group:5:u")
    # Every key a script or a load takes together shares a slot.
    slot = key_slot
    assert keys.used_bucket(1) == "gw:used:{u.01}"
    assert slot(keys.ids_of(513).encode()) == slot(keys.expiry_of(513).encode())
    assert len({slot(keys.usage(w, 7).encode()) for w in (1, 2)} | {slot(keys.account_logs(7).encode()),
                                                                     slot(keys.token_logs_of(3, 7).encode())}) == 1
    # the usage exchange's one call of an account: its usage, its lease and its lease registry
    assert len({slot(key.encode()) for key in (keys.usage(1, 7), keys.lease(1, 7), keys.lease_instances_of(7))}) == 1
    # and records spread: the 4096 token buckets reach well over a thousand slots.
    assert len({slot(keys.token(f"{bucket:03x}").encode()) for bucket in range(4096)}) > 1000


def test_each_layout_reads_its_own_names_back_and_not_the_others() -> None:
    from gateway.store.keys import ACCOUNT_LOGS, ACCOUNT_TOKENS, ClusterKeys

    digest = "abc" + "0" * 61
    for keys in (Keys("{gw}:"), ClusterKeys("{gw}:"), Keys("gw:"), ClusterKeys("gw:")):
        assert keys.record_digest(keys.token(digest)) == digest
        assert keys.account_of(ACCOUNT_TOKENS, keys.account_tokens(7)) == 7
        assert keys.account_of(ACCOUNT_LOGS, keys.account_logs(7)) == 7
        assert keys.token_logs_id(keys.token_logs_of(3, 7)) == 3
        assert keys.usage_of(keys.usage(29000, 7)) == (29000, 7)
        assert keys.index_of("ids", 513) in keys.index_keys("ids")
        assert keys.migrating == "{gw}:migrating" if keys.prefix == "{gw}:" else keys.migrating == "gw:migrating"
    # Under a prefix without braces both layouts start alike: each leaves the other's names alone.
    one, cluster = Keys("gw:"), ClusterKeys("gw:")
    assert one.record_digest(cluster.token(digest)) is None and cluster.record_digest(one.token(digest)) is None
    assert one.account_of(ACCOUNT_TOKENS, cluster.account_tokens(7)) is None
    assert cluster.account_of(ACCOUNT_TOKENS, one.account_tokens(7)) is None
    assert one.usage_of(cluster.usage(29000, 7)) is None and cluster.usage_of(one.usage(29000, 7)) is None
    assert one.token_logs_id(cluster.token_logs_of(3, 7)) is None and cluster.token_logs_id(one.token_logs(3)) is None


def test_every_family_has_a_pattern_in_each_layout() -> None:
    from gateway.store.keys import FAMILIES, LEGACY_ACCESSED, WRITES_IN, ClusterKeys

    assert set(Keys("{gw}:").patterns()) == set(FAMILIES) - {WRITES_IN}
    assert set(ClusterKeys("{gw}:").patterns()) == set(FAMILIES) - {LEGACY_ACCESSED}
    assert Keys("{gw}:").patterns()["tok"] == "{gw}:tok:*" and Keys("a[1]:").patterns()["ids"] == "a\\[1\\]:ids"
