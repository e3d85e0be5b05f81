"""The IP whitelist of a token: check the `ips` masks when a token is saved, match client addresses.

`ips` is a comma-separated list; blanks around items are ignored and `""` allows any address.
An item is one of:

- an exact address in its canonical spelling: `182.15.48.5`, `2001:db8::1`;
- a wildcard mask matched against the canonical text of the client address: `*` matches any run of
  characters, separators included (`10.*` covers 10.0.0.0/8), `?` exactly one digit (IPv4) or hex
  digit (IPv6) and never a separator, so `110.160.56.1?` is 110.160.56.10-19 and nothing else;
- a CIDR network with no host bits set: `10.0.0.0/8`, `2001:db8::/32`.

Spellings that a human may read one way and a parser another are refused when the token is saved
rather than guessed at: `010.0.0.1` is 8.0.0.1 to `inet_aton` but 10.0.0.1 to most readers, and
`2001:DB8::1` or `2001:db8:0::1` could never equal the canonical text a wildcard is compared with.

Client addresses are normalised before matching: an IPv4-mapped IPv6 peer (`::ffff:10.0.0.1`, what
a dual-stack socket reports) is matched as IPv4, an IPv6 zone (`%eth0`) is dropped and IPv6 is
compared in `ipaddress`'s compressed lowercase form. The same host therefore has one spelling
whichever way the connection reached the gateway. Because of that, IPv4-mapped IPv6 masks are
refused (write them as IPv4) and `::/0` does not cover IPv4 clients.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from gateway.policy.wildcard import glob_to_regex

# (first address, netmask) as ints: membership is one AND and one compare, far cheaper than
# `address in IPv4Network` on every request.
Network = tuple[int, int]
Family = Literal[4, 6]

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_DECIMAL = re.compile(r"[0-9]+")
_MASK_CHARS = frozenset("0123456789abcdefABCDEF.:*?/")
_IPV4_MASK_CHARS = frozenset("0123456789.*?")
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")
_EIGHT_GROUPS = struct.Struct("!8H")
_GROUPS_TEXT = ":{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:".format  # ':'-padded so zero runs are found whole
_ZERO_RUNS = tuple(":" + ":".join(["0"] * length) + ":" for length in range(8, 1, -1))  # longest first
_STAR = {4: "[0-9.]", 6: "[0-9a-f:]"}
_ONE = {4: "[0-9]", 6: "[0-9a-f]"}


@dataclass(frozen=True, slots=True)
class IpAddress:
    """A client address, normalised: IPv4-mapped IPv6 is IPv4 and an IPv6 zone is gone."""

    version: Family
    value: int

    @property
    def text(self) -> str:
        """The canonical spelling, the one wildcard masks are matched against."""
        if self.version == 4:
            return socket.inet_ntoa(self.value.to_bytes(4, "big"))
        return _ipv6_text(self.value)


def parse_ip(text: str) -> IpAddress | None:
    """The normalised form of a client address, or None when `text` is not one."""
    if ":" not in text:
        return _parse_ipv4(text)
    # A dual-stack socket reports every IPv4 peer this way: spare them the slow general parser.
    mapped = _parse_ipv4(text[7:]) if text.startswith("::ffff:") else None
    if mapped is not None:
        return mapped
    address, percent, zone = text.partition("%")
    # The zone only names the local interface the packet came through, not a different host.
    return None if percent and not zone else _parse_ipv6(address)


def _parse_ipv4(text: str) -> IpAddress | None:
    # inet_aton alone would take `010.1` as 8.0.0.1; past this regex the text is a canonical
    # dotted quad, which every platform's inet_aton reads the same way, and fast.
    if _IPV4.fullmatch(text) is None:
        return None
    return IpAddress(4, int.from_bytes(socket.inet_aton(text), "big"))


def _parse_ipv6(text: str) -> IpAddress | None:
    try:
        address = IPv6Address(text)
    except ValueError:
        return None
    mapped = address.ipv4_mapped
    if mapped is not None:
        return IpAddress(4, int(mapped))
    return IpAddress(6, int(address))


def _ipv6_text(value: int) -> str:
    """`IPv6Address(value).compressed` (RFC 5952) in a third of the time: the left-most longest
    run of two or more zero groups becomes `::`. Only reached for addresses that are not IPv4-mapped."""
    padded = _GROUPS_TEXT(*_EIGHT_GROUPS.unpack(value.to_bytes(16, "big")))
    for run in _ZERO_RUNS:
        start = padded.find(run)
        if start >= 0:
            return f"{padded[1:start]}::{padded[start + len(run):-1]}"
    return padded[1:-1]


def network_key(network: IPv4Network | IPv6Network) -> Network:
    return int(network.network_address), int(network.netmask)


def in_networks(value: int, networks: tuple[Network, ...]) -> bool:
    return any(value & netmask == first for first, netmask in networks)


@dataclass(frozen=True, slots=True)
class _FamilyRules:
    """Every mask of one address family, in the form that is cheapest to test."""

    exact: frozenset[int]
    networks: tuple[Network, ...]
    wildcards: re.Pattern[str] | None

    def matches(self, address: IpAddress) -> bool:
        if address.value in self.exact or in_networks(address.value, self.networks):
            return True
        return self.wildcards is not None and self.wildcards.fullmatch(address.text) is not None


@dataclass(frozen=True, slots=True)
class IpMatcher:
    """The compiled `ips` of one token; built once when the token record is loaded."""

    v4: _FamilyRules
    v6: _FamilyRules

    def matches(self, address: str) -> bool:
        parsed = parse_ip(address)
        if parsed is None:
            return False
        return (self.v4 if parsed.version == 4 else self.v6).matches(parsed)


def compile_ip_masks(ips: str) -> IpMatcher | None:
    """None when any address is allowed (`""`); ValueError naming every problem when `ips` is invalid."""
    problems = ip_mask_problems(ips)
    if problems:
        raise ValueError("; ".join(problems))
    if ips == "":
        return None
    items = [item.strip() for item in ips.split(",")]
    return IpMatcher(v4=_compile_family(items, 4), v6=_compile_family(items, 6))


def _compile_family(items: list[str], family: Family) -> _FamilyRules:
    mine = [item for item in items if family in _families(item)]
    return _FamilyRules(
        exact=frozenset(int(ipaddress.ip_address(item)) for item in mine if _kind(item) == "address"),
        networks=tuple(network_key(ipaddress.ip_network(item)) for item in mine if _kind(item) == "network"),
        wildcards=_wildcard_regex([item for item in mine if _kind(item) == "wildcard"], family),
    )


def _kind(item: str) -> Literal["address", "network", "wildcard"]:
    if "/" in item:
        return "network"
    if "*" in item or "?" in item:
        return "wildcard"
    return "address"


def _families(item: str) -> tuple[Family, ...]:
    if ":" in item:
        return (6,)
    if "." in item:
        return (4,)
    return (4, 6)  # only `*` gets here once validated: any address of either family


def _wildcard_regex(masks: Iterable[str], family: Family) -> re.Pattern[str] | None:
    sources = [f"(?:{glob_to_regex(mask, _STAR[family], _ONE[family])})" for mask in masks]
    return re.compile("|".join(sources)) if sources else None


def ip_mask_problems(ips: object) -> list[str]:
    """Why `ips` cannot be saved on a token, one reason per bad item; empty when it is valid."""
    if not isinstance(ips, str):
        return ["must be a string of comma-separated addresses, wildcard masks or CIDR networks"]
    if ips == "":
        return []
    problems = []
    for position, raw in enumerate(ips.split(","), start=1):
        item = raw.strip()
        problem = _item_problem(item)
        if problem is not None:
            problems.append(f"mask {position} {item!r}: {problem}")
    return problems


def _item_problem(item: str) -> str | None:
    if item == "":
        return "empty item"
    unexpected = sorted(set(item) - _MASK_CHARS)
    if unexpected:
        return f"characters not allowed in an address mask: {''.join(unexpected)!r}"
    kind = _kind(item)
    if kind == "network":
        return _cidr_problem(item)
    if kind == "wildcard":
        return _wildcard_problem(item)
    return _address_problem(item)


def _address_problem(text: str) -> str | None:
    if ":" in text:
        return _ipv6_problem(text)
    if "." in text:
        return _ipv4_problem(text)
    return "not an IP address"


def _ipv4_problem(text: str) -> str | None:
    parts = text.split(".")
    if len(parts) != 4:
        return f"an IPv4 address has 4 parts, this has {len(parts)}"
    for part in parts:
        problem = _octet_problem(part)
        if problem is not None:
            return problem
    return None


def _octet_problem(octet: str) -> str | None:
    if _DECIMAL.fullmatch(octet) is None:
        return f"octet {octet!r} is not a decimal number"
    if len(octet) > 1 and octet[0] == "0":
        return f"octet {octet!r} has a leading zero, which some parsers read as octal"
    if int(octet) > 255:
        return f"octet {octet!r} is above 255"
    return None


def _ipv6_problem(text: str) -> str | None:
    try:
        address = IPv6Address(text)
    except ValueError:
        return "not a valid IPv6 address"
    if address in _IPV4_MAPPED:
        return f"IPv4-mapped clients are matched as IPv4: write {address.ipv4_mapped}"
    if text != address.compressed:
        return f"not in canonical form: write {address.compressed}"
    return None


def _cidr_problem(item: str) -> str | None:
    if "*" in item or "?" in item:
        return "a CIDR network cannot contain wildcards"
    text, _, prefix = item.partition("/")
    problem = _address_problem(text) or _prefix_problem(prefix, 128 if ":" in text else 32)
    if problem is not None:
        return problem
    network = ipaddress.ip_network(item, strict=False)
    if str(network.network_address) != text:
        return f"host bits are set: the network is {network}"
    return None


def _prefix_problem(prefix: str, longest: int) -> str | None:
    if _DECIMAL.fullmatch(prefix) is None or (len(prefix) > 1 and prefix[0] == "0"):
        return f"prefix length {prefix!r} must be a number without leading zeros"
    if int(prefix) > longest:
        return f"prefix length {prefix} is above {longest}"
    return None


def _wildcard_problem(mask: str) -> str | None:
    if ":" in mask:
        return _ipv6_mask_problem(mask)
    if "." in mask:
        return _ipv4_mask_problem(mask)
    if set(mask) == {"*"}:
        return None
    return "a wildcard mask needs '.' (IPv4) or ':' (IPv6), or must be '*' alone"


def _ipv4_mask_problem(mask: str) -> str | None:
    if not set(mask) <= _IPV4_MASK_CHARS:
        return "an IPv4 mask takes decimal digits, '.', '*' and '?' only"
    parts = mask.split(".")
    if len(parts) > 4:
        return f"an IPv4 address has 4 parts, this has {len(parts)}"
    if len(parts) < 4 and "*" not in mask:
        return f"has {len(parts)} parts; without '*' an IPv4 mask needs 4"
    for part in parts:
        problem = _mask_group_problem(part, "octet", 3) or _octet_range_problem(part)
        if problem is not None:
            return problem
    return None


def _ipv6_mask_problem(mask: str) -> str | None:
    if "." in mask:
        return "canonical IPv6 text never contains '.': write IPv4-mapped addresses as IPv4"
    if mask != mask.lower():
        return "hex digits must be lowercase, as in the canonical form"
    if ":::" in mask or mask.count("::") > 1:
        return "'::' may appear once, and ':::' never"
    groups = mask.split(":")
    if len([group for group in groups if group]) > 8:
        return "an IPv6 address has at most 8 groups"
    if _lone_colon_at_end(mask):
        return "an IPv6 address never starts or ends with a single ':'"
    for group in groups:
        problem = _mask_group_problem(group, "group", 4) if group else None
        if problem is not None:
            return problem
    return None


def _lone_colon_at_end(mask: str) -> bool:
    return (mask.startswith(":") and not mask.startswith("::")) or (
        mask.endswith(":") and not mask.endswith("::")
    )


def _mask_group_problem(group: str, name: str, width: int) -> str | None:
    """Checks one octet or IPv6 group of a wildcard mask, run by run between its stars.

    The canonical text never has a leading zero, so a group that would begin with one is
    ambiguous (octal?) or can never match. A run begins its group when it opens it, or when it is
    as wide as a whole group: a star beside it could then only stand for a separator.
    """
    if group == "":
        return f"empty {name}"
    for index, run in enumerate(group.split("*")):
        if len(run) > width:
            return f"{run!r} is wider than one {name}"
        if (index == 0 or len(run) == width) and len(run) > 1 and run[0] == "0":
            octal = " (and octal to some parsers)" if name == "octet" else ""
            return f"{name} {group!r} starts with a zero, which the canonical form never has{octal}"
    return None


def _octet_range_problem(part: str) -> str | None:
    runs = part.split("*")
    whole_octets = runs if len(runs) == 1 else [run for run in runs if len(run) == 3]
    if any(_lowest_octet(run) > 255 for run in whole_octets):
        return f"octet {part!r} is always above 255"
    return None


def _lowest_octet(octet: str) -> int:
    # A canonical octet has no leading zero, so a leading `?` of a longer octet is at least 1.
    lowest = octet.replace("?", "0")
    if octet[0] == "?" and len(octet) > 1:
        lowest = "1" + lowest[1:]
    return int(lowest)
