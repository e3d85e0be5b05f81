"""Which address a request comes from, for the IP whitelist and the logs, and what to tell upstream.

The client address is the TCP peer. Only when the peer is a configured trusted proxy is
`X-Forwarded-For` believed, walked from the right: each trusted proxy appended the address it saw,
so the right-most address that is not a trusted proxy is the client. Anything left of it was
written by the client itself and could be anything. An entry that is not an IP address (`unknown`,
`1.2.3.4:5678`) ends the walk, since nothing written before it can be attributed to anyone.

`X-Real-IP` and `Forwarded` are never read: one header with one rule is less to get wrong, and a
client that is not a trusted proxy cannot change its address with any header.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from multidict import MultiMapping

from gateway.policy.ipmask import IpAddress, Network, in_networks, network_key, parse_ip

_FORWARDED_FOR = "X-Forwarded-For"
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The proxies whose `X-Forwarded-For` is believed; parsed once from the configuration."""

    v4: tuple[Network, ...]
    v6: tuple[Network, ...]

    @classmethod
    def parse(cls, items: Sequence[str]) -> TrustedProxies:
        """Addresses and CIDR networks, IPv4 or IPv6; ValueError naming the first bad item."""
        if isinstance(items, str):
            raise ValueError("trusted proxies must be a list of addresses and networks, not one string")
        networks = [_trusted_network(item) for item in items]
        return cls(
            v4=tuple(network_key(network) for network in networks if network.version == 4),
            v6=tuple(network_key(network) for network in networks if network.version == 6),
        )

    def is_trusted(self, address: str) -> bool:
        parsed = parse_ip(address)
        return parsed is not None and self.contains(parsed)

    def contains(self, address: IpAddress) -> bool:
        return in_networks(address.value, self.v4 if address.version == 4 else self.v6)


def _trusted_network(item: object) -> IPv4Network | IPv6Network:
    if not isinstance(item, str) or item.strip() == "":
        raise ValueError(f"trusted proxy {item!r}: expected an IP address or CIDR network")
    try:
        network = ipaddress.ip_network(item.strip())
    except ValueError as error:
        raise ValueError(f"trusted proxy {item!r}: {error}") from None
    return _unmapped(network)


def _unmapped(network: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    # Peers are normalised to IPv4 when they arrive IPv4-mapped, so the networks must be as well.
    if isinstance(network, IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        first = network.network_address.ipv4_mapped
        return IPv4Network(f"{first}/{network.prefixlen - 96}")
    return network


def client_address(peer: str, headers: MultiMapping[str], trusted: TrustedProxies) -> str:
    """The normalised client address; `peer` itself when it is no IP address (a unix socket)."""
    peer_ip = parse_ip(peer)
    if peer_ip is None:
        return peer
    if not trusted.contains(peer_ip):
        return peer_ip.text
    return _walk_chain(_forwarded_chain(headers), trusted, peer_ip).text


def _walk_chain(chain: list[str], trusted: TrustedProxies, peer: IpAddress) -> IpAddress:
    nearest = peer
    for entry in reversed(chain):
        hop = parse_ip(entry)
        if hop is None:
            return nearest
        nearest = hop
        if not trusted.contains(hop):
            return hop
    # Every hop is a trusted proxy: the left-most is the closest to the client that is known.
    return nearest


def _forwarded_chain(headers: MultiMapping[str]) -> list[str]:
    # Empty entries (an empty header, a trailing comma) carry no address and are skipped.
    entries = (entry.strip() for value in headers.getall(_FORWARDED_FOR, []) for entry in value.split(","))
    return [entry for entry in entries if entry]


def forwarded_for(peer: str, headers: MultiMapping[str], trusted: TrustedProxies) -> str:
    """The `X-Forwarded-For` to send upstream: a chain only a trusted peer may extend."""
    peer_ip = parse_ip(peer)
    peer_text = peer if peer_ip is None else peer_ip.text
    if peer_ip is None or not trusted.contains(peer_ip):
        return peer_text
    return ", ".join([*_forwarded_chain(headers), peer_text])
