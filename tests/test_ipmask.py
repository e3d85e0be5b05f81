"""The `ips` whitelist: what may be saved on a token and which client addresses it lets in."""
from __future__ import annotations

import ipaddress
import re
import time
from functools import cache

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from gateway.policy.ipmask import compile_ip_masks, ip_mask_problems, parse_ip

EXAMPLE_MASKS = "10.100.15.*, 110.160.56.1?, 182.15.48.5"


@pytest.mark.parametrize(
    "ips",
    [
        EXAMPLE_MASKS,
        "182.15.48.5",
        "0.0.0.0",
        "255.255.255.255",
        "2001:db8::1",
        "::1",
        "10.0.0.0/8",
        "0.0.0.0/0",
        "192.168.1.1/32",
        "2001:db8::/32",
        "::/0",
        "2001:db8::*",
        "fe80::?",
        "*",
        "10.*",
        "*.1",
        "10.0*.1.1",
        "25?.1.1.1",
        "?.?.?.?",
        "1.2.3.4*",
        "  10.0.0.1 ,\t10.0.0.2  ",
    ],
)
def test_valid_masks_have_no_problems(ips: str) -> None:
    assert ip_mask_problems(ips) == []
    assert compile_ip_masks(ips) is not None


@pytest.mark.parametrize(
    ("ips", "reason"),
    [
        ("010.0.0.1", "leading zero"),
        ("10.0.0.01", "leading zero"),
        ("10.00.0.1", "leading zero"),
        ("01?.0.0.1", "starts with a zero"),
        ("0?.0.0.1", "starts with a zero"),
        ("10.0.0.256", "above 255"),
        ("300.0.0.1", "above 255"),
        ("26?.0.0.1", "always above 255"),
        ("3??.0.0.1", "always above 255"),
        ("*.300*", "always above 255"),
        ("1.2.3.1234*", "wider than one octet"),
        ("10.1", "4 parts"),
        ("10.1.2", "4 parts"),
        ("1.2.3.4.5", "4 parts"),
        ("1.2.3.4.*", "4 parts"),
        ("10.0.?", "without '*' an IPv4 mask needs 4"),
        ("10..0.1", "not a decimal number"),
        ("10.0..*", "empty octet"),
        ("10.0.0.1,,10.0.0.2", "empty item"),
        ("10.0.0.1,", "empty item"),
        (",10.0.0.1", "empty item"),
        (" ", "empty item"),
        ("10.0.0.1 10.0.0.2", "characters not allowed"),
        ("10.0.0.x", "characters not allowed"),
        ("fe80::1%eth0", "characters not allowed"),
        ("[::1]", "characters not allowed"),
        ("1.2.3.4:80", "not a valid IPv6"),
        ("10.0.0.a", "not a decimal number"),
        ("1a.0.0.*", "decimal digits"),
        ("1234", "not an IP address"),
        ("?", "needs '.'"),
        ("1*", "needs '.'"),
        ("2001:DB8::1", "canonical form: write 2001:db8::1"),
        ("2001:db8:0:0::1", "canonical form: write 2001:db8::1"),
        ("2001:0db8::1", "canonical form: write 2001:db8::1"),
        ("::ffff:10.0.0.1", "write 10.0.0.1"),
        ("::ffff:a00:1", "write 10.0.0.1"),
        ("::ffff:10.0.0.0/104", "write 10.0.0.0"),
        ("2001:DB8::*", "lowercase"),
        ("2001:0db8::*", "starts with a zero"),
        ("2001:db8::0?", "starts with a zero"),
        ("2001:db8::12345*", "wider than one group"),
        ("2001::db8::*", "'::' may appear once"),
        ("2001:::*", "'::' may appear once"),
        (":1::*", "single ':'"),
        ("1:2:3:4:5:6:7:8:*", "at most 8 groups"),
        ("::ffff:10.0.0.*", "never contains '.'"),
        ("10.0.0.1/8", "host bits are set: the network is 10.0.0.0/8"),
        ("2001:db8::1/32", "host bits are set: the network is 2001:db8::/32"),
        ("10.0.0.0/33", "above 32"),
        ("2001:db8::/129", "above 128"),
        ("10.0.0.0/08", "without leading zeros"),
        ("10.0.0.0/", "must be a number"),
        ("10.0.0.0/255.0.0.0", "must be a number"),
        ("10.0.0.0/8/8", "must be a number"),
        ("10.0.0.*/8", "cannot contain wildcards"),
        ("010.0.0.0/8", "leading zero"),
    ],
)
def test_invalid_masks_are_refused_with_a_reason(ips: str, reason: str) -> None:
    problems = ip_mask_problems(ips)
    assert len(problems) == 1
    assert reason in problems[0]
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_ip_masks(ips)


def test_every_bad_item_is_reported_and_named() -> None:
    problems = ip_mask_problems("10.0.0.1, 010.0.0.1, 10.1, 2001:db8::1")
    assert len(problems) == 2
    assert "'010.0.0.1'" in problems[0]
    assert "'10.1'" in problems[1]


@pytest.mark.parametrize("ips", [None, 5, ["10.0.0.1"], b"10.0.0.1", {"ip": "10.0.0.1"}])
def test_ips_must_be_a_string(ips: object) -> None:
    assert ip_mask_problems(ips) == ["must be a string of comma-separated addresses, wildcard masks or CIDR networks"]


def test_empty_string_means_any_address() -> None:
    assert ip_mask_problems("") == []
    assert compile_ip_masks("") is None


@pytest.mark.parametrize(
    ("ips", "address", "expected"),
    [
        (EXAMPLE_MASKS, "10.100.15.7", True),
        (EXAMPLE_MASKS, "10.100.15.255", True),
        (EXAMPLE_MASKS, "10.100.16.7", False),
        (EXAMPLE_MASKS, "10.100.150.7", False),
        (EXAMPLE_MASKS, "110.160.56.10", True),
        (EXAMPLE_MASKS, "110.160.56.19", True),
        (EXAMPLE_MASKS, "110.160.56.1", False),
        (EXAMPLE_MASKS, "110.160.56.100", False),
        (EXAMPLE_MASKS, "110.160.56.20", False),
        (EXAMPLE_MASKS, "182.15.48.5", True),
        (EXAMPLE_MASKS, "182.15.48.50", False),
        (EXAMPLE_MASKS, "82.15.48.5", False),
        ("10.*", "10.200.3.4", True),
        ("10.*", "110.0.0.1", False),
        ("*.1", "10.0.0.1", True),
        ("*.1", "10.0.0.11", False),
        ("1.2.3.4*", "1.2.3.4", True),
        ("1.2.3.4*", "1.2.3.45", True),
        ("1.2.3.4*", "1.2.3.54", False),
        ("?.?.?.?", "1.2.3.4", True),
        ("?.?.?.?", "1.2.3.44", False),
        ("10.0.0.0/8", "10.255.255.255", True),
        ("10.0.0.0/8", "11.0.0.0", False),
        ("192.168.1.0/24", "192.168.1.77", True),
        ("192.168.1.0/24", "192.168.2.77", False),
        ("0.0.0.0/0", "8.8.8.8", True),
        ("0.0.0.0/0", "2001:db8::1", False),
        ("2001:db8::/32", "2001:db8:ffff::1", True),
        ("2001:db8::/32", "2001:db9::1", False),
        ("2001:db8::/32", "10.0.0.1", False),
        ("::/0", "2001:db8::1", True),
        ("::/0", "::ffff:10.0.0.1", False),
        ("2001:db8::1", "2001:db8::1", True),
        ("2001:db8::1", "2001:db8::2", False),
        ("2001:db8::*", "2001:db8::abcd:1", True),
        ("2001:db8::*", "2001:db8:1::1", False),
        ("fe80::?", "fe80::a", True),
        ("fe80::?", "fe80::ab", False),
        ("*", "10.0.0.1", True),
        ("*", "2001:db8::1", True),
        ("10.0.0.1, 10.0.0.2", "10.0.0.2", True),
        ("10.0.0.1, 10.0.0.2", "10.0.0.3", False),
        ("10.0.0.1, 2001:db8::/32, 172.16.*", "172.16.9.9", True),
    ],
)
def test_matching(ips: str, address: str, expected: bool) -> None:
    matcher = compile_ip_masks(ips)
    assert matcher is not None
    assert matcher.matches(address) is expected


@pytest.mark.parametrize(
    ("ips", "address"),
    [
        ("10.0.0.1", "::ffff:10.0.0.1"),
        ("10.0.0.1", "::FFFF:a00:1"),
        ("10.0.0.1", "::ffff:10.0.0.1%eth0"),
        ("10.0.0.1", "0:0:0:0:0:ffff:10.0.0.1"),
        ("10.0.0.*", "::ffff:10.0.0.9"),
        ("10.0.0.0/8", "::ffff:10.9.9.9"),
        ("2001:db8::1", "2001:DB8::1"),
        ("2001:db8::1", "2001:db8:0:0:0:0:0:1"),
        ("2001:db8::1", "2001:0db8::0001"),
        ("2001:db8::*", "2001:DB8:0::5"),
        ("fe80::1", "fe80::1%eth0"),
        ("fe80::*", "fe80::1%25"),
    ],
)
def test_client_address_is_normalised_before_matching(ips: str, address: str) -> None:
    matcher = compile_ip_masks(ips)
    assert matcher is not None
    assert matcher.matches(address)


@pytest.mark.parametrize(
    "address",
    [
        *("", "junk", "010.0.0.1", "10.0.0.01", "1.2.3", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n"),
        *("1.2.3.4:80", "[::1]", "::1::2", "fe80::1%", "\u0661.\u0662.\u0663.\u0664"),
    ],
)
def test_unparseable_client_address_never_matches(address: str) -> None:
    matcher = compile_ip_masks("*, 0.0.0.0/0, ::/0, 1.2.3.4, *.*.*.*")
    assert matcher is not None
    assert not matcher.matches(address)


def test_pathological_mask_is_matched_in_linear_time() -> None:
    stars_v4 = "*1" * 40 + "*.2"
    stars_v6 = "*a" * 40 + "*:b"
    matcher = compile_ip_masks(f"{stars_v4}, {stars_v6}")
    assert matcher is not None
    started = time.perf_counter()
    for _ in range(100):
        assert not matcher.matches("111.111.111.111")
        assert not matcher.matches("aaaa:aaaa:aaaa:aaaa:aaaa:aaaa:aaaa:aaaa")
    assert time.perf_counter() - started < 1.0


# ---- properties against independent oracles ----

ipv4_addresses = st.integers(0, 2**32 - 1).map(lambda value: str(ipaddress.IPv4Address(value)))
# Zero groups are drawn often so that `::` compression shows up in most addresses.
ipv6_groups = st.sampled_from([0, 0, 1, 0xDB8, 0xFFFF, 0x2001, 0xABCD]) | st.integers(0, 0xFFFF)
ipv6_addresses = (
    st.lists(ipv6_groups, min_size=8, max_size=8)
    .map(lambda groups: ipaddress.IPv6Address(b"".join(group.to_bytes(2, "big") for group in groups)).compressed)
    .filter(lambda text: ipaddress.IPv6Address(text).ipv4_mapped is None)
)


def glob_oracle(mask: str, text: str, one_of: str) -> bool:
    """Plain recursive wildcard matching: `*` any run, `?` one character from `one_of`."""

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(mask):
            return j == len(text)
        if mask[i] == "*":
            return match(i + 1, j) or (j < len(text) and match(i, j + 1))
        if j == len(text):
            return False
        if mask[i] == "?":
            return text[j] in one_of and match(i + 1, j + 1)
        return mask[i] == text[j] and match(i + 1, j + 1)

    return match(0, 0)


@st.composite
def masks_from(draw: st.DrawFn, base: str, digits: str) -> str:
    """Mutate an address into a mask: keep characters, turn some into `?` or `*`, change some."""
    chars = []
    for char in base:
        action = draw(st.sampled_from(["keep", "keep", "keep", "one", "star", "change"]))
        if action == "one" and char in digits:
            chars.append("?")
        elif action == "star":
            chars.append("*")
        elif action == "change" and char in digits:
            chars.append(draw(st.sampled_from(digits)))
        else:
            chars.append(char)
    return "".join(chars)


@given(st.data(), ipv4_addresses, ipv4_addresses, ipv4_addresses)
def test_ipv4_wildcards_agree_with_the_oracle(data: st.DataObject, base: str, base2: str, other: str) -> None:
    masks = [data.draw(masks_from(base, "0123456789")), data.draw(masks_from(base2, "0123456789"))]
    assume(ip_mask_problems(", ".join(masks)) == [])
    matcher = compile_ip_masks(", ".join(masks))
    assert matcher is not None
    for address in (base, base2, other):
        expected = any(glob_oracle(mask, address, "0123456789") for mask in masks)
        event(f"matches: {expected}")
        assert matcher.matches(address) is expected, (masks, address)


@given(st.data(), ipv6_addresses, ipv6_addresses)
def test_ipv6_wildcards_agree_with_the_oracle(data: st.DataObject, base: str, other: str) -> None:
    mask = data.draw(masks_from(base, "0123456789abcdef"))
    assume(ip_mask_problems(mask) == [])
    matcher = compile_ip_masks(mask)
    assert matcher is not None
    for address in (base, other):
        expected = glob_oracle(mask, address, "0123456789abcdef")
        event(f"matches: {expected}")
        assert matcher.matches(address) is expected, (mask, address)


@given(ipv4_addresses, st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_ipv4_cidr_agrees_with_ipaddress(address: str, base: int, prefix: int) -> None:
    network = ipaddress.IPv4Network((base, prefix), strict=False)
    matcher = compile_ip_masks(str(network))
    assert matcher is not None
    assert matcher.matches(address) is (ipaddress.IPv4Address(address) in network)
    assert matcher.matches(str(network.network_address))
    assert matcher.matches(str(network.broadcast_address))


@given(ipv6_addresses, st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_ipv6_cidr_agrees_with_ipaddress(address: str, base: int, prefix: int) -> None:
    network = ipaddress.IPv6Network((base, prefix), strict=False)
    assume(not network.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")))
    matcher = compile_ip_masks(str(network))
    assert matcher is not None
    assert matcher.matches(address) is (ipaddress.IPv6Address(address) in network)
    assert matcher.matches(str(network.network_address))


@given(st.data(), ipv4_addresses, ipv4_addresses, st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_ipv4_mapped_peers_match_like_ipv4(
    data: st.DataObject, address: str, base: str, network_base: int, prefix: int
) -> None:
    mask = data.draw(masks_from(base, "0123456789"))
    network = ipaddress.IPv4Network((network_base, prefix), strict=False)
    ips = f"{mask}, {network}, {base}"
    assume(ip_mask_problems(ips) == [])
    matcher = compile_ip_masks(ips)
    assert matcher is not None
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    for spelling in (f"::ffff:{address}", mapped.compressed, mapped.exploded, mapped.exploded.upper()):
        assert matcher.matches(spelling) is matcher.matches(address)


@given(st.integers(0, 2**128 - 1))
def test_parse_ip_uses_the_ipaddress_canonical_form(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    parsed = parse_ip(address.exploded.upper())
    assert parsed is not None
    expected = address.ipv4_mapped or address
    assert (parsed.version, parsed.value, parsed.text) == (expected.version, int(expected), expected.compressed)
