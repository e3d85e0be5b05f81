"""Validation of token objects sent to the tokens API: every problem is reported with its field."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import FieldProblem, InvalidInput
from gateway.tokens import TokenType

WRITABLE = frozenset({"info", "enabled", "access", "expire", "ttl", "ips", "origins", "metadata"})
READ_ONLY = frozenset({"id", "key", "created", "accessed", "cid"})
DEFAULTS: Mapping[str, Any] = {
    "info": "", "enabled": True, "access": {"type": 0}, "expire": 0, "ttl": 0, "ips": "", "origins": "*",
    "metadata": {},
}
MAX_INFO = 1024
ProblemFinder = Callable[[Any], list[FieldProblem]]


def _no_problems(value: Any) -> list[FieldProblem]:
    return []


@dataclass(frozen=True, slots=True)
class TokenValidator:
    """Checks one token object; the ACL, IP and origin finders come from their own modules."""

    acl_problems: ProblemFinder = _no_problems
    ips_problems: ProblemFinder = _no_problems
    origins_problems: ProblemFinder = _no_problems
    writable: frozenset[str] = field(default=WRITABLE)

    def problems(self, body: Any, *, partial: bool) -> list[FieldProblem]:
        if not isinstance(body, dict):
            return [FieldProblem("", "token must be a JSON object")]
        found: list[FieldProblem] = []
        for name in body:
            if name in READ_ONLY:
                found.append(FieldProblem(name, f"field '{name}' is read-only"))
            elif name not in self.writable:
                found.append(FieldProblem(name, f"unknown field '{name}'"))
        for name, value in body.items():
            if name in self.writable:
                found.extend(self._field_problems(name, value))
        if not partial and not found:
            found.extend(validity_problems({**DEFAULTS, **body}))
        return found

    def _field_problems(self, name: str, value: Any) -> list[FieldProblem]:
        if name == "info":
            if not isinstance(value, str):
                return [FieldProblem(name, "'info' must be a string")]
            if len(value) > MAX_INFO:
                return [FieldProblem(name, f"'info' must be at most {MAX_INFO} characters")]
        elif name == "enabled" and not isinstance(value, bool):
            return [FieldProblem(name, "'enabled' must be true or false")]
        elif name in ("expire", "ttl") and not _non_negative_int(value):
            return [FieldProblem(name, f"'{name}' must be a non-negative integer")]
        elif name == "access":
            return self._access_problems(value)
        elif name == "ips":
            if not isinstance(value, str):
                return [FieldProblem(name, "'ips' must be a string of comma-separated address masks")]
            return self.ips_problems(value)
        elif name == "origins":
            return self.origins_problems(value)
        elif name == "metadata" and (not isinstance(value, dict)
                                     or not all(isinstance(v, str) for v in value.values())):
            return [FieldProblem(name, "'metadata' must be an object of string values")]
        return []

    def _access_problems(self, access: Any) -> list[FieldProblem]:
        if not isinstance(access, dict):
            return [FieldProblem("access", "'access' must be an object with a 'type'")]
        kind = access.get("type")
        if type(kind) is not int or kind not in tuple(TokenType):  # 1.0 == 1 and True == 1: neither is a type
            return [FieldProblem("access.type", "'access.type' must be 0 (standard), 1 (master), 2 (ACL) or 3 (NOAPI)")]
        unknown = sorted(set(access) - {"type", "acl"})
        found = [FieldProblem(f"access.{name}", f"unknown field 'access.{name}'") for name in unknown]
        if kind == TokenType.ACL:
            if "acl" not in access:
                found.append(FieldProblem("access.acl", "an ACL token needs 'access.acl'"))
            else:
                found.extend(self.acl_problems(access["acl"]))
        elif "acl" in access:
            found.append(FieldProblem("access.acl", "'access.acl' is only for ACL tokens (type 2)"))
        return found


def _non_negative_int(value: Any) -> bool:
    return type(value) is int and value >= 0  # `type`, not isinstance: bool is an int subclass


def validity_problems(record: Mapping[str, Any]) -> list[FieldProblem]:
    if not record.get("ttl") and not record.get("expire"):
        return [FieldProblem("ttl", "token must have 'ttl' or 'expire' (or both)")]
    return []


ACCOUNT_WRITABLE = frozenset({"name", "limits", "metadata"})
LIMIT_NAMES = frozenset({"api_calls", "traffic"})


def account_problems(body: Any, *, partial: bool) -> list[FieldProblem]:
    """A subaccount: `name`, optional `limits` ({api_calls, traffic}: per window, 0 = unlimited,
    null = the configured default) and `metadata`."""
    if not isinstance(body, dict):
        return [FieldProblem("", "account must be a JSON object")]
    found = [FieldProblem(name, f"unknown or read-only field '{name}'")
             for name in body if name not in ACCOUNT_WRITABLE]
    name = body.get("name")
    if ("name" in body or not partial) and (not isinstance(name, str) or not name.strip() or len(name) > 255):
        found.append(FieldProblem("name", "'name' must be a non-empty string of at most 255 characters"))
    if "limits" in body:
        limits = body["limits"]
        if not isinstance(limits, dict):
            found.append(FieldProblem("limits", "'limits' must be an object with api_calls and/or traffic"))
        else:
            for key, value in limits.items():
                if key not in LIMIT_NAMES:
                    found.append(FieldProblem(f"limits.{key}", f"unknown limit '{key}'"))
                elif value is not None and not _non_negative_int(value):
                    reason = f"'limits.{key}' must be a non-negative integer or null"
                    found.append(FieldProblem(f"limits.{key}", reason))
    if "metadata" in body and (not isinstance(body["metadata"], dict)
                               or not all(isinstance(v, str) for v in body["metadata"].values())):
        found.append(FieldProblem("metadata", "'metadata' must be an object of string values"))
    return found


CUSTOMER_WRITABLE = frozenset({"name", "metadata"})


def customer_problems(body: Any) -> list[FieldProblem]:
    """A change to the acting account itself (`PUT /platform/customer`): its name and metadata;
    its limits are its parent's to set (`PUT /platform/subaccounts/{id}`)."""
    if not isinstance(body, dict):
        return [FieldProblem("", "account must be a JSON object")]
    found = [FieldProblem(name, f"field '{name}' cannot be changed here" if name == "limits"
                          else f"unknown or read-only field '{name}'")
             for name in body if name not in CUSTOMER_WRITABLE]
    return found + [problem for problem in account_problems({k: v for k, v in body.items() if k in CUSTOMER_WRITABLE},
                                                           partial=True)]


MAX_GRACE = 30 * 86400


def grace_problems(body: Any) -> list[FieldProblem]:
    """The body of a key rotation: `{"grace": seconds}` (optional, 0 to 30 days)."""
    if not isinstance(body, dict):
        return [FieldProblem("", "rotation options must be a JSON object")]
    found = [FieldProblem(name, f"unknown field '{name}'") for name in body if name != "grace"]
    grace = body.get("grace", 0)
    if not _non_negative_int(grace) or grace > MAX_GRACE:
        found.append(FieldProblem("grace", f"'grace' must be a whole number of seconds from 0 to {MAX_GRACE}"))
    return found


# -- request bodies -----------------------------------------------------------------------------

class _Object(dict[str, Any]):
    """A JSON object as the duplicate scan reads it, with the first key it found written twice."""

    repeated: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                found.repeated = key
                break
            seen.add(key)
    return found


def _shape_only(text: str) -> None:
    return None  # the scan reads keys only; no int() of a number's digits (Python caps those at 4300)


Path = tuple[str | int, ...]


def _repeated_at(value: Any, path: Path = ()) -> tuple[Path, str] | None:
    """Where the first object with a repeated key is (keys and list indexes), and that key."""
    if isinstance(value, _Object):
        if value.repeated is not None:
            return path, value.repeated
        children: Any = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for name, child in children:
        found = _repeated_at(child, (*path, name))
        if found is not None:
            return found
    return None


def field_name(path: Path) -> str:
    """`("access", "acl", 0, "uri")` -> `access.acl[0].uri`, as problems name fields."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name


def parse_json(raw: bytes | str, field: str = "") -> Any:
    """A request's JSON (the body, or the query parameter `field`), refused unless it is strict JSON whose
    objects write each key once: a proxy in front that keeps the first of two values would
    otherwise disagree with us (we keep the last) about what was asked for. A top-level list's
    item is named by `index`, as validation names it."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput([FieldProblem(field, f"'{field}' is not valid JSON" if field
                                         else "request body is not valid JSON")]) from None
    if not isinstance(value, (dict, list)):
        return value
    # orjson read it, so it is strict JSON; the standard parser hands over each object's pairs.
    found = _repeated_at(json.loads(raw, object_pairs_hook=_object, parse_int=_shape_only, parse_float=_shape_only))
    if found is None:
        return value
    path, key = found
    index: int | None = None
    if isinstance(value, list) and not field and path:
        index, path = int(path[0]), path[1:]
    name = field_name(((field,) if field else ()) + path + (key,))
    where = f"'{field}'" if field else "the request body"
    raise InvalidInput([FieldProblem(name, f"key '{key}' appears more than once in {where}", index)])
