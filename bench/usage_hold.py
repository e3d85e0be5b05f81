"""How far past its limit an account is served, at full load through two instances.

    python bench/usage_hold.py [--limit 20000] [--seconds 6] [--rounds 3] [--connections 50] [--cluster]

Two gateway processes (A and B, one worker each, usage window 60 s, the default flush interval)
on this run's own redis-server (with `--cluster`: on a Redis Cluster of three masters and three
replicas, started as bench/cluster.py starts it), in front of the bench upstream. First the rate: wrk on A and on
B at once, `--seconds`, with a token of an account that has no limit (the baseline of the same
run). Then each round makes a fresh account with `api_calls: --limit` and a token in it, and
runs the same two wrk at once with that token, inside one usage window; the calls served are
wrk's requests less its non-2xx replies (every refusal is a 429), and what Redis counted for the
account is read back. Prints the rate, and per round the calls served, the overshoot over the
limit and Redis's count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request
from typing import Any

from harness import HOST, MASTER_KEY, PREFIX  # bench/ is the script's own directory
from harness.client import fast_path_kind
from harness.servers import GatewayProcess, start_gateway
from harness.session import Session, interrupt_on_termination
from harness.tools import ensure_tools
from harness.wrk import WrkResult, parse_wrk

from gateway.store.keys import keys_for
from gateway.writers.usage import parse_usage

WINDOW = 60


def both(wrk: str, gateways: list[GatewayProcess], key: str, seconds: int, connections: int) -> list[WrkResult]:
    """wrk against every gateway at once, with the same token."""
    runs = [subprocess.Popen([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                              "-H", f"Authorization: FlespiToken {key}", gw.url + "/bench/ping"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True) for gw in gateways]
    return [parse_wrk(run.communicate(timeout=seconds + 60)[0].decode(errors="replace")) for run in runs]


def api(url: str, body: object, cid: int | None = None) -> dict[str, Any]:
    """One platform API call with the master key (acting for `cid` when given): its first result."""
    headers = {"Authorization": f"FlespiToken {MASTER_KEY}", "Content-Type": "application/json"}
    if cid is not None:
        headers["x-flespi-cid"] = str(cid)
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:
        result: dict[str, Any] = json.loads(reply.read())["result"][0]
        return result


def token_in(url: str, limit: int) -> tuple[int, str]:
    """A fresh account (`limit` calls a window, 0 none) and a token in it: (account id, key)."""
    cid = int(api(url + "/platform/subaccounts", {"name": "bench", "limits": {"api_calls": limit}})["id"])
    return cid, str(api(url + "/platform/tokens", [{"ttl": 3600}], cid)["key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=6, help="each wrk run (default 6)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50, help="wrk connections per instance (default 50)")
    parser.add_argument("--cluster", action="store_true",
                        help="both instances on a Redis Cluster (3 masters, 3 replicas) instead of one Redis")
    options = parser.parse_args()
    interrupt_on_termination()
    session = Session(ensure_tools(("wrk", "redis-server")), prefix="gw-usage-")
    try:
        session.start()
        settings: dict[str, Any] = {"usage": {"window": WINDOW}}
        redis_url = session.redis_url
        ports: list[int] = []
        if options.cluster:
            from scale import start_cluster

            ports = start_cluster(session.procs, session.tools["redis-server"] or "redis-server")
            settings["redis"] = {"cluster": {"nodes": [f"{HOST}:{port}" for port in ports[:3]]}, "key_prefix": PREFIX}
            redis_url = ""
            session.say(f"Redis Cluster on {', '.join(map(str, ports))}")
        gateways = [start_gateway(session.procs, f"gateway-{name}", session.upstream, redis_url, 1,
                                  settings=settings) for name in "AB"]
        wrk = session.tools["wrk"] or "wrk"
        session.say(f"gateways {', '.join(gw.url for gw in gateways)} ({fast_path_kind(gateways[0].url)})")
        _, free = token_in(gateways[0].url, 0)
        time.sleep(0.5)
        both(wrk, gateways, free, 2, options.connections)  # warm-up: caches, upstream pools
        rate = sum(run.requests for run in both(wrk, gateways, free, options.seconds, options.connections))
        rate_per_s = rate / options.seconds
        session.say(f"no limit: {rate_per_s:,.0f} req/s through both instances")
        import redis
        import redis.cluster

        store: Any = (redis.cluster.RedisCluster(host=HOST, port=ports[0]) if options.cluster
                      else redis.Redis(host=HOST, port=session.redis_port))
        keys = keys_for(PREFIX, options.cluster)
        rows = []
        for _ in range(options.rounds):
            cid, key = token_in(gateways[0].url, options.limit)
            time.sleep(0.5)  # both instances have the account's limit
            if WINDOW - time.time() % WINDOW < options.seconds + 3:  # the round fits in one window
                time.sleep(WINDOW - time.time() % WINDOW + 0.1)
            window = int(time.time() // WINDOW)
            runs = both(wrk, gateways, key, options.seconds, options.connections)
            if int(time.time() // WINDOW) != window:
                session.say("the window ended during the round; left out")
                continue
            served = sum(run.requests - run.non_2xx for run in runs)
            time.sleep(1.5)  # the last counts reach Redis
            counted = sum(calls for calls, _ in parse_usage(store.hgetall(keys.usage(window, cid))).values())
            rows.append((served, counted))
            session.say(f"limit {options.limit}: served {served} ({100 * (served / options.limit - 1):+.2f} %), "
                        f"Redis counted {counted}")
        where = "a Redis Cluster (3 masters, 3 replicas)" if options.cluster else "one Redis"
        print(f"\nrate without a limit: {rate_per_s:,.0f} req/s through two instances on {where} "
              f"({options.connections} connections each)")
        for served, counted in rows:
            print(f"limit {options.limit:,}: served {served:,}, {100 * (served / options.limit - 1):+.2f} % over; "
                  f"Redis counted {counted:,}")
        if rows:
            worst = max(served for served, _ in rows)
            print(f"worst: {100 * (worst / options.limit - 1):+.2f} % over the limit")
    finally:
        session.close()


if __name__ == "__main__":
    main()
