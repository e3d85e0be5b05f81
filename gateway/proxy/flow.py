"""The rules of one request, written once for every front that serves requests.

A front (the fast path's `Exchange`, aiohttp's `Gateway.handle`, and any later one) parses the
request its own way and writes the reply its own way; what a request *is* and what the gateway
adds to it or takes from it is decided here:

    request id -> facts -> [authenticate] -> own path or route -> upstream headers
               -> reply headers dropped -> error reply -> log record and usage count

`RequestFlow` is built once per process (`app.Gateway`). It is compiled with mypyc, so its
attributes have concrete types: calls through `Protocol`, `Callable` or `Any` are slow there
(`is_api` is one, asked only for paths under the gateway's own prefixes).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter  # bound: a module attribute is a lookup per use, compiled
from typing import Final

from multidict import CIMultiDict, MultiMapping

from gateway.auth.authenticator import Authenticator
from gateway.auth.checks import RequestFacts, request_facts
from gateway.config import Route, Settings
from gateway.counters import LATENCY_BOUNDS, Buckets, StatusCounts
from gateway.errors import INTERNAL_ERROR, STORAGE_UNAVAILABLE, Denied, StoreUnavailable, refusal_id
from gateway.policy.clientaddr import TrustedProxies, client_address, forwarded_for
from gateway.policy.paths import AUTH_INFO, INVALID_PATH, PLATFORM, OwnPaths
from gateway.proxy.routing import pick_route
from gateway.tokens import Token
from gateway.writers.logs import LogWriter, RequestIds, request_record
from gateway.writers.usage import UsageMeter

log = logging.getLogger("gateway.proxy.flow")
# Meaningful for one connection only (RFC 9110 7.6.1), in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Answered or re-created by the gateway itself, so never copied from the client.
REQUEST_DROP = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
                          "forwarded"})
# Rails, Laravel, Express and others let these replace the method: a token allowed GET and POST
# could make a DELETE. Dropped, so the upstream acts on the method the checks saw.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# Headers a request may carry once: which value counts would be the reader's choice, and the
# gateway and the upstream could choose differently. The gateway's own, and aiohttp's singletons
# (Content-Length and Transfer-Encoding have rules of their own: llhttp's and `check_transfer_encoding`).
SINGLE_HEADERS = ("host", "x-flespi-cid", "authorization", "content-location", "content-range", "content-type",
                  "etag", "max-forwards", "server", "user-agent")
HTTP_VERSIONS = ("1.1", "1.0")
# RFC 9110 9.2.2: a request that may be sent again, as nginx retries them (when it has no body).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
VERSION_NOT_SUPPORTED = "HTTP version not supported"
METHOD_NOT_ALLOWED = "method not allowed"
TRANSFER_CODING_NOT_SUPPORTED = "transfer coding not supported"
# The gateway alone decides which pages may read a reply (see cors.py); the upstream cannot know.
CORS_PREFIX = "access-control-"
MAX_REQUEST_ID = 128
NO_HEADERS: CIMultiDict[str] = CIMultiDict()
# Decision mode (<internal_prefix>auth): the URI an allowed request may go on with, the ACL's
# narrowing applied; always in an allowed answer, so a proxy can copy it unconditionally.
AUTHORIZED_URI = "X-Authorized-Uri"
NO_ORIGINAL_URI = "no original request URI: send X-Original-URI or X-Forwarded-Uri, or append it to the path"
INVALID_METHOD = "invalid original request method"
CONFLICTING_ORIGINAL = "conflicting original request: its headers name different URIs or methods"
MAX_METHOD = 32
# Sent by a proxy that cannot forward AUTHORIZED_URI (Traefik, Envoy): a request the ACL would
# narrow is refused rather than forwarded whole. Anyone may send it: it only ever refuses more.
NARROWING = "x-gateway-narrowing"
# Client-given values went through the parser as bytes: surrogateescape gives back the same bytes.
UTF8: Final = "utf-8"
SAME_BYTES: Final = "surrogateescape"


class RequestFlow:
    """Per process: the settings and services every request's rules need, and the rules."""

    def __init__(self, settings: Settings, auth: Authenticator, usage: UsageMeter, logs: LogWriter,
                 is_api: Callable[[str], bool], previous: RequestFlow | None = None) -> None:
        proxy = settings.proxy
        self.settings = settings
        self.auth = auth
        self.usage = usage
        self.logs = logs
        self.trusted = TrustedProxies.parse(settings.trusted_proxies)
        self.request_ids = RequestIds()
        self.routes: tuple[Route, ...] = settings.routes
        self.is_api = is_api
        self.internal_prefix = settings.internal_prefix
        # Paths that start with none of these are never the API's nor the gateway's own.
        # Every path under a platform prefix is the API's (404 there if unknown), never proxied.
        self.own_prefixes = (*settings.platform_prefixes, PLATFORM, AUTH_INFO, settings.internal_prefix)
        self.own_paths = OwnPaths(self.own_prefixes)
        # Decision mode's endpoint: "may this request pass?", asked by a proxy in front.
        self.decision_path = settings.internal_prefix + "auth"
        self.realm_challenge = f'FlespiToken realm="{settings.realm}"'
        self.request_id_header = proxy.request_id_header
        self.token_id_header = proxy.token_id_header
        self.account_id_header = proxy.account_id_header
        self.added_names = (proxy.token_id_header, proxy.account_id_header, proxy.request_id_header,
                            "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")
        self.added_template = "".join(f"{name}: %s\r\n" for name in self.added_names).encode()
        # An allowed decision's head up to its framing: the date, then the `decision_values`.
        self.decision_names = (proxy.token_id_header, proxy.account_id_header, proxy.request_id_header, AUTHORIZED_URI)
        self.decision_template = ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nDate: %s\r\n"
                                  + "".join(f"{name}: %s\r\n" for name in self.decision_names)).encode()
        # Lowercased names the upstream never gets from the client: hop-by-hop, re-created, and
        # the identity headers (only the gateway says who made a request).
        drop = set(HOP_BY_HOP | REQUEST_DROP | METHOD_OVERRIDES)
        drop |= {proxy.token_id_header.lower(), proxy.account_id_header.lower(), proxy.request_id_header.lower()}
        if not proxy.forward_authorization:
            drop.add("authorization")  # the key goes no further than the gateway
        self.request_drop = frozenset(drop)
        # From the upstream's reply: hop-by-hop, whatever its Connection names, and CORS_PREFIX.
        self.reply_drop = HOP_BY_HOP
        # Counted for the metrics (gateway/metrics.py reads them at scrape time): replies by front,
        # refusals by kind (`errors.refusal_id`), and the time from a request sent upstream to its
        # reply's head. A reload's new flow carries on with `previous`'s counts.
        self.fast: StatusCounts = previous.fast if previous is not None else StatusCounts()
        self.aiohttp: StatusCounts = previous.aiohttp if previous is not None else StatusCounts()
        self.decision: StatusCounts = previous.decision if previous is not None else StatusCounts()
        self.refusals: dict[str, int] = previous.refusals if previous is not None else {}
        self.upstream_latency: Buckets = (previous.upstream_latency if previous is not None
                                          else Buckets(LATENCY_BOUNDS))

    # -- the request -----------------------------------------------------------------------------

    @staticmethod
    def check_request_line(method: str, target: str, version: str) -> None:
        """Refuse what no upstream route can be: another HTTP version, CONNECT, a target that is
        not a path (`*`, `host:port`, absolute-form)."""
        if version not in HTTP_VERSIONS:
            raise Denied(505, VERSION_NOT_SUPPORTED)
        if method == "CONNECT":
            raise Denied(405, METHOD_NOT_ALLOWED)
        if not target.startswith("/"):
            raise Denied(400, INVALID_PATH)

    @staticmethod
    def check_transfer_encoding(values: list[str]) -> None:
        """Only a lone `chunked` is understood (RFC 9112 6.1: 501 for the others): forwarding
        `gzip, chunked` as chunked would silently drop the gzip."""
        if len(values) != 1 or values[0].strip().lower() != "chunked":
            raise Denied(501, TRANSFER_CODING_NOT_SUPPORTED)

    @staticmethod
    def repeated_header(name: str) -> Denied:
        return Denied(400, f"repeated {name} header")

    @staticmethod
    def folded(lower: str) -> str:
        """The name a WSGI/CGI upstream files a header under (`X_Token_Id` is `X-Token-Id` there)."""
        return lower.replace("_", "-")

    def is_trusted_peer(self, address: str | None) -> bool:
        return address is not None and self.trusted.is_trusted(address)

    def request_id(self, incoming: str | None, trusted: bool) -> str:
        """A trusted proxy's request id is kept; otherwise a new one, unique across processes."""
        if incoming and trusted and len(incoming) <= MAX_REQUEST_ID and incoming.isprintable():
            return incoming
        return self.request_ids.next()

    def client_address(self, peer: str, headers: MultiMapping[str]) -> str:
        return client_address(peer, headers, self.trusted)

    def facts(self, method: str, target: str, cid: str | None, origin: str | None, client_ip: str,
              now: float) -> RequestFacts:
        """What the checks see; refuses an ambiguous path or a malformed x-flespi-cid with 400."""
        raw_path, _, query = target.partition("?")
        facts = request_facts(method, raw_path, query, cid, origin, client_ip, now)
        if self.own_paths.lookalike(facts.path):
            raise Denied(400, INVALID_PATH)  # only a lenient upstream would read it as the gateway's own
        return facts

    def unchecked_facts(self, method: str, target: str, client_ip: str, now: float) -> RequestFacts:
        """For the log record of a request refused before its facts could be made (an ambiguous
        path, a malformed x-flespi-cid): the path as it came."""
        raw_path = target.partition("?")[0]
        return RequestFacts(method, raw_path, raw_path, "", client_ip, None, None, now)

    def is_internal(self, path: str) -> bool:
        """Under the gateway's own prefix: answered by the gateway (404 when unknown), never proxied."""
        return path.startswith(self.internal_prefix)

    def is_own(self, path: str) -> bool:
        """Whether the gateway answers this path itself (the API, /auth/info, its own pages)."""
        return ((path.startswith(self.own_prefixes) or path in self.own_paths.exact)
                and (self.is_api(path) or path.startswith(self.internal_prefix)))

    def route(self, path: str) -> Route:
        route = pick_route(self.routes, path)
        if route is None:
            raise Denied(404, f"no upstream for {path}")
        return route

    def added_values(self, token: Token, facts: RequestFacts, request_id: str, peer: str, trusted: bool,
                     headers: MultiMapping[str], scheme: str, host: str) -> tuple[str, str, str, str, str, str]:
        """What the gateway adds to a forwarded request, in the order of `added_names`: who made it
        (these names are never taken from the client), and where it came from. `headers` are the
        client's; they are read only when the peer is a trusted proxy (so a front may pass none
        otherwise)."""
        if trusted:
            chain = forwarded_for(peer, headers, self.trusted)
            proto = headers.get("X-Forwarded-Proto") or scheme
            forwarded_host = headers.get("X-Forwarded-Host") or host
        else:
            chain, proto, forwarded_host = facts.client_ip, scheme, host  # the peer, as `forwarded_for` says
        return (str(token.id), str(facts.account_of(token)), request_id, chain, proto, forwarded_host)

    def upstream_headers(self, token: Token, facts: RequestFacts, request_id: str, peer: str, trusted: bool,
                         headers: MultiMapping[str], scheme: str, host: str) -> list[tuple[str, str]]:
        """`added_values` as (name, value) pairs (aiohttp's relay)."""
        values = self.added_values(token, facts, request_id, peer, trusted, headers, scheme, host)
        return list(zip(self.added_names, values, strict=True))

    def upstream_header_lines(self, token: Token, facts: RequestFacts, request_id: str, peer: str, trusted: bool,
                              headers: MultiMapping[str], scheme: str, host: str) -> bytes:
        """`added_values` as header lines of a request head (the fast path): one formatting of a
        template made once, instead of six encoded pairs a request."""
        token_id, account_id, rid, chain, proto, forwarded_host = self.added_values(
            token, facts, request_id, peer, trusted, headers, scheme, host)
        if trusted:  # the request id and the forwarding values may be the proxy's words
            return self.added_template % (token_id.encode(), account_id.encode(), rid.encode(UTF8, SAME_BYTES),
                                          chain.encode(UTF8, SAME_BYTES), proto.encode(UTF8, SAME_BYTES),
                                          forwarded_host.encode(UTF8, SAME_BYTES))
        # Else only Host is the client's: the rest is ours (ids, the peer's address, the scheme).
        return self.added_template % (token_id.encode(), account_id.encode(), rid.encode(), chain.encode(),
                                      proto.encode(), forwarded_host.encode(UTF8, SAME_BYTES))

    # -- decision mode ---------------------------------------------------------------------------

    def is_decision(self, target: str) -> bool:
        """Whether a request target (path and query, as received) asks the decision endpoint."""
        endpoint = self.decision_path
        if not target.startswith(endpoint):
            return False
        return len(target) == len(endpoint) or target[len(endpoint)] in "/?"

    def original_request(self, method: str, target: str, original_uri: str | None, original_method: str | None,
                         forwarded_uri: str | None, forwarded_method: str | None) -> tuple[str, str]:
        """The method and target of the request a decision is asked about, from X-Original-URI and
        X-Original-Method (nginx), X-Forwarded-Uri and X-Forwarded-Method (Caddy, Traefik), or the
        path after the endpoint with the check's own method (Envoy).

        A proxy sets its own names and passes the client's other headers on, so a client could
        claim another request in the names its proxy does not set: every source present must name
        the same request, or it is refused. The check's own query string with no path after the
        endpoint is no source (Caddy 2.6 keeps the original's there)."""
        tail = target[len(self.decision_path):]
        envoy = tail.startswith("/")
        uris = [uri for uri in (original_uri, forwarded_uri, tail if envoy else None) if uri]
        methods = [named for named in (original_method, forwarded_method, method if envoy else None) if named]
        if not uris:
            raise Denied(400, NO_ORIGINAL_URI)
        uri = uris[0]
        chosen = methods[0] if methods else method
        if any(other != uri for other in uris) or any(other != chosen for other in methods):
            raise Denied(400, CONFLICTING_ORIGINAL)
        # Printable ASCII only: the URI goes back in a header (AUTHORIZED_URI) and into the log.
        if not uri.isascii() or not uri.isprintable() or " " in uri:
            raise Denied(400, INVALID_PATH)
        if len(chosen) > MAX_METHOD or not chosen.isascii() or not chosen.replace("-", "").isalpha():
            raise Denied(400, INVALID_METHOD)
        return chosen, uri

    def decision_facts(self, method: str, target: str, cid: str | None, origin: str | None, client_ip: str,
                       now: float, narrowing: str | None) -> RequestFacts:
        """A decision's facts: those of its original request, and whether it may be narrowed."""
        facts = self.facts(method, target, cid, origin, client_ip, now)
        facts.may_narrow = narrowing is None or narrowing.strip().lower() != "refuse"
        return facts

    def decision_values(self, token: Token, facts: RequestFacts, request_id: str) -> tuple[str, str, str, str]:
        """What an allowed decision answers, in the order of `decision_names`: who made the request,
        and the URI it may go on with (its `all` selector narrowed by the ACL, as a proxied
        request's would be)."""
        # The identity values exactly as a forwarded request gets them (the rest needs no peer).
        token_id, account_id, rid, *_ = self.added_values(token, facts, request_id, "", False, NO_HEADERS, "", "")
        uri = facts.forward_path + "?" + facts.query if facts.query else facts.forward_path
        return token_id, account_id, rid, uri

    def decision_headers(self, token: Token, facts: RequestFacts, request_id: str) -> list[tuple[str, str]]:
        """`decision_values` as (name, value) pairs (aiohttp's answer)."""
        return list(zip(self.decision_names, self.decision_values(token, facts, request_id), strict=True))

    def decision_head(self, token: Token, facts: RequestFacts, request_id: bytes, date: bytes) -> bytes:
        """`decision_values` in the fast path's reply head, without its last line: one formatting
        of a template made once (the names and framing are ours; the URI is printable ASCII,
        `original_request` refused anything else)."""
        uri = facts.forward_path + "?" + facts.query if facts.query else facts.forward_path
        return self.decision_template % (date, str(token.id).encode(), str(facts.account_of(token)).encode(),
                                         request_id, uri.encode())

    # -- refusals --------------------------------------------------------------------------------

    def refusal(self, error: Exception) -> Denied:
        """The error reply for what stopped a request: a `Denied` as it is, a store failure 503,
        anything else 500 (logged): an error never lets a request through."""
        if isinstance(error, Denied):
            return error
        if isinstance(error, StoreUnavailable):
            return Denied(503, STORAGE_UNAVAILABLE)
        log.error("unexpected error while authenticating; request denied", exc_info=error)
        return Denied(500, INTERNAL_ERROR)

    def error_headers(self, status: int, extra: dict[str, str]) -> list[tuple[str, str]]:
        """The headers of a gateway error reply besides its framing: every 401 carries the
        FlespiToken challenge, then the refusal's own headers."""
        headers = [("WWW-Authenticate", self.realm_challenge)] if status == 401 else []
        headers.extend(extra.items())
        return headers

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, front: StatusCounts, facts: RequestFacts | None, token: Token | None, served: Token | None,
               app: str, status: int, started: float, size: int, traffic: int, request_id: str,
               reason: str | None) -> None:
        """The end of every request a front served: counted by `front`; the usage count of one
        that was served (`served`: `traffic` bytes both ways); the log record of one whose token
        was found (`token`, refused or not) or that was refused (`reason`, the refusal's text:
        then also counted by kind). `size`: the reply body's bytes as sent."""
        front.count(status)
        kind = ""
        if reason is not None:
            kind = refusal_id(status, reason)
            self.refusals[kind] = self.refusals.get(kind, 0) + 1
        if facts is None or (token is None and reason is None):
            return
        if served is not None:
            self.usage.record(served, served.cid, traffic, facts.now)
        record = request_record(facts.now, token.id if token is not None else None,
                                token.cid if token is not None else None, facts.client_ip, app, facts.method,
                                facts.path, status, perf_counter() - started, size, request_id)
        if reason is not None:
            record["reason"] = reason
            record["refusal"] = kind
        self.logs.emit(record)
