"""Error types of the gateway and the flespi-style JSON body they become (`proxy/replies.py`
renders it as a reply, for aiohttp or as bytes)."""
from __future__ import annotations

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
UPSTREAM_UNAVAILABLE = "upstream unavailable"
UPSTREAM_TIMEOUT = "upstream timeout"
INTERNAL_ERROR = "internal gateway error"


def error_body(status: int, reason: str, **extra: object) -> bytes:
    body: bytes = orjson.dumps({"errors": [{"code": status, "reason": reason, **extra}]})
    return body
