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
    assert keys.group_members(5, "gw/devices") == "{gw}:group:5:gw/devices"


def test_another_prefix_prefixes_everything() -> None:
    keys = Keys("app:")
    assert keys.token("x") == "app:tok:x" and keys.channel == "app:invalidate"
