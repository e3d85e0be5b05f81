"""Time per `matches()` call of a compiled 10-mask `ips` and a 10-item `origins` list.

Run from the repository root: `PYTHONPATH=. python bench/netmatch_check.py`. Prints figures only;
compilation happens once per token load and is timed separately.
"""
from __future__ import annotations

import timeit
from collections.abc import Callable
from functools import partial

from gateway.policy.ipmask import compile_ip_masks
from gateway.policy.origins import compile_origins

IPS = (
    "10.100.15.*, 110.160.56.1?, 182.15.48.5, 192.168.0.0/16, 172.16.*.1, "
    "2001:db8::/32, fe80::*, 2001:db8:aaaa::1, 203.0.113.7, 100.64.0.0/10"
)
ADDRESSES = {
    "IPv4 exact hit": "182.15.48.5",
    "IPv4 wildcard hit": "110.160.56.17",
    "IPv4 CIDR hit": "100.64.3.4",
    "IPv4 miss": "8.8.8.8",
    "IPv4-mapped hit": "::ffff:182.15.48.5",
    "IPv6 CIDR hit": "2001:db8:1::1",
    "IPv6 wildcard hit": "fe80::1",
    "IPv6 miss": "2001:db9::1",
    "garbage": "not-an-address",
}
ORIGINS: list[object] = [
    "http://localhost:1234",
    "https://app.example.org",
    "https://admin.example.org",
    "https://*.example.com",
    "https://*.subdomain.domain",
    "custom7://te?t.example.com",
    "https://app-*.preview.example.net",
    "http://192.168.1.*:8080",
    "https://*.flespi.io",
    {"preset": "flespi"},
]
PRESETS = {"flespi": ["https://flespi.io"]}
ORIGIN_VALUES = {
    "exact hit": "https://admin.example.org",
    "wildcard hit": "https://a.b.example.com",
    "preset hit": "https://flespi.io",
    "miss (look-alike)": "https://example.com.evil.com",
    "miss (null)": "null",
}


def per_call_us(call: Callable[[], object], number: int = 200_000) -> float:
    best = min(timeit.repeat(call, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    print(f"compile 10 ips masks:   {per_call_us(lambda: compile_ip_masks(IPS), 2_000):8.2f} us")
    print(f"compile 10 origins:     {per_call_us(lambda: compile_origins(ORIGINS, PRESETS), 2_000):8.2f} us")
    ip_matcher = compile_ip_masks(IPS)
    origin_matcher = compile_origins(ORIGINS, PRESETS)
    if ip_matcher is None or origin_matcher is None:
        raise SystemExit("the benchmark lists compiled to 'any': nothing to time")
    for label, address in ADDRESSES.items():
        print(f"ips     {label:22} {per_call_us(partial(ip_matcher.matches, address)):6.2f} us/call")
    for label, origin in ORIGIN_VALUES.items():
        print(f"origins {label:22} {per_call_us(partial(origin_matcher.matches, origin)):6.2f} us/call")


if __name__ == "__main__":
    main()
