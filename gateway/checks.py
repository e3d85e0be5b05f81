"""The checks a request passes after its token is found and valid in time.

Each check is a small pure function `(token, facts) -> None` that raises `Denied`; the pipeline
is the ordered list built by `build_checks`, run in one loop by the authenticator.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import TOKEN_DISABLED, UNAUTHORIZED_LOCATION, UNAUTHORIZED_ORIGIN, Denied
from .tokens import Token, TokenType


@dataclass(slots=True)
class RequestFacts:
    """What the checks may know about a request; `forward_path` may be narrowed by the ACL."""

    method: str
    path: str
    forward_path: str
    query: str
    client_ip: str
    origin: str | None
    acting_cid: int | None
    now: float
    token: Token | None = None


Check = Callable[[Token, RequestFacts], None]


def check_enabled(token: Token, facts: RequestFacts) -> None:
    if not token.enabled:
        raise Denied(401, TOKEN_DISABLED)


def check_ip(token: Token, facts: RequestFacts) -> None:
    if token.ips is not None and not token.ips.matches(facts.client_ip):
        raise Denied(401, UNAUTHORIZED_LOCATION)


def check_origin(token: Token, facts: RequestFacts) -> None:
    if facts.origin is not None and token.origins is not None and not token.origins.matches(facts.origin):
        raise Denied(401, UNAUTHORIZED_ORIGIN)


def describe(facts: RequestFacts) -> str:
    return f"{facts.path.lstrip('/')} ({canonical_method(facts.method)})"


def canonical_method(method: str) -> str:
    return {"HEAD": "GET", "PATCH": "PUT"}.get(method, method)


def type_check(platform_prefixes: Sequence[str], open_paths: frozenset[str]) -> Check:
    """Master may call anything; standard anything but platform paths; NOAPI nothing."""
    prefixes = tuple(platform_prefixes) + tuple(prefix.rstrip("/") for prefix in platform_prefixes)

    def is_platform(path: str) -> bool:
        return path.startswith(prefixes[: len(platform_prefixes)]) or path in prefixes[len(platform_prefixes):]

    def check_type(token: Token, facts: RequestFacts) -> None:
        kind = token.type
        if kind is TokenType.MASTER:
            return
        if kind is TokenType.NOAPI:
            raise Denied(403, "NOAPI token cannot be used for API requests")
        if facts.path in open_paths:
            return
        if is_platform(facts.path):
            if kind is TokenType.ACL:
                raise Denied(403, f"access to {describe(facts)} is denied by token ACL")
            raise Denied(403, f"access to {describe(facts)} is denied for standard token")
        if kind is TokenType.ACL:
            if token.acl is None:
                raise Denied(403, f"access to {describe(facts)} is denied by token ACL")
            facts.forward_path = token.acl.authorize(facts.method, facts.path, token.group_members)

    return check_type


def check_account(token: Token, facts: RequestFacts) -> None:
    """Acting as another account (x-flespi-cid) is allowed only for the token's own account."""
    if facts.acting_cid is not None and facts.acting_cid != token.cid:
        raise Denied(403, f"access to account {facts.acting_cid} is denied for this token")


def build_checks(platform_prefixes: Sequence[str], open_paths: frozenset[str]) -> list[Check]:
    return [check_enabled, check_ip, check_origin, check_account, type_check(platform_prefixes, open_paths)]
