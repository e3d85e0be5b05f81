"""Blocking HTTP to the servers the bench started (loopback only, never through a proxy)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from . import MASTER_KEY

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, key: str | None = None, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if key:
        request.add_header("Authorization", f"FlespiToken {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def create_token(gateway_url: str, master_key: str = MASTER_KEY, ttl: int = 3600) -> dict[str, Any]:
    """A standard token, made through the tokens API (as a user would)."""
    status, body = http("POST", gateway_url + "/platform/tokens", master_key, [{"ttl": ttl, "info": "bench"}])
    if status != 200:
        raise RuntimeError(f"token creation failed: {status} {body[:200]!r}")
    return json.loads(body)["result"][0]  # type: ignore[no-any-return]


def health(gateway_url: str) -> dict[str, Any] | None:
    """`result[0]` of the gateway's health reply (of the worker that answered), None if not 200."""
    status, body = http("GET", gateway_url + "/_gateway/health", timeout=2)
    return json.loads(body)["result"][0] if status == 200 else None


def fast_path_kind(gateway_url: str) -> str:
    facts = health(gateway_url)
    return str(facts.get("fast_path", "?")) if facts is not None else "?"


def cached_tokens(gateway_url: str) -> int:
    facts = health(gateway_url)
    return int(facts["tokens_cached"]) if facts is not None else -1
