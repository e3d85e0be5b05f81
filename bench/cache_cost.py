"""Memory per cached token and CPU per cache miss, in process, against a real redis-server.

    python bench/cache_cost.py                    # 100,000 tokens for memory, 10,000 misses
    python bench/cache_cost.py --tokens 20000     # smaller and faster

It starts its own redis-server on a free port (or uses --redis-url, whose data it leaves alone
except for keys under the bench prefix `{gw}:`), writes the tokens with the gateway's own
`TokenStore.insert` (records as the tokens API makes them, like bench/run.py), then:

- memory: a fresh process imports the gateway as a worker does (`gateway.app`), builds the
  store, compiler and `TokenCache` as `app.services` does, loads one token (baseline) and then
  every token through `TokenCache.lookup` (50 at a time); it reports RSS before and after, the
  growth per token, GC-tracked objects per token, and (second process, fewer tokens) the bytes
  per token that tracemalloc sees;
- miss cost: `Authenticator.authenticate` on rounds of 50 concurrent requests with distinct
  keys, either all cached (hits) or all new to the cache (misses: keys present in Redis, and keys
  that are not); CPU time of this process per request, and the extra CPU of a miss over a hit
  (the redis-server's own CPU is not included); then the CPU the usage and `accessed` writers
  spend, at their next flush, per distinct token used (each miss is one).

It prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from harness import PREFIX
from harness.procs import Processes
from harness.servers import start_redis
from harness.session import run_async
from harness.tokens import fill_tokens, random_keys

CONCURRENCY = 50


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def build(redis_url: str) -> tuple[Any, Any, Any, Any, Any]:
    """Store, cache and authenticator built as gateway/app.py services() builds them."""
    from gateway.writers.accessed import AccessedWriter
    from gateway.store.accounts import AccountDirectory, AccountStore
    from gateway.api.platform import AUTH_INFO
    from gateway.auth.authenticator import Authenticator
    from gateway.store.cache import TokenCache
    from gateway.auth.checks import build_checks
    from gateway.auth.compiler import TokenCompiler
    from gateway.config import LogSettings, RedisSettings, Settings, UsageSettings
    from gateway.writers.logs import LogWriter
    from gateway.store.tokens import TokenStore, connect_redis
    from gateway.writers.usage import UsageMeter

    settings = Settings(routes=())
    client = connect_redis(RedisSettings(url=redis_url, socket_timeout=30))
    store = TokenStore(client, PREFIX)
    cache = TokenCache(store, settings.cache, TokenCompiler(settings, store))
    directory = AccountDirectory(AccountStore(client, PREFIX), settings.cache.max_age)
    meter = UsageMeter(store, UsageSettings(), directory, LogWriter(LogSettings(), []))
    checks = build_checks(settings.platform_prefixes, frozenset({AUTH_INFO}), directory, meter)
    accessed = AccessedWriter(store, 3600.0)  # flushed by hand below
    return client, cache, Authenticator(cache, accessed, checks), meter, accessed


# -- memory (a child process per measurement) ---------------------------------------------------

async def memory_child(redis_url: str, keys_file: Path, count: int, traced: bool) -> dict[str, Any]:
    import gateway.app  # noqa: F401  (a worker imports all of it)
    from gateway.tokens import key_digest

    # The keys stay alive throughout (in the gateway they come with requests); each digest is made
    # per lookup, as a request makes it, so that the cache key is counted with the token.
    keys = keys_file.read_text().split()[:count + 1]
    client, cache, *_ = await build(redis_url)
    try:
        assert await cache.lookup(key_digest(keys[0])) is not None
        gc.collect()
        if traced:
            import tracemalloc
            tracemalloc.start()
        rss_before, objects_before = rss_mb(), len(gc.get_objects())
        started = time.perf_counter()
        for start in range(1, len(keys), CONCURRENCY):
            await asyncio.gather(*(cache.lookup(key_digest(key)) for key in keys[start:start + CONCURRENCY]))
        took = time.perf_counter() - started
        gc.collect()
        result = {"tokens": len(cache) - 1, "rss_before": rss_before, "rss_after": rss_mb(),
                  "tracked_per_token": (len(gc.get_objects()) - objects_before) / count, "fill_seconds": took}
        if traced:
            import tracemalloc
            result["traced_per_token"] = tracemalloc.get_traced_memory()[0] / count
            tracemalloc.stop()
        return result
    finally:
        await client.aclose()


def run_memory_child(redis_url: str, keys_file: Path, count: int, traced: bool) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--memory-child", redis_url, str(keys_file), str(count)]
    if traced:
        argv.append("--traced")
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def import_rss() -> tuple[float, float]:
    code = ("import sys; sys.path.insert(0, %r); from pathlib import Path\n"
            "def rss():\n"
            "    return [int(l.split()[1]) / 1024 for l in Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('VmRSS:')][0]\n"
            "a = rss(); import gateway.app; print(a, rss())") % str(BENCH.parent)
    before, after = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                   text=True).stdout.split()
    return float(before), float(after)


# -- CPU per miss ---------------------------------------------------------------------------

async def miss_cost(redis_url: str, cached: list[str], fresh: list[str],
                    unknown: list[str]) -> dict[str, tuple[float, float, float]]:
    from gateway.auth.checks import RequestFacts

    client, _, auth, meter, accessed = await build(redis_url)
    try:
        def facts() -> RequestFacts:
            return RequestFacts(method="GET", path="/bench/ping", forward_path="/bench/ping", query="",
                                client_ip="127.0.0.1", origin=None, acting_cid=None, now=time.time())

        async def one(key: str) -> bool:
            try:
                now = facts()
                token = await auth.authenticate(key, now)
            except Exception:
                return False
            meter.record(token, token.cid, 0, now.now)  # as Gateway.handle does after a request
            return True

        async def rounds(keys: list[str]) -> tuple[float, float, float]:
            cpu, wall, ok = time.process_time(), time.perf_counter(), 0
            for start in range(0, len(keys), CONCURRENCY):
                ok += sum(await asyncio.gather(*(one(key) for key in keys[start:start + CONCURRENCY])))
            return ((time.process_time() - cpu) / len(keys) * 1e6, (time.perf_counter() - wall) / len(keys) * 1e6,
                    ok)

        async def flush_cost(job: Any, tokens: int) -> float:
            cpu = time.process_time()
            await job()
            return (time.process_time() - cpu) / max(1, tokens) * 1e6

        for start in range(0, len(cached), CONCURRENCY):  # load them once
            await asyncio.gather(*(one(key) for key in cached[start:start + CONCURRENCY]))
        gc.collect()
        gc.freeze()
        figures = {"hit": await rounds(cached * 4)}
        await meter.flush()
        await accessed.flush()
        figures["miss"] = await rounds(fresh)
        # what the background writers then spend per distinct token used (each miss here)
        figures["writers"] = (await flush_cost(meter.flush, len(fresh)), await flush_cost(accessed.flush, len(fresh)),
                              0.0)
        figures["unknown"] = await rounds(unknown)
        return figures
    finally:
        await client.aclose()


def main() -> int:
    parse = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--tokens", type=int, default=100_000, help="cached tokens for the memory figure")
    parse.add_argument("--traced-tokens", type=int, default=10_000, help="tokens for the tracemalloc figure")
    parse.add_argument("--misses", type=int, default=10_000, help="misses (and unknown keys) for the CPU figure")
    parse.add_argument("--redis-url", help="use this Redis instead of starting one (keys under {gw}: are written)")
    parse.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parse.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parse.parse_args()
    if args.memory_child:
        url, keys_file, count = args.memory_child
        print(json.dumps(run_async(memory_child(url, Path(keys_file), int(count), args.traced))))
        return 0

    with tempfile.TemporaryDirectory(prefix="gw-cache-cost-") as work:
        workdir = Path(work)
        procs = Processes(workdir)
        try:
            redis_url = args.redis_url
            if redis_url is None:
                port, _ = start_redis(procs, "redis-server")
                redis_url = f"redis://127.0.0.1:{port}/0"
            keys = random_keys(max(args.tokens, args.traced_tokens) + 1 + 2 * args.misses)
            present = keys[:len(keys) - args.misses]
            started = time.monotonic()
            run_async(fill_tokens(redis_url, present))
            print(f"{len(present):,} tokens written in {time.monotonic() - started:.1f} s ({redis_url})")
            keys_file = workdir / "keys.txt"
            keys_file.write_text("\n".join(present) + "\n")

            before, after = import_rss()
            print(f"import gateway.app: RSS {before:.1f} -> {after:.1f} MB")
            memory = run_memory_child(redis_url, keys_file, args.tokens, False)
            grown = memory["rss_after"] - memory["rss_before"]
            print(f"memory: {memory['tokens']:,} tokens cached in {memory['fill_seconds']:.1f} s; RSS "
                  f"{memory['rss_before']:.1f} -> {memory['rss_after']:.1f} MB, "
                  f"{1024 * grown / memory['tokens']:.2f} KB per token; "
                  f"{memory['tracked_per_token']:.2f} GC-tracked objects per token")
            traced = run_memory_child(redis_url, keys_file, args.traced_tokens, True)
            print(f"tracemalloc: {traced['traced_per_token']:.0f} bytes per token ({traced['tokens']:,} tokens)")

            cached = present[:CONCURRENCY * 20]
            fresh = present[len(present) - args.misses:]
            unknown = keys[len(keys) - args.misses:]
            figures = run_async(miss_cost(redis_url, cached, fresh, unknown))
            print(f"per request, {CONCURRENCY} concurrent (CPU of this process / wall):")
            hit_cpu = figures["hit"][0]
            for name, asked in (("hit", len(cached) * 4), ("miss", len(fresh)), ("unknown", len(unknown))):
                cpu, wall, accepted = figures[name]
                extra = "" if name == "hit" else f"; extra CPU over a hit: {cpu - hit_cpu:.1f} us"
                print(f"  {name:8} {cpu:7.1f} us / {wall:7.1f} us  ({accepted:,.0f} of {asked:,} accepted){extra}")
            usage, used = figures["writers"][:2]
            print(f"then, per distinct token used: usage flush {usage:.1f} us, accessed flush {used:.1f} us of CPU")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
