"""Token ACLs (docs/acl.md): validation on create/update, compilation on load, matching per request.

An ACL is a list of entries `{"uri", "methods", "ids", "submodules"}` (HTTP) or
`{"uri": "mqtt", "topic", "actions"}` (MQTT, never grants an HTTP path). What is not granted is denied.

Validation lives in `gateway.policy.acl_validation` (re-exported here as `acl_problems`).

Decisions the public material leaves open (validation's own are listed in its module):
- The collection path itself (`/gw/devices`, no selector) is granted only by an entry whose ids are
  `"all"`, for every method: POST creates items whose ids do not exist yet, and GET, PUT or DELETE
  on a collection address all of its items, so an id list can restrict none of them.
- A path that fits several uris (`gw` and `gw/devices`) is granted if any reading grants it; the
  longest uri is tried first, so its `all` rewrite is the one that applies.
- An uri mapped to a pattern without `{submodule}` grants nothing below the selector.
- Compiling a stored ACL never fails: a malformed part grants nothing, and an entry whose uri does
  not validate now (a platform uri included) is skipped.
- The `all` rewrite lists every permitted id, so an entry with a very large id list (or group)
  makes a long upstream URL; that is the price of the upstream never seeing an unpermitted item.

Group membership (`"ids": "in-groups"`) is kept in Redis by the upstream application and read by
`store/groups.py` when a token is loaded; here it is only matched against. A token reaches the
groups named by its own `gw/groups` entries.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from gateway.errors import Denied
from gateway.policy.acl_validation import (
    ALL_IDS,
    GROUP_URI,
    IN_GROUPS,
    METHODS,
    MQTT_URI,
    PLATFORM_PREFIXES,
    acl_problems,
    is_item_id,
    is_plain_path,
    is_platform_path,
    topic_problem,
    uri_problem,
)
from gateway.policy.mqtt_topics import NO_MQTT, MqttGrants, compile_mqtt

__all__ = [
    "CompiledAcl",
    "UriPattern",
    "acl_problems",
    "compile_acl",
    "parse_uri_patterns",
]

# Request methods an ACL can grant, by what they count as; OPTIONS, TRACE and others are never granted.
_REQUEST_METHODS = {"GET": "GET", "HEAD": "GET", "POST": "POST", "PUT": "PUT", "PATCH": "PUT", "DELETE": "DELETE"}
_NO_IDS: frozenset[int] = frozenset()
_Key = TypeVar("_Key", str, tuple[str, str])


# --- uri patterns -----------------------------------------------------------------------------

SELECTOR = "{selector}"
SUBMODULE = "{submodule}"


@dataclass(frozen=True, slots=True)
class UriPattern:
    """Where the items of one ACL uri live upstream: `{prefix}/{selector}[/{submodule}[/...]]`."""

    uri: str
    prefix: str
    submodules: bool = True

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or not is_plain_path(self.prefix):
            raise ValueError(f"uri {self.uri!r}: prefix {self.prefix!r} must be plain path segments after a /")
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"uri {self.uri!r}: only {SELECTOR} and {SUBMODULE} may be placeholders")

    @classmethod
    def flespi(cls, uri: str) -> UriPattern:
        """flespi's own layout: the uri is the path of the collection."""
        return cls(uri, "/" + uri)


def parse_uri_patterns(
    mapping: Mapping[str, str], platform_prefixes: tuple[str, ...] = PLATFORM_PREFIXES
) -> dict[str, UriPattern]:
    """Parse `{uri: "/api/v2/orders/{selector}/{submodule}"}`; a ValueError names the bad entry."""
    patterns = {uri: _parse_pattern(uri, pattern, platform_prefixes) for uri, pattern in mapping.items()}
    owners: dict[str, str] = {}
    for uri, parsed in patterns.items():
        other = owners.setdefault(parsed.prefix, uri)
        if other != uri:
            raise ValueError(f"uri {uri!r}: pattern prefix {parsed.prefix!r} is already used by {other!r}")
    return patterns


def _parse_pattern(uri: str, pattern: object, platform_prefixes: tuple[str, ...]) -> UriPattern:
    problem = uri_problem(uri, ()) if uri != MQTT_URI else "mqtt has no HTTP paths"
    if problem:
        raise ValueError(f"uri {uri!r}: {problem}")
    if not isinstance(pattern, str):
        raise ValueError(f"uri {uri!r}: pattern must be a string")
    for tail, submodules in ((f"/{SELECTOR}/{SUBMODULE}", True), (f"/{SELECTOR}", False)):
        if pattern.endswith(tail):
            parsed = UriPattern(uri, pattern[: -len(tail)], submodules)
            if is_platform_path(parsed.prefix, platform_prefixes):
                raise ValueError(f"uri {uri!r}: pattern {pattern!r} reaches a platform path")
            return parsed
    raise ValueError(f"uri {uri!r}: pattern {pattern!r} must end with /{SELECTOR} or /{SELECTOR}/{SUBMODULE}")


# --- compilation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Grant:
    """Which items one method (or one submodule's method) reaches."""

    everything: bool = False
    ids: frozenset[int] = _NO_IDS
    in_groups: bool = False
    listing: str = ""  # `ids` as the rewrite of `all`; filled in by `sealed` once merging is done

    def merge(self, other: _Grant | None) -> _Grant:
        if other is None:
            return self
        return _Grant(self.everything or other.everything, self.ids | other.ids, self.in_groups or other.in_groups)

    def sealed(self, listings: dict[frozenset[int], str]) -> _Grant:
        """The final grant, its listing shared with every grant of the same ids (often several methods)."""
        listing = listings.get(self.ids)
        if listing is None:
            listing = listings[self.ids] = _listing(self.ids)
        return _Grant(self.everything, self.ids, self.in_groups, listing)


def _listing(ids: frozenset[int]) -> str:
    return ",".join(map(str, sorted(ids)))


@dataclass(frozen=True, slots=True)
class _Collection:
    """Everything an ACL grants under one uri, keyed for lookup by method."""

    uri: str
    collection: frozenset[str]  # methods on the collection path itself
    items: Mapping[str, _Grant]  # method -> grant on an item
    any_submodule: Mapping[str, _Grant]  # method -> grant on every submodule (entries without `submodules`)
    listed: Mapping[tuple[str, str], _Grant]  # (submodule, method) -> grant, any_submodule merged in
    submodules_allowed: bool  # False when the uri's pattern has no {submodule}

    def submodule_grant(self, method: str, name: str) -> _Grant | None:
        if not self.submodules_allowed:
            return None
        return self.listed.get((name, method)) or self.any_submodule.get(method)


def _ids_grant(ids: object) -> _Grant:
    if ids == ALL_IDS:
        return _Grant(everything=True)
    if ids == IN_GROUPS:
        return _Grant(in_groups=True)
    if isinstance(ids, list):
        return _Grant(ids=frozenset(item for item in ids if is_item_id(item)))
    return _Grant()  # a malformed stored ACL grants nothing rather than failing open


def _methods(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(method for method in value if isinstance(method, str) and method in METHODS)


def _merge_into(table: dict[_Key, _Grant], key: _Key, grant: _Grant) -> None:
    table[key] = grant.merge(table.get(key))


class _CollectionBuilder:
    """Accumulates the entries of one uri; several entries combine by union."""

    def __init__(self, uri: str, pattern: UriPattern) -> None:
        self.uri = uri
        self.pattern = pattern
        self.collection: set[str] = set()
        self.items: dict[str, _Grant] = {}
        self.any_submodule: dict[str, _Grant] = {}
        self.listed: dict[tuple[str, str], _Grant] = {}

    def add(self, entry: Mapping[str, object]) -> None:
        grant = _ids_grant(entry.get("ids", ALL_IDS))
        methods = _methods(entry.get("methods"))
        if grant.everything:
            self.collection |= methods
        for method in methods:
            _merge_into(self.items, method, grant)
        if "submodules" not in entry:
            for method in methods:
                _merge_into(self.any_submodule, method, grant)
            return
        submodules = entry["submodules"]
        for submodule in submodules if isinstance(submodules, list) else ():
            if isinstance(submodule, dict) and isinstance(submodule.get("name"), str):
                for method in _methods(submodule.get("methods")):
                    _merge_into(self.listed, (submodule["name"], method), grant)

    def build(self, listings: dict[frozenset[int], str]) -> _Collection:
        listed = {key: grant.merge(self.any_submodule.get(key[1])) for key, grant in self.listed.items()}
        return _Collection(
            self.uri,
            frozenset(self.collection),
            _sealed(self.items, listings),
            _sealed(self.any_submodule, listings),
            _sealed(listed, listings),
            self.pattern.submodules,
        )


def _sealed(table: dict[_Key, _Grant], listings: dict[frozenset[int], str]) -> dict[_Key, _Grant]:
    return {key: grant.sealed(listings) for key, grant in table.items()}


def compile_acl(
    acl: list[dict[str, object]],
    patterns: Mapping[str, UriPattern] | None = None,
    group_uri: str = GROUP_URI,
    platform_prefixes: tuple[str, ...] = PLATFORM_PREFIXES,
) -> CompiledAcl:
    """Compile a (validated) ACL once per token load; anything malformed in it grants nothing.

    Entries whose uri is not valid (a platform uri included) are skipped, so a record stored before
    a rule or the configuration changed can never grant more than validation would allow now.
    """
    patterns = patterns or {}
    builders: dict[str, _CollectionBuilder] = {}
    http_entries = [e for e in acl if isinstance(e, dict) and isinstance(e.get("uri"), str) and e["uri"] != MQTT_URI]
    for entry in http_entries:
        uri = str(entry["uri"])
        builder = builders.get(uri)
        if builder is None:
            pattern = _pattern_for(uri, patterns, platform_prefixes)
            if pattern is None:
                continue
            builder = builders[uri] = _CollectionBuilder(uri, pattern)
        builder.add(entry)
    by_prefix: dict[str, tuple[_Collection, ...]] = {}
    listings: dict[frozenset[int], str] = {}
    for builder in builders.values():
        prefix = builder.pattern.prefix
        by_prefix[prefix] = (*by_prefix.get(prefix, ()), builder.build(listings))
    return CompiledAcl(
        group_uri=group_uri,
        by_prefix=by_prefix,
        depths=tuple(sorted({prefix.count("/") for prefix in by_prefix}, reverse=True)),
        needs_groups=_groups_needed(http_entries, group_uri),
        reachable=_reachable_groups(http_entries, group_uri),
        mqtt=compile_mqtt([e for e in acl if isinstance(e, dict) and e.get("uri") == MQTT_URI], topic_problem),
    )


def _pattern_for(
    uri: str, patterns: Mapping[str, UriPattern], platform_prefixes: tuple[str, ...]
) -> UriPattern | None:
    if uri in patterns:
        return patterns[uri]  # checked against the platform prefixes when the configuration was read
    return UriPattern.flespi(uri) if uri_problem(uri, platform_prefixes) is None else None


def _groups_needed(entries: Iterable[Mapping[str, object]], group_uri: str) -> tuple[str, ...] | None:
    uris = sorted({str(e["uri"]) for e in entries if e.get("ids") == IN_GROUPS and e["uri"] != group_uri})
    return tuple(uris) or None


def _reachable_groups(
    entries: Iterable[Mapping[str, object]], group_uri: str
) -> frozenset[int] | Literal["all"] | None:
    grants = [_ids_grant(e.get("ids", ALL_IDS)) for e in entries if e["uri"] == group_uri]
    if not grants:
        return None
    if any(grant.everything for grant in grants):
        return ALL_IDS
    return frozenset(group for grant in grants for group in grant.ids)


# --- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledAcl:
    """An ACL ready to match requests: one dict lookup per uri depth, never a scan of entries."""

    group_uri: str
    by_prefix: Mapping[str, tuple[_Collection, ...]]
    depths: tuple[int, ...]  # segment counts of the prefixes, longest first
    needs_groups: tuple[str, ...] | None
    reachable: frozenset[int] | Literal["all"] | None
    mqtt: MqttGrants = NO_MQTT  # the `mqtt` entries (gateway.policy.mqtt_topics)

    def groups_needed(self) -> tuple[str, ...] | None:
        """The uris whose ids are `in-groups`, so group membership must be loaded for them."""
        return self.needs_groups

    def reachable_groups(self) -> frozenset[int] | Literal["all"] | None:
        """The group ids of the token's own group entries; None when it has none."""
        return self.reachable

    def authorize(self, method: str, path: str, members: Mapping[str, frozenset[int]] | None = None) -> str:
        """Return the path to forward (with `all` rewritten where ids are restricted) or raise 403.

        `path` must be the output of `checked_path`: decoded, no dot or empty segments.
        """
        verb = _REQUEST_METHODS.get(method) or _REQUEST_METHODS.get(method.upper())
        if verb is not None:
            segments = path.split("/")
            for depth in self.depths:
                if len(segments) > depth:
                    for collection in self.by_prefix.get("/".join(segments[: depth + 1]), ()):
                        granted = _authorize_in(collection, verb, path, segments, depth + 1, members)
                        if granted is not None:
                            return granted
        raise Denied(403, f"access to {path[1:]} ({verb or method.upper()}) is denied by token ACL")


def _authorize_in(
    collection: _Collection,
    verb: str,
    path: str,
    segments: list[str],
    start: int,
    members: Mapping[str, frozenset[int]] | None,
) -> str | None:
    """Match `segments[start:]` = [] | [selector] | [selector, submodule, ...] below one collection."""
    end = len(segments)
    if end > start and segments[-1] == "":
        end -= 1  # a trailing slash addresses the same resource
    if end == start:
        return path if verb in collection.collection else None
    grant = collection.items.get(verb) if end == start + 1 else collection.submodule_grant(verb, segments[start + 1])
    if grant is None:
        return None
    if grant.everything:
        return path
    extra = members.get(collection.uri, _NO_IDS) if grant.in_groups and members else _NO_IDS
    return _restricted_selector(grant, extra, path, segments, start)


def _restricted_selector(
    grant: _Grant, extra: frozenset[int], path: str, segments: list[str], start: int
) -> str | None:
    """With an id-restricted grant: every listed id must be permitted; `all` becomes the permitted ids."""
    selector = segments[start]
    if selector == ALL_IDS:
        listing = _listing(grant.ids | extra) if extra else grant.listing
        if not listing:
            return None
        return "/".join([*segments[:start], listing, *segments[start + 1 :]])
    return path if _all_permitted(selector, grant.ids, extra) else None


def _all_permitted(selector: str, ids: frozenset[int], extra: frozenset[int]) -> bool:
    """Whether `selector` is a list `1,2,3` of permitted ids; any other form (`name=x`, `{expr}`, `01`,
    `1,,2`) is not."""
    for part in selector.split(","):
        # isascii: str.isdigit accepts other scripts' digits, which int() would quietly read.
        if not (part.isascii() and part.isdigit()) or part[0] == "0":
            return False
        item = int(part)
        if item not in ids and item not in extra:
            return False
    return True
