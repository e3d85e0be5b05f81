"""Revocation through a lost invalidation subscription, under load.

    python bench/revocation_gap.py [--rounds 100] [--load 20]

Two gateway processes (A and B, one worker each) on this run's own redis-server, in front of the
bench upstream; wrk keeps `--load` connections of hot traffic (another token) on B the whole time.
Each round makes a token through A, has B cache it, polls B back to back with it and deletes it
through A; on every other round, just before the DELETE, every pub/sub connection of the bench
Redis is cut (`CLIENT KILL TYPE pubsub`: redis-py re-subscribes at once, and what was published
in between is lost). The window is from the DELETE being sent to B's first 401. Both kinds of
round alternate in the same run, so the rounds without a cut are the baseline. Prints p50, p99
and max of each, the ratio of the p99s, how many requests B accepted after A acknowledged the
DELETE, and the load's rate.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import time
from typing import Any

from harness import HOST, MASTER_KEY  # bench/ is the script's own directory
from harness.client import create_token, fast_path_kind
from harness.procs import signal_group
from harness.revocation import percentile
from harness.servers import start_gateway
from harness.session import Session, interrupt_on_termination, run_async
from harness.tools import ensure_tools
from harness.wrk import parse_wrk

MASTER = {"Authorization": f"FlespiToken {MASTER_KEY}"}


async def one_round(a_url: str, b_url: str, redis_port: int, cut: bool) -> tuple[float, int]:
    """(ms from the DELETE being sent to B's first 401, requests B accepted after A acknowledged it)"""
    import aiohttp
    import redis.asyncio as aioredis

    admin = aioredis.Redis(host=HOST, port=redis_port)
    async with aiohttp.ClientSession() as a, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as b:
        async with a.post(a_url + "/platform/tokens", json=[{"ttl": 3600}], headers=MASTER) as reply:
            token = (await reply.json())["result"][0]
        auth = {"Authorization": f"FlespiToken {token['key']}"}
        for _ in range(100):  # B caches it
            async with b.get(b_url + "/bench/revoke", headers=auth) as reply:
                await reply.read()
                if reply.status == 200:
                    break
        else:
            raise RuntimeError("instance B never accepted the new token")
        polls: list[tuple[float, float, int]] = []
        give_up = time.monotonic() + 20.0

        async def poll() -> None:
            while time.monotonic() < give_up:
                sent = time.perf_counter()
                async with b.get(b_url + "/bench/revoke", headers=auth) as reply:
                    await reply.read()
                polls.append((sent, time.perf_counter(), reply.status))
                if reply.status == 401:
                    return

        poller = asyncio.ensure_future(poll())
        await asyncio.sleep(0.01)
        if cut:
            await admin.client_kill_filter(_type="pubsub")
        deleted = time.perf_counter()
        async with a.delete(f"{a_url}/platform/tokens/{token['id']}", headers=MASTER) as reply:
            await reply.read()
            if reply.status != 200:
                raise RuntimeError(f"DELETE through A failed: {reply.status}")
        acked = time.perf_counter()
        await poller
        await admin.aclose()
    refused = next((received for _, received, status in polls if status == 401), None)
    if refused is None:
        raise RuntimeError("instance B kept accepting a deleted token for 20 s")
    late = sum(1 for sent, _, status in polls if status == 200 and sent > acked)
    return (refused - deleted) * 1000, late


async def rounds(a_url: str, b_url: str, redis_port: int, count: int) -> dict[bool, list[tuple[float, int]]]:
    found: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for index in range(2 * count):
        cut = index % 2 == 1
        found[cut].append(await one_round(a_url, b_url, redis_port, cut))
        await asyncio.sleep(0.05)  # B re-subscribed and live again before the next round
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="rounds of each kind (default 100)")
    parser.add_argument("--load", type=int, default=20, help="wrk connections of hot traffic on B (default 20)")
    options = parser.parse_args()
    interrupt_on_termination()
    session = Session(ensure_tools(("wrk", "redis-server")), prefix="gw-revgap-")
    try:
        session.start()
        gwa = start_gateway(session.procs, "gateway-A", session.upstream, session.redis_url, 1)
        gwb = start_gateway(session.procs, "gateway-B", session.upstream, session.redis_url, 1)
        session.say(f"gateways A {gwa.url}, B {gwb.url} ({fast_path_kind(gwb.url)})")
        hot = create_token(gwa.url)["key"]
        wrk = subprocess.Popen([session.tools["wrk"] or "wrk", "-t1", f"-c{options.load}", "-d3600s", "--timeout", "5s",
                                "-H", f"Authorization: FlespiToken {hot}", gwb.url + "/bench/ping"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
        session.procs.running.append(("wrk", wrk))
        time.sleep(1.0)
        started = time.monotonic()
        found = run_async(rounds(gwa.url, gwb.url, session.redis_port, options.rounds))
        elapsed = time.monotonic() - started
        signal_group(wrk, signal.SIGINT)  # wrk prints its figures on SIGINT
        load = parse_wrk(wrk.communicate(timeout=30)[0].decode(errors="replace"))
        report(found, load.requests / max(elapsed, 1e-9), options, load.non_2xx)
    finally:
        session.close()


def report(found: dict[bool, list[tuple[float, int]]], load_rps: float, options: Any, load_errors: int) -> None:
    print(f"\nhot load on B: ~{load_rps:,.0f} req/s over {options.load} connections ({load_errors} non-2xx)")
    p99 = {}
    for cut, label in ((False, "subscription kept"), (True, "subscription cut just before the DELETE")):
        windows = [window for window, _ in found[cut]]
        late = sum(count for _, count in found[cut])
        p99[cut] = percentile(windows, 99)
        print(f"{label:42s} rounds {len(windows):4d}  p50 {percentile(windows, 50):7.2f} ms  "
              f"p99 {p99[cut]:7.2f} ms  max {max(windows):7.2f} ms  accepted after the DELETE's reply: {late}")
    print(f"p99 with the cut / p99 without: {p99[True] / p99[False]:.2f}")


if __name__ == "__main__":
    main()
