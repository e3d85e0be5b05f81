"""The load benchmark: the gateway against nginx proxy_pass and a naive aiohttp proxy.

    python bench/run.py            # full run, about 5 minutes; writes bench/RESULTS.md
    python bench/run.py --quick    # about a minute; writes bench/out/RESULTS.quick.md

Everything it needs runs on loopback and is started (and stopped) by this script: its own
redis-server on a free port, nginx as the fast upstream and as the reference proxy, the naive
proxy (bench/naive_proxy.py) and `python -m gateway` processes. wrk drives the load. It prints
figures and says which targets they meet; it asserts nothing about speed. The pieces are in
bench/harness/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import BENCH
from harness.checkcost import check_cost
from harness.client import fast_path_kind
from harness.memory import memory_with_tokens
from harness.misses import cache_misses, write_tokens
from harness.procs import others_percent
from harness.profile import profile_gateway
from harness.report import Report
from harness.results import with_run_report
from harness.revocation import revocation
from harness.session import Session, interrupt_on_termination, run_async
from harness.throughput import start_contenders, throughput_rounds
from harness.tools import ensure_tools, machine_facts
from harness.wrk import CONNECTIONS


@dataclass(frozen=True)
class Options:
    quick: bool
    duration: int  # seconds per measured wrk run
    warmup: int
    rounds: int
    n_tokens: int  # written into Redis for the cache-miss run
    n_memory: int  # distinct tokens cached for the memory step
    n_revoke: int
    micro_calls: int
    results: Path
    keep: bool
    profile: bool
    workers_n: int


def parse_options() -> Options:
    parse = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--quick", action="store_true", help="short runs and fewer tokens (about a minute)")
    parse.add_argument("--duration", type=int, help="seconds per measured wrk run (default 10, quick 3)")
    parse.add_argument("--rounds", type=int, help="rounds over the five targets, best kept (default 2, quick 1)")
    parse.add_argument("--tokens", type=int, help="tokens written into Redis for the cache-miss run (1,000,000; quick 20,000)")
    parse.add_argument("--memory-tokens", type=int, help="distinct tokens for the memory step (100,000; quick 10,000)")
    parse.add_argument("--revocations", type=int, help="revocation rounds (100; quick 30)")
    parse.add_argument("--results", type=Path, help="where to write the results (default bench/RESULTS.md; quick: bench/out/RESULTS.quick.md)")
    parse.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, key list)")
    parse.add_argument("--profile", action="store_true", help="also run py-spy against gateway 1 worker under load")
    args = parse.parse_args()
    quick = args.quick
    n_tokens = args.tokens or (20_000 if quick else 1_000_000)
    return Options(
        quick=quick,
        duration=args.duration or (3 if quick else 10),
        warmup=1 if quick else 2,
        rounds=args.rounds or (1 if quick else 2),
        n_tokens=n_tokens,
        n_memory=min(args.memory_tokens or (10_000 if quick else 100_000), n_tokens),
        n_revoke=args.revocations or (30 if quick else 100),
        micro_calls=20_000 if quick else 100_000,
        results=args.results or (BENCH / "out" / "RESULTS.quick.md" if quick else BENCH / "RESULTS.md"),
        keep=args.keep,
        profile=args.profile,
        workers_n=max(2, os.cpu_count() or 2),
    )


def measure(session: Session, options: Options, machine: dict[str, str], started_at: str) -> Report:
    """Every measurement, in this order: the main table (and the profile), (a) cache misses,
    (c) memory, (b) revocation, (d) one check in process."""
    session.start()
    contenders = start_contenders(session, options.workers_n)
    token = contenders.token
    machine["gateway fast path"] = fast_path_kind(contenders.gateway_1.url)  # compiled with mypyc, or Python
    session.say(f"all targets answer; token id {token['id']}; {options.rounds} round(s) of {options.duration}s runs, "
                f"{CONNECTIONS} connections, wrk -t1")
    throughput = throughput_rounds(session, contenders.targets, options.rounds, options.duration, options.warmup)
    profile_note = ""
    if options.profile:
        profile_note = profile_gateway(session, contenders.gateway_1, token["key"], options.duration)
        session.say(profile_note)
    for process in contenders.processes:
        session.procs.stop(process)

    files, fill_seconds = write_tokens(session, options.n_tokens, options.n_memory, token["key"])
    misses = cache_misses(session, files, options.n_tokens, fill_seconds, options.duration, options.warmup)
    memory = memory_with_tokens(session, files.memory, options.n_memory, token["key"], options.duration)
    revoke = revocation(session, options.n_revoke)
    micro = run_async(check_cost(session.redis_url, token["key"], options.micro_calls))
    session.say("in-process: " + ", ".join(f"{name} {value:.2f} µs" for name, value in micro.items()))
    return Report(
        machine=machine, started_at=started_at, quick=options.quick, duration=options.duration,
        rounds=options.rounds, workers_n=options.workers_n, upstream_kind=session.upstream_kind,
        throughput=throughput, misses=misses, memory=memory, revoke=revoke, micro=micro,
        elapsed=time.monotonic() - session.began, profile_note=profile_note,
    )


def main() -> int:
    options = parse_options()
    interrupt_on_termination()
    tools = ensure_tools()
    machine = machine_facts(tools)
    machine["others' CPU at start"] = f"{others_percent():.0f} % of one core"
    session = Session(tools, keep=options.keep)
    started_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        report = measure(session, options, machine, started_at)
        print()
        print(report.console())
        options.results.parent.mkdir(parents=True, exist_ok=True)
        options.results.write_text(with_run_report(options.results, report.markdown()))
        print(f"\nwritten: {options.results}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
