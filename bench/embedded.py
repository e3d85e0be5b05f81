"""What one token creation costs on the embedded store as it fills, against redis-server in the same run.

    python bench/embedded.py                  # up to 100,000 tokens (a few minutes)
    python bench/embedded.py --tokens 20000   # smaller and faster

For each store, a `python -m gateway` of its own (one worker, no request log): the embedded store
(`memory://`, its files in the work directory) and a redis-server started here with
`--appendonly yes --appendfsync always` (durable before it answers, as the embedded store is).
Through the tokens API, as a user would:

1. the latency of `POST /platform/tokens` with one token, one request at a time (`--singles`
   of them), on the empty store;
2. the store filled to `--tokens` with POSTs of 1,000 tokens (the time it takes is printed);
3. the same single creations again at that size (for the embedded store, also once its
   compaction child has finished), then 32 in flight at once (the journal's group commit: one
   fsync for the creations waiting together);
4. for the embedded store: the time from start to ready at that size (snapshot loaded, journal
   replayed) as the fill left the files, the time of a compaction of them (what the gateway's
   child process does), and start to ready again after it, with the files' sizes.

The ratio that matters is a creation at `--tokens` over one on the empty store (the embedded
store's former snapshot-per-change made it grow with the store: seconds at 5,000 tokens); the
redis-server column is the baseline measured beside it. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness import HOST, MASTER_KEY, PREFIX, ROOT
from harness.client import http
from harness.procs import Processes, free_port, others_percent, wait_for_port
from harness.servers import GatewayProcess, start_gateway
from harness.session import interrupt_on_termination
from harness.tools import ensure_tools

FILL_BATCH = 1000
IN_FLIGHT = 32
READY_TIMEOUT = 900.0


def create(url: str, count: int, label: str) -> None:
    tokens = [{"ttl": 86400, "info": f"{label}-{i}"} for i in range(count)]
    status, body = http("POST", url + "/platform/tokens", MASTER_KEY, tokens, timeout=120)
    if status != 200:
        raise RuntimeError(f"creation failed: {status} {body[:200]!r}")


def singles(url: str, count: int, label: str) -> list[float]:
    """Milliseconds of each single-token creation, one after the other."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        create(url, 1, f"{label}-{i}")
        times.append((time.perf_counter() - started) * 1000)
    return times


async def in_flight(url: str, count: int) -> float:
    """Creations per second with IN_FLIGHT single-token POSTs at a time."""
    import aiohttp

    headers = {"Authorization": f"FlespiToken {MASTER_KEY}"}
    queue = iter(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            async with session.post(url + "/platform/tokens", json=[{"ttl": 86400, "info": f"flight-{i}"}],
                                    headers=headers) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"creation failed: {reply.status}")
                await reply.read()

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
    return count / (time.perf_counter() - started)


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "max_ms": ordered[-1]}


def fill(url: str, tokens: int) -> float:
    started = time.perf_counter()
    for batch in range(0, tokens, FILL_BATCH):
        create(url, min(FILL_BATCH, tokens - batch), f"fill-{batch}")
    return time.perf_counter() - started


def ready_seconds(procs: Processes, name: str, settings: dict[str, Any], upstream: str) -> tuple[float, GatewayProcess]:
    """`python -m gateway` as start_gateway starts it, but given as long as its store takes to load."""
    port = free_port()
    directory = procs.workdir / name
    directory.mkdir()
    config = {"listen": {"host": HOST, "port": port}, "upstream": upstream, "bootstrap_master_token": MASTER_KEY,
              **settings}
    (directory / "gateway.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    started = time.perf_counter()
    process = procs.start(name, [sys.executable, "-m", "gateway", "--config", str(directory / "gateway.yaml"),
                                 "--log-level", "WARNING"], cwd=ROOT, env=env)
    url = f"http://{HOST}:{port}"
    while process.poll() is None and time.perf_counter() - started < READY_TIMEOUT:
        try:
            if http("GET", url + "/auth/info", MASTER_KEY, timeout=1)[0] == 200:
                return time.perf_counter() - started, GatewayProcess(name, url, port, process, 1)
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway {name} not ready:\n{procs.log_tail(name)}")


def measure(procs: Processes, name: str, redis: dict[str, Any], tokens: int, count: int) -> dict[str, Any]:
    upstream = f"http://{HOST}:9"  # never called: only the tokens API is used
    settings = {"redis": redis, "log": {"path": "off"}}
    gateway = start_gateway(procs, name, upstream, str(redis["url"]), 1, settings=settings)
    figures: dict[str, Any] = {"empty": summary(singles(gateway.url, count, "empty"))}
    figures["fill_seconds"] = fill(gateway.url, tokens)
    figures["full"] = summary(singles(gateway.url, count, "full"))
    data_file = redis.get("data_file")
    if data_file is not None:  # again once no compaction child competes for the CPU
        wait_compaction_idle(Path(data_file))
        figures["settled"] = summary(singles(gateway.url, count, "settled"))
    figures["in_flight_per_s"] = asyncio.run(in_flight(gateway.url, count * 4))
    procs.stop(gateway.process)
    return figures


def wait_compaction_idle(data_file: Path, timeout: float = 900.0) -> None:
    """Until the compaction lock is free and at most one finished segment waits (none running)."""
    import fcntl

    lock = data_file.with_name(data_file.name + ".compact.lock")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segments = list(data_file.parent.glob(data_file.name + ".journal.*"))
        if lock.exists() and len(segments) <= 2:
            with open(lock, "rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    pass
                else:
                    return
        time.sleep(1)


def files_mb(directory: Path, stem: str) -> dict[str, float]:
    return {path.name.removeprefix(stem) or "snapshot": path.stat().st_size / 1e6
            for path in sorted(directory.glob(stem + "*")) if path.is_file() and not path.name.endswith("lock")}


def embedded_restarts(procs: Processes, data_file: Path) -> dict[str, Any]:
    """Start-to-ready as the fill left the files; then the compaction the gateway runs in a child
    process, run here on the stopped gateway's files (timed), and start-to-ready again."""
    from gateway.store.embedded import DataFiles, compact

    settings = {"redis": {"url": "memory://", "data_file": str(data_file)}, "log": {"path": "off"}}
    upstream = f"http://{HOST}:9"
    before = files_mb(data_file.parent, data_file.name)
    first, gateway = ready_seconds(procs, "embedded-restart", settings, upstream)
    procs.stop(gateway.process)
    started = time.perf_counter()
    compact(str(data_file), DataFiles(data_file).segments()[-1])
    compaction = time.perf_counter() - started
    second, gateway = ready_seconds(procs, "embedded-compacted", settings, upstream)
    after = files_mb(data_file.parent, data_file.name)
    procs.stop(gateway.process)
    return {"ready_s_journal": first, "files_mb_journal": before, "compaction_s": compaction,
            "ready_s_compacted": second, "files_mb_compacted": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--singles", type=int, default=100, help="single creations timed at each size")
    args = parser.parse_args()
    interrupt_on_termination()
    tools = ensure_tools(("redis-server",))
    binary = tools["redis-server"]
    assert binary is not None
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-embedded-"))
    procs = Processes(workdir)
    busy = others_percent()
    try:
        port = free_port()
        (workdir / "redis").mkdir()
        redis = procs.start("redis", [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "yes",
                                      "--appendfsync", "always", "--dir", str(workdir / "redis")])
        wait_for_port(port, redis)
        data_file = workdir / "store" / "gateway-data.json"
        data_file.parent.mkdir(parents=True)
        print(f"other processes' CPU when it started: {busy:.0f}% of the machine", flush=True)
        print(f"one-token POST /platform/tokens, {args.singles} one after the other (milliseconds):")
        print(f"{'store':<14}{'empty median':>14}{'full median':>13}{'full p90':>10}{'full max':>10}"
              f"{'full/empty':>12}{'fill s':>9}{f'{IN_FLIGHT} in flight/s':>17}", flush=True)
        results = {}
        for name, redis_section in (("embedded", {"url": "memory://", "data_file": str(data_file)}),
                                    ("redis-server", {"url": f"redis://{HOST}:{port}/0", "key_prefix": PREFIX})):
            figures = results[name] = measure(procs, f"gateway-{name}", redis_section, args.tokens, args.singles)
            empty, full = figures["empty"], figures["full"]
            print(f"{name:<14}{empty['median_ms']:>14.2f}{full['median_ms']:>13.2f}{full['p90_ms']:>10.2f}"
                  f"{full['max_ms']:>10.2f}{full['median_ms'] / empty['median_ms']:>12.2f}"
                  f"{figures['fill_seconds']:>9.1f}{figures['in_flight_per_s']:>17.0f}", flush=True)
        settled, empty_ms = results["embedded"]["settled"], results["embedded"]["empty"]["median_ms"]
        print(f"embedded, no compaction running: median {settled['median_ms']:.2f}, p90 {settled['p90_ms']:.2f}, "
              f"max {settled['max_ms']:.2f}; / empty: {settled['median_ms'] / empty_ms:.2f}", flush=True)
        ratio = results["embedded"]["full"]["median_ms"] / results["redis-server"]["full"]["median_ms"]
        print(f"embedded / redis-server at {args.tokens:,} tokens (median): {ratio:.2f}", flush=True)
        restarts = embedded_restarts(procs, data_file)
        print(f"embedded store start to ready at {args.tokens:,} tokens: {restarts['ready_s_journal']:.1f} s with "
              f"the files as the fill left them {restarts['files_mb_journal']}; compaction "
              f"{restarts['compaction_s']:.1f} s; {restarts['ready_s_compacted']:.1f} s after it "
              f"{restarts['files_mb_compacted']} (MB)")
        print(f"other processes' CPU at the end: {others_percent():.0f}% of the machine")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
