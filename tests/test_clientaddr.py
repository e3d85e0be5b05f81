"""The client address behind trusted proxies, and the X-Forwarded-For sent upstream."""
from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.policy.clientaddr import TrustedProxies, client_address, forwarded_for

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "192.168.0.1", "::1", "2001:db8::/32"])


def xff(*values: str) -> CIMultiDict[str]:
    return CIMultiDict([("X-Forwarded-For", value) for value in values])


@pytest.mark.parametrize(
    ("items", "trusted", "untrusted"),
    [
        (["10.0.0.0/8"], ["10.1.2.3", "::ffff:10.1.2.3"], ["11.0.0.1", "::1"]),
        (["192.168.0.1"], ["192.168.0.1"], ["192.168.0.2"]),
        ([" 192.168.0.1 "], ["192.168.0.1"], ["192.168.0.2"]),
        (["::1"], ["::1", "0:0:0:0:0:0:0:1"], ["127.0.0.1"]),
        (["2001:db8::/32"], ["2001:db8:1::1", "2001:DB8::9", "2001:db8::1%eth0"], ["2001:db9::1"]),
        (["::ffff:10.0.0.1"], ["10.0.0.1", "::ffff:10.0.0.1"], ["10.0.0.2"]),
        (["::ffff:10.0.0.0/120"], ["10.0.0.77"], ["10.0.1.1"]),
        ([], [], ["10.0.0.1", "::1"]),
        (["10.0.0.0/8"], [], ["", "junk", "010.0.0.1", "10.0.0.1:80"]),
    ],
)
def test_is_trusted(items: list[str], trusted: list[str], untrusted: list[str]) -> None:
    proxies = TrustedProxies.parse(items)
    assert all(proxies.is_trusted(address) for address in trusted)
    assert not any(proxies.is_trusted(address) for address in untrusted)


@pytest.mark.parametrize(
    ("items", "named"),
    [
        (["10.0.0.1/8"], "'10.0.0.1/8'"),
        (["10.0.0.0/8", "junk"], "'junk'"),
        (["010.0.0.1"], "'010.0.0.1'"),
        ([""], "''"),
        (["10.0.0.0/33"], "'10.0.0.0/33'"),
        ("10.0.0.1", "not one string"),
    ],
)
def test_parse_names_the_bad_item(items: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        TrustedProxies.parse(items)


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # An untrusted peer is the client, whatever it claims.
        ("203.0.113.7", xff("198.51.100.1"), "203.0.113.7"),
        ("203.0.113.7", CIMultiDict({"X-Real-IP": "198.51.100.1"}), "203.0.113.7"),
        ("203.0.113.7", CIMultiDict({"Forwarded": "for=198.51.100.1"}), "203.0.113.7"),
        ("::ffff:203.0.113.7", xff("10.0.0.1"), "203.0.113.7"),
        ("2001:DB9::7", xff("10.0.0.1"), "2001:db9::7"),
        ("fe80::7%eth0", xff("10.0.0.1"), "fe80::7"),
        # A trusted peer without a chain is the client itself.
        ("10.0.0.5", CIMultiDict(), "10.0.0.5"),
        ("10.0.0.5", xff(""), "10.0.0.5"),
        ("10.0.0.5", CIMultiDict({"X-Real-IP": "198.51.100.1"}), "10.0.0.5"),
        ("10.0.0.5", CIMultiDict({"Forwarded": "for=198.51.100.1"}), "10.0.0.5"),
        # The right-most untrusted entry is the client; what lies left of it is the client's word.
        ("10.0.0.5", xff("198.51.100.1"), "198.51.100.1"),
        ("10.0.0.5", xff("6.6.6.6, 198.51.100.1"), "198.51.100.1"),
        ("10.0.0.5", xff("6.6.6.6, 198.51.100.1, 10.9.9.9"), "198.51.100.1"),
        ("10.0.0.5", xff("6.6.6.6", "198.51.100.1", "10.9.9.9, 192.168.0.1"), "198.51.100.1"),
        ("10.0.0.5", xff("6.6.6.6,198.51.100.1,,10.9.9.9,"), "198.51.100.1"),
        ("::1", xff("2001:DB9:0::1, 2001:db8::2"), "2001:db9::1"),
        ("::ffff:10.0.0.5", xff("::ffff:198.51.100.1"), "198.51.100.1"),
        # Every entry trusted: the left-most is the nearest to the client that is known.
        ("10.0.0.5", xff("10.1.1.1, 10.2.2.2"), "10.1.1.1"),
        # Garbage ends the walk at the last valid address seen, else the peer.
        ("10.0.0.5", xff("6.6.6.6, junk, 10.2.2.2"), "10.2.2.2"),
        ("10.0.0.5", xff("6.6.6.6, unknown"), "10.0.0.5"),
        ("10.0.0.5", xff("6.6.6.6, 198.51.100.1:5555"), "10.0.0.5"),
        ("10.0.0.5", xff("6.6.6.6, [2001:db9::1]"), "10.0.0.5"),
        ("10.0.0.5", xff("6.6.6.6, 010.0.0.1"), "10.0.0.5"),
        # Not an IP peer (a unix socket): returned as it is, and no mask will ever match it.
        ("", xff("198.51.100.1"), ""),
    ],
)
def test_client_address(peer: str, headers: CIMultiDict[str], expected: str) -> None:
    assert client_address(peer, headers, TRUSTED) == expected


def test_header_name_is_case_insensitive() -> None:
    headers = CIMultiDict([("x-forwarded-for", "6.6.6.6"), ("X-FORWARDED-FOR", "198.51.100.1")])
    assert client_address("10.0.0.5", headers, TRUSTED) == "198.51.100.1"


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.7", xff("198.51.100.1"), "203.0.113.7"),
        ("203.0.113.7", CIMultiDict(), "203.0.113.7"),
        ("::ffff:203.0.113.7", xff("6.6.6.6"), "203.0.113.7"),
        ("10.0.0.5", CIMultiDict(), "10.0.0.5"),
        ("10.0.0.5", xff("198.51.100.1"), "198.51.100.1, 10.0.0.5"),
        ("10.0.0.5", xff("6.6.6.6, 198.51.100.1", "10.9.9.9"), "6.6.6.6, 198.51.100.1, 10.9.9.9, 10.0.0.5"),
        ("10.0.0.5", xff(" 6.6.6.6 ,, "), "6.6.6.6, 10.0.0.5"),
        ("::ffff:10.0.0.5", xff("198.51.100.1"), "198.51.100.1, 10.0.0.5"),
    ],
)
def test_forwarded_for(peer: str, headers: CIMultiDict[str], expected: str) -> None:
    assert forwarded_for(peer, headers, TRUSTED) == expected


# ---- properties ----

untrusted_ipv4 = (
    st.integers(0, 2**32 - 1)
    .map(lambda value: str(ipaddress.IPv4Address(value)))
    .filter(lambda text: not TRUSTED.is_trusted(text))
)
trusted_ipv4 = st.integers(0, 2**24 - 1).map(lambda value: str(ipaddress.IPv4Address((10 << 24) + value)))
header_names = st.sampled_from(["X-Forwarded-For", "x-forwarded-for", "X-Real-IP", "Forwarded", "X-Client-IP"])
header_values = st.text(max_size=40) | st.lists(trusted_ipv4 | untrusted_ipv4, max_size=4).map(", ".join)


@given(untrusted_ipv4, st.lists(st.tuples(header_names, header_values), max_size=6))
def test_untrusted_peer_always_gets_its_own_address(peer: str, headers: list[tuple[str, str]]) -> None:
    spoofed = CIMultiDict(headers)
    assert client_address(peer, spoofed, TRUSTED) == peer
    assert client_address(f"::ffff:{peer}", spoofed, TRUSTED) == peer
    assert forwarded_for(peer, spoofed, TRUSTED) == peer


any_ipv4 = untrusted_ipv4 | trusted_ipv4


@given(st.lists(any_ipv4, max_size=3), untrusted_ipv4, st.lists(trusted_ipv4, max_size=3), trusted_ipv4)
def test_trusted_chain_yields_the_right_most_untrusted_hop(
    spoofed: list[str], client: str, proxies: list[str], peer: str
) -> None:
    headers = xff(", ".join([*spoofed, client, *proxies]))
    assert client_address(peer, headers, TRUSTED) == client
