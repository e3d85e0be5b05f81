"""Decision mode's throughput against its baselines, all measured in one run.

    python bench/decision.py [--duration 5] [--rounds 2]

Starts the bench Redis and the upstream (nginx `return 200 "ok"`, 1 worker), one gateway
(`workers: 1`, requests logged to a file, one cached standard token), and three nginx (1 worker
each): `proxy_pass` to the upstream, `proxy_pass` to the gateway, and `proxy_pass` to the
upstream behind `auth_request` to the gateway (docs/decision.md's nginx configuration without
its CORS and error mapping, with the keep-alive pools of the other nginx rows). wrk (1 thread,
50 connections, the token in every request) runs against

  1. nginx `return 200` (the ceiling of an HTTP server here), bench/floor_server.py (uvloop and
     httptools answering a fixed 200: the ceiling of a Python server on the fast path's stack),
     the gateway proxying to nginx, and the decision endpoint hit directly
     (`/_gateway/auth/bench/ping`, Envoy's shape);
  2. nginx `proxy_pass` alone, nginx -> gateway proxy, nginx + `auth_request` to the gateway;

in rounds (the best round of each kept), and prints req/s, p99, the CPU of the gateway during
each run (and per request: what others on the machine take does not change it), and the two
targets: decision >= 0.4 x nginx `return 200`, nginx + auth_request >= 0.7 x nginx -> gateway
proxy. Loopback only; every process is stopped at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import HOST  # bench/ is the script's own directory
from harness.client import create_token, fast_path_kind
from harness.procs import free_port, others_percent, process_tree, wait_for_port
from harness.servers import GatewayProcess, start_gateway, start_nginx, start_nginx_proxy
from harness.session import Session, interrupt_on_termination
from harness.tools import ensure_tools
from harness.wrk import WrkResult

AUTH_REQUEST = """    upstream gateway {{ server {gateway}; keepalive 64; keepalive_requests 1000000; }}
    upstream backend {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            auth_request /_gateway/auth;
            auth_request_set $gw_token_id $upstream_http_x_token_id;
            auth_request_set $gw_account_id $upstream_http_x_account_id;
            auth_request_set $gw_request_id $upstream_http_x_request_id;
            auth_request_set $gw_uri $upstream_http_x_authorized_uri;
            proxy_pass http://backend$gw_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Token-Id $gw_token_id;
            proxy_set_header X-Account-Id $gw_account_id;
            proxy_set_header X-Request-ID $gw_request_id;
        }}
        location = /_gateway/auth {{
            internal;
            proxy_pass http://gateway/_gateway/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}"""

ROWS = [
    ("nginx return 200", "the ceiling of an HTTP server here"),
    ("python floor", "uvloop + httptools, a fixed 200 (bench/floor_server.py)"),
    ("gateway proxy", "gateway 1 worker -> nginx return 200"),
    ("decision direct", "wrk -> gateway /_gateway/auth/bench/ping"),
    ("nginx proxy_pass", "nginx -> nginx return 200"),
    ("nginx -> gateway proxy", "nginx -> gateway -> nginx return 200"),
    ("nginx + auth_request", "nginx (auth_request to the gateway) -> nginx return 200"),
]


def start_auth_request_nginx(session: Session, gateway: GatewayProcess) -> str:
    port = free_port()
    body = AUTH_REQUEST.format(gateway=f"{HOST}:{gateway.port}", upstream=session.upstream.removeprefix("http://"),
                               host=HOST, port=port)
    nginx = session.tools["nginx"]
    assert nginx is not None
    process = start_nginx(session.procs, nginx, "nginx-auth-request", body)
    wait_for_port(port, process)
    return f"http://{HOST}:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every target (the best kept)")
    args = parser.parse_args()
    interrupt_on_termination()
    tools = ensure_tools(("wrk", "redis-server", "nginx"))
    session = Session(tools, prefix="gw-bench-decision-")
    try:
        session.start()
        nginx = tools["nginx"]
        assert nginx is not None
        gateway = start_gateway(session.procs, "gateway", session.upstream, session.redis_url, 1,
                                settings={"trusted_proxies": [HOST]})
        key = str(create_token(gateway.url)["key"])
        session.say(f"gateway {gateway.url} ({fast_path_kind(gateway.url)} fast path)")
        proxy_alone, proxy_alone_process = start_nginx_proxy(session.procs, nginx, session.upstream)
        to_gateway_port = free_port()
        to_gateway = start_nginx(session.procs, nginx, "nginx-to-gateway", NGINX_TO_GATEWAY.format(
            gateway=f"{HOST}:{gateway.port}", host=HOST, port=to_gateway_port))
        wait_for_port(to_gateway_port, to_gateway)
        auth_request = start_auth_request_nginx(session, gateway)
        floor_port = free_port()
        floor = session.procs.start("python-floor", [sys.executable, str(Path(__file__).with_name("floor_server.py")),
                                                     "--port", str(floor_port)])
        wait_for_port(floor_port, floor)
        urls = {"nginx return 200": session.upstream, "python floor": f"http://{HOST}:{floor_port}",
                "gateway proxy": gateway.url,
                "decision direct": gateway.url + "/_gateway/auth", "nginx proxy_pass": proxy_alone,
                "nginx -> gateway proxy": f"http://{HOST}:{to_gateway_port}", "nginx + auth_request": auth_request}
        session.say(f"others on the machine: {others_percent():.0f}% of one core before the runs")
        best: dict[str, WrkResult] = {}
        # Each row's CPU is that of the server it measures first: the gateway's where it takes part.
        assert session.upstream_process is not None
        pids = gateway.worker_pids()
        served_by = {"nginx return 200": process_tree(session.upstream_process.pid), "python floor": [floor.pid],
                     "nginx proxy_pass": process_tree(proxy_alone_process.pid)}
        for round_number in range(args.rounds):
            for name, _ in ROWS:
                session.runner.wrk_run(urls[name], 1, key=key)  # warm-up
                result = session.runner.wrk_run(urls[name], args.duration, key=key,
                                                pids=served_by.get(name, pids))
                if result.errors:
                    raise SystemExit(f"{name}: {result.non_2xx} non-2xx, {result.socket_errors} socket errors\n"
                                     f"{result.raw}")
                session.say(f"round {round_number + 1} {name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms, "
                            f"gateway CPU {result.cpu_percent:.0f}%, others {result.others_percent:.0f}%")
                if name not in best or result.rps > best[name].rps:
                    best[name] = result
        print()
        # The gateway's CPU per request does not depend on how much of the machine others take.
        # CPU: the gateway's where it takes part, else the one server's (nginx's worker, the floor).
        print(f"{'target':<24} {'req/s':>9} {'p99 ms':>7} {'CPU %':>8} {'us/req':>9} {'others %':>8}  what")
        for name, what in ROWS:
            result = best[name]
            per_request = f"{result.cpu_percent * 1e4 / result.rps:.1f}"
            print(f"{name:<24} {result.rps:>9,.0f} {result.p99_ms:>7.2f} {result.cpu_percent:>8.0f} "
                  f"{per_request:>9} {result.others_percent:>8.0f}  {what}")
        decision = best["decision direct"].rps

        def cpu_per_request(name: str) -> float:
            return best[name].cpu_percent / best[name].rps
        print()
        print(f"decision / nginx return 200        = {decision / best['nginx return 200'].rps:.2f} (target >= 0.40)")
        print(f"decision / python floor            = {decision / best['python floor'].rps:.2f}")
        # Throughput ratios move with what others take of the machine; CPU per request does not.
        ratio = cpu_per_request("nginx return 200") / cpu_per_request("decision direct")
        print(f"nginx return 200 / decision, CPU per request = {ratio:.2f}")
        print(f"python floor / nginx return 200    = {best['python floor'].rps / best['nginx return 200'].rps:.2f}")
        print(f"decision / gateway proxy           = {decision / best['gateway proxy'].rps:.2f}")
        auth = best["nginx + auth_request"].rps
        print(f"auth_request / nginx -> gateway    = {auth / best['nginx -> gateway proxy'].rps:.2f} (target >= 0.70)")
        print(f"auth_request / nginx proxy_pass    = {auth / best['nginx proxy_pass'].rps:.2f}")
    finally:
        session.close()
    return 0


NGINX_TO_GATEWAY = """    upstream gateway {{ server {gateway}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}"""


if __name__ == "__main__":
    raise SystemExit(main())
