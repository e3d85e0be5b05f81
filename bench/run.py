"""The load benchmark: the gateway against nginx proxy_pass and a naive aiohttp proxy.

    python bench/run.py            # full run, about 5 minutes; writes bench/RESULTS.md
    python bench/run.py --quick    # about a minute; writes bench/out/RESULTS.quick.md

Everything it needs runs on loopback and is started (and stopped) by this script: its own
redis-server on a free port, nginx as the fast upstream and as the reference proxy, the naive
proxy (bench/naive_proxy.py) and `python -m gateway` processes. wrk drives the load. It prints
figures and says which targets they meet; it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

MASTER_KEY = "BenchMaster" + "0123456789" * 5 + "xyz"  # 64 characters [A-Za-z0-9]
PREFIX = "{gw}:"
FLOOR = "aiohttp server + client, no auth (floor)"
CONNECTIONS = 50
HOST = "127.0.0.1"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


# -- processes --------------------------------------------------------------------------------

class Processes:
    """Every process this script starts, each in its own process group, stopped in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{name}.out", "ab")
        process = subprocess.Popen(argv, cwd=cwd or self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold workers that outlive their parent: make sure it is empty.
        _signal_group(process, signal.SIGKILL)
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self.running = [(n, p) for n, p in self.running if p is not process]

    def stop_all(self) -> None:
        for _, process in reversed(list(self.running)):
            self.stop(process)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.out"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


def listeners(port: int) -> int:
    """Listening sockets on the port (one per worker with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
                count += 1
    return count


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (SC_CLK_TCK ticks)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU time every core spent busy (not idle, not waiting for I/O) since boot, in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def our_cpu_seconds() -> float:
    """This script and everything it started, alive or already reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / ticks  # cutime + cstime of waited-for children
    return cpu_seconds(process_tree(os.getpid())) + reaped


def others_percent(seconds: float = 1.0) -> float:
    """CPU used by processes that are not ours, in % of one core, sampled over `seconds`."""
    busy, ours, started = machine_busy_seconds(), our_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return max(0.0, 100 * ((machine_busy_seconds() - busy) - (our_cpu_seconds() - ours)) / elapsed)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


# -- HTTP helpers (blocking, loopback) --------------------------------------------------------

def http(method: str, url: str, key: str | None = None, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if key:
        request.add_header("Authorization", f"FlespiToken {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- tools ------------------------------------------------------------------------------------

def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def ensure_tools() -> dict[str, str | None]:
    wanted = {"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server"}
    missing = [package for binary, package in wanted.items() if find_binary(binary) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing with apt-get: {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False, timeout=600,
                       stdout=subprocess.DEVNULL)
    tools = {binary: find_binary(binary) for binary in wanted}
    if tools["wrk"] is None or tools["redis-server"] is None:
        raise SystemExit("wrk and redis-server are needed (run as root to have them installed with apt-get)")
    return tools


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine_facts(tools: dict[str, str | None]) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    import aiohttp
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event loop": loop,
        "aiohttp": aiohttp.__version__,
        "nginx": version_of([tools["nginx"], "-v"]).replace("nginx version: ", "") if tools["nginx"] else "not installed",
        "wrk": " ".join(version_of([tools["wrk"] or "wrk", "-v"]).split()[:2]),
        "redis": version_of([tools["redis-server"] or "redis-server", "--version"]),
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- servers ----------------------------------------------------------------------------------

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


def start_upstream(procs: Processes, tools: dict[str, str | None]) -> tuple[str, subprocess.Popen[bytes], str]:
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


def start_gateway(procs: Processes, name: str, upstream: str, redis_url: str, workers: int) -> GatewayProcess:
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
    }
    path = directory / "gateway.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    out = open(procs.workdir / f"{name}.out", "ab")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(path), "--log-level", "WARNING"],
                               cwd=ROOT, env=env_clean, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    procs.running.append((name, process))
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


def create_token(gateway_url: str) -> dict[str, Any]:
    status, body = http("POST", gateway_url + "/platform/tokens", MASTER_KEY, [{"ttl": 3600, "info": "bench"}])
    if status != 200:
        raise RuntimeError(f"token creation failed: {status} {body[:200]!r}")
    return json.loads(body)["result"][0]  # type: ignore[no-any-return]


def fast_path_kind(gateway_url: str) -> str:
    status, body = http("GET", gateway_url + "/_gateway/health", timeout=2)
    return str(json.loads(body)["result"][0].get("fast_path", "?")) if status == 200 else "?"


def cached_tokens(gateway_url: str) -> int:
    status, body = http("GET", gateway_url + "/_gateway/health", timeout=2)
    return int(json.loads(body)["result"][0]["tokens_cached"]) if status == 200 else -1


# -- wrk --------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_percent: float = 0.0  # of the target's processes during the run
    others_percent: float = 0.0  # of processes this script did not start, during the run
    machine_percent: float = 0.0  # every process on the machine (wrk and the upstream too), % of one core
    redis_commands: int = 0
    redis_detail: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    result = WrkResult(raw=text)
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result.rps = float(match.group(1))
    if match := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        result.requests = int(match.group(1))
        result.seconds = _ms(match.group(2) + match.group(3)) / 1000
    if match := re.search(r"^\s+50%\s+(\S+)", text, re.M):
        result.p50_ms = _ms(match.group(1))
    if match := re.search(r"^\s+99%\s+(\S+)", text, re.M):
        result.p99_ms = _ms(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        result.non_2xx = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result.socket_errors = sum(int(x) for x in match.groups())
    return result


class Runner:
    def __init__(self, procs: Processes, wrk: str, redis_port: int) -> None:
        self.procs = procs
        self.wrk = wrk
        self.redis_port = redis_port
        import redis
        self.redis = redis.Redis(host=HOST, port=redis_port)

    def command_counts(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def wrk_run(self, url: str, seconds: float, *, key: str | None = None, script_args: list[str] | None = None,
                pids: list[int] | None = None, count_redis: bool = False, stop_when: Any = None,
                max_seconds: float | None = None) -> WrkResult:
        argv = [self.wrk, "-t1", f"-c{CONNECTIONS}", f"-d{int(max_seconds or seconds)}s", "--latency", "--timeout", "5s"]
        if key is not None:
            argv += ["-H", f"Authorization: FlespiToken {key}"]
        if script_args is not None:
            argv += ["-s", str(BENCH / "random_tokens.lua")]
        argv.append(url + "/bench/ping")
        if script_args is not None:
            argv += ["--", *script_args]
        before_cmds = self.command_counts() if count_redis else {}
        before_cpu, started = cpu_seconds(pids or []), time.monotonic()
        before_busy, before_ours = machine_busy_seconds(), our_cpu_seconds()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.procs.running.append(("wrk", process))
        try:
            if stop_when is not None:
                deadline = time.monotonic() + (max_seconds or seconds)
                while process.poll() is None and time.monotonic() < deadline:
                    if stop_when():
                        _signal_group(process, signal.SIGINT)  # wrk prints its figures on SIGINT
                        break
                    time.sleep(0.2)
            output, _ = process.communicate(timeout=(max_seconds or seconds) + 60)
        finally:
            self.procs.stop(process, grace=2)
        elapsed = time.monotonic() - started
        result = parse_wrk(output.decode(errors="replace"))
        others = (machine_busy_seconds() - before_busy) - (our_cpu_seconds() - before_ours)
        result.others_percent = max(0.0, 100 * others / elapsed)
        result.machine_percent = 100 * (machine_busy_seconds() - before_busy) / elapsed
        if pids:
            result.cpu_percent = 100 * (cpu_seconds(pids) - before_cpu) / elapsed
        if count_redis:
            after = self.command_counts()
            delta = {name: after[name] - before_cmds.get(name, 0) for name in after}
            delta["info"] = delta.get("info", 0) - 1  # our own INFO after the run
            result.redis_detail = {name: n for name, n in delta.items() if n > 0}
            result.redis_commands = sum(result.redis_detail.values())
        if result.requests == 0:
            raise RuntimeError(f"wrk made no requests against {url}:\n{result.raw}")
        return result


# -- tokens written straight into Redis -------------------------------------------------------

_TABLE = bytes((ord(c) for c in (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" * 5)[:256]))


def random_keys(count: int) -> list[str]:
    """64-character [A-Za-z0-9] keys from os.urandom (a byte maps to one character)."""
    raw = os.urandom(64 * count).translate(_TABLE).decode("ascii")
    return [raw[i:i + 64] for i in range(0, len(raw), 64)]


async def fill_tokens(redis_url: str, keys: list[str], batch: int = 5000) -> None:
    """The records exactly as the tokens API creates them, written by the gateway's own TokenStore."""
    from gateway.config import RedisSettings
    from gateway.store import TokenStore, connect_redis
    from gateway.tokens import key_digest
    from gateway.validation import DEFAULTS

    client = connect_redis(RedisSettings(url=redis_url, socket_timeout=30, connect_timeout=5))
    store = TokenStore(client, PREFIX)
    try:
        ids = await store.allocate_ids(len(keys))
        now = int(time.time())
        pending: list[asyncio.Task[None]] = []
        for start in range(0, len(keys), batch):
            records = [{**DEFAULTS, "ttl": 3600, "info": "", "id": token_id, "digest": key_digest(key),
                        "created": now, "accessed": 0, "cid": 0}
                       for token_id, key in zip(ids[start:start + batch], keys[start:start + batch])]
            pending.append(asyncio.ensure_future(store.insert(records)))
            if len(pending) >= 4:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await client.aclose()


# -- revocation across instances --------------------------------------------------------------

async def revocation_rounds(url_a: str, url_b: str, rounds: int) -> dict[str, Any]:
    """Delete through A while B is polled back to back; how long does B still accept the token?"""
    import aiohttp

    master = {"Authorization": f"FlespiToken {MASTER_KEY}"}
    windows, after_ack = [], []
    late_accepts = 0
    connector_b = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession() as a, aiohttp.ClientSession(connector=connector_b) as b:
        for _ in range(rounds):
            async with a.post(url_a + "/platform/tokens", json=[{"ttl": 3600}], headers=master) as reply:
                token = (await reply.json())["result"][0]
            auth = {"Authorization": f"FlespiToken {token['key']}"}
            for _ in range(100):  # B caches it
                async with b.get(url_b + "/bench/revoke", headers=auth) as reply:
                    await reply.read()
                    if reply.status == 200:
                        break
            else:
                raise RuntimeError("instance B never accepted the new token")
            polls: list[tuple[float, float, int]] = []
            stop_polling = time.monotonic() + 5.0

            async def poll() -> None:
                while time.monotonic() < stop_polling:
                    sent = time.perf_counter()
                    async with b.get(url_b + "/bench/revoke", headers=auth) as reply:
                        await reply.read()
                    polls.append((sent, time.perf_counter(), reply.status))
                    if reply.status == 401:
                        return

            poller = asyncio.ensure_future(poll())
            await asyncio.sleep(0.01)
            deleted = time.perf_counter()
            async with a.delete(f"{url_a}/platform/tokens/{token['id']}", headers=master) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"DELETE through A failed: {reply.status}")
            acked = time.perf_counter()
            await poller
            refused = next((received for _, received, status in polls if status == 401), None)
            if refused is None:
                raise RuntimeError("instance B kept accepting a deleted token for 5 s")
            windows.append((refused - deleted) * 1000)
            after_ack.append(max(0.0, refused - acked) * 1000)
            late_accepts += sum(1 for sent, _, status in polls if status == 200 and sent > acked)
            await asyncio.sleep(0.01)
    return {"rounds": rounds, "windows_ms": windows, "after_ack_ms": after_ack, "late_accepts": late_accepts}


# -- one check, in process --------------------------------------------------------------------

async def check_cost(redis_url: str, key: str, calls: int) -> dict[str, float]:
    from gateway.accessed import AccessedWriter
    from gateway.accounts import AccountDirectory, AccountStore
    from gateway.api import AUTH_INFO
    from gateway.auth import Authenticator, extract_key
    from gateway.cache import TokenCache
    from gateway.checks import RequestFacts, build_checks
    from gateway.compiler import TokenCompiler
    from gateway.config import LogSettings, RedisSettings, Settings, UsageSettings
    from gateway.logs import LogWriter
    from gateway.store import TokenStore, connect_redis
    from gateway.tokens import key_digest
    from gateway.usage import UsageMeter

    client = connect_redis(RedisSettings(url=redis_url))
    try:
        # The same services the app builds (gateway/app.py services()), without the HTTP server.
        defaults = Settings(routes=())
        store = TokenStore(client, PREFIX)
        cache = TokenCache(store, defaults.cache, TokenCompiler(defaults, store))
        accessed = AccessedWriter(store, 0.1)
        directory = AccountDirectory(AccountStore(client, PREFIX), defaults.cache.max_age)
        meter = UsageMeter(store, UsageSettings(), directory, LogWriter(LogSettings(), []))
        checks = build_checks(defaults.platform_prefixes, frozenset({AUTH_INFO}), directory, meter)
        auth = Authenticator(cache, accessed, checks)
        facts = RequestFacts(method="GET", path="/bench/ping", forward_path="/bench/ping", query="",
                             client_ip=HOST, origin=None, acting_cid=None, now=time.time())
        await auth.authenticate(key, facts)  # the one load from Redis; every call below is a cache hit
        header = f"FlespiToken {key}"

        best: dict[str, float] = {}
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(calls):
                await auth.authenticate(key, facts)
            took = (time.perf_counter() - started) / calls * 1e6
            best["authenticate"] = min(best.get("authenticate", took), took)
            started = time.perf_counter()
            for _ in range(calls):
                await auth.authenticate(extract_key(header), facts)
            took = (time.perf_counter() - started) / calls * 1e6
            best["extract_key + authenticate"] = min(best.get("extract_key + authenticate", took), took)
            started = time.perf_counter()
            for _ in range(calls):
                key_digest(key)
            took = (time.perf_counter() - started) / calls * 1e6
            best["key_digest (sha256) alone"] = min(best.get("key_digest (sha256) alone", took), took)
        return best
    finally:
        await client.aclose()


def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


# -- report -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def scaling_verdict(scale: float, per_core: float, saturated: bool, cores: float, workers: int) -> bool | None:
    """N workers against one: met at 0.75 × N the throughput; on a saturated machine, met at 0.75
    of one worker's throughput per core used if the workers had at least 1.25 cores, and None
    (nothing shown either way) with fewer; a loss per core, or cores left unused, is a miss."""
    if scale >= 0.75 * workers:
        return True
    if per_core < 0.75 or not saturated:
        return False
    return True if cores >= 1.25 else None


def main() -> int:
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
    duration = args.duration or (3 if quick else 10)
    warmup = 1 if quick else 2
    rounds = args.rounds or (1 if quick else 2)
    n_tokens = args.tokens or (20_000 if quick else 1_000_000)
    n_memory = min(args.memory_tokens or (10_000 if quick else 100_000), n_tokens)
    n_revoke = args.revocations or (30 if quick else 100)
    results_path = args.results or (BENCH / "out" / "RESULTS.quick.md" if quick else BENCH / "RESULTS.md")
    workers_n = os.cpu_count() or 2
    workers_n = max(2, workers_n)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    tools = ensure_tools()
    machine = machine_facts(tools)
    machine["others' CPU at start"] = f"{others_percent():.0f} % of one core"
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    procs = Processes(workdir)
    began = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def say(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    try:
        say(f"work directory {workdir}")
        redis_port, _ = start_redis(procs, tools["redis-server"] or "redis-server")
        redis_url = f"redis://{HOST}:{redis_port}/0"
        runner = Runner(procs, tools["wrk"] or "wrk", redis_port)
        upstream, upstream_process, upstream_kind = start_upstream(procs, tools)
        say(f"redis-server on {redis_port}; upstream {upstream} ({upstream_kind})")
        gw1 = start_gateway(procs, "gateway-1", upstream, redis_url, 1)
        token = create_token(gw1.url)
        key = token["key"]
        machine["gateway fast path"] = fast_path_kind(gw1.url)  # compiled with mypyc, or Python
        gwn = start_gateway(procs, f"gateway-{workers_n}", upstream, redis_url, workers_n)
        naive_url, naive_process = start_naive(procs, upstream, redis_url)
        floor_url, floor_process = start_naive(procs, upstream, redis_url, check=False)
        targets: list[tuple[str, str, str | None, Any]] = [
            ("upstream direct (ceiling)", upstream, None, lambda: process_tree(upstream_process.pid)),
        ]
        if tools["nginx"]:
            proxy_url, proxy_process = start_nginx_proxy(procs, tools["nginx"], upstream)
            targets.append(("nginx proxy_pass (reference)", proxy_url, key, lambda: process_tree(proxy_process.pid)))
        targets += [
            ("naive aiohttp proxy", naive_url, key, lambda: [naive_process.pid]),
            ("gateway, 1 worker", gw1.url, key, lambda: process_tree(gw1.process.pid)),
            (f"gateway, {workers_n} workers", gwn.url, key, lambda: process_tree(gwn.process.pid)),
            (FLOOR, floor_url, key, lambda: [floor_process.pid]),
        ]
        for name, url, target_key, _ in targets:
            status, body = http("GET", url + "/bench/ping", target_key)
            if status != 200 or body != b"ok":
                raise RuntimeError(f"{name}: sanity request got {status} {body[:100]!r}")
        say(f"all targets answer; token id {token['id']}; {rounds} round(s) of {duration}s runs, "
            f"{CONNECTIONS} connections, wrk -t1")

        best: dict[str, WrkResult] = {}
        all_runs: dict[str, list[WrkResult]] = {}
        for round_no in range(1, rounds + 1):
            for name, url, target_key, pids in targets:
                runner.wrk_run(url, warmup, key=target_key)
                gateway_1 = name == "gateway, 1 worker"
                result = runner.wrk_run(url, duration, key=target_key, pids=pids(), count_redis=gateway_1)
                all_runs.setdefault(name, []).append(result)
                if name not in best or result.rps > best[name].rps:
                    best[name] = result
                say(f"round {round_no} {name:40} {fmt_rps(result.rps):>9} req/s  p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:6.2f} ms  cpu {result.cpu_percent:4.0f}%  others {result.others_percent:4.0f}%  "
                    f"errors {result.errors}")

        profile_note = ""
        if args.profile:
            profile_note = profile_gateway(runner, procs, gw1, key, duration, workdir)
            say(profile_note)

        for process in (floor_process, naive_process, gwn.process, gw1.process):
            procs.stop(process)
        if tools["nginx"]:
            procs.stop(proxy_process)

        # (a) cache-miss traffic
        say(f"writing {n_tokens:,} tokens into the bench Redis (gateway layout, TokenStore.insert)")
        fill_started = time.monotonic()
        keys = random_keys(n_tokens)
        run_async(fill_tokens(redis_url, keys))
        fill_seconds = time.monotonic() - fill_started
        key_file = workdir / "keys.txt"
        key_file.write_text("\n".join(keys) + "\n")
        hot_file = workdir / "hot-key.txt"
        hot_file.write_text(key + "\n")
        memory_file = workdir / "memory-keys.txt"
        memory_file.write_text("\n".join(keys[:n_memory]) + "\n")
        del keys
        say(f"{n_tokens:,} tokens written in {fill_seconds:.1f}s; keys in {key_file}")

        gwm = start_gateway(procs, "gateway-miss", upstream, redis_url, 1)
        runner.wrk_run(gwm.url, warmup, script_args=[str(hot_file)])
        hot = runner.wrk_run(gwm.url, duration, script_args=[str(hot_file)], pids=process_tree(gwm.process.pid),
                             count_redis=True)
        say(f"hot (one key, Lua)       {fmt_rps(hot.rps):>9} req/s  p50 {hot.p50_ms:.2f} ms  p99 {hot.p99_ms:.2f} ms  "
            f"errors {hot.errors}")
        cached_before = cached_tokens(gwm.url)
        miss = runner.wrk_run(gwm.url, duration, script_args=[str(key_file), "random"],
                              pids=process_tree(gwm.process.pid), count_redis=True)
        miss_cached, miss_rss = cached_tokens(gwm.url), rss_mb(gwm.process.pid)
        # Records are loaded in batches (one MGET each): the cache's growth counts them.
        miss_loads = miss_cached - cached_before
        say(f"random of {n_tokens:,} keys    {fmt_rps(miss.rps):>9} req/s  p50 {miss.p50_ms:.2f} ms  "
            f"p99 {miss.p99_ms:.2f} ms  errors {miss.errors}  record loads {miss_loads:,} of {miss.requests:,} "
            f"requests in {miss.redis_detail.get('mget', 0):,} round trips")
        procs.stop(gwm.process)

        # (c) memory with N distinct cached tokens
        gwr = start_gateway(procs, "gateway-memory", upstream, redis_url, 1)
        http("GET", gwr.url + "/bench/ping", key)
        rss_before = rss_mb(gwr.process.pid)
        memory_run = runner.wrk_run(gwr.url, duration, script_args=[str(memory_file), "seq", str(n_memory)],
                                    stop_when=lambda: cached_tokens(gwr.url) >= n_memory + 1, max_seconds=240)
        time.sleep(1.0)  # let the log and accessed writers drain their batches
        cached = cached_tokens(gwr.url)
        rss_after = rss_mb(gwr.process.pid)
        rss_peak = rss_mb(gwr.process.pid, "VmHWM")
        say(f"memory: {cached:,} tokens cached after {memory_run.requests:,} requests; RSS {rss_after:.1f} MB "
            f"(peak {rss_peak:.1f} MB; {rss_before:.1f} MB with one token)")
        hot_full = runner.wrk_run(gwr.url, duration, key=key, pids=process_tree(gwr.process.pid))
        say(f"hot traffic with {cached:,} tokens cached: {fmt_rps(hot_full.rps)} req/s  p50 {hot_full.p50_ms:.2f} ms  "
            f"p99 {hot_full.p99_ms:.2f} ms  errors {hot_full.errors}")
        procs.stop(gwr.process)

        # (b) revocation seen by another instance
        gwa = start_gateway(procs, "gateway-A", upstream, redis_url, 1)
        gwb = start_gateway(procs, "gateway-B", upstream, redis_url, 1)
        revoke = run_async(revocation_rounds(gwa.url, gwb.url, n_revoke))
        say(f"revocation on the other instance: p50 {percentile(revoke['windows_ms'], 50):.2f} ms, "
            f"p99 {percentile(revoke['windows_ms'], 99):.2f} ms after DELETE was sent; "
            f"{revoke['late_accepts']} request(s) accepted after the DELETE was acknowledged")
        procs.stop(gwb.process)
        procs.stop(gwa.process)

        # (d) one check in process
        micro_calls = 20_000 if quick else 100_000
        micro = run_async(check_cost(redis_url, key, micro_calls))
        say("in-process: " + ", ".join(f"{name} {value:.2f} µs" for name, value in micro.items()))

        report = Report(
            machine=machine, started_at=started_at, quick=quick, duration=duration, rounds=rounds,
            workers_n=workers_n, upstream_kind=upstream_kind, best=best, all_runs=all_runs,
            n_tokens=n_tokens, fill_seconds=fill_seconds, hot=hot, miss=miss, n_memory=n_memory, cached=cached,
            rss_before=rss_before, rss_after=rss_after, rss_peak=rss_peak, revoke=revoke, micro=micro,
            miss_cached=miss_cached, miss_rss=miss_rss, miss_loads=miss_loads, hot_full=hot_full,
            elapsed=time.monotonic() - began, profile_note=profile_note,
        )
        text = report.markdown()
        print()
        print(report.console())
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(text)
        print(f"\nwritten: {results_path}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        procs.stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def profile_gateway(runner: Runner, procs: Processes, gateway: GatewayProcess, key: str, duration: int,
                    workdir: Path) -> str:
    """py-spy (if installed) samples gateway 1 worker during one more load run; collapsed stacks kept."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        return "profile: py-spy not installed (pip install py-spy)"
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / "gateway-1.collapsed.txt"
    spy_process = procs.start("py-spy", [spy, "record", "--pid", str(gateway.process.pid), "--format", "raw",
                                         "--rate", "200", "--duration", str(duration + 1), "--nonblocking",
                                         "--output", str(target)])
    time.sleep(0.5)
    result = runner.wrk_run(gateway.url, duration, key=key)
    try:
        spy_process.wait(duration + 30)
    except subprocess.TimeoutExpired:
        pass
    procs.stop(spy_process)
    if not target.exists():
        return f"profile: py-spy wrote nothing (see {workdir}/py-spy.out)"
    return f"profile: {fmt_rps(result.rps)} req/s under py-spy; top frames by self time:\n" + top_frames(target)


def top_frames(collapsed: Path, count: int = 15) -> str:
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(samples)
        total += int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"  {100 * n / total:5.1f}%  {frame}" for frame, n in ranked)


@dataclass
class Report:
    machine: dict[str, str]
    started_at: str
    quick: bool
    duration: int
    rounds: int
    workers_n: int
    upstream_kind: str
    best: dict[str, WrkResult]
    all_runs: dict[str, list[WrkResult]]
    n_tokens: int
    fill_seconds: float
    hot: WrkResult
    miss: WrkResult
    n_memory: int
    cached: int
    rss_before: float
    rss_after: float
    rss_peak: float
    revoke: dict[str, Any]
    micro: dict[str, float]
    elapsed: float
    miss_cached: int
    miss_rss: float
    miss_loads: int
    hot_full: WrkResult
    profile_note: str = ""

    # -- derived figures --
    @property
    def gw1(self) -> WrkResult:
        return self.best["gateway, 1 worker"]

    @property
    def gwn(self) -> WrkResult:
        return self.best[f"gateway, {self.workers_n} workers"]

    def ratio(self, a: str, b: str) -> float | None:
        if a in self.best and b in self.best and self.best[b].rps:
            return self.best[a].rps / self.best[b].rps
        return None

    @property
    def scaling(self) -> tuple[float, float, bool]:
        """N workers / 1 worker in req/s, the same per CPU core they used, and whether the machine
        had no core left (wrk and the upstream share it: the workers cannot have N cores then)."""
        scale = self.gwn.rps / self.gw1.rps
        per_core = (self.gwn.rps / max(1.0, self.gwn.cpu_percent)) / (self.gw1.rps / max(1.0, self.gw1.cpu_percent))
        saturated = self.gwn.machine_percent >= 0.9 * 100 * (os.cpu_count() or 1)
        return scale, per_core, saturated

    @property
    def redis_per_request(self) -> float:
        return self.gw1.redis_commands / max(1, self.gw1.requests)

    @property
    def rss_for_target(self) -> tuple[float, bool]:
        """RSS with 100,000 cached tokens: measured, or extrapolated linearly from a smaller run."""
        if self.cached >= 100_000:
            return self.rss_after, False
        per_token = (self.rss_after - self.rss_before) / max(1, self.cached)
        return self.rss_before + per_token * 100_000, True

    def targets(self) -> list[tuple[str, str, bool | None]]:
        rows: list[tuple[str, str, bool | None]] = []
        nginx = self.ratio("gateway, 1 worker", "nginx proxy_pass (reference)")
        rows.append(("gateway 1 worker ≥ 0.20 × nginx proxy_pass",
                     f"{nginx:.2f} ×" if nginx is not None else "nginx not installed",
                     None if nginx is None else nginx >= 0.20))
        naive = self.ratio("gateway, 1 worker", "naive aiohttp proxy")
        rows.append(("gateway 1 worker ≥ 3 × naive proxy", f"{naive:.2f} ×", naive is not None and naive >= 3))
        scale, efficiency, saturated = self.scaling
        cores = self.gwn.cpu_percent / 100
        scaled = scaling_verdict(scale, efficiency, saturated, cores, self.workers_n)
        rows.append((f"{self.workers_n} workers scale with cores (≥ 0.75 × {self.workers_n} = "
                     f"{0.75 * self.workers_n:.2f} × 1 worker, or, when wrk and the upstream leave the workers "
                     "fewer cores than that, ≥ 0.75 × 1 worker's req/s per core used, the workers having had "
                     "at least 1.25 cores; n/a when they had less)",
                     f"{scale:.2f} ×; per core {efficiency:.2f} ×; the workers had {cores:.2f} "
                     f"cores; machine {'saturated' if saturated else 'not saturated'}"
                     + ("; too few cores left to show it" if scaled is None else ""),
                     scaled))
        rows.append(("≤ 0.01 Redis commands per proxied request (1 worker)", f"{self.redis_per_request:.5f}",
                     self.redis_per_request <= 0.01))
        rows.append(("p99 < 5 ms at 50 connections (gateway 1 worker)", f"{self.gw1.p99_ms:.2f} ms",
                     self.gw1.p99_ms < 5))
        rows.append((f"p99 < 5 ms at 50 connections (gateway {self.workers_n} workers)", f"{self.gwn.p99_ms:.2f} ms",
                     self.gwn.p99_ms < 5))
        rows.append((f"p99 < 5 ms at 50 connections with {self.cached:,} tokens cached (gateway 1 worker)",
                     f"{self.hot_full.p99_ms:.2f} ms", self.hot_full.p99_ms < 5))
        revoke_p99 = percentile(self.revoke["windows_ms"], 99)
        rows.append(("revoked token refused on another instance within 100 ms p99", f"{revoke_p99:.2f} ms",
                     revoke_p99 < 100))
        miss_ratio = self.miss.rps / self.hot.rps
        rows.append(("cache-miss throughput ≥ 0.5 × hot", f"{miss_ratio:.2f} ×", miss_ratio >= 0.5))
        rss, extrapolated = self.rss_for_target
        rows.append(("< 200 MB RSS per worker with 100,000 cached tokens",
                     f"{rss:.1f} MB" + (" (extrapolated)" if extrapolated else ""), rss < 200))
        return rows

    def main_table(self) -> list[list[str]]:
        rows = [["target", "req/s", "p50 ms", "p99 ms", "CPU %", "others' CPU %", "errors"]]
        for name, result in self.best.items():
            rows.append([name, fmt_rps(result.rps), f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}",
                         f"{result.cpu_percent:.0f}", f"{result.others_percent:.0f}", str(result.errors)])
        return rows

    def ratio_lines(self) -> list[str]:
        lines = []
        nginx = self.ratio("gateway, 1 worker", "nginx proxy_pass (reference)")
        if nginx is not None:
            lines.append(f"gateway 1 worker / nginx proxy_pass = {nginx:.2f}")
        naive = self.ratio("gateway, 1 worker", "naive aiohttp proxy")
        lines.append(f"gateway 1 worker / naive proxy = {naive:.2f}")
        scale, per_core, saturated = self.scaling
        lines.append(f"gateway {self.workers_n} workers / gateway 1 worker = {scale:.2f}; per CPU core used "
                     f"{per_core:.2f} ({self.gw1.cpu_percent:.0f} % and {self.gwn.cpu_percent:.0f} % of a core; "
                     f"whole machine during the {self.workers_n}-worker run {self.gwn.machine_percent:.0f} % of "
                     f"{100 * (os.cpu_count() or 1)} %{', saturated' if saturated else ''})")
        floor = self.ratio("gateway, 1 worker", FLOOR)
        if floor is not None:
            lines.append(f"gateway 1 worker / aiohttp floor = {floor:.2f} (the floor forwards with aiohttp's server "
                         "and ClientSession and does nothing else)")
        detail = ", ".join(f"{name} {n}" for name, n in sorted(self.gw1.redis_detail.items(), key=lambda x: -x[1]))
        lines.append(f"Redis commands per proxied request (gateway 1 worker): {self.redis_per_request:.5f} "
                     f"({self.gw1.redis_commands} commands for {self.gw1.requests:,} requests: {detail or 'none'})")
        cpu_us = lambda r: 1e6 * r.cpu_percent / 100 * r.seconds / max(1, r.requests)  # noqa: E731
        lines.append("CPU time per request: " + ", ".join(
            f"{name} {cpu_us(result):.0f} µs" for name, result in self.best.items()))
        return lines

    def extra_lines(self) -> list[str]:
        windows, after = self.revoke["windows_ms"], self.revoke["after_ack_ms"]
        rss, extrapolated = self.rss_for_target
        loads = self.miss_loads
        lines = [
            f"(a) cache-miss traffic, gateway 1 worker, {self.n_tokens:,} tokens in Redis "
            f"(written in {self.fill_seconds:.0f} s):",
            f"    hot (one key)     {fmt_rps(self.hot.rps):>9} req/s  p50 {self.hot.p50_ms:.2f} ms  "
            f"p99 {self.hot.p99_ms:.2f} ms  errors {self.hot.errors}  others' CPU {self.hot.others_percent:.0f}%",
            f"    random key        {fmt_rps(self.miss.rps):>9} req/s  p50 {self.miss.p50_ms:.2f} ms  "
            f"p99 {self.miss.p99_ms:.2f} ms  errors {self.miss.errors}  others' CPU {self.miss.others_percent:.0f}%",
            f"    miss / hot = {self.miss.rps / self.hot.rps:.2f}; {loads:,} records loaded from Redis for "
            f"{self.miss.requests:,} requests ({100 * loads / max(1, self.miss.requests):.0f}% misses) in "
            f"{self.miss.redis_detail.get('mget', 0):,} round trips, "
            f"{self.miss.redis_commands / max(1, self.miss.requests):.2f} Redis commands per request; "
            f"afterwards {self.miss_cached:,} tokens cached, RSS {self.miss_rss:.1f} MB",
            f"(b) revocation through instance A, instance B polled back to back, {self.revoke['rounds']} rounds:",
            f"    first 401 from B after the DELETE was sent: p50 {percentile(windows, 50):.2f} ms, "
            f"p99 {percentile(windows, 99):.2f} ms, max {max(windows):.2f} ms",
            f"    after the DELETE was acknowledged: p50 {percentile(after, 50):.2f} ms, "
            f"p99 {percentile(after, 99):.2f} ms; requests B accepted after the acknowledgement: "
            f"{self.revoke['late_accepts']}",
            f"(c) resident memory of one gateway worker with {self.cached:,} cached tokens: {self.rss_after:.1f} MB "
            f"(peak {self.rss_peak:.1f} MB; {self.rss_before:.1f} MB with one token; "
            f"{1024 * (self.rss_after - self.rss_before) / max(1, self.cached):.2f} KB per token)"
            + (f"; extrapolated to 100,000 tokens: {rss:.1f} MB" if extrapolated else ""),
            f"    then hot traffic (one key) through that worker: {fmt_rps(self.hot_full.rps)} req/s  "
            f"p50 {self.hot_full.p50_ms:.2f} ms  p99 {self.hot_full.p99_ms:.2f} ms  errors {self.hot_full.errors}",
            "(d) in-process cost of one check (cached token, no I/O): " + ", ".join(
                f"{name} {value:.2f} µs" for name, value in self.micro.items()),
        ]
        return lines

    def console(self) -> str:
        table = self.main_table()
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = []
        for index, row in enumerate(table):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row) if i]
            lines.append("  ".join(cells))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [""] + self.ratio_lines() + [""] + self.extra_lines() + [""]
        for name, value, ok in self.targets():
            lines.append(f"{'n/a' if ok is None else verdict(ok):6}  {name}: {value}")
        if self.profile_note:
            lines += ["", self.profile_note]
        return "\n".join(lines)

    def markdown(self) -> str:
        table = self.main_table()
        out = [
            "# Benchmark results" + (" (quick mode)" if self.quick else ""),
            "",
            f"Measured {self.started_at} by `python bench/run.py{' --quick' if self.quick else ''}` "
            f"({self.elapsed:.0f} s in all). wrk `-t1 -c{CONNECTIONS} -d{self.duration}s --latency`, "
            f"GET with `Authorization: FlespiToken <key>` of a standard token created through the API; "
            f"{self.rounds} round(s) over the targets, the best round of each kept. Upstream: {self.upstream_kind}. "
            "Gateways run `python -m gateway` with the full pipeline and request logging to a file.",
            "",
            "| " + " | ".join(table[0]) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(table[0]) - 1)) + "|",
        ]
        out += ["| " + " | ".join(row) + " |" for row in table[1:]]
        out += ["", "CPU % is the target's processes during the run (100 % = one core); others' CPU % is what "
                "processes this benchmark did not start used meanwhile (the machine is shared); errors are "
                "non-2xx replies plus socket errors.", ""]
        out += [f"- {line}" for line in self.ratio_lines()]
        if self.rounds > 1:
            out += ["", "Every round (req/s): " + "; ".join(
                f"{name}: " + ", ".join(fmt_rps(r.rps) for r in runs) for name, runs in self.all_runs.items())]
        out += ["", "## Other figures", "", "```", *self.extra_lines(), "```", "", "## Targets", "",
                "| target | measured | |", "|---|---:|---|"]
        for name, value, ok in self.targets():
            out.append(f"| {name} | {value} | {'n/a' if ok is None else verdict(ok)} |")
        out += ["", f"With {CONNECTIONS} connections each waiting for its reply, the mean latency is "
                f"{CONNECTIONS} / throughput (Little's law): p99 < 5 ms needs well over "
                f"{CONNECTIONS / 0.005:,.0f} req/s, so that target follows the throughput ones."]
        out += ["", "## Machine", "", "| | |", "|---|---|"]
        out += [f"| {name} | {value} |" for name, value in self.machine.items()]
        out += ["", "The machine is shared: wrk, the upstream and the proxy under test all run on its "
                f"{self.machine['nproc']} cores, and other services on it add noise; compare ratios more than "
                "absolute figures.", ""]
        if self.profile_note:
            out += ["## Profile", "", "```", self.profile_note, "```", ""]
        return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
