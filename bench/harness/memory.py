"""(c) Resident memory of one gateway worker once many distinct tokens were each used through it,
then hot traffic through that worker (does a full cache slow the request path?)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .client import cached_tokens, http
from .procs import process_tree, rss_mb
from .servers import start_gateway
from .session import Session
from .wrk import WrkResult


@dataclass
class Memory:
    cached: int
    rss_before: float  # MB with one token cached
    rss_after: float
    rss_peak: float  # VmHWM
    hot: WrkResult  # one key, with `cached` tokens in the cache

    @property
    def rss_for_100k(self) -> tuple[float, bool]:
        """RSS with 100,000 cached tokens: measured, or extrapolated linearly from a smaller run."""
        if self.cached >= 100_000:
            return self.rss_after, False
        per_token = (self.rss_after - self.rss_before) / max(1, self.cached)
        return self.rss_before + per_token * 100_000, True


def memory_with_tokens(session: Session, memory_keys: Path, n_memory: int, key: str, duration: int) -> Memory:
    runner = session.runner
    gwr = start_gateway(session.procs, "gateway-memory", session.upstream, session.redis_url, 1)
    http("GET", gwr.url + "/bench/ping", key)
    rss_before = rss_mb(gwr.process.pid)
    # In order, once each; wrk is stopped as soon as all of them are cached.
    filling = runner.wrk_run(gwr.url, duration, script_args=[str(memory_keys), "seq", str(n_memory)],
                             stop_when=lambda: cached_tokens(gwr.url) >= n_memory + 1, max_seconds=240)
    time.sleep(1.0)  # let the log and accessed writers drain their batches
    cached = cached_tokens(gwr.url)
    rss_after = rss_mb(gwr.process.pid)
    rss_peak = rss_mb(gwr.process.pid, "VmHWM")
    session.say(f"memory: {cached:,} tokens cached after {filling.requests:,} requests; RSS {rss_after:.1f} MB "
                f"(peak {rss_peak:.1f} MB; {rss_before:.1f} MB with one token)")
    hot = runner.wrk_run(gwr.url, duration, key=key, pids=process_tree(gwr.process.pid))
    session.say(f"hot traffic with {cached:,} tokens cached: {hot.rps:,.0f} req/s  p50 {hot.p50_ms:.2f} ms  "
                f"p99 {hot.p99_ms:.2f} ms  errors {hot.errors}")
    session.procs.stop(gwr.process)
    return Memory(cached, rss_before, rss_after, rss_peak, hot)
