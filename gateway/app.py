"""`create_app(settings)`: the one request flow and the services it is built from.

config -> app -> extract token -> load record (cache, then store) -> time -> checks (enabled, IP,
origin, account, type/ACL, usage) -> platform API or proxy -> usage counters and log line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.aio import cancel_all
from gateway.api.platform import PlatformApi
from gateway.api.validation import TokenValidator
from gateway.auth.authenticator import Authenticator, extract_key
from gateway.auth.checks import RequestFacts, build_checks
from gateway.auth.compiler import TokenCompiler
from gateway.build import fast_path_compiled
from gateway.config import Settings
from gateway.errors import Denied, FieldProblem, InvalidInput, StoreUnavailable
from gateway.mqtt.front import MqttFront
from gateway.mqtt.websocket import serve as serve_mqtt_websocket
from gateway.panel import install as install_panel
from gateway.policy.acl import acl_problems
from gateway.policy.ipmask import ip_mask_problems
from gateway.policy.origins import origin_problems
from gateway.policy.paths import AUTH_INFO
from gateway.proxy.cors import CorsPolicy
from gateway.proxy.flow import NARROWING, RequestFlow
from gateway.proxy.relay import Proxy
from gateway.proxy.replies import error_response, invalid_input_response
from gateway.proxy.routing import upstream_url
from gateway.store.accounts import CHANGED_MESSAGE, AccountDirectory, AccountStore
from gateway.store.cache import TokenCache
from gateway.store.clients import SENTINEL_POLL, Clients, open_clients
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


class Gateway:
    """The aiohttp front: runs the requests aiohttp serves through the process's `RequestFlow`."""

    def __init__(self, settings: Settings, services: Services, cors: CorsPolicy) -> None:
        self.settings = settings
        self.cors = cors
        self.services = services
        self.store = services.store
        self.cache = services.cache
        self.accessed = services.accessed
        self.usage = services.usage
        self.logs = services.logs
        self.api = PlatformApi(services.store, services.accounts, services.directory, token_validator(settings),
                               services.logs, services.token_logs, settings.platform_prefixes)
        self.api.body_limit = settings.limits.api_body_size
        checks = build_checks(settings.platform_prefixes, frozenset({AUTH_INFO}), services.directory, services.usage)
        self.auth = Authenticator(services.cache, services.accessed, checks)
        # The rules every front applies (the fast path gets this same object).
        self.flow = RequestFlow(settings, self.auth, services.usage, services.logs, self.api.handles)
        self.proxy = Proxy(settings.proxy, services.session, self.flow.request_drop)
        self.open_connections: Callable[[], int] = lambda: 0  # the listener's count, once it runs
        self.mqtt: MqttFront | None = None  # the MQTT front's shared state, when configured

    async def handle(self, request: web.Request) -> web.StreamResponse:
        flow = self.flow
        started, now = time.perf_counter(), time.time()
        trusted = flow.is_trusted_peer(request.remote)
        request_id = flow.request_id(request.headers.get(flow.request_id_header), trusted)
        facts: RequestFacts | None = None
        served: Token | None = None
        try:
            if self.cors.is_preflight(request):
                response = await self.cors.preflight(request)  # no token: never authorized, never forwarded
            else:
                headers = request.headers
                facts = flow.facts(request.method, request.raw_path, headers.get("x-flespi-cid"), headers.get("Origin"),
                                   flow.client_address(request.remote or "", headers), now)
                served = await flow.auth.authenticate(extract_key(headers.get("Authorization")), facts)
                response = await self._dispatch(request, served, facts, request_id, trusted)
        except (Denied, StoreUnavailable) as error:
            denied = flow.refusal(error)
            response = error_response(flow, denied.status, denied.reason, denied.headers)
        except InvalidInput as invalid:
            response = invalid_input_response(invalid.problems)
        if not response.prepared:  # a proxied reply got these from the proxy, before its first byte
            self._finish(response, request, facts, request_id)
        if facts is not None:
            size = response.body_length
            flow.finish(facts, facts.token, served, request.headers.get("x-flespi-app", ""), response.status, started,
                        size, request.content.total_bytes + (size or 0), request_id)
        return response

    def _finish(self, response: web.StreamResponse, request: web.Request, facts: RequestFacts | None,
                request_id: str) -> None:
        """The gateway's own headers on every reply (API, error or proxied), set before it starts."""
        response.headers[self.flow.request_id_header] = request_id
        origin_allowed = facts is not None and facts.origin_allowed
        self.cors.share(response.headers, request.headers.get("Origin"), origin_allowed)

    async def _dispatch(self, request: web.Request, token: Token, facts: RequestFacts, request_id: str,
                        trusted: bool) -> web.StreamResponse:
        flow = self.flow
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
            response = error_response(flow, denied.status, denied.reason, denied.headers)
            response.headers[flow.request_id_header] = request_id
        if facts is not None:
            flow.finish(facts, facts.token, served, headers.get("x-flespi-app", ""), response.status, started, 0, 0,
                        request_id)
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"result": [{"status": "ok", "pid": os.getpid(), "tokens_cached": len(self.cache),
                                             "invalidation": self.cache.subscribed.is_set(),
                                             "connections": self.open_connections(), "tasks": len(asyncio.all_tasks()),
                                             "fast_path": "compiled" if fast_path_compiled() else "interpreted"}]})


def openapi_document() -> bytes:
    """The platform API's OpenAPI 3.1 description, shipped as package data."""
    return (resources.files("gateway.api") / "openapi.json").read_bytes()


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
CORS = web.AppKey("cors", CorsPolicy)
BOOTSTRAP_EXPIRE = 4102444800  # 2100-01-01: a token must have ttl or expire (docs/tokens.md)


def master_record(token_id: int, digest: str, info: str) -> dict[str, Any]:
    return {"id": token_id, "digest": digest, "info": info, "enabled": True, "access": {"type": 1},
            "expire": BOOTSTRAP_EXPIRE, "ttl": 0, "created": int(time.time()), "accessed": 0, "ips": "",
            "origins": "*", "cid": 0, "metadata": {}}


async def bootstrap_master(store: TokenStore, key: str) -> None:
    """Make the configured key a master token unless it exists (safe from several instances)."""
    digest = key_digest(key)
    if await store.load(digest) is None:
        [token_id] = await store.allocate_ids(1)
        if await store.insert_if_absent(master_record(token_id, digest, "bootstrap master token")):
            log.info("bootstrap master token created with id %d", token_id)
    await store.publish([digest])  # drop "no such token" answers cached before it existed


async def first_master(store: TokenStore, announce: Callable[[int, str], None]) -> None:
    """A store that never held a token, started with no bootstrap key, gets a master token whose
    key is handed to `announce`, once: a restart finds `next_id` and makes nothing."""
    key = new_key()
    digest = key_digest(key)
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


async def _keep_trying(name: str, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        try:
            await job()
            return
        except Exception as exc:
            log.warning("%s not yet created (%s); retrying", name, exc)
            await asyncio.sleep(1.0)


def open_session(settings: Settings, upstream_tls: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=settings.proxy.pool_size, ttl_dns_cache=60, ssl=upstream_tls),
        # `connect` covers the wait for a free pooled connection too (`pool_size`), as on the fast path.
        timeout=aiohttp.ClientTimeout(total=None, connect=settings.proxy.pool_timeout + settings.proxy.connect_timeout,
                                      sock_connect=settings.proxy.connect_timeout,
                                      sock_read=settings.proxy.read_timeout),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
    )


async def services(app: web.Application, settings: Settings) -> AsyncIterator[None]:
    embedded: EmbeddedStore | None = None
    if settings.redis.embedded:
        from gateway.store.embedded import open_embedded  # fakeredis: imported only when it is used
        embedded = open_embedded(settings.redis.data_file)
        clients = Clients(embedded.client)  # the client is closed with the store's files, below
    else:
        clients = open_clients(settings.redis)
    prefix, client = settings.redis.key_prefix, clients.client
    store = TokenStore(client, prefix, clients.lean, clients.lean_loads)
    accounts = AccountStore(client, prefix)
    if clients.listener is not None:
        store.listener = accounts.listener = clients.listener
    if clients.waiter is not None:
        for acknowledged in (store, accounts):
            acknowledged.require_replicas(clients.waiter, settings.redis.replicas_to_wait, settings.redis.wait_timeout)
    if embedded is not None:
        for persisted in (store, accounts):
            persisted.after_change = embedded.sync  # an API change is on disk before it is answered
    sink = None if settings.log.path == "off" else FileSink(settings.log.path)
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
        compiler=compiler, upstream_tls=upstream_tls,
    )
    gateway = app[GATEWAY] = Gateway(settings, built, app[CORS])
    if settings.mqtt is not None:
        gateway.mqtt = MqttFront(settings.mqtt, gateway.auth, cache, built.usage, logs, settings.platform_prefixes)
    jobs: list[Coroutine[Any, Any, None]] = [
        cache.run_subscriber(), built.accessed.run(), logs.run(), built.usage.run(), built.housekeeper.run(),
        directory.run(settings.cache.refresh_interval),
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
        jobs.append(_keep_trying(*make_master))
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
        if sink is not None:
            sink.close()
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


def create_app(settings: Settings) -> web.Application:
    """A pure builder: nothing is opened until the app starts (cleanup_ctx)."""
    limits = settings.limits
    # The listener's parser applies `limits` to every request before aiohttp sees it; aiohttp's
    # own bounds sit just above them, so it never refuses first (with a reply of its own).
    app = web.Application(client_max_size=limits.api_body_size, handler_args={
        "max_line_size": limits.max_request_line + 64, "max_field_size": limits.max_header_size + 64,
        "max_headers": limits.max_headers + 1, "keepalive_timeout": limits.keepalive_timeout})

    async def context(app: web.Application) -> AsyncIterator[None]:
        async for _ in services(app, settings):
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].handle(request)

    async def health(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].health(request)

    async def decide(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].decide(request)

    document = openapi_document()

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    app.cleanup_ctx.append(context)
    app.router.add_get(settings.internal_prefix + "health", health)
    app.router.add_get(settings.internal_prefix + "openapi.json", openapi)
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
    app[CORS].install(app, app.router.add_route("*", "/{tail:.*}", handle))
    return app
