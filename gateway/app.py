"""`create_app(settings)`: the one request flow and the services it is built from.

config -> app -> extract token -> load record (cache, then store) -> time -> checks (enabled, IP,
origin, account, type/ACL, usage) -> platform API or proxy -> usage counters and log line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.aio import cancel_all
from gateway.api.platform import PlatformApi
from gateway.api.validation import TokenValidator
from gateway.auth.authenticator import Authenticator, extract_key
from gateway.auth.checks import RequestFacts, build_checks
from gateway.auth.compiler import TokenCompiler
from gateway.build import fast_path_compiled
from gateway.config import ConfigError, Settings
from gateway.errors import (
    INTERNAL_ERROR,
    MALFORMED_REQUEST,
    MIGRATING,
    Denied,
    FieldProblem,
    InvalidInput,
    StoreUnavailable,
    error_body,
)
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics, Sources
from gateway.mqtt.front import MqttFront
from gateway.mqtt.websocket import serve as serve_mqtt_websocket
from gateway.panel import install as install_panel
from gateway.policy.acl import acl_problems
from gateway.policy.clientaddr import TrustedProxies
from gateway.policy.ipmask import ip_mask_problems
from gateway.policy.origins import origin_problems
from gateway.policy.paths import AUTH_INFO
from gateway.proxy.cors import CorsPolicy
from gateway.proxy.flow import NARROWING, SINGLE_HEADERS, RequestFlow
from gateway.proxy.relay import Proxy, UpstreamConnector, body_size
from gateway.proxy.replies import error_response, invalid_input_response
from gateway.proxy.routing import upstream_url
from gateway.store.accounts import CHANGED_MESSAGE, AccountDirectory, AccountStore
from gateway.store.cache import TokenCache
from gateway.store.clients import SENTINEL_POLL, Clients, open_clients
from gateway.store.health import StoreMonitor
from gateway.store.sharded import open_token_store
from gateway.store.tokens import TokenStore
from gateway.tokens import Token, key_digest, new_key
from gateway.writers.accessed import AccessedWriter
from gateway.writers.housekeeping import Housekeeper
from gateway.writers.logs import FileSink, LogWriter
from gateway.writers.tokenlogs import RedisLogSink
from gateway.writers.usage import UsageMeter

if TYPE_CHECKING:
    from gateway.store.embedded import EmbeddedStore

log = logging.getLogger("gateway")


@dataclass(slots=True)
class Services:
    """Everything one process holds; built and torn down in `services()`."""

    store: TokenStore
    accounts: AccountStore
    directory: AccountDirectory
    cache: TokenCache
    accessed: AccessedWriter
    usage: UsageMeter
    logs: LogWriter
    token_logs: RedisLogSink | None
    housekeeper: Housekeeper
    session: aiohttp.ClientSession
    compiler: TokenCompiler
    upstream_tls: ssl.SSLContext  # the one context both proxy paths use for https upstreams
    request_log: FileSink | None  # `log.path`'s sink (None: off), among `logs`'s sinks
    monitor: StoreMonitor


@dataclass(frozen=True, slots=True)
class Internal:
    """One of the gateway's own endpoints, at `<internal_prefix><path>`."""

    path: str
    handler: Callable[[Gateway, web.Request], Coroutine[Any, Any, web.StreamResponse]]
    guarded: bool  # answered only to clients in `internal.allow`; the others get 403


ALLOW_LIST_REFUSAL = "not served to this address (internal.allow)"


class Gateway:
    """The aiohttp front: runs the requests aiohttp serves through the process's `RequestFlow`."""

    def __init__(self, settings: Settings, services: Services, cors: CorsPolicy, shared: str | None = None) -> None:
        self.settings = settings
        self.cors = cors
        self.services = services
        self.store = services.store
        self.cache = services.cache
        self.accessed = services.accessed
        self.usage = services.usage
        self.logs = services.logs
        checks = build_checks(settings.platform_prefixes, frozenset({AUTH_INFO}), services.directory, services.usage)
        self.auth = Authenticator(services.cache, services.accessed, checks)
        self.session_proxy = settings.proxy  # what the aiohttp relay's session was opened with
        self.open_connections: Callable[[], int] = lambda: 0  # the listener's count, once it runs
        self.mqtt: MqttFront | None = None  # the MQTT front's shared state, when configured
        self.monitor = services.monitor
        self._build(settings, None)
        self.metrics = Metrics(Sources(flow=self.flow, cache=services.cache, store=services.store,
                                       monitor=services.monitor, logs=services.logs, token_logs=services.token_logs,
                                       usage=services.usage, connections=lambda: self.open_connections(),
                                       mqtt=lambda: self.mqtt), shared)

    def _build(self, settings: Settings, previous: RequestFlow | None) -> None:
        """The parts a reload replaces: the API (its validator knows the origin presets and ACL
        patterns), the flow (routes, trusted proxies, headers, realm; it keeps `previous`'s
        counters, which the metrics read), the relay and the internal allow list."""
        services = self.services
        api = PlatformApi(services.store, services.accounts, services.directory, token_validator(settings),
                          services.logs, services.token_logs, settings.platform_prefixes)
        api.body_limit = settings.limits.api_body_size
        # The rules every front applies (the fast path gets this same object).
        flow = RequestFlow(settings, self.auth, services.usage, services.logs, api.handles, previous)
        options: dict[str, Any] = {}
        if settings.proxy != self.session_proxy:
            proxy = settings.proxy
            options = {"ssl": services.upstream_tls, "timeout": aiohttp.ClientTimeout(
                total=None, connect=proxy.pool_timeout + proxy.connect_timeout, sock_connect=proxy.connect_timeout,
                sock_read=proxy.read_timeout)}
        self.settings, self.api, self.flow = settings, api, flow
        self.proxy = Proxy(settings.proxy, services.session, flow.request_drop, flow.upstream_latency, options)
        # Matched like trusted proxies are: addresses and networks, IPv4-mapped peers as IPv4.
        self.internal_allow = TrustedProxies.parse(settings.internal.allow)

    def reconfigure(self, settings: Settings) -> None:
        """A reload (`config.reload_plan` kept what only a restart can change): what can fail
        (opening a new log file, a CA file) is done first, so a failure leaves everything as it
        was; then each part is swapped for requests that start from now on. Raises OSError or
        ConfigError."""
        services, running = self.services, self.settings
        upstream_tls = services.upstream_tls
        if settings.proxy != running.proxy:
            try:
                upstream_tls = settings.proxy.ssl_context()
            except (OSError, ssl.SSLError) as exc:  # changed since the file was checked
                raise ConfigError("proxy.ca_file", f"cannot be loaded ({exc})") from exc
        request_log = services.request_log
        if settings.log.path != running.log.path:
            try:
                request_log = None if settings.log.path == "off" else FileSink(settings.log.path)
            except OSError as exc:
                raise ConfigError("log.path", f"cannot open {settings.log.path!r} ({exc.strerror})") from exc
        compiler = None
        if (settings.origin_presets, settings.acl) != (running.origin_presets, running.acl):
            compiler = TokenCompiler(settings, services.store)
            services.compiler = compiler
        services.cache.configure(settings.cache, compiler)
        if request_log is not services.request_log:
            services.logs.replace_sink(services.request_log, request_log)
            if services.request_log is not None:
                services.request_log.close()
            services.request_log = request_log
        services.logs.configure(settings.log)
        services.upstream_tls = upstream_tls
        self.cors.configure(settings.cors)
        self._build(settings, self.flow)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        flow = self.flow  # one request, one flow: a reload meanwhile applies to the next
        started, now = time.perf_counter(), time.time()
        trusted = flow.is_trusted_peer(request.remote)
        request_id = flow.request_id(request.headers.get(flow.request_id_header), trusted)
        facts: RequestFacts | None = None
        served: Token | None = None
        reason: str | None = None
        try:
            headers = request.headers
            version = request.version
            flow.check_request_line(request.method, request.raw_path, f"{version.major}.{version.minor}")
            for name in SINGLE_HEADERS:
                if len(headers.getall(name, ())) > 1:
                    raise flow.repeated_header(name)
            if "Transfer-Encoding" in headers:
                flow.check_transfer_encoding(headers.getall("Transfer-Encoding"))
            if self.cors.is_preflight(request):
                response = await self.cors.preflight(request)  # no token: never authorized, never forwarded
            else:
                facts = flow.facts(request.method, request.raw_path, headers.get("x-flespi-cid"), headers.get("Origin"),
                                   flow.client_address(request.remote or "", headers), now)
                if flow.is_internal(facts.path):  # the known ones have routes of their own (`internal_endpoints`)
                    raise Denied(404, f"unknown path {facts.path}")
                served = await flow.auth.authenticate(extract_key(headers.get("Authorization")), facts)
                await _continue(request)
                response = await self._dispatch(flow, request, served, facts, request_id, trusted)
        except (Denied, StoreUnavailable) as error:
            denied = flow.refusal(error)
            reason = denied.reason
            response = error_response(flow, denied.status, denied.reason, denied.headers)
        except InvalidInput as invalid:
            reason = "invalid " + ", ".join(dict.fromkeys(problem.field for problem in invalid.problems))
            response = invalid_input_response(invalid.problems)
        except Exception as error:  # whatever else went wrong is the gateway's fault, in flespi's shape
            denied = flow.refusal(error)
            reason = denied.reason
            response = error_response(flow, denied.status, denied.reason, denied.headers)
        if facts is None and reason is not None:  # refused before its facts were made: the path as it came
            facts = flow.unchecked_facts(request.method, request.raw_path,
                                         flow.client_address(request.remote or "", request.headers), now)
        if not response.prepared:  # a proxied reply got these from the proxy, before its first byte
            self._finish(response, request, facts, request_id)
            if reason is not None and not request.content.is_eof():
                response.force_close()  # as on the fast path: a refused body still coming ends the connection
        size = body_size(request, response)
        flow.finish(flow.aiohttp, facts, facts.token if facts is not None else None, served,
                    request.headers.get("x-flespi-app", ""), response.status, started, size,
                    request.content.total_bytes + size, request_id, reason)
        return response

    def _finish(self, response: web.StreamResponse, request: web.Request, facts: RequestFacts | None,
                request_id: str) -> None:
        """The gateway's own headers on every reply (API, error or proxied), set before it starts."""
        response.headers[self.flow.request_id_header] = request_id
        origin_allowed = facts is not None and facts.origin_allowed
        self.cors.share(response.headers, request.headers.get("Origin"), origin_allowed)

    async def _dispatch(self, flow: RequestFlow, request: web.Request, token: Token, facts: RequestFacts,
                        request_id: str, trusted: bool) -> web.StreamResponse:
        if flow.is_api(facts.path):
            return await self.api.dispatch(request, token, facts.path, facts.account_of(token))
        route = flow.route(facts.path)
        url = upstream_url(route, facts.path, facts.forward_path, facts.query)
        extra = flow.upstream_headers(token, facts, request_id, request.remote or "", trusted, request.headers,
                                      request.scheme, request.host)
        return await self.proxy.forward(request, url, self.proxy.request_headers(request.headers, extra),
                                        partial(self._finish, request=request, facts=facts, request_id=request_id))

    async def decide(self, request: web.Request) -> web.StreamResponse:
        """Decision mode, for a check the fast path hands over (HEAD, HTTP/1.0, `Expect`): the
        same answer as `proxy.decision` writes, made by the same flow and authenticator."""
        flow = self.flow
        started, now = time.perf_counter(), time.time()
        headers = request.headers
        trusted = flow.is_trusted_peer(request.remote)
        request_id = flow.request_id(headers.get(flow.request_id_header), trusted)
        facts: RequestFacts | None = None
        served: Token | None = None
        response: web.Response
        reason: str | None = None
        try:
            method, target = flow.original_request(
                request.method, request.raw_path, headers.get("X-Original-URI"), headers.get("X-Original-Method"),
                headers.get("X-Forwarded-Uri"), headers.get("X-Forwarded-Method"))
            facts = flow.decision_facts(method, target, headers.get("x-flespi-cid"), headers.get("Origin"),
                                        flow.client_address(request.remote or "", headers), now,
                                        headers.get(NARROWING))
            served = await flow.auth.authenticate(extract_key(headers.get("Authorization")), facts)
            response = web.Response(status=200, headers=flow.decision_headers(served, facts, request_id))
        except (Denied, StoreUnavailable) as error:
            denied = flow.refusal(error)
            reason = denied.reason
            response = error_response(flow, denied.status, denied.reason, denied.headers)
            response.headers[flow.request_id_header] = request_id
        if facts is None:  # refused before its facts were made: the check's own path
            facts = flow.unchecked_facts(request.method, request.raw_path,
                                         flow.client_address(request.remote or "", headers), now)
        flow.finish(flow.decision, facts, facts.token, served, headers.get("x-flespi-app", ""), response.status,
                    started, body_size(request, response), 0, request_id, reason)
        return response

    # -- the gateway's own endpoints (`internal_endpoints`) ----------------------------------------

    def allows_internal(self, request: web.Request) -> bool:
        """Whether the client (its address as the token checks see it) is in `internal.allow`."""
        address = self.flow.client_address(request.remote or "", request.headers)
        return self.internal_allow.is_trusted(address)

    def refuse_internal(self, request: web.Request) -> web.Response:
        """403 for a client outside `internal.allow`, in the request log like any refusal."""
        flow, started, now = self.flow, time.perf_counter(), time.time()
        client = flow.client_address(request.remote or "", request.headers)
        reason = f"{request.path} is {ALLOW_LIST_REFUSAL}"
        response = error_response(flow, 403, reason)
        request_id = flow.request_id(None, False)
        response.headers[flow.request_id_header] = request_id
        facts = flow.unchecked_facts(request.method, request.raw_path, client, now)
        flow.finish(flow.aiohttp, facts, None, None, "", 403, started, body_size(request, response), 0, request_id,
                    reason)
        return response

    def refuse_unserved(self, request: web.Request, status: int, reason: str, parsed: bool) -> web.Response:
        """An error aiohttp answers outside `handle` (a request its parser refused, a handler's
        failure), as `handle`'s refusals are: a request id, a log record with its reason, a count.
        `parsed`: whether `request` is the request that was sent (its method and path are logged)."""
        flow, started, now = self.flow, time.perf_counter(), time.time()
        response = error_response(flow, status, reason)
        request_id = flow.request_id(None, False)
        response.headers[flow.request_id_header] = request_id
        client = flow.client_address(request.remote or "", request.headers)
        facts = (flow.unchecked_facts(request.method, request.raw_path, client, now) if parsed
                 else flow.unchecked_facts("", "", client, now))
        flow.finish(flow.aiohttp, facts, None, None, "", status, started, body_size(request, response), 0, request_id,
                    reason)
        return response

    async def health(self, request: web.Request) -> web.StreamResponse:
        """Liveness: the process answers (and what it holds)."""
        return web.json_response({"result": [{"status": "ok", "pid": os.getpid(), "tokens_cached": len(self.cache),
                                             "invalidation": self.monitor.invalidation_live(),
                                             "store": "up" if self.monitor.available else "down",
                                             "connections": self.open_connections(), "tasks": len(asyncio.all_tasks()),
                                             "fast_path": "compiled" if fast_path_compiled() else "interpreted"}]})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """Readiness: 200 only while the store answers and invalidation is live (`store/health.py`)."""
        reason = self.monitor.not_ready()
        if reason is not None:
            return web.Response(status=503, body=error_body(503, reason), content_type="application/json")
        return web.json_response({"result": [{"status": "ready"}]})

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=OPENAPI, content_type="application/json")


# The gateway's own endpoints under `internal_prefix`, in one list: any other path there is a 404
# (`Gateway.handle`), never proxied. The token panel's files (`<internal_prefix>panel/`, when
# `panel.enabled`) are routed by `gateway/panel` and open to anyone, as `openapi.json` is.
INTERNAL_ENDPOINTS = (
    Internal("health", Gateway.health, guarded=True),
    Internal("ready", Gateway.ready, guarded=True),
    Internal("metrics", Gateway.metrics_text, guarded=True),
    Internal("openapi.json", Gateway.openapi, guarded=False),
)


async def _continue(request: web.Request) -> None:
    """`100 Continue`, once the token has passed: aiohttp's own would go out before any check
    (the catch-all route is added with `_no_continue`)."""
    if request.version == aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the reply itself has not started


async def _no_continue(request: web.Request) -> None:
    """The catch-all route's expect handler: `Gateway.handle` answers `Expect` after the checks."""


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with its own error pages (a request its parser refuses, a
    failure outside every handler) in flespi's JSON shape, refused through `gateway`'s flow."""

    gateway: Gateway | None = None

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the reply has started; no error reply can follow it")
        reason = MALFORMED_REQUEST if status == 400 else INTERNAL_ERROR if status >= 500 else _phrase(status)
        repeated = DUPLICATE_HEADER.fullmatch(message or "") if status == 400 else None
        gateway = self.gateway
        if gateway is None or not isinstance(request, web.Request):  # no gateway behind it: the error alone
            response = web.Response(status=status, body=error_body(status, reason), content_type="application/json")
        else:
            if repeated is not None:  # the listener's and `Gateway.handle`'s words for it
                reason = gateway.flow.repeated_header(repeated.group(1).lower()).reason
            # A parser error (`message` given) has no request behind it: aiohttp's stand-in is "GET /".
            response = gateway.refuse_unserved(request, status, reason, parsed=message is None)
        response.force_close()
        return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def json_error_handlers(server: web.Server, gateway: Gateway | None = None) -> Callable[[], asyncio.Protocol]:
    """What the listener hands connections to: `server`'s handlers, as `JsonErrorHandler`s of `gateway`."""
    kwargs = server._kwargs  # the handler arguments the runner was given (web.Server keeps them so)

    def handler() -> asyncio.Protocol:
        made = JsonErrorHandler(server, loop=asyncio.get_running_loop(), **kwargs)
        made.gateway = gateway
        return made

    return handler


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
    """aiohttp's own refusals (a missing panel file, a method a route does not take) as flespi JSON.
    A target that is no path (`*`, absolute-form) matches no route: `Gateway.handle` refuses it,
    as the listener does."""
    if not request.raw_path.startswith("/"):
        return await request.app[GATEWAY].handle(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.Response(status=exc.status, body=error_body(exc.status, (exc.reason or "error").lower()),
                            content_type="application/json", headers={
                                name: value for name, value in exc.headers.items() if name.lower() == "allow"})
    except Exception:
        log.exception("unexpected error while answering %s", request.path)
        return web.Response(status=500, body=error_body(500, INTERNAL_ERROR), content_type="application/json")


def openapi_document() -> bytes:
    """The platform API's OpenAPI 3.1 description, shipped as package data."""
    return (resources.files("gateway.api") / "openapi.json").read_bytes()


OPENAPI = openapi_document()


def token_validator(settings: Settings) -> TokenValidator:
    """The tokens API's validator, with the ACL, IP and origin rules the compiler applies."""
    presets = dict(settings.origin_presets)

    def acl(value: Any) -> list[FieldProblem]:
        return acl_problems(value, "access.acl", settings.platform_prefixes, settings.acl.group_uri)

    def ips(value: Any) -> list[FieldProblem]:
        return [FieldProblem("ips", reason) for reason in ip_mask_problems(value)]

    def origins(value: Any) -> list[FieldProblem]:
        return [FieldProblem("origins", reason) for reason in origin_problems(value, presets)]

    return TokenValidator(acl_problems=acl, ips_problems=ips, origins_problems=origins)


GATEWAY = web.AppKey("gateway", Gateway)
# aiohttp's parser refuses a repeated singleton header in these words (http_parser.py).
DUPLICATE_HEADER = re.compile(r"Duplicate '([^']+)' header found\.")


def internal_handler(endpoint: Internal) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        if endpoint.guarded and not gateway.allows_internal(request):
            return gateway.refuse_internal(request)
        return await endpoint.handler(gateway, request)
    return serve
CORS = web.AppKey("cors", CorsPolicy)
BOOTSTRAP_EXPIRE = 4102444800  # 2100-01-01: a token must have ttl or expire (docs/tokens.md)


def master_record(token_id: int, digest: str, info: str) -> dict[str, Any]:
    return {"id": token_id, "digest": digest, "info": info, "enabled": True, "access": {"type": 1},
            "expire": BOOTSTRAP_EXPIRE, "ttl": 0, "created": int(time.time()), "accessed": 0, "ips": "",
            "origins": "*", "cid": 0, "metadata": {}}


class StoreMigrating(Exception):
    """`gateway migrate` is copying the store: no master token is made until it ends (one made
    on the source meanwhile could be missed by the copy, one on the target overwritten by it)."""

    def __init__(self) -> None:
        super().__init__(MIGRATING)


async def bootstrap_master(store: TokenStore, key: str) -> None:
    """Make the configured key a master token unless it exists (safe from several instances)."""
    digest = key_digest(key)
    if await store.load(digest) is None:
        if await store.migrating():
            raise StoreMigrating
        [token_id] = await store.allocate_ids(1)
        if await store.insert_if_absent(master_record(token_id, digest, "bootstrap master token")):
            log.info("bootstrap master token created with id %d", token_id)
    await store.publish([digest])  # drop "no such token" answers cached before it existed


async def first_master(store: TokenStore, announce: Callable[[int, str], None]) -> None:
    """A store that never held a token, started with no bootstrap key, gets a master token whose
    key is handed to `announce`, once: a restart finds `next_id` and makes nothing."""
    key = new_key()
    digest = key_digest(key)
    if await store.migrating():
        raise StoreMigrating
    if await store.insert_first(master_record(1, digest, "first master token")):
        log.info("first master token created with id 1 (its key is shown once, on the console)")
        announce(1, key)
        await store.publish([digest])


def announce_key(token_id: int, key: str) -> None:
    """On the console, never through logging: log handlers may write to files and collectors."""
    sys.stderr.write(
        f"\ngateway: this store had no tokens, so master token {token_id} was created. Its key, shown only now:\n\n"
        f"    {key}\n\n"
        "Keep it: manage tokens with it (GATEWAY_MASTER_TOKEN for `gateway token ...`, or the panel at\n"
        "/_gateway/panel/). A restart creates no other.\n\n")
    sys.stderr.flush()


async def _keep_trying(name: str, job: Callable[[], Awaitable[None]], told: str = "") -> None:
    """Every second until it is done; each new reason logged once (a migration lasts minutes)."""
    while True:
        try:
            await job()
            return
        except Exception as exc:
            if str(exc) != told:
                told = str(exc)
                log.warning("%s not yet created (%s); retrying", name, exc)
            await asyncio.sleep(1.0)


def open_session(settings: Settings, upstream_tls: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=UpstreamConnector(settings.proxy.pool_timeout, limit=settings.proxy.pool_size, ttl_dns_cache=60,
                                    ssl=upstream_tls),
        # `connect` covers the wait for a free pooled connection too (`pool_size`), as on the fast path.
        timeout=aiohttp.ClientTimeout(total=None, connect=settings.proxy.pool_timeout + settings.proxy.connect_timeout,
                                      sock_connect=settings.proxy.connect_timeout,
                                      sock_read=settings.proxy.read_timeout),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
    )


async def services(app: web.Application, settings: Settings, shared: str | None = None) -> AsyncIterator[None]:
    try:  # first: nothing is open yet if it fails
        sink = None if settings.log.path == "off" else FileSink(settings.log.path)
    except OSError as exc:  # writable at the check, and no longer: said as the check would, no traceback
        raise ConfigError("log.path", f"cannot open {settings.log.path!r} ({exc.strerror})") from exc
    embedded: EmbeddedStore | None = None
    if settings.redis.embedded:
        from gateway.store.embedded import open_embedded  # fakeredis: imported only when it is used
        embedded = open_embedded(settings.redis.data_file)
        clients = Clients(embedded.client)  # the client is closed with the store's files, below
    else:
        clients = open_clients(settings.redis)
    prefix, client = settings.redis.key_prefix, clients.client
    store = open_token_store(client, prefix, clients.lean, clients.lean_loads, clients.lean_nodes,
                             clients.lean_script_nodes)
    accounts = AccountStore(client, prefix)
    if clients.listener is not None:
        store.listener = accounts.listener = clients.listener
    if clients.waiter is not None:
        for acknowledged in (store, accounts):
            acknowledged.require_replicas(clients.waiter, settings.redis.replicas_to_wait, settings.redis.wait_timeout)
    if clients.replica_wait is not None:
        for acknowledged in (store, accounts):
            acknowledged.require_replicas_on_cluster(clients.replica_wait.confirmed, settings.redis.replicas_to_wait,
                                                     settings.redis.wait_timeout)
    if embedded is not None:
        for persisted in (store, accounts):
            persisted.after_change = embedded.sync  # an API change is on disk before it is answered
    logs = LogWriter(settings.log, [sink] if sink else [])
    token_logs = RedisLogSink(store, settings.token_logs) if settings.token_logs.enabled else None
    if token_logs is not None:
        logs.add_sink(token_logs)
    directory = AccountDirectory(accounts, settings.cache.max_age)
    compiler = TokenCompiler(settings, store)
    cache = TokenCache(store, settings.cache, compiler)
    cache.listeners[CHANGED_MESSAGE] = directory.mark_changed
    store.on_publish = accounts.on_publish = cache.receive
    upstream_tls = settings.proxy.ssl_context()
    built = Services(
        store=store, accounts=accounts, directory=directory, cache=cache,
        accessed=AccessedWriter(store, settings.accessed_flush_interval),
        usage=UsageMeter(store, settings.usage, directory, logs), logs=logs, token_logs=token_logs,
        housekeeper=Housekeeper(store, settings.housekeeping, logs), session=open_session(settings, upstream_tls),
        compiler=compiler, upstream_tls=upstream_tls, request_log=sink,
        monitor=StoreMonitor(store, cache, settings.redis.connect_timeout + settings.redis.socket_timeout),
    )
    gateway = app[GATEWAY] = Gateway(settings, built, app[CORS], shared)
    if settings.mqtt is not None:
        gateway.mqtt = MqttFront(settings.mqtt, gateway.auth, cache, built.usage, logs, settings.platform_prefixes)
    jobs: list[Coroutine[Any, Any, None]] = [
        cache.run_subscriber(), store.run_announcer(), built.accessed.run(), logs.run(), built.usage.run(),
        built.housekeeper.run(), directory.run(settings.cache.refresh_interval), built.monitor.run(),
        gateway.metrics.run(),
    ]
    if embedded is not None:
        jobs.append(embedded.run())
    if clients.watch is not None:
        jobs.append(clients.watch.run(SENTINEL_POLL))
    # Usable as soon as the port opens; only if the store is away does it wait in background.
    master_key = settings.bootstrap_master_token
    make_master: tuple[str, Callable[[], Awaitable[None]]] = (
        ("bootstrap master token", partial(bootstrap_master, store, master_key)) if master_key else
        ("first master token", partial(first_master, store, announce_key)))
    try:
        await make_master[1]()
    except Exception as exc:
        log.warning("%s not yet created (%s); retrying in background", make_master[0], exc)
        jobs.append(_keep_trying(*make_master, told=str(exc)))
    if gateway.mqtt is not None:
        jobs.append(gateway.mqtt.run())
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield
    finally:
        if gateway.mqtt is not None:
            await gateway.mqtt.shutdown()
        await cancel_all(tasks)
        await cache.close()
        await _quietly(built.accessed.flush())
        await _quietly(built.usage.flush(final=True))
        await logs.flush()
        gateway.metrics.share()  # the other workers keep this one's counters in their sums
        if built.request_log is not None:
            built.request_log.close()
        await built.session.close()
        await clients.close()
        if embedded is not None:
            await embedded.close()  # the journal's last frames, then the lock goes


async def _quietly(job: Coroutine[Any, Any, None]) -> None:
    """Shutdown goes on even if Redis is away; what could not be written is reported, not raised."""
    try:
        await job
    except Exception as exc:
        log.warning("shutdown: could not flush (%s)", exc)


def create_app(settings: Settings, shared: str | None = None) -> web.Application:
    """A pure builder: nothing is opened until the app starts (cleanup_ctx). `shared`: the
    directory the workers of one gateway share their metrics through (`workers: N`)."""
    limits = settings.limits
    # The listener's parser applies `limits` to every request before aiohttp sees it; aiohttp's
    # own bounds sit just above them, so it never refuses first (with a reply of its own).
    app = web.Application(client_max_size=limits.api_body_size, middlewares=[json_errors], handler_args={
        "max_line_size": limits.max_request_line + 64, "max_field_size": limits.max_header_size + 64,
        "max_headers": limits.max_headers + 1, "keepalive_timeout": limits.keepalive_timeout})

    async def context(app: web.Application) -> AsyncIterator[None]:
        async for _ in services(app, settings, shared):
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].handle(request)

    async def decide(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].decide(request)

    app.cleanup_ctx.append(context)
    for endpoint in INTERNAL_ENDPOINTS:
        app.router.add_get(settings.internal_prefix + endpoint.path, internal_handler(endpoint))
    # Decision mode: any method, any client (proxies call it); the fast path answers most checks.
    app.router.add_route("*", settings.internal_prefix + "auth", decide)
    app.router.add_route("*", settings.internal_prefix + "auth/{original:.*}", decide)
    install_panel(app, settings)  # the token panel's static files, <internal_prefix>panel/
    if settings.mqtt is not None and settings.mqtt.websocket_path:
        async def mqtt_websocket(request: web.Request) -> web.StreamResponse:
            gateway = request.app[GATEWAY]
            assert gateway.mqtt is not None
            client_ip = gateway.flow.client_address(request.remote or "", request.headers)
            return await serve_mqtt_websocket(gateway.mqtt, request, client_ip)

        app.router.add_get(settings.mqtt.websocket_path, mqtt_websocket)
    # Built here, not with the services: aiohttp-cors registers with the app before it is frozen.
    app[CORS] = CorsPolicy(settings.cors)
    app[CORS].install(app, app.router.add_route("*", "/{tail:.*}", handle, expect_handler=_no_continue))
    return app
