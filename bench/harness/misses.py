"""(a) Cache-miss traffic: many tokens written into Redis, then one key (hot) against random keys
out of them (cache misses), both through the same wrk Lua script, on a fresh gateway."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .client import cached_tokens
from .procs import process_tree, rss_mb
from .servers import start_gateway
from .session import Session, run_async
from .tokens import fill_tokens, random_keys
from .wrk import WrkResult


@dataclass
class KeyFiles:
    """Key lists for random_tokens.lua, one key a line."""
    all_keys: Path
    hot: Path  # the one key of the main table
    memory: Path  # the first keys, for the memory step


@dataclass
class Misses:
    n_tokens: int
    fill_seconds: float
    hot: WrkResult
    miss: WrkResult
    cached: int  # tokens cached after the miss run
    rss: float  # MB, after the miss run
    loads: int  # records loaded from Redis during the miss run


def write_tokens(session: Session, n_tokens: int, n_memory: int, hot_key: str) -> tuple[KeyFiles, float]:
    """`n_tokens` records written with the gateway's TokenStore; the key files; the seconds it took."""
    session.say(f"writing {n_tokens:,} tokens into the bench Redis (gateway layout, TokenStore.insert)")
    started = time.monotonic()
    keys = random_keys(n_tokens)
    run_async(fill_tokens(session.redis_url, keys))
    seconds = time.monotonic() - started
    files = KeyFiles(session.workdir / "keys.txt", session.workdir / "hot-key.txt",
                     session.workdir / "memory-keys.txt")
    files.all_keys.write_text("\n".join(keys) + "\n")
    files.hot.write_text(hot_key + "\n")
    files.memory.write_text("\n".join(keys[:n_memory]) + "\n")
    session.say(f"{n_tokens:,} tokens written in {seconds:.1f}s; keys in {files.all_keys}")
    return files, seconds


def cache_misses(session: Session, files: KeyFiles, n_tokens: int, fill_seconds: float, duration: int,
                 warmup: int) -> Misses:
    runner = session.runner
    gwm = start_gateway(session.procs, "gateway-miss", session.upstream, session.redis_url, 1)
    runner.wrk_run(gwm.url, warmup, script_args=[str(files.hot)])
    hot = runner.wrk_run(gwm.url, duration, script_args=[str(files.hot)], pids=process_tree(gwm.process.pid),
                         count_redis=True)
    session.say(f"hot (one key, Lua)       {hot.rps:>9,.0f} req/s  p50 {hot.p50_ms:.2f} ms  "
                f"p99 {hot.p99_ms:.2f} ms  errors {hot.errors}")
    cached_before = cached_tokens(gwm.url)
    miss = runner.wrk_run(gwm.url, duration, script_args=[str(files.all_keys), "random"],
                          pids=process_tree(gwm.process.pid), count_redis=True)
    cached, rss = cached_tokens(gwm.url), rss_mb(gwm.process.pid)
    # Records are loaded in batches (one MGET each): the cache's growth counts them.
    loads = cached - cached_before
    session.say(f"random of {n_tokens:,} keys    {miss.rps:>9,.0f} req/s  p50 {miss.p50_ms:.2f} ms  "
                f"p99 {miss.p99_ms:.2f} ms  errors {miss.errors}  record loads {loads:,} of {miss.requests:,} "
                f"requests in {miss.redis_detail.get('mget', 0):,} round trips")
    session.procs.stop(gwm.process)
    return Misses(n_tokens, fill_seconds, hot, miss, cached, rss, loads)
