"""Signals as an operator sends them to `python -m gateway`: SIGHUP under traffic (valid and invalid
changes, one process and `workers: 2`), SIGUSR1 after logrotate moved the file, a worker killed, the
supervisor killed."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.config import build_settings
from gateway.server import CRASH_WINDOW, RESTART_FIRST, RESTART_MAX, Process, Supervisor

from support.keys import MASTER_KEY
from support.servers import ROOT, Upstream, free_port

AUTH = {"Authorization": f"FlespiToken {MASTER_KEY}"}
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}


class Gateway:
    """One `python -m gateway` process; its stderr (the application log) goes to a file read as it grows."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.config_path = directory / f"gateway-{self.port}.yaml"
        self.log_path = directory / f"gateway-{self.port}.stderr"
        self.config = {**config, "listen": {"host": "127.0.0.1", "port": self.port}}
        self.write(self.config)
        with self.log_path.open("wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(self.config_path)],
                                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        self.url = f"http://127.0.0.1:{self.port}"

    def write(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def change(self, **changes: Any) -> None:
        """Rewrite the file with `changes` over what it held (a value None: the key removed)."""
        config = {**self.config, **changes}
        self.config = {key: value for key, value in config.items() if value is not None}
        self.write(self.config)

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    async def logged(self, text: str, after: int = 0, timeout: float = 20.0) -> str:
        """Wait until the application log says `text` (past `after` characters); the line returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log[after:]
            for line in log.splitlines():
                if text in line:
                    return line
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited ({self.process.returncode}) before logging {text!r}:\n{log}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"never logged {text!r}:\n{self.log[after:]}")

    def workers(self) -> set[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def start(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., Any]]:
    started: list[Gateway] = []

    async def launch(**config: Any) -> Gateway:
        config = {"upstream": upstream.url, "bootstrap_master_token": MASTER_KEY,
                  "log": {"path": str(tmp_path / "requests.log"), "flush_interval": 0.05},
                  "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")}, **config}
        gateway = Gateway(tmp_path, config)
        started.append(gateway)
        await gateway.logged("listening on")
        if config.get("workers", 1) > 1:
            deadline = time.monotonic() + 20
            while gateway.log.count("listening on") < config["workers"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return gateway

    yield launch
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()
        for pid in gateway_children(gateway):
            os.kill(pid, signal.SIGKILL)


def gateway_children(gateway: Gateway) -> list[int]:
    """Workers the test may have orphaned (a supervisor killed): found by their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(gateway.config_path).encode() in command and int(entry.name) != gateway.process.pid:
                found.append(int(entry.name))
    return found


@dataclass
class Traffic:
    """Clients that keep asking while the test signals the gateway: every answer that is not a 200
    from the upstream, and every connection error, is a failure."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    running: bool = True

    async def client(self, session: aiohttp.ClientSession, path: str) -> None:
        while self.running:
            try:
                async with session.get(f"{self.url}{path}", headers=AUTH) as reply:
                    body = await reply.read()
                    if reply.status == 200 and b'"path"' in body:
                        self.ok += 1
                    else:
                        self.failures.append(f"{reply.status} {body[:200]!r}")
            except (aiohttp.ClientError, OSError) as exc:
                self.failures.append(repr(exc))

    async def until(self, count: int) -> None:
        """Wait for `count` more answers (so traffic surely runs across what the test does next)."""
        target = self.ok + count
        deadline = time.monotonic() + 20
        while self.ok < target and time.monotonic() < deadline and not self.failures:
            await asyncio.sleep(0.01)


@asynccontextmanager
async def traffic(url: str) -> AsyncIterator[Traffic]:
    """Four keep-alive clients and two that open a new connection for every request."""
    load = Traffic(url)
    async with aiohttp.ClientSession() as kept, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        tasks = [asyncio.ensure_future(load.client(kept, f"/load/{n}")) for n in range(4)]
        tasks += [asyncio.ensure_future(load.client(fresh, f"/fresh/{n}")) for n in range(2)]
        await load.until(50)
        try:
            yield load
        finally:
            await load.until(50)
            load.running = False
            await asyncio.gather(*tasks)


async def get(url: str, **headers: str) -> tuple[int, dict[str, Any] | None, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers={**AUTH, **headers}) as reply:
        body = await reply.read()
        return reply.status, orjson.loads(body) if body.startswith(b"{") else None, reply.headers


async def preflight_max_age(url: str) -> str | None:
    async with aiohttp.ClientSession() as session, session.options(f"{url}/x", headers=PREFLIGHT) as reply:
        return reply.headers.get("Access-Control-Max-Age")


async def reload_while_serving(gateway: Gateway, upstream: Upstream, done: str) -> None:
    """The scenario both process models share: a valid change, then an invalid one, under traffic."""
    async with traffic(gateway.url) as load:
        assert (await get(f"{gateway.url}/v2/x"))[1] == {"method": "GET", "path": "/v2/x", "size": 0}
        assert await preflight_max_age(gateway.url) == "600"
        # A request in flight across the reload (with workers: on a worker the reload retires).
        slow = asyncio.ensure_future(get(f"{gateway.url}/slow/5"))
        while not any(seen.raw_path == "/slow/5" for seen in upstream.requests):
            await asyncio.sleep(0.01)
        mark = len(gateway.log)
        gateway.change(upstream=None, routes={"/": upstream.url, "/v2/": f"{upstream.url}/new/"},
                       cors={"max_age": 77}, listen={"host": "127.0.0.1", "port": free_port()})
        gateway.send(signal.SIGHUP)
        line = await gateway.logged("reloaded", mark)
        assert "changed routes, cors.max_age" in line and "needs a restart, kept as running: listen.port" in line
        await gateway.logged(done, mark)
        assert not slow.done()
        assert (await slow)[:2] == (200, {"slow": True})
        await load.until(100)
        assert (await get(f"{gateway.url}/v2/x"))[1] == {"method": "GET", "path": "/new/x", "size": 0}
        assert await preflight_max_age(gateway.url) == "77"

        mark = len(gateway.log)
        gateway.change(cors={"max_age": 5, "allow_methods": ["FOO"]})
        gateway.send(signal.SIGHUP)
        line = await gateway.logged("refused", mark)
        assert line.endswith("still running the previous configuration: cors.allow_methods: 'FOO' is not an HTTP "
                             "method (CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE)")
        await load.until(100)
        assert (await get(f"{gateway.url}/v2/x"))[1] == {"method": "GET", "path": "/new/x", "size": 0}
        assert await preflight_max_age(gateway.url) == "77"
    assert load.failures == []
    assert load.ok > 300


async def test_sighup_reloads_one_process_under_traffic(start: Callable[..., Any], upstream: Upstream) -> None:
    gateway = await start()
    await reload_while_serving(gateway, upstream, "reloaded")
    assert gateway.stop() == 0


async def test_sighup_replaces_workers_under_traffic(start: Callable[..., Any], upstream: Upstream, redis_url: str,
                                                    key_prefix: str) -> None:
    gateway = await start(workers=2, redis={"url": redis_url, "key_prefix": key_prefix})
    before = gateway.workers()
    assert len(before) == 2
    await reload_while_serving(gateway, upstream, "reload done")
    for pid in before:  # the old generation finishes its requests and leaves; how long that takes is load's
        assert (await gateway.logged(f"worker {pid} stopped")).endswith(f"worker {pid} stopped (status 0)")
    after = gateway.workers()
    assert len(after) == 2 and not after & before  # a new generation; the refused reload started none
    assert gateway.stop() == 0
    assert "Traceback" not in gateway.log


async def test_trusted_proxies_reload_on_open_connections(start: Callable[..., Any], upstream: Upstream) -> None:
    """A keep-alive connection opened before the reload: its next request is judged by the new list."""
    gateway = await start()
    async with aiohttp.ClientSession() as session:
        async def forwarded_for() -> list[str]:
            async with session.get(f"{gateway.url}/who", headers={**AUTH, "X-Forwarded-For": "203.0.113.9"}) as r:
                assert r.status == 200
            return upstream.last.headers["x-forwarded-for"]
        assert await forwarded_for() == ["127.0.0.1"]
        mark = len(gateway.log)
        gateway.change(trusted_proxies=["127.0.0.1"])
        gateway.send(signal.SIGHUP)
        await gateway.logged("changed trusted_proxies", mark)
        assert await forwarded_for() == ["203.0.113.9, 127.0.0.1"]
    assert gateway.stop() == 0


async def test_sigusr1_reopens_the_request_log(start: Callable[..., Any], tmp_path: Path) -> None:
    gateway = await start()
    log, rotated = tmp_path / "requests.log", tmp_path / "requests.log.1"
    sent = 0
    for n in range(5):
        assert (await get(f"{gateway.url}/before/{n}"))[0] == 200
        sent += 1
    while not log.exists() or len(log.read_bytes().splitlines()) < 5:
        await asyncio.sleep(0.02)
    log.rename(rotated)
    gateway.send(signal.SIGUSR1)
    while not log.exists():  # the signal is taken between two requests: ask until the new file appears
        assert (await get(f"{gateway.url}/after/{sent}"))[0] == 200
        sent += 1
        await asyncio.sleep(0.05)
    for n in range(3):  # reopened: these go to the new file
        assert (await get(f"{gateway.url}/after/{sent + n}"))[0] == 200
    sent += 3
    assert gateway.stop() == 0
    old, new = requests(rotated), requests(log)
    assert old[:5] == [f"/before/{n}" for n in range(5)]
    assert new and all(uri.startswith("/after/") for uri in new)
    assert len(old) + len(new) == sent  # nothing lost, nothing twice


async def test_a_killed_worker_is_replaced(start: Callable[..., Any], redis_url: str, key_prefix: str) -> None:
    gateway = await start(workers=2, redis={"url": redis_url, "key_prefix": key_prefix})
    before = gateway.workers()
    victim = min(before)
    mark = len(gateway.log)
    os.kill(victim, signal.SIGKILL)
    line = await gateway.logged(f"worker {victim} exited", mark)
    assert line.endswith(f"worker {victim} exited (killed by SIGKILL); starting another in 0.25 s")
    await gateway.logged("listening on", mark)
    after = gateway.workers()
    assert len(after) == 2 and victim not in after
    for n in range(20):  # both workers (whichever accepts) answer
        assert (await get(f"{gateway.url}/again/{n}"))[0] == 200
    mark = len(gateway.log)
    survivor = min(after)
    os.kill(survivor, signal.SIGHUP)  # meant for the supervisor: the worker says so and goes on
    await gateway.logged(f"SIGHUP ignored by a worker: send it to the supervisor (pid {gateway.process.pid})", mark)
    assert gateway.workers() == after
    assert gateway.stop() == 0


async def test_workers_stop_when_the_supervisor_is_killed(start: Callable[..., Any], redis_url: str,
                                                          key_prefix: str) -> None:
    gateway = await start(workers=2, redis={"url": redis_url, "key_prefix": key_prefix})
    workers = gateway.workers()
    gateway.process.kill()
    gateway.process.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        await asyncio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_worker_that_keeps_dying_is_restarted_ever_later() -> None:
    """Back-off: each quick death doubles the wait, up to RESTART_MAX; a worker that lived resets it."""
    supervisor = Supervisor(build_settings({"upstream": "http://127.0.0.1:1"}), None)
    waits = []
    for pid in range(10):
        supervisor.restart_later(Process(pid, 0, 0, time.monotonic(), None), "status 1")
        waits.append(supervisor.due.pop()[0] - time.monotonic())
    assert [round(wait, 1) for wait in waits] == [0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    supervisor.restart_later(Process(11, 0, 0, time.monotonic() - CRASH_WINDOW, None), "status 1")
    assert supervisor.due.pop()[0] - time.monotonic() <= 0
    assert supervisor.failures[0] == 0
    assert RESTART_FIRST * 2 ** 7 > RESTART_MAX


async def test_sighup_moves_the_request_log_and_recompiles_origin_presets(start: Callable[..., Any],
                                                                        tmp_path: Path) -> None:
    """A token whose origins name a preset follows the preset's new list; the log goes to its new file."""
    gateway = await start(origin_presets={"mine": ["https://a.example"]})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/platform/tokens", headers=AUTH,
                                json=[{"ttl": 600, "origins": [{"preset": "mine"}]}]) as reply:
            key = (await reply.json())["result"][0]["key"]

        async def from_origin(origin: str) -> int:
            async with session.get(f"{gateway.url}/page", headers={"Authorization": f"FlespiToken {key}",
                                                                   "Origin": origin}) as reply:
                return reply.status
        assert (await from_origin("https://a.example"), await from_origin("https://b.example")) == (200, 401)
        moved = tmp_path / "moved.log"
        mark = len(gateway.log)
        gateway.change(origin_presets={"mine": ["https://b.example"]},
                       log={"path": str(moved), "flush_interval": 0.05})
        gateway.send(signal.SIGHUP)
        line = await gateway.logged("reloaded", mark)
        assert "changed log.path, origin_presets" in line
        assert (await from_origin("https://a.example"), await from_origin("https://b.example")) == (401, 200)
    assert gateway.stop() == 0
    before, after = requests(tmp_path / "requests.log"), requests(moved)
    # Records still queued at the reload are written to the new file: each record once, in order.
    assert (before + after)[-5:] == ["/platform/tokens", "/page", "/page", "/page", "/page"]
    assert after[-2:] == ["/page", "/page"]


def requests(log: Path) -> list[str]:
    """The paths of the request records (event 1000) in a request log."""
    records = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    return [record["uri"] for record in records if record["event_code"] == 1000]


async def test_sighup_changes_upstream_timeouts_on_both_fronts(start: Callable[..., Any]) -> None:
    """The fast path's pools and aiohttp's relay (a request with an Origin is served there) both
    take the new `proxy.read_timeout`."""
    gateway = await start()
    origin = {"Origin": "https://app.example"}
    assert (await get(f"{gateway.url}/slow/0.4"))[0] == 200
    assert (await get(f"{gateway.url}/slow/0.4", **origin))[0] == 200
    mark = len(gateway.log)
    gateway.change(proxy={"read_timeout": 0.1})
    gateway.send(signal.SIGHUP)
    await gateway.logged("changed proxy.read_timeout", mark)
    for headers in ({}, origin):
        status, body, _ = await get(f"{gateway.url}/slow/0.4", **headers)
        assert (status, body) == (504, {"errors": [{"code": 504, "reason": "upstream timeout"}]})
    assert (await get(f"{gateway.url}/slow/0"))[0] == 200
    assert gateway.stop() == 0
