"""Two builds of the gateway side by side: hot proxied throughput, alternating rounds, one run.

    python bench/ab_builds.py --a /old/checkout/.venv/bin/python --b .venv/bin/python [--rounds 4]

Each python must have its own checkout installed (`pip install -e .`, compiled). Both proxy to
the same upstream (nginx `return 200` when nginx is installed, else `bench/upstream.py`) and
share one redis-server of this run (a key prefix each), one worker each, with one cached token;
wrk (from Debian's package) runs `--duration` seconds against A, then B, then A, ... so that the machine's
drift falls on both alike. Prints each round, the medians and B / A.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from harness.procs import free_port, wait_for_port  # bench/ is the script's own directory

HERE = Path(__file__).resolve().parent
MASTER = "A" * 64


def start_gateway(python: str, upstream: int, redis_port: int, work: Path, name: str,
                  wrapper: list[str] | None = None, timeout: float = 30) -> tuple[subprocess.Popen[bytes], int, str]:
    """Build `name`'s gateway (one worker, one cached token): its process, port and token key.
    `wrapper` goes before the command (bench/instructions.py runs it under valgrind)."""
    port = free_port()
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({
        "listen": {"host": "127.0.0.1", "port": port}, "upstream": f"http://127.0.0.1:{upstream}",
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "key_prefix": f"{{ab{name}}}:"},
        "log": {"path": "off"},
        "bootstrap_master_token": MASTER}))
    checkout = Path(python).absolute().parents[2] if ".venv" in python else HERE.parent  # <checkout>/.venv/bin/python
    process = subprocess.Popen([*(wrapper or []), python, "-m", "gateway", "--config", str(config)], cwd=checkout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process, timeout=timeout)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/platform/tokens", method="POST",
                                     data=json.dumps([{"ttl": 3600}]).encode(),
                                     headers={"Authorization": f"FlespiToken {MASTER}"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        key = json.loads(reply.read())["result"][0]["key"]
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/_gateway/health"),
                                timeout=timeout) as reply:
        kind = json.loads(reply.read())["result"][0]["fast_path"]
    print(f"{name}: {python} ({kind})", flush=True)
    return process, port, str(key)


def upstream_process(port: int, work: Path) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        return subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (work / "nginx.conf").write_text(
        f"daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work}; "
        f"fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work}; "
        f"server {{ listen 127.0.0.1:{port}; keepalive_requests 100000; location / {{ return 200 ok; }} }} }}\n")
    return subprocess.Popen([nginx, "-c", str(work / "nginx.conf"), "-p", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def backends(work: Path) -> Iterator[tuple[int, int, list[subprocess.Popen[bytes]]]]:
    """The upstream and the redis-server both builds share: their ports, and the list of processes
    to stop at the end (a caller adds its gateways to it)."""
    upstream_port, redis_port = free_port(), free_port()
    processes = [upstream_process(upstream_port, work),
                 subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for_port(upstream_port, processes[0])
        wait_for_port(redis_port, processes[1])
        yield upstream_port, redis_port, processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)


def wrk(port: int, key: str, seconds: float) -> float:
    output = subprocess.run(["wrk", "-t1", "-c50", f"-d{max(1, round(seconds))}s",
                             "-H", f"Authorization: FlespiToken {key}", f"http://127.0.0.1:{port}/hot"],
                            capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if found is None or "Non-2xx" in output:
        raise SystemExit(f"wrk failed:\n{output}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="python of build A")
    parser.add_argument("--b", required=True, help="python of build B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    with backends(work) as (upstream_port, redis_port, processes):
        builds = {}
        for name, python in (("A", args.a), ("B", args.b)):
            process, port, key = start_gateway(python, upstream_port, redis_port, work, name)
            processes.append(process)
            builds[name] = (port, key)
        results: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for name, (port, key) in builds.items():
                wrk(port, key, 2)  # warm-up
                results[name].append(wrk(port, key, args.duration))
                print(f"  {name}: {results[name][-1]:,.0f} req/s", flush=True)
    a, b = statistics.median(results["A"]), statistics.median(results["B"])
    print(f"median A {a:,.0f} req/s, B {b:,.0f} req/s, B / A = {b / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
