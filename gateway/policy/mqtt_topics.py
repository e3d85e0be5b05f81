"""MQTT topics against a token (docs/mqtt.md): pure functions, no I/O.

A topic *name* (what is published) has no wildcards; a topic *filter* (what is subscribed to) may
hold `+` (one whole level) and `#` (the whole last level: that level and everything below), and
may be shared, `$share/<group>/<filter>`. Topics whose first level starts with `$` are never
matched by a filter that starts with a wildcard (MQTT 5.0 4.7.2).

Rules, for every front that speaks MQTT:
- Nothing under the reserved `flespi/` namespace, and no `$` topic, is ever published by a client.
- A subscription is granted only if every topic its filter can match is granted. For an ACL token
  that means one of its subscribe entries covers the whole filter (a union of entries is not
  searched for a cover: sound, and the entries a person writes cover what they mean one by one).
- `flespi/message/<uri>/<id>` follows the REST ACL: granted when GET on `<uri>/<id>/messages` is;
  `flespi/state/<uri>/<id>[/...]` when GET on the item `<uri>/<id>` is; `+` as the id asks for
  every item (`all`). Other `flespi/` topics are for master tokens only, and so is `$SYS`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESERVED = "flespi"
SHARE = "$share"
SYS = "$SYS"
ANY_LEVEL = "+"
ALL_BELOW = "#"
# flespi's own topics and the REST item submodule each follows ("" for the item itself).
REST_TOPICS = {"message": "messages", "state": ""}

Levels = tuple[str, ...]


def strip_share(topic_filter: str) -> str | None:
    """The filter a `$share/<group>/<filter>` subscription matches with (the filter itself when it
    is not shared); None when the share is malformed (no group, a wildcard in it, no filter)."""
    if not topic_filter.startswith(SHARE + "/"):
        return topic_filter
    group, slash, rest = topic_filter[len(SHARE) + 1:].partition("/")
    if not group or not slash or not rest or ANY_LEVEL in group or ALL_BELOW in group:
        return None
    return rest


def filter_problem(topic_filter: str) -> str | None:
    """Why a string is not a valid topic filter (shared or not), or None."""
    inner = strip_share(topic_filter)
    if inner is None:
        return "a shared subscription is $share/<group>/<filter>, the group without wildcards"
    if not inner:
        return "a topic filter must not be empty"
    if "\x00" in inner:
        return "a topic filter must not contain NUL"
    levels = inner.split("/")
    if any(level != ALL_BELOW and ALL_BELOW in level for level in levels) or ALL_BELOW in levels[:-1]:
        return "# may only be the whole last level of a topic filter"
    if any(level != ANY_LEVEL and ANY_LEVEL in level for level in levels):
        return "+ may only be a whole level of a topic filter"
    return None


def name_problem(topic: str) -> str | None:
    """Why a string is not a valid topic name (what a PUBLISH carries), or None."""
    if not topic:
        return "a topic name must not be empty"
    if "\x00" in topic or ANY_LEVEL in topic or ALL_BELOW in topic:
        return "a topic name must not contain wildcards or NUL"
    return None


def covers(granting: Levels, asked: Levels) -> bool:
    """Whether every topic the filter `asked` can match is matched by the filter `granting`
    (a topic name is a filter without wildcards, so this is matching too)."""
    if asked and asked[0].startswith("$") and granting and granting[0] in (ANY_LEVEL, ALL_BELOW):
        return False  # wildcards at the first level never match $ topics
    for index, level in enumerate(granting):
        if level == ALL_BELOW:
            return True  # `a/#` matches `a` itself and everything below it
        if index >= len(asked):
            return False
        wanted = asked[index]
        if wanted == ALL_BELOW:
            return False
        if level != ANY_LEVEL and level != wanted:
            return False
    return len(asked) == len(granting)


def may_match_reserved(topic_filter: str) -> bool:
    """Whether a filter (shared or not) can match a topic under `flespi/`."""
    inner = strip_share(topic_filter)
    if inner is None:
        return True  # malformed: assume the worst
    levels = inner.split("/")
    first = levels[0]
    return first == ALL_BELOW or (first in (RESERVED, ANY_LEVEL) and len(levels) > 1)


def is_sys(topic: str) -> bool:
    return topic == SYS or topic.startswith(SYS + "/")


@dataclass(frozen=True, slots=True)
class MqttGrants:
    """An ACL token's `mqtt` entries, compiled: the filters it may subscribe with and publish to."""

    subscribe: tuple[Levels, ...] = ()
    publish: tuple[Levels, ...] = ()

    def may_subscribe(self, levels: Levels) -> bool:
        return any(covers(granted, levels) for granted in self.subscribe)

    def may_publish(self, levels: Levels) -> bool:
        return any(covers(granted, levels) for granted in self.publish)


NO_MQTT = MqttGrants()


def compile_mqtt(entries: Sequence[object], problem: Callable[[object], str | None]) -> MqttGrants:
    """The grants of a stored ACL's mqtt entries. `problem` is validation's topic rule: an entry
    that would not validate now (stored before a rule tightened) grants nothing."""
    subscribe: list[Levels] = []
    publish: list[Levels] = []
    for entry in entries:
        if not isinstance(entry, dict) or problem(entry.get("topic")) is not None:
            continue
        actions = entry.get("actions")
        if not isinstance(actions, list):
            continue
        levels = tuple(str(entry["topic"]).split("/"))
        if "subscribe" in actions:
            subscribe.append(levels)
        if "publish" in actions:
            publish.append(levels)
    return MqttGrants(tuple(subscribe), tuple(publish))


def rest_path(levels: Levels) -> str | None:
    """The REST path whose GET grants a subscription under `flespi/` (`+` as the id becomes `all`),
    or None when the filter is not one of flespi's item topics."""
    if len(levels) < 4 or levels[0] != RESERVED or levels[1] not in REST_TOPICS:
        return None
    rest = levels[2:]
    for index in range(1, len(rest)):
        item = rest[index]
        if item == ANY_LEVEL or (item.isascii() and item.isdigit() and item[0] != "0"):
            break
    else:
        return None
    uri, tail = rest[:index], rest[index + 1:]
    if any(level in (ANY_LEVEL, ALL_BELOW) or not level for level in uri):
        return None
    selector = "all" if rest[index] == ANY_LEVEL else rest[index]
    submodule = REST_TOPICS[levels[1]]
    if submodule:
        if tail:
            return None  # message topics end at the item
        return "/" + "/".join((*uri, selector, submodule))
    return "/" + "/".join((*uri, selector))  # state: anything below the item is the item's state


# How a token's REST access answers "may GET this path" (the path as `rest_path` gives it).
RestReader = Callable[[str], bool]


def may_subscribe(kind: str, grants: MqttGrants | None, rest_allows: RestReader, topic_filter: str) -> bool:
    """Whether a token may subscribe with `topic_filter`; `kind` is "master", "standard" or "acl"
    (NOAPI tokens never get this far). The filter must be valid (`filter_problem`)."""
    if kind == "master":
        return True
    inner = strip_share(topic_filter)
    if inner is None or is_sys(inner):
        return False
    levels = tuple(inner.split("/"))
    if may_match_reserved(inner):
        path = rest_path(levels)
        return path is not None and rest_allows(path)
    if kind == "standard":
        return True
    return grants is not None and grants.may_subscribe(levels)


def may_publish(kind: str, grants: MqttGrants | None, topic: str) -> bool:
    """Whether a token may publish to `topic` (a valid topic name): never under `flespi/` nor to a
    `$` topic; master and standard tokens anything else; ACL tokens what an entry grants."""
    if topic.startswith("$") or topic.startswith(RESERVED + "/") or topic == RESERVED:
        return False
    if kind in ("master", "standard"):
        return True
    return grants is not None and grants.may_publish(tuple(topic.split("/")))
