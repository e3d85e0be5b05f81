"""Validation of a token's ACL as given on create/update: one FieldProblem per problem, each naming its field.

Choices where the public material is silent:
- `ids` may be left out and then means `"all"`, as an entry without restriction reads.
- Repeated methods, ids or submodule names are accepted: they are sets, a repeat changes nothing.
- An empty `ids` list is valid and permits no item; an empty `submodules` list permits no submodule.
- `PATCH` and `HEAD` are not ACL methods: at request time they count as PUT and GET.
- A platform uri is refused case-insensitively, and so is an uri above a configured platform prefix.
- An MQTT topic filter that could match a topic under `flespi/` (`#`, `+/x/#`, `$share/g/flespi/x`) is
  refused: those topics follow the REST ACL (docs/mqtt.md), never an mqtt entry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gateway.errors import Denied, FieldProblem
from gateway.policy.mqtt_topics import filter_problem, is_sys, may_match_reserved, strip_share
from gateway.policy.paths import checked_path

GROUP_URI = "gw/groups"
MQTT_URI = "mqtt"
PLATFORM_PREFIXES = ("/platform/", "/auth/")
METHODS = ("GET", "POST", "PUT", "DELETE")
MQTT_ACTIONS = ("publish", "subscribe")
ALL_IDS: Final = "all"
IN_GROUPS: Final = "in-groups"

_HTTP_KEYS = frozenset(("uri", "methods", "ids", "submodules"))
_MQTT_KEYS = frozenset(("uri", "topic", "actions"))
_SUBMODULE_KEYS = frozenset(("name", "methods"))
# The characters a request path may hold without any decoding (see gateway.policy.paths), so an uri or a
# submodule name always reads the same in the ACL, in the request and upstream.
_URI = re.compile(r"[A-Za-z0-9\-._~/,=:@!$&'()*+]+")
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~,=:@!$&'()*+]+")
_DOT_SEGMENTS = (".", "..")


@dataclass(frozen=True, slots=True)
class _Context:
    platform_prefixes: tuple[str, ...]
    group_uri: str
    has_groups: bool


def acl_problems(
    acl: object,
    field: str = "access.acl",
    platform_prefixes: tuple[str, ...] = PLATFORM_PREFIXES,
    group_uri: str = GROUP_URI,
) -> list[FieldProblem]:
    """Every problem of an ACL as given in a token's `access.acl`, each naming its exact field."""
    if not isinstance(acl, list):
        return [FieldProblem(field, "acl must be a list of entries")]
    has_groups = any(isinstance(entry, dict) and entry.get("uri") == group_uri for entry in acl)
    context = _Context(platform_prefixes, group_uri, has_groups)
    problems: list[FieldProblem] = []
    for index, entry in enumerate(acl):
        problems += _entry_problems(entry, f"{field}[{index}]", context)
    return problems


def _entry_problems(entry: object, at: str, context: _Context) -> list[FieldProblem]:
    if not isinstance(entry, dict):
        return [FieldProblem(at, "acl entry must be an object")]
    if entry.get("uri") == MQTT_URI:
        return _mqtt_problems(entry, at)
    return _http_problems(entry, at, context)


def _http_problems(entry: dict[str, object], at: str, context: _Context) -> list[FieldProblem]:
    problems = _unknown_keys(entry, _HTTP_KEYS, at)
    uri = entry.get("uri")
    found = {
        "uri": uri_problem(uri, context.platform_prefixes),
        "methods": _methods_problem(entry.get("methods")),
        "ids": _ids_problem(entry, uri, context),
    }
    problems += [FieldProblem(f"{at}.{key}", reason) for key, reason in found.items() if reason]
    if "submodules" in entry:
        problems += _submodules_problems(entry["submodules"], f"{at}.submodules")
    return problems


def _unknown_keys(entry: dict[str, object], known: frozenset[str], at: str) -> list[FieldProblem]:
    return [FieldProblem(f"{at}.{key}", "unknown field") for key in entry if key not in known]


def uri_problem(uri: object, platform_prefixes: tuple[str, ...]) -> str | None:
    """Why `uri` can not name a collection in an ACL, or None when it can."""
    if not isinstance(uri, str) or not uri:
        return "uri must be a non-empty string"
    if any(char.isspace() for char in uri):
        return "uri must not contain whitespace"
    if uri.startswith("/") or uri.endswith("/"):
        return "uri must not start or end with a slash"
    if "//" in uri:
        return "uri must not contain an empty segment"
    if not _URI.fullmatch(uri) or any(segment in _DOT_SEGMENTS for segment in uri.split("/")):
        return "uri may hold only letters, digits and -._~,=:@!$&'()*+ between slashes, and no dot segments"
    if is_platform_path("/" + uri, platform_prefixes):
        return "platform uri can not be granted by an ACL"
    return None


def is_plain_path(path: str) -> bool:
    """A path that needs no decoding and that `checked_path` accepts as it is."""
    try:
        return "%" not in path and checked_path(path) == path
    except Denied:
        return False


def is_platform_path(path: str, platform_prefixes: tuple[str, ...]) -> bool:
    # Case-insensitive and both ways: `platform/x` lies under `/platform/`, and an uri above a
    # platform prefix (`api` above `/api/admin/`) would reach it through its selector.
    folded = path.casefold() + "/"
    return any(folded.startswith(p.casefold()) or p.casefold().startswith(folded) for p in platform_prefixes)


def _methods_problem(methods: object) -> str | None:
    if not isinstance(methods, list) or not methods:
        return "methods must be a non-empty list"
    for method in methods:
        if not isinstance(method, str) or method not in METHODS:
            return f"unknown method {str(method)[:32]!r}: allowed are {', '.join(METHODS)}"
    return None


def _ids_problem(entry: dict[str, object], uri: object, context: _Context) -> str | None:
    ids = entry.get("ids", ALL_IDS)
    if ids == IN_GROUPS:
        return _in_groups_problem(uri, context)
    if ids == ALL_IDS:
        return None
    if isinstance(ids, list) and all(is_item_id(item) for item in ids):
        return None
    return f'ids must be "{ALL_IDS}", "{IN_GROUPS}" or a list of positive integer ids'


def _in_groups_problem(uri: object, context: _Context) -> str | None:
    if uri == context.group_uri:
        return f"{context.group_uri} can not be restricted to {IN_GROUPS}"
    if not context.has_groups:
        return f"{IN_GROUPS} needs a {context.group_uri} entry in the same ACL"
    return None


def is_item_id(value: object) -> bool:
    # `type() is int`, not isinstance: bool is an int subclass, and `true` must not pass as id 1.
    return type(value) is int and value > 0


def _submodules_problems(submodules: object, at: str) -> list[FieldProblem]:
    if not isinstance(submodules, list):
        return [FieldProblem(at, "submodules must be a list of {name, methods} objects")]
    problems: list[FieldProblem] = []
    for index, submodule in enumerate(submodules):
        problems += _submodule_problems(submodule, f"{at}[{index}]")
    return problems


def _submodule_problems(submodule: object, at: str) -> list[FieldProblem]:
    if not isinstance(submodule, dict):
        return [FieldProblem(at, "submodule must be an object {name, methods}")]
    problems = _unknown_keys(submodule, _SUBMODULE_KEYS, at)
    name = submodule.get("name")
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name) or name in _DOT_SEGMENTS:
        reason = "submodule name must be one path segment of letters, digits and -._~,=:@!$&'()*+"
        problems.append(FieldProblem(f"{at}.name", reason))
    method_problem = _methods_problem(submodule.get("methods"))
    if method_problem:
        problems.append(FieldProblem(f"{at}.methods", method_problem))
    return problems


def _mqtt_problems(entry: dict[str, object], at: str) -> list[FieldProblem]:
    problems = _unknown_keys(entry, _MQTT_KEYS, at)
    found = {"topic": topic_problem(entry.get("topic")), "actions": _actions_problem(entry.get("actions"))}
    return problems + [FieldProblem(f"{at}.{key}", reason) for key, reason in found.items() if reason]


def _actions_problem(actions: object) -> str | None:
    if isinstance(actions, list) and actions and all(isinstance(a, str) and a in MQTT_ACTIONS for a in actions):
        return None
    return f"actions must be a non-empty list of {', '.join(MQTT_ACTIONS)}"


def topic_problem(topic: object) -> str | None:
    """Why `topic` can not be an ACL entry's topic filter, or None: the filter must be valid MQTT
    and must not be able to match anything under the reserved `flespi/` namespace (`#`, `+/x`,
    `$share/g/flespi/...` could), which only the REST ACL grants (docs/mqtt.md)."""
    if not isinstance(topic, str) or not topic:
        return "topic must be a non-empty string"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in topic):
        return "topic must not contain control characters"
    problem = filter_problem(topic)
    if problem is not None:
        return problem.replace("a topic filter", "topic")
    inner = strip_share(topic) or ""
    if inner.startswith("flespi/"):
        return "topic may not start with flespi/"
    if may_match_reserved(topic):
        return "topic could match reserved flespi/ topics"
    if is_sys(inner):
        return "$SYS topics are for master tokens only"
    return None
