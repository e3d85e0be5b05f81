"""Decision mode on the fast path: the bytes of "may this request pass?" asked by a proxy in front.

nginx `auth_request`, Caddy `forward_auth`, Traefik ForwardAuth and Envoy `ext_authz` ask the
gateway before they forward a request themselves. The decision is an `Exchange` like any other
(same facts, same `Authenticator`, same refusal reply, log record and usage); what is here is
only what differs on the wire: which request the check is about, and the allowed answer, which
goes back to the proxy instead of to an upstream. The rules themselves are `RequestFlow`'s
(`original_request`, `decision_values`), so aiohttp answers a handed-over check the same way.
"""
from __future__ import annotations

from gateway.auth.checks import RequestFacts
from gateway.proxy.flow import NARROWING, RequestFlow
from gateway.proxy.front import Incoming
from gateway.tokens import Token

NARROWING_BYTES = NARROWING.encode()


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if value is not None else None


def serves(incoming: Incoming) -> bool:
    """Whether the fast path answers this check; aiohttp answers the rest (HEAD, which has no
    body to refuse with, HTTP/1.0's framing, `Expect`, protocol switches)."""
    return (incoming.method != b"HEAD" and incoming.version == "1.1" and not incoming.upgrade
            and b"expect" not in incoming.index)


def original_facts(flow: RequestFlow, incoming: Incoming, client_ip: str, now: float) -> RequestFacts:
    """The facts of the request the check is about (`RequestFlow.original_request`), with the
    original's Origin: a check with one stays on the fast path, a proxied request does not."""
    index = incoming.index
    method, target = flow.original_request(
        incoming.method.decode(), incoming.url.decode("utf-8", "surrogateescape"),
        _text(index.get(b"x-original-uri")), _text(index.get(b"x-original-method")),
        _text(index.get(b"x-forwarded-uri")), _text(index.get(b"x-forwarded-method")))
    return flow.decision_facts(method, target, _text(index.get(b"x-flespi-cid")), _text(index.get(b"origin")),
                               client_ip, now, _text(index.get(NARROWING_BYTES)))


def allowed_bytes(flow: RequestFlow, token: Token, facts: RequestFacts, request_id: bytes, date: bytes,
                  close: bool) -> bytes:
    """The allowed answer: 200, no body, the identity headers for the proxy to copy upstream."""
    return flow.decision_head(token, facts, request_id, date) + (b"Connection: close\r\n\r\n" if close else b"\r\n")
