"""The checks a request passes after its token is found and valid in time.

Each check is a small pure function `(token, facts) -> None` that raises `Denied` (the usage
check also counts the call it lets pass, as its last act, unless the facts are a live MQTT
session's re-check); the pipeline is `Checks`, built by
`build_checks` and run by the authenticator: one native call that makes the others directly (as a
list of functions, compiled, each was called through Python's calling convention, every request).
"""
from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import TOKEN_DISABLED, UNAUTHORIZED_LOCATION, UNAUTHORIZED_ORIGIN, Denied
from gateway.policy.paths import checked_path, forwarded_path
from gateway.store.accounts import AccountDirectory, check_acting_account
from gateway.tokens import Token, TokenType
from gateway.writers.usage import UsageMeter


class RequestFacts:
    """What the checks may know about a request; `forward_path` may be narrowed by the ACL.

    `origin_allowed` is set by the origin check when it passes; it is what lets a reply be shared
    with the requesting page, so a refusal raised before that check is never readable by the page.

    A plain class, not a dataclass: one is made per request, and compiled, a dataclass is still
    initialised through its generated Python `__init__`.
    """

    __slots__ = ("method", "path", "forward_path", "query", "client_ip", "origin", "acting_cid", "now", "token",
                 "origin_allowed", "may_narrow", "mqtt", "recheck")

    def __init__(self, method: str, path: str, forward_path: str, query: str, client_ip: str, origin: str | None,
                 acting_cid: int | None, now: float, token: Token | None = None, origin_allowed: bool = False) -> None:
        self.method = method
        self.path = path
        self.forward_path = forward_path
        self.query = query
        self.client_ip = client_ip
        self.origin = origin
        self.acting_cid = acting_cid
        self.now = now
        self.token = token
        self.origin_allowed = origin_allowed
        # False when what forwards the request cannot send the ACL's narrowed path (a proxy asking
        # for a decision says so): a request the ACL would narrow is then refused instead.
        self.may_narrow = True
        self.mqtt = False  # an MQTT session (gateway.mqtt): no path; what it may do is its topics'
        # A live session checked again (gateway.mqtt sweeps): no call is made, so usage only refuses
        # a blocked token; it counts nothing and never waits for a lease.
        self.recheck = False


    def account_of(self, token: Token) -> int:
        """The account the request acts for: `x-flespi-cid` when given (checked), else the token's."""
        return self.acting_cid if self.acting_cid is not None else token.cid


def request_facts(method: str, raw_path: str, query: str, cid_header: str | None, origin: str | None,
                  client_ip: str, now: float) -> RequestFacts:
    """What the checks see; refuses an ambiguous path or a malformed x-flespi-cid with 400."""
    path = checked_path(raw_path)
    acting_cid = None
    if cid_header is not None:
        cid = cid_header.strip()
        # Thousands of digits would make int() raise (and no account id is that long).
        if not cid.isdigit() or not cid.isascii() or len(cid) > 15:
            raise Denied(400, "invalid x-flespi-cid header: must be an account id")
        acting_cid = int(cid)
    return RequestFacts(method, path, raw_path, query, client_ip, origin, acting_cid, now)


def mqtt_facts(client_ip: str, now: float) -> RequestFacts:
    """What the checks see of an MQTT session: its address and the time (no path, origin or cid)."""
    facts = RequestFacts("MQTT", "/", "/", "", client_ip, None, None, now)
    facts.mqtt = True
    return facts


def check_enabled(token: Token, facts: RequestFacts) -> None:
    if not token.enabled:
        raise Denied(401, TOKEN_DISABLED)


def check_ip(token: Token, facts: RequestFacts) -> None:
    if token.ips is not None and not token.ips.matches(facts.client_ip):
        raise Denied(401, UNAUTHORIZED_LOCATION)


def check_origin(token: Token, facts: RequestFacts) -> None:
    if facts.origin is None:
        return
    if token.origins is not None and not token.origins.matches(facts.origin):
        raise Denied(401, UNAUTHORIZED_ORIGIN)
    facts.origin_allowed = True  # only now may the page at that origin read the reply (CORS)


def describe(facts: RequestFacts) -> str:
    return f"{facts.path.lstrip('/')} ({canonical_method(facts.method)})"


def canonical_method(method: str) -> str:
    return {"HEAD": "GET", "PATCH": "PUT"}.get(method, method)


class TypeCheck:
    """Master may call anything; standard anything but platform paths; NOAPI nothing."""

    def __init__(self, platform_prefixes: Sequence[str], open_paths: frozenset[str]) -> None:
        # Under a platform prefix, or the prefix itself without its slash.
        self.starts = tuple(platform_prefixes)
        self.bare = frozenset(prefix.rstrip("/") for prefix in platform_prefixes)
        self.open_paths = open_paths

    def check(self, token: Token, facts: RequestFacts) -> None:
        kind = token.type
        if kind is TokenType.MASTER:
            return
        if kind is TokenType.NOAPI:
            raise Denied(403, "NOAPI token cannot be used for API requests")
        if facts.mqtt:
            return  # its topics are checked per packet (gateway.policy.mqtt_topics)
        path = facts.path
        if path in self.open_paths:
            return
        if path.startswith(self.starts) or path in self.bare:
            if kind is TokenType.ACL:
                raise Denied(403, f"access to {describe(facts)} is denied by token ACL")
            raise Denied(403, f"access to {describe(facts)} is denied for standard token")
        if kind is TokenType.ACL:
            if token.acl is None:
                raise Denied(403, f"access to {describe(facts)} is denied by token ACL")
            authorized = token.acl.authorize(facts.method, facts.path, token.group_members)
            if authorized != facts.path and not facts.may_narrow:
                raise Denied(403, f"access to {describe(facts)} is narrowed by token ACL, which the proxy cannot send")
            facts.forward_path = forwarded_path(facts.forward_path, facts.path, authorized)


class Checks:
    """The checks of every request, in order: enabled, IP, origin, the acting account (acting as
    account N, x-flespi-cid, needs N to be the token's account or below it), the token's type,
    usage. Without `types`, `directory` and `meter` only the first three run (tests)."""

    def __init__(self, types: TypeCheck | None = None, directory: AccountDirectory | None = None,
                 meter: UsageMeter | None = None) -> None:
        self.types = types
        self.directory = directory
        self.meter = meter

    def run(self, token: Token, facts: RequestFacts) -> None:
        check_enabled(token, facts)
        check_ip(token, facts)
        check_origin(token, facts)
        directory = self.directory
        if directory is not None and facts.acting_cid is not None:
            check_acting_account(directory, token.cid, facts.acting_cid)
        types = self.types
        if types is not None:
            types.check(token, facts)
        meter = self.meter
        if meter is not None:
            if facts.recheck:
                meter.check_blocked(token, facts.now)
            else:
                meter.check(token, facts.now)  # last: it counts the call it lets pass


def build_checks(platform_prefixes: Sequence[str], open_paths: frozenset[str], directory: AccountDirectory,
                 meter: UsageMeter) -> Checks:
    return Checks(TypeCheck(platform_prefixes, open_paths), directory, meter)
