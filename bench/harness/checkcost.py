"""(d) The in-process cost of one check of a cached token: no HTTP, no I/O."""
from __future__ import annotations

import time

from . import HOST, PREFIX


async def check_cost(redis_url: str, key: str, calls: int) -> dict[str, float]:
    """Microseconds per call, the best of three rounds of `calls` each."""
    from gateway.writers.accessed import AccessedWriter
    from gateway.store.accounts import AccountDirectory, AccountStore
    from gateway.api.platform import AUTH_INFO
    from gateway.auth.authenticator import Authenticator, extract_key
    from gateway.store.cache import TokenCache
    from gateway.auth.checks import RequestFacts, build_checks
    from gateway.auth.compiler import TokenCompiler
    from gateway.config import LogSettings, RedisSettings, Settings, UsageSettings
    from gateway.writers.logs import LogWriter
    from gateway.store.tokens import TokenStore, connect_redis
    from gateway.tokens import key_digest
    from gateway.writers.usage import UsageMeter

    client = connect_redis(RedisSettings(url=redis_url))
    try:
        # The same services the app builds (gateway/app.py services()), without the HTTP server.
        defaults = Settings(routes=())
        store = TokenStore(client, PREFIX)
        cache = TokenCache(store, defaults.cache, TokenCompiler(defaults, store))
        accessed = AccessedWriter(store, 0.1)
        directory = AccountDirectory(AccountStore(client, PREFIX), defaults.cache.max_age)
        meter = UsageMeter(store, UsageSettings(), directory, LogWriter(LogSettings(), []))
        checks = build_checks(defaults.platform_prefixes, frozenset({AUTH_INFO}), directory, meter)
        auth = Authenticator(cache, accessed, checks)
        facts = RequestFacts(method="GET", path="/bench/ping", forward_path="/bench/ping", query="",
                             client_ip=HOST, origin=None, acting_cid=None, now=time.time())
        await auth.authenticate(key, facts)  # the one load from Redis; every call below is a cache hit
        header = f"FlespiToken {key}"

        best: dict[str, float] = {}
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(calls):
                await auth.authenticate(key, facts)
            took = (time.perf_counter() - started) / calls * 1e6
            best["authenticate"] = min(best.get("authenticate", took), took)
            started = time.perf_counter()
            for _ in range(calls):
                await auth.authenticate(extract_key(header), facts)
            took = (time.perf_counter() - started) / calls * 1e6
            best["extract_key + authenticate"] = min(best.get("extract_key + authenticate", took), took)
            started = time.perf_counter()
            for _ in range(calls):
                key_digest(key)
            took = (time.perf_counter() - started) / calls * 1e6
            best["key_digest (sha256) alone"] = min(best.get("key_digest (sha256) alone", took), took)
        return best
    finally:
        await client.aclose()
