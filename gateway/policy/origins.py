"""Allowed web origins of a token: check `origins` when a token is saved, match the `Origin` header.

`origins` is absent (None), `"*"`, or a list; `[]` and a list containing `"*"` also allow any
origin. A list item is a pattern string or `{"preset": NAME}`, standing for the patterns that the
configuration lists under NAME (a preset may itself contain `"*"`).

A pattern is `scheme://host[:port]`, matched against the whole `Origin` value. Both are lowercased
first: scheme and host are case-insensitive. Wildcards never leave the part they are written in, so
no pattern can be stretched across `://`, `:`, `.`, `/` or `@`:

- scheme: `*` is any run of scheme characters, `?` one of them;
- host: `*` is any run of characters within one label and `?` one such character, neither ever
  matches `.`; only a host that starts with the whole label `*.` may match several labels there, so
  `https://*.example.com` matches `https://a.example.com` and `https://a.b.example.com` but not
  `https://example.com`, `https://evilexample.com` or `https://a.example.com.evil.com`;
- port: `*` is any run of digits, `?` one digit. A pattern without a port matches only origins
  without one: `https://*.example.com` does not match `https://a.example.com:8080`.

Wildcards are refused in the last two labels of a host (`https://*example.com`, `https://example.*`,
`https://*.com`): what those match is decided by whoever registers a domain, not by the token owner.
Without the public suffix list `*.co.uk` cannot be told from `*.example.com`, so it is accepted.
IPv4 hosts are the exception (`http://192.168.1.*`): there a wildcard matches digits only.

`Origin: null` comes from sandboxed frames, `file:` pages and cross-origin redirects. Any page can
produce it, so a `"null"` item is refused and `null` matches no list; only a token that allows any
origin accepts it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address

from gateway.policy.wildcard import glob_to_regex

Presets = Mapping[str, Sequence[str]]

_SCHEME = re.compile(r"[a-z*?][a-z0-9+.\-*?]*")
_SCHEME_CHAR = r"[a-z0-9+.\-]"
_LABEL_CHAR = "[a-z0-9_-]"
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-*?")
_IPV4_LABEL = re.compile(r"[0-9*?]+")
_PORT_CHARS = frozenset("0123456789*?")
_DEFAULT_PORTS = {"http": "80", "ws": "80", "https": "443", "wss": "443"}
_NOT_IN_ORIGIN = (("/", "a path"), ("#", "a fragment"), ("@", "user info"), ("=", "a query"))


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One validated, lowercased origin pattern."""

    scheme: str
    host: str
    port: str | None

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.host}" + ("" if self.port is None else f":{self.port}")

    @property
    def has_wildcards(self) -> bool:
        return "*" in self.text or "?" in self.text

    def regex(self) -> str:
        scheme = glob_to_regex(self.scheme, _SCHEME_CHAR, _SCHEME_CHAR)
        port = "" if self.port is None else ":" + glob_to_regex(self.port, "[0-9]", "[0-9]")
        return f"{scheme}://{_host_regex(self.host)}{port}"


def _host_regex(host: str) -> str:
    if host.startswith("["):
        return re.escape(host)
    labels = host.split(".")
    if _is_ipv4_host(labels):
        return r"\.".join(glob_to_regex(label, "[0-9]", "[0-9]") for label in labels)
    leading = ""
    if set(labels[0]) == {"*"}:
        leading, labels = rf"(?:{_LABEL_CHAR}+\.)+", labels[1:]
    return leading + r"\.".join(glob_to_regex(label, _LABEL_CHAR, _LABEL_CHAR) for label in labels)


def _is_ipv4_host(labels: list[str]) -> bool:
    return len(labels) == 4 and all(_IPV4_LABEL.fullmatch(label) for label in labels)


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


@dataclass(frozen=True, slots=True)
class OriginMatcher:
    """The compiled `origins` of one token; built once when the token record is loaded."""

    exact: frozenset[str]
    wildcards: re.Pattern[str] | None

    def matches(self, origin: str) -> bool:
        # Lowercasing non-ASCII text can fold a look-alike into ASCII (KELVIN SIGN becomes "k"),
        # and browsers send hosts in punycode, so a non-ASCII origin is no origin of ours.
        if not origin.isascii() or origin == "null":
            return False
        origin = origin.lower()
        if origin in self.exact:
            return True
        return self.wildcards is not None and self.wildcards.fullmatch(origin) is not None


def compile_origins(origins: object, presets: Presets) -> OriginMatcher | None:
    """None when any origin is allowed; ValueError naming every problem when `origins` is invalid."""
    problems = origin_problems(origins, presets)
    if problems:
        raise ValueError("; ".join(problems))
    if not isinstance(origins, list) or not origins:
        return None
    # An empty preset expands to nothing and so allows nothing: only a literal [] means "any".
    patterns = [pattern for item in origins for pattern in _expand(item, presets)]
    if "*" in patterns:
        return None
    parsed = [_parse_pattern(pattern) for pattern in patterns]
    sources = [f"(?:{pattern.regex()})" for pattern in parsed if pattern.has_wildcards]
    return OriginMatcher(
        exact=frozenset(pattern.text for pattern in parsed if not pattern.has_wildcards),
        wildcards=re.compile("|".join(sources)) if sources else None,
    )


def _expand(item: object, presets: Presets) -> Sequence[str]:
    if isinstance(item, str):
        return (item,)
    name = _preset_name(item)
    return () if name is None else presets[name]


def _preset_name(item: object) -> str | None:
    if not isinstance(item, dict) or len(item) != 1:
        return None
    name = item.get("preset")
    return name if isinstance(name, str) else None


def origin_problems(origins: object, presets: Presets) -> list[str]:
    """Why `origins` cannot be saved on a token, one reason per bad item; empty when it is valid."""
    if origins is None or origins == "*":
        return []
    if not isinstance(origins, list):
        return ['must be "*" or a list of origins']
    problems: list[str] = []
    for index, item in enumerate(origins):
        problems.extend(f"origins[{index}] {problem}" for problem in _item_problems(item, presets))
    return problems


def _item_problems(item: object, presets: Presets) -> list[str]:
    if isinstance(item, str):
        problem = pattern_problem(item)
        return [] if problem is None else [f"{item!r}: {problem}"]
    name = _preset_name(item)
    if name is None:
        return ['must be an origin string or {"preset": NAME}']
    if name not in presets:
        return [f"unknown preset {name!r}"]
    return [f"preset {name!r} {problem}" for problem in _preset_problems(presets[name])]


def preset_problems(presets: Presets) -> list[str]:
    """Problems of the configured presets, for the configuration loader; empty when all are valid."""
    problems: list[str] = []
    for name, patterns in presets.items():
        if not patterns:
            problems.append(f"preset {name!r} is empty")
        problems.extend(f"preset {name!r} {problem}" for problem in _preset_problems(patterns))
    return problems


def _preset_problems(patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        return ["must be a list of origins, not one string"]
    problems = [(pattern, pattern_problem(pattern)) for pattern in patterns]
    return [f"{pattern!r}: {problem}" for pattern, problem in problems if problem is not None]


def pattern_problem(pattern: object) -> str | None:
    """Why one origin pattern is refused, or None; `"*"` alone is valid and means any origin."""
    if not isinstance(pattern, str):
        return "must be a string"
    if pattern == "*":
        return None
    try:
        _parse_pattern(pattern)
    except ValueError as error:
        return str(error)
    return None


def _parse_pattern(pattern: str) -> _Pattern:
    _check_text(pattern)
    scheme, separator, authority = pattern.lower().partition("://")
    if not separator:
        raise ValueError("must have the form scheme://host[:port]")
    if _SCHEME.fullmatch(scheme) is None:
        raise ValueError(f"scheme {scheme!r} is not valid")
    for char, what in _NOT_IN_ORIGIN:
        if char in authority:
            raise ValueError(f"{what} is not part of an origin")
    host, port = _split_port(authority)
    _check_host(host)
    if port is not None:
        _check_port(scheme, port)
    return _Pattern(scheme, host, port)


def _check_text(pattern: str) -> None:
    if pattern == "":
        raise ValueError("empty origin")
    if not pattern.isascii():
        raise ValueError("non-ASCII: write the host in punycode (xn--...), as browsers send it")
    if any(char.isspace() for char in pattern):
        raise ValueError("contains whitespace")
    if pattern.lower() == "null":
        raise ValueError("any page can send the null origin (from a sandboxed frame): it cannot be allowed")


def _split_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]") + 1
        host, rest = authority[:end], authority[end:]
        if end == 0 or not (rest == "" or rest.startswith(":")):
            raise ValueError("an IPv6 host must be written as [address] with an optional :port")
        return host, rest[1:] if rest else None
    host, colon, port = authority.partition(":")
    if ":" in port:
        raise ValueError("too many ':' in the host and port")
    return host, port if colon else None


def _check_host(host: str) -> None:
    if host.startswith("["):
        _check_ipv6_host(host[1:-1])
        return
    labels = host.split(".")
    if "" in labels:
        raise ValueError("the host is missing or has an empty label (leading, trailing or doubled '.')")
    unexpected = sorted(set(host) - _LABEL_CHARS - {"."})
    if unexpected:
        raise ValueError(f"characters not allowed in a host: {''.join(unexpected)!r}")
    if not _is_ipv4_host(labels) and any(_has_wildcard(label) for label in labels[-2:]):
        raise ValueError(
            "wildcards are not allowed in the last two labels of a host: "
            "they would match domains that anyone can register (write https://*.example.com)"
        )


def _check_ipv6_host(text: str) -> None:
    if "%" in text:
        raise ValueError("browsers do not send IPv6 zones in an origin")
    try:
        address = IPv6Address(text)
    except ValueError:
        raise ValueError(f"[{text}] is not an IPv6 address (wildcards are not allowed in one)") from None
    if text != address.compressed:
        raise ValueError(f"browsers send IPv6 hosts in canonical form: write [{address.compressed}]")


def _check_port(scheme: str, port: str) -> None:
    if port == "" or not set(port) <= _PORT_CHARS:
        raise ValueError(f"port {port!r} is not a number")
    if _has_wildcard(port):
        return
    if port[0] == "0" or int(port) > 65535:
        raise ValueError(f"port {port} is out of range or has a leading zero")
    if _DEFAULT_PORTS.get(scheme) == port:
        raise ValueError(f"browsers never send the default port {port} of {scheme}: leave it out")
