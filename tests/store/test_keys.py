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
    assert keys.token(digest) == "gw:tok:{t.abc}" + digest and keys.used_of(digest) == "gw:used:{u.ab}"
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
