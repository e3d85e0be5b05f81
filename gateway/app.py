"""`create_app(settings)`: the one request flow and the services it is built from.

config -> app -> extract token -> load record (cache, then store) -> time -> checks (enabled, IP,
origin, account, type/ACL, usage) -> platform API or proxy -> usage counters and log line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.writers.accessed import AccessedWriter
from gateway.store.accounts import CHANGED_MESSAGE, AccountDirectory, AccountStore
from gateway.aio import cancel_all
from gateway.api.platform import AUTH_INFO, PlatformApi
from gateway.auth.authenticator import Authenticator, extract_key
from gateway.build import fast_path_compiled
from gateway.store.cache import TokenCache
from gateway.auth.checks import RequestFacts, build_checks, request_facts
from gateway.policy.clientaddr import TrustedProxies, client_address, forwarded_for
from gateway.auth.compiler import TokenCompiler
from gateway.config import Settings
from gateway.proxy.cors import CorsPolicy
from gateway.errors import (STORAGE_UNAVAILABLE, Denied, InvalidInput, StoreUnavailable, error_response,
                     invalid_input_response)
from gateway.writers.housekeeping import Housekeeper
from gateway.writers.logs import FileSink, LogWriter, RequestIds, request_record
from gateway.panel import install as install_panel
from gateway.policy.paths import pick_route
from gateway.proxy.relay import Proxy, upstream_url
from gateway.store.resp import RespClient, lean_client
from gateway.store.tokens import TokenStore, connect_redis
from gateway.writers.tokenlogs import RedisLogSink
from gateway.tokens import Token, key_digest
from gateway.writers.usage import UsageMeter

if TYPE_CHECKING:
    from gateway.store.embedded import Snapshotter

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
    """Runs every request through the same flow."""

    def __init__(self, settings: Settings, services: Services, cors: CorsPolicy) -> None:
        self.settings = settings
        self.cors = cors
        self.services = services
        self.store = services.store
        self.cache = services.cache
        self.accessed = services.accessed
        self.usage = services.usage
        self.logs = services.logs
        self.api = PlatformApi(services.store, services.accounts, services.directory, services.compiler.validator(),
                               services.logs, services.token_logs, settings.platform_prefixes)
        self.api.body_limit = settings.limits.api_body_size
        self.trusted = TrustedProxies.parse(settings.trusted_proxies)
        checks = build_checks(settings.platform_prefixes, frozenset({AUTH_INFO}), services.directory, services.usage)
        self.auth = Authenticator(services.cache, services.accessed, checks)
        self.proxy = Proxy(settings.proxy, services.session)
        self._request_id_header = settings.proxy.request_id_header
        self.request_ids = RequestIds()
        self.open_connections: Callable[[], int] = lambda: 0  # the listener's count, once it runs

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started, now = time.perf_counter(), time.time()
        request_id = self._request_id(request)
        facts: RequestFacts | None = None
        served: Token | None = None
        try:
            if self.cors.is_preflight(request):
                response = await self.cors.preflight(request)  # no token: never authorized, never forwarded
            else:
                facts = self._facts(request, now)
                served = await self.auth.authenticate(extract_key(request.headers.get("Authorization")), facts)
                response = await self._dispatch(request, served, facts, request_id)
        except Denied as denied:
            response = error_response(denied.status, denied.reason, self.settings.realm, denied.headers)
        except StoreUnavailable:
            response = error_response(503, STORAGE_UNAVAILABLE, self.settings.realm)
        except InvalidInput as invalid:
            response = invalid_input_response(invalid.problems)
        if not response.prepared:  # a proxied reply got these from the proxy, before its first byte
            self._finish(response, request, facts, request_id)
        if facts is not None and facts.token is not None:
            if served is not None:
                size = request.content.total_bytes + (response.body_length or 0)
                self.usage.record(served, served.cid, size, now)
            self._log_request(request, facts, facts.token, response, request_id, started)
        return response

    def _finish(self, response: web.StreamResponse, request: web.Request, facts: RequestFacts | None,
                request_id: str) -> None:
        """The gateway's own headers on every reply (API, error or proxied), set before it starts."""
        response.headers[self._request_id_header] = request_id
        origin_allowed = facts is not None and facts.origin_allowed
        self.cors.share(response.headers, request.headers.get("Origin"), origin_allowed)

    def _request_id(self, request: web.Request) -> str:
        return self.request_id(request.headers.get(self._request_id_header), request.remote)

    def request_id(self, incoming: str | None, peer: str | None) -> str:
        """A trusted proxy's request id is kept; otherwise a new one, unique across processes."""
        if incoming and self.is_trusted_peer(peer) and len(incoming) <= 128 and incoming.isprintable():
            return str(incoming)
        return self.request_ids.next()

    def is_trusted_peer(self, address: str | None) -> bool:
        return address is not None and self.trusted.is_trusted(address)

    def _facts(self, request: web.Request, now: float) -> RequestFacts:
        raw_path, _, query = request.raw_path.partition("?")
        # What the checks see; refuses an ambiguous path or a malformed x-flespi-cid with 400.
        return request_facts(request.method, raw_path, query, request.headers.get("x-flespi-cid"),
                             request.headers.get("Origin"),
                             client_address(request.remote or "", request.headers, self.trusted), now)

    async def _dispatch(self, request: web.Request, token: Token, facts: RequestFacts,
                        request_id: str) -> web.StreamResponse:
        if self.api.handles(facts.path):
            return await self.api.dispatch(request, token, facts.path, facts.account_of(token))
        route = pick_route(self.settings.routes, facts.path)
        if route is None:
            raise Denied(404, f"no upstream for {facts.path}")
        url = upstream_url(route, facts.path, facts.forward_path, facts.query)
        return await self.proxy.forward(request, url, self._upstream_headers(request, token, facts, request_id),
                                        partial(self._finish, request=request, facts=facts, request_id=request_id))

    def _upstream_headers(self, request: web.Request, token: Token, facts: RequestFacts, request_id: str) -> Any:
        peer = request.remote or ""
        trusted = self.is_trusted_peer(peer)
        extra = {
            **dict(self.identity_headers(token, facts, request_id)),
            "X-Forwarded-For": forwarded_for(peer, request.headers, self.trusted),
            "X-Forwarded-Proto": (request.headers.get("X-Forwarded-Proto") if trusted else None) or request.scheme,
            "X-Forwarded-Host": (request.headers.get("X-Forwarded-Host") if trusted else None) or request.host,
        }
        return self.proxy.request_headers(request.headers, extra)

    def identity_headers(self, token: Token, facts: RequestFacts, request_id: str) -> tuple[tuple[str, str], ...]:
        """Who made the request, for the upstream: these names are never taken from the client."""
        proxy = self.settings.proxy
        return ((proxy.token_id_header, str(token.id)),
                (proxy.account_id_header, str(facts.account_of(token))),
                (proxy.request_id_header, request_id))

    def _log_request(self, request: web.Request, facts: RequestFacts, token: Token, response: web.StreamResponse,
                     request_id: str, started: float) -> None:
        self.log_request(facts, token, request.headers.get("x-flespi-app", ""), response.status,
                         time.perf_counter() - started, response.body_length, request_id)

    def log_request(self, facts: RequestFacts, token: Token, app: str, status: int, duration: float, size: int,
                    request_id: str) -> None:
        self.logs.emit(request_record(facts.now, token.id, token.cid, facts.client_ip, app, facts.method, facts.path,
                                      status, duration, size, request_id))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"result": [{"status": "ok", "pid": os.getpid(), "tokens_cached": len(self.cache),
                                             "invalidation": self.cache.subscribed.is_set(),
                                             "connections": self.open_connections(), "tasks": len(asyncio.all_tasks()),
                                             "fast_path": "compiled" if fast_path_compiled() else "interpreted"}]})


def openapi_document() -> bytes:
    """The platform API's OpenAPI 3.1 description, shipped as package data."""
    return (resources.files("gateway.api") / "openapi.json").read_bytes()


GATEWAY = web.AppKey("gateway", Gateway)
CORS = web.AppKey("cors", CorsPolicy)
BOOTSTRAP_EXPIRE = 4102444800  # 2100-01-01: a token must have ttl or expire (docs/tokens.md)


async def bootstrap_master(store: TokenStore, key: str) -> None:
    """Make the configured key a master token unless it exists (safe from several instances)."""
    digest = key_digest(key)
    if await store.load(digest) is None:
        [token_id] = await store.allocate_ids(1)
        record = {"id": token_id, "digest": digest, "info": "bootstrap master token", "enabled": True,
                  "access": {"type": 1}, "expire": BOOTSTRAP_EXPIRE, "ttl": 0, "created": int(time.time()),
                  "accessed": 0, "ips": "", "origins": "*", "cid": 0, "metadata": {}}
        if await store.insert_if_absent(record):
            log.info("bootstrap master token created with id %d", token_id)
    await store.publish([digest])  # drop "no such token" answers cached before it existed


async def _keep_bootstrapping(store: TokenStore, key: str) -> None:
    while True:
        try:
            await bootstrap_master(store, key)
            return
        except Exception as exc:
            log.warning("bootstrap master token not yet created (%s); retrying", exc)
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
    snapshotter: Snapshotter | None = None
    lean: RespClient | None = None
    lean_loads: RespClient | None = None
    if settings.redis.embedded:
        from gateway.store.embedded import open_embedded  # fakeredis: imported only when it is used
        client, snapshotter = open_embedded(settings.redis.data_file)
        loaded = await snapshotter.load()
        log.info("embedded store: %d keys loaded from %s", loaded, settings.redis.data_file)
    else:
        client = connect_redis(settings.redis)
        lean = lean_client(settings.redis.url, settings.redis.socket_timeout, settings.redis.connect_timeout)
        lean_loads = lean_client(settings.redis.url, settings.redis.socket_timeout, settings.redis.connect_timeout)
    prefix = settings.redis.key_prefix
    store, accounts = TokenStore(client, prefix, lean, lean_loads), AccountStore(client, prefix)
    if snapshotter is not None:
        for persisted in (store, accounts):
            persisted.after_change = snapshotter.save
            persisted.after_touch = snapshotter.mark_dirty
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
    app[GATEWAY] = Gateway(settings, built, app[CORS])
    jobs: list[Coroutine[Any, Any, None]] = [
        cache.run_subscriber(), built.accessed.run(), logs.run(), built.usage.run(), built.housekeeper.run(),
        directory.run(settings.cache.refresh_interval),
    ]
    if snapshotter is not None:
        jobs.append(snapshotter.run())
    if settings.bootstrap_master_token:
        # Usable as soon as the port opens; only if the store is away does it wait in background.
        try:
            await bootstrap_master(store, settings.bootstrap_master_token)
        except Exception as exc:
            log.warning("bootstrap master token not yet created (%s); retrying in background", exc)
            jobs.append(_keep_bootstrapping(store, settings.bootstrap_master_token))
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield
    finally:
        await cancel_all(tasks)
        await cache.close()
        await _quietly(built.accessed.flush())
        await _quietly(built.usage.flush(final=True))
        await logs.flush()
        if sink is not None:
            sink.close()
        await built.session.close()
        if snapshotter is not None:
            await snapshotter.save()
        for connection in (lean, lean_loads):
            if connection is not None:
                await connection.close()
        await client.aclose()


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

    document = openapi_document()

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=document, content_type="application/json")

    app.cleanup_ctx.append(context)
    app.router.add_get(settings.internal_prefix + "health", health)
    app.router.add_get(settings.internal_prefix + "openapi.json", openapi)
    install_panel(app, settings)  # the token panel's static files, <internal_prefix>panel/
    # Built here, not with the services: aiohttp-cors registers with the app before it is frozen.
    app[CORS] = CorsPolicy(settings.cors)
    app[CORS].install(app, app.router.add_route("*", "/{tail:.*}", handle))
    return app
