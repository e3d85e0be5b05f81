"""The main table: the upstream, nginx proxy_pass, the naive proxy, the gateway with 1 and N
workers and the aiohttp floor, each under the same wrk load, in rounds, the best round kept."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .client import create_token, http
from .procs import process_tree
from .servers import GatewayProcess, start_gateway, start_naive, start_nginx_proxy
from .session import Session
from .wrk import WrkResult

FLOOR = "aiohttp server + client, no auth (floor)"
GATEWAY_1 = "gateway, 1 worker"
NGINX_PROXY = "nginx proxy_pass (reference)"
NAIVE = "naive aiohttp proxy"


def gateway_n(workers: int) -> str:
    return f"gateway, {workers} workers"


@dataclass
class Target:
    name: str
    url: str
    key: str | None  # None: the target takes no token (the upstream itself)
    pids: Callable[[], list[int]]  # whose CPU counts for it, read when its run starts


@dataclass
class Contenders:
    """Every target, started; the gateway's token and its 1-worker instance (profiled later)."""
    targets: list[Target]
    token: dict[str, Any]
    gateway_1: GatewayProcess
    processes: list[subprocess.Popen[bytes]]  # stopped once the rounds are over (not the upstream)


@dataclass
class Throughput:
    best: dict[str, WrkResult] = field(default_factory=dict)
    all_runs: dict[str, list[WrkResult]] = field(default_factory=dict)


def start_contenders(session: Session, workers_n: int) -> Contenders:
    procs, upstream, redis_url = session.procs, session.upstream, session.redis_url
    gw1 = start_gateway(procs, "gateway-1", upstream, redis_url, 1)
    token = create_token(gw1.url)
    key = token["key"]
    gwn = start_gateway(procs, f"gateway-{workers_n}", upstream, redis_url, workers_n)
    naive_url, naive_process = start_naive(procs, upstream, redis_url)
    floor_url, floor_process = start_naive(procs, upstream, redis_url, check=False)
    upstream_process = session.upstream_process
    assert upstream_process is not None
    targets = [Target("upstream direct (ceiling)", upstream, None, lambda: process_tree(upstream_process.pid))]
    processes = [floor_process, naive_process, gwn.process, gw1.process]
    if session.tools["nginx"]:
        proxy_url, proxy_process = start_nginx_proxy(procs, session.tools["nginx"], upstream)
        targets.append(Target(NGINX_PROXY, proxy_url, key, lambda: process_tree(proxy_process.pid)))
        processes.append(proxy_process)
    targets += [
        Target(NAIVE, naive_url, key, lambda: [naive_process.pid]),
        Target(GATEWAY_1, gw1.url, key, lambda: process_tree(gw1.process.pid)),
        Target(gateway_n(workers_n), gwn.url, key, lambda: process_tree(gwn.process.pid)),
        Target(FLOOR, floor_url, key, lambda: [floor_process.pid]),
    ]
    for target in targets:
        status, body = http("GET", target.url + "/bench/ping", target.key)
        if status != 200 or body != b"ok":
            raise RuntimeError(f"{target.name}: sanity request got {status} {body[:100]!r}")
    return Contenders(targets, token, gw1, processes)


def throughput_rounds(session: Session, targets: list[Target], rounds: int, duration: int,
                      warmup: int) -> Throughput:
    """Each target in turn, `rounds` times (noise on a shared machine moves between rounds);
    Redis commands are counted around the 1-worker gateway's runs."""
    measured = Throughput()
    for round_no in range(1, rounds + 1):
        for target in targets:
            session.runner.wrk_run(target.url, warmup, key=target.key)
            result = session.runner.wrk_run(target.url, duration, key=target.key, pids=target.pids(),
                                            count_redis=target.name == GATEWAY_1)
            measured.all_runs.setdefault(target.name, []).append(result)
            if target.name not in measured.best or result.rps > measured.best[target.name].rps:
                measured.best[target.name] = result
            session.say(f"round {round_no} {target.name:40} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                        f"p99 {result.p99_ms:6.2f} ms  cpu {result.cpu_percent:4.0f}%  "
                        f"others {result.others_percent:4.0f}%  errors {result.errors}")
    return measured
