"""The servers a measurement runs against, each on a free loopback port in the work directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import BENCH, HOST, MASTER_KEY, PREFIX, ROOT
from .client import http
from .procs import Processes, free_port, listeners, process_tree, wait_for_port
from .tools import Tools


def start_redis(procs: Processes, binary: str) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    data = procs.workdir / "redis"
    data.mkdir()
    process = procs.start("redis", [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                                    "--dir", str(data), "--protected-mode", "yes"])
    wait_for_port(port, process)
    return port, process


NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{body}
}}
"""


def start_nginx(procs: Processes, binary: str, name: str, body: str) -> subprocess.Popen[bytes]:
    directory = procs.workdir / name
    directory.mkdir()
    conf = directory / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(user + NGINX_COMMON.format(dir=directory, body=body))
    return procs.start(name, [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")])


def start_upstream(procs: Processes, tools: Tools) -> tuple[str, subprocess.Popen[bytes], str]:
    """nginx `return 200 "ok"` when installed (it does not tire first), else bench/upstream.py."""
    port = free_port()
    if tools["nginx"]:
        body = f"""    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}"""
        process = start_nginx(procs, tools["nginx"], "nginx-upstream", body)
        kind = "nginx `return 200 \"ok\"`, 1 worker"
    else:
        process = procs.start("py-upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)])
        kind = "bench/upstream.py (asyncio), nginx not installed"
    wait_for_port(port, process)
    return f"http://{HOST}:{port}", process, kind


def start_aiohttp_upstream(procs: Processes) -> tuple[str, subprocess.Popen[bytes], str]:
    """bench/upstream.py --aiohttp: WebSocket echo, a big and a slow path (what the soak needs)."""
    port = free_port()
    process = procs.start("aiohttp-upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(port),
                                               "--aiohttp"])
    wait_for_port(port, process)
    return f"http://{HOST}:{port}", process, "bench/upstream.py --aiohttp (WebSocket echo, /soak/big, /soak/slow)"


def start_nginx_proxy(procs: Processes, binary: str, upstream: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    body = f"""    upstream backend {{
        server {upstream.removeprefix("http://")};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    process = start_nginx(procs, binary, "nginx-proxy", body)
    wait_for_port(port, process)
    return f"http://{HOST}:{port}", process


def start_naive(procs: Processes, upstream: str, redis_url: str,
                check: bool = True) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    process = procs.start("naive" if check else "aiohttp-floor",
                          [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(port), "--upstream", upstream,
                           "--redis", redis_url, "--prefix", PREFIX] + ([] if check else ["--no-check"]))
    wait_for_port(port, process)
    return f"http://{HOST}:{port}", process


@dataclass
class GatewayProcess:
    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    workers: int

    def worker_pids(self) -> list[int]:
        tree = process_tree(self.process.pid)
        return tree if self.workers == 1 else [pid for pid in tree if pid != self.process.pid]


def start_gateway(procs: Processes, name: str, upstream: str, redis_url: str, workers: int,
                  argv: list[str] | None = None, settings: dict[str, Any] | None = None) -> GatewayProcess:
    """`python -m gateway` (or `argv`, given the config path) with the bench Redis, request logging
    to a file and the bench master token (`settings` replace top-level sections); ready once every
    worker listens and /auth/info answers."""
    port = free_port()
    directory = procs.workdir / name
    directory.mkdir()
    config = {
        "listen": {"host": HOST, "port": port},
        "upstream": upstream,
        "redis": {"url": redis_url, "key_prefix": PREFIX},
        "bootstrap_master_token": MASTER_KEY,
        "log": {"path": str(directory / "requests.log")},
        "workers": workers,
        **(settings or {}),
    }
    path = directory / "gateway.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    command = (argv or [sys.executable, "-m", "gateway"]) + ["--config", str(path), "--log-level", "WARNING"]
    process = procs.start(name, command, cwd=ROOT, env=env_clean)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway {name} exited:\n{procs.log_tail(name)}")
        if listeners(port) >= workers:
            try:
                if http("GET", url + "/auth/info", MASTER_KEY, timeout=1)[0] == 200:
                    return GatewayProcess(name, url, port, process, workers)
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway {name} not ready after 30s:\n{procs.log_tail(name)}")
