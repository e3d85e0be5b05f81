"""Error types of the gateway and the flespi-style JSON body they become (`proxy/replies.py`
renders it as a reply, for aiohttp or as bytes)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class Denied(GatewayError):
    """A request is refused: `status` and `reason` become the JSON error body as they are."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class Undecided(GatewayError):
    """A check that cannot decide without waiting (an account's calls near its usage limit, this
    instance's lease used up): `settled()` returns once asking again may decide; a request that is
    still undecided after waiting gets `refusal`, never the call."""

    def __init__(self, settled: Callable[[], Awaitable[None]], refusal: Denied) -> None:
        super().__init__(refusal.status, refusal.reason)
        self.settled = settled
        self.refusal = refusal


class StoreUnavailable(GatewayError, ConnectionError):
    """The token store could not be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One invalid field in an API request body; several are reported together."""

    field: str
    reason: str
    index: int | None = None

    def as_json(self) -> dict[str, object]:
        error: dict[str, object] = {"code": 400, "reason": self.reason, "field": self.field}
        if self.index is not None:
            error["index"] = self.index
        return error


class InvalidInput(GatewayError):
    """An API request body failed validation; carries every problem found."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__(problems)
        self.problems = problems


INVALID_TOKEN = "invalid or expired access token"
TOKEN_DISABLED = "token is disabled"
UNAUTHORIZED_LOCATION = "using token from unauthorized location"
UNAUTHORIZED_ORIGIN = "using token from unauthorized origin"
STORAGE_UNAVAILABLE = "token storage unavailable"
# The change is made on the master and every instance was told, but no replica confirmed it in
# time (redis.wait_replicas, redis.wait_timeout): a failover now could undo it.
NOT_REPLICATED = ("token storage unavailable: the change was made but not confirmed by a replica, "
                  "so a failover may undo it")
# `gateway migrate` is copying this store (its `migrating` marker is set): an API change now could
# be missed by the copy, so none is made; authentications go on.
MIGRATING = "token storage is being migrated: changes are refused until the migration ends"
UPSTREAM_UNAVAILABLE = "upstream unavailable"
UPSTREAM_TIMEOUT = "upstream timeout"
INTERNAL_ERROR = "internal gateway error"
MALFORMED_REQUEST = "malformed HTTP request"


def error_body(status: int, reason: str, **extra: object) -> bytes:
    body: bytes = orjson.dumps({"errors": [{"code": status, "reason": reason, **extra}]})
    return body


# Refusals by kind, for the metrics: a bounded set of ids, never the reason's text (which may name
# a path or an account). Exact reasons first, then the families whose text varies, then the status.
REFUSAL_IDS = {
    INVALID_TOKEN: "invalid_token",
    TOKEN_DISABLED: "token_disabled",
    UNAUTHORIZED_LOCATION: "unauthorized_location",
    UNAUTHORIZED_ORIGIN: "unauthorized_origin",
    STORAGE_UNAVAILABLE: "storage_unavailable",
    MIGRATING: "migrating",
    UPSTREAM_UNAVAILABLE: "upstream_unavailable",
    UPSTREAM_TIMEOUT: "upstream_timeout",
    INTERNAL_ERROR: "internal_error",
    "invalid request path": "invalid_path",
    "invalid x-flespi-cid header: must be an account id": "invalid_cid",
    "NOAPI token cannot be used for API requests": "token_type",
    "request URI too long": "uri_too_long",
    "request header too large": "header_too_large",
    "request body too large": "body_too_large",
    "request header timeout": "header_timeout",
    "too many connections": "too_many_connections",
    "malformed HTTP request": "malformed_request",
}
REFUSAL_FAMILIES = (
    ("token is blocked", "usage_blocked"),
    ("its account's usage limit is nearly reached", "usage_share"),
    ("no upstream for ", "no_route"),
    ("unknown path ", "unknown_path"),
    ("request body larger than ", "body_too_large"),
)
REFUSAL_BY_STATUS = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                     405: "method_not_allowed", 413: "body_too_large", 429: "usage_blocked"}


def refusal_id(status: int, reason: str) -> str:
    """The kind of a refusal (`Denied`'s status and reason) as a short, stable id."""
    known = REFUSAL_IDS.get(reason)
    if known is not None:
        return known
    for start, kind in REFUSAL_FAMILIES:
        if reason.startswith(start):
            return kind
    if status == 403 and reason.startswith("access to "):
        if reason.endswith("by token ACL"):
            return "acl"
        if reason.endswith(("for standard token", "master token required")):
            return "token_type"
        return "forbidden"
    return REFUSAL_BY_STATUS.get(status, "client_error" if status < 500 else "server_error")
