"""Soak: mixed traffic over every path for minutes, while one gateway worker's memory,
descriptors, tasks and connections are sampled; do they stay flat?

    python bench/soak.py                    # 10 minutes; starts its own gateway, Redis and upstream
    python bench/soak.py --minutes 3
    python bench/soak.py --url http://127.0.0.1:8080 --master-key KEY   # a gateway already running
    python bench/soak.py --markdown         # also writes the figures into bench/RESULTS.md

Loopback only. Without --url it starts redis-server on a free port, bench/upstream.py --aiohttp
(it speaks WebSocket and has a big and a slow path) and `python -m gateway` with one worker, and
stops them at the end. The traffic (bench/harness/traffic.py) opens and closes connections all
the time: proxied GET and POST with a valid key, requests the fast path hands to aiohttp (the
tokens API with the master key, /auth/info, `Origin`, HEAD, HTTP/1.0, WebSocket), refusals,
idle keep-alive connections the client abandons, and clients that leave mid-request and
mid-reply. Every --interval seconds it samples the worker (bench/harness/sampling.py); at the end
it prints each series, its least-squares slope per minute and a verdict. It asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from harness import BENCH, MASTER_KEY, ROOT
from harness.client import create_token
from harness.results import with_soak_section
from harness.sampling import SoakFigures, fmt, markdown_table, read_sample, text_table
from harness.servers import start_gateway
from harness.session import Session, interrupt_on_termination, run_async
from harness.tools import ensure_tools
from harness.traffic import Traffic, upgrades

SETTLE = 5.0  # seconds between the end of the traffic and the last sample


@dataclass(frozen=True)
class Options:
    minutes: float
    url: str | None
    master_key: str
    rate: float
    concurrency: int
    interval: float
    warmup: float
    markdown: bool
    keep: bool


def parse_options() -> Options:
    parse = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (default 10)")
    parse.add_argument("--url", help="a gateway already running (loopback); default: start one")
    parse.add_argument("--master-key", default=MASTER_KEY, help="its master token's key (default: the bench's)")
    parse.add_argument("--rate", type=float, default=50.0, help="client actions started per second (default 50)")
    parse.add_argument("--concurrency", type=int, default=32, help="actions in flight at most (default 32)")
    parse.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30)")
    parse.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the slope (default 30)")
    parse.add_argument("--markdown", action="store_true", help="write a soak section into bench/RESULTS.md")
    parse.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parse.parse_args()
    return Options(args.minutes, args.url, args.master_key, args.rate, args.concurrency, args.interval,
                   args.warmup, args.markdown, args.keep)


class Monitor:
    """GET /_gateway/health over one kept-alive connection: always the same worker, and no new
    connection per sample (the soak should not be what it measures)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Monitor:
        import aiohttp
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def health(self) -> dict[str, Any] | None:
        import aiohttp
        try:
            async with self.session.get(self.url + "/_gateway/health", timeout=aiohttp.ClientTimeout(total=5)) as reply:
                if reply.status != 200:
                    return None
                facts: dict[str, Any] = (await reply.json())["result"][0]
                return facts
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError):
            return None


@dataclass
class SoakRun:
    figures: SoakFigures
    traffic: Traffic
    pid: int
    health_keys: list[str]


async def soak(url: str, key: str, options: Options, say: Callable[[str], None]) -> SoakRun:
    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    async with Monitor(url) as monitor:
        health = await monitor.health()
        if health is None:
            raise RuntimeError(f"{url}/_gateway/health did not answer")
        pid = int(health["pid"])
        websocket = await upgrades(host, port, key)
        say(f"worker pid {pid}; health reports {', '.join(sorted(health))}; "
            f"WebSocket through the gateway: {'yes' if websocket else 'no (the upstream does not upgrade; left out)'}")
        traffic = Traffic(host, port, key, options.master_key, websocket, options.rate, options.concurrency)
        seconds = options.minutes * 60
        samples = [await read_sample(pid, 0.0, health)]
        started = time.monotonic()
        running = asyncio.ensure_future(traffic.run(seconds))
        try:
            tick = 1
            while tick * options.interval <= seconds + 1e-6:
                await asyncio.sleep(max(0.0, started + tick * options.interval - time.monotonic()))
                sample = await read_sample(pid, time.monotonic() - started, await monitor.health())
                samples.append(sample)
                done = sum(sum(counts.values()) for counts in traffic.outcomes.values())
                say(f"sample at {sample.seconds:.0f} s: " + ", ".join(
                    f"{name} {fmt(value)}" for name, value in sample.values.items()) + f"; {done:,} outcomes so far")
                tick += 1
            await running
        finally:
            running.cancel()
        await asyncio.sleep(SETTLE)
        after = await read_sample(pid, time.monotonic() - started, await monitor.health())
    figures = SoakFigures(samples, after, options.warmup, options.concurrency)
    return SoakRun(figures, traffic, pid, sorted(health))


def traffic_rows(traffic: Traffic) -> list[list[str]]:
    rows = [["client action", "outcomes", "ok", "abandoned", "other"]]
    for label, counts in sorted(traffic.outcomes.items()):
        other = ", ".join(f"{name} {n}" for name, n in counts.most_common() if name not in ("ok", "abandoned"))
        rows.append([label, str(sum(counts.values())), str(counts["ok"]), str(counts["abandoned"]), other or "-"])
    return rows


def describe(options: Options, started_by_us: str) -> str:
    return (f"{options.minutes:g} min of mixed traffic, {options.rate:g} client actions started per second, "
            f"at most {options.concurrency} at once; {started_by_us}; a sample every {options.interval:g} s "
            f"and {SETTLE:g} s after the traffic stopped (after)")


def revision() -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def console(run: SoakRun, description: str) -> str:
    figures = run.figures
    verdicts = {trend.name: trend.verdict for trend in figures.trends}
    return "\n".join([
        description, "", text_table(traffic_rows(run.traffic)), "",
        f"gateway worker pid {run.pid}:", text_table(figures.table()), "", text_table(figures.trend_rows()), "",
        "criterion: " + figures.criterion(), "",
        "verdict: " + ", ".join(f"{name} {verdict}" for name, verdict in verdicts.items()),
    ])


def markdown(run: SoakRun, description: str, command: str, started_at: str) -> str:
    figures = run.figures
    return "\n".join([
        "## Soak", "",
        f"Measured {started_at} by `{command}` on revision `{revision()}`: {description}. "
        f"The worker's health reply had: {', '.join(run.health_keys)}.", "",
        *markdown_table(figures.table()), "",
        *markdown_table(figures.trend_rows()), "",
        f"Criterion: {figures.criterion()}. RSS is VmRSS; fds the open descriptors of the worker (the least of "
        "five reads 0.1 s apart); tasks and connections as the worker reports them (n/a when it does not).", "",
        *markdown_table(traffic_rows(run.traffic)), "",
        "`abandoned`: the client left on purpose before the reply; `other`: replies with another status than "
        "the action expects, or client-side errors.", "",
    ])


def main() -> int:
    options = parse_options()
    interrupt_on_termination()
    began = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def say(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    session: Session | None = None
    try:
        if options.url:
            url, started_by_us = options.url.rstrip("/"), f"the gateway at {options.url}"
        else:
            session = Session(ensure_tools(needed=("redis-server",)), keep=options.keep, prefix="gw-soak-")
            session.start(aiohttp_upstream=True)
            gateway = start_gateway(session.procs, "gateway", session.upstream, session.redis_url, 1)
            url = gateway.url
            started_by_us = (f"`python -m gateway`, 1 worker, started by the soak with its own redis-server and "
                             f"{session.upstream_kind}")
        key = create_token(url, options.master_key, ttl=int(options.minutes * 60) + 3600)["key"]
        run = run_async(soak(url, key, options, say))
        description = describe(options, started_by_us)
        print()
        print(console(run, description))
        if options.markdown:
            results = BENCH / "RESULTS.md"
            command = "python bench/soak.py" + " ".join([""] + sys.argv[1:]).replace(options.master_key, "KEY")
            results.write_text(with_soak_section(results, markdown(run, description, command, started_at)))
            print(f"\nwritten: {results} (soak section)")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        if session is not None:
            session.close()


if __name__ == "__main__":
    sys.exit(main())
