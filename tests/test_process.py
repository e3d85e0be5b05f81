"""The gateway as users run it: `python -m gateway --config ...` in its own process."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.config import ConfigError, build_settings
from gateway.server import GatewayServer

from support.keys import MASTER_KEY
from support.servers import ROOT, Upstream, free_port, run_gateway_process, wait_for_port

AUTH = {"Authorization": f"FlespiToken {MASTER_KEY}"}
FIRST_KEY_NOTICE = b"was created. Its key, shown only now:"


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def check_config(config_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--check-config", "--config", str(config_path)],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("config", "named"), [
    ({"upstream": "ftp://x"}, "upstream"),
    ({"listen": {"port": "eighty"}, "upstream": "http://127.0.0.1:1"}, "listen.port"),
    ({"upstream": "http://127.0.0.1:1", "redis": {"url": "mysql://x"}}, "redis.url"),
    ({"upstream": "http://127.0.0.1:1", "bootstrap_master_token": "short"}, "bootstrap_master_token"),
    ({"upstream": "http://127.0.0.1:1", "cache": {"max_agee": 3}}, "cache.max_agee"),
    ({"upstream": "http://127.0.0.1:1", "trusted_proxies": ["not-an-ip"]}, "trusted_proxies"),
    ({"routes": {"api": "http://127.0.0.1:1"}}, "routes.api"),
    ({"listen": {"port": 1}}, "upstream"),
    ({"upstream": "http://127.0.0.1:1", "workers": 2}, "workers"),
    ({"upstream": "http://127.0.0.1:1", "surprise": 1}, "surprise"),
    ({"upstream": "http://127.0.0.1:1", "cors": {"allow_headers": "Authorization"}}, "cors.allow_headers"),
])
def test_bad_config_exits_before_listening(tmp_path: Path, config: dict[str, Any], named: str) -> None:
    result = check_config(write_config(tmp_path / "bad.yaml", config))
    assert result.returncode == 2
    assert named in result.stderr and "configuration error" in result.stderr
    port = free_port()
    config = {**config, "listen": {**(config.get("listen") or {}), "port": port}} if named != "listen.port" else config
    process = run_gateway_process(write_config(tmp_path / "bad2.yaml", config))
    assert process.wait(30) == 2
    assert named.encode() in process.stderr.read()  # type: ignore[union-attr]


def test_check_config_accepts_shipped_config() -> None:
    result = check_config(ROOT / "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_environment_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"upstream": "http://127.0.0.1:1"})
    assert check_config(path, {"GATEWAY_LISTEN__PORT": "notaport"}).returncode == 2
    assert check_config(path, {"GATEWAY_LISTEN__PORT": "9001", "GATEWAY_CACHE__MAX_AGE": "5"}).returncode == 0
    bad = check_config(path, {"GATEWAY_MASTER_TOKEN": "tooshort"})
    assert bad.returncode == 2 and "bootstrap_master_token" in bad.stderr


class Running:
    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path, self.port = config_path, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = run_gateway_process(self.config_path)
        wait_for_port(self.port)

    def stop(self) -> tuple[int, bytes]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        stderr = self.process.stderr.read() if self.process.stderr else b""
        self.process = None
        return code, stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_peak_kb(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")


@pytest.fixture
def running(tmp_path: Path, upstream: Upstream) -> Iterator[Any]:
    started: list[Running] = []

    def launch(**overrides: Any) -> Running:
        port = free_port()
        config = {"listen": {"host": "127.0.0.1", "port": port}, "upstream": upstream.url,
                  "bootstrap_master_token": MASTER_KEY, "log": {"path": str(tmp_path / "requests.log")},
                  "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")}, **overrides}
        instance = Running(write_config(tmp_path / f"gw-{port}.yaml", config), port)
        instance.start()
        started.append(instance)
        return instance

    yield launch
    for instance in started:
        if instance.process is not None:
            instance.process.kill()
            instance.process.wait()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_log_lines_equal_requests_after_sigterm(running: Any, client: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    gateway = running()

    async def one(i: int) -> int:
        async with client.get(f"{gateway.url}/items/{i}?q=secret", headers={**AUTH, "x-flespi-app": "a" * 80}) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(400)))
    assert set(statuses) == {200}
    code, stderr = gateway.stop()
    assert code == 0, stderr
    lines = [orjson.loads(line) for line in (tmp_path / "requests.log").read_bytes().splitlines()]
    requests = [line for line in lines if line["event_code"] == 1000 and line["uri"].startswith("/items/")]
    assert len(requests) == 400
    sample = requests[0]
    assert set(sample) == {"timestamp", "event_code", "token_id", "cid", "host", "app", "method", "uri", "status",
                           "duration", "size", "request_id"}
    assert sample["host"] == "127.0.0.1" and sample["app"] == "a" * 64 and sample["status"] == 200
    assert "?" not in sample["uri"] and sample["size"] > 0
    everything = (tmp_path / "requests.log").read_bytes() + stderr
    assert MASTER_KEY.encode() not in everything
    assert FIRST_KEY_NOTICE not in stderr  # a bootstrap key is configured: nothing is made or shown


async def test_token_events_logged_without_key(running: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    gateway = running()
    async with client.post(f"{gateway.url}/platform/tokens", json=[{"ttl": 60}], headers=AUTH) as r:
        token = (await r.json())["result"][0]
    async with client.put(f"{gateway.url}/platform/tokens/{token['id']}", json={"info": "x"}, headers=AUTH) as r:
        assert r.status == 200
    async with client.delete(f"{gateway.url}/platform/tokens/{token['id']}", headers=AUTH) as r:
        assert r.status == 200
    gateway.stop()
    raw = (tmp_path / "requests.log").read_bytes()
    assert token["key"].encode() not in raw
    events = [line for line in map(orjson.loads, raw.splitlines()) if line["event_code"] in (1, 2, 3)]
    assert [(e["event_code"], e["token_id"]) for e in events] == [(1, token["id"]), (2, token["id"]), (3, token["id"])]


async def test_embedded_store_survives_restart(running: Any, client: aiohttp.ClientSession) -> None:
    gateway = running()
    async with client.post(f"{gateway.url}/platform/tokens", json=[{"ttl": 3600, "info": "kept"}],
                           headers=AUTH) as r:
        token = (await r.json())["result"][0]
    gateway.process.kill()  # not even a clean shutdown: the API answered only after saving
    gateway.process.wait()
    gateway.start()
    async with client.get(f"{gateway.url}/anything", headers={"Authorization": f"FlespiToken {token['key']}"}) as r:
        assert r.status == 200
    async with client.get(f"{gateway.url}/platform/tokens/{token['id']}", headers=AUTH) as r:
        assert (await r.json())["result"][0]["info"] == "kept"


async def test_large_bodies_stream_with_flat_memory(running: Any, client: aiohttp.ClientSession) -> None:
    gateway = running(log={"path": "off"})
    async with client.get(f"{gateway.url}/big/1000", headers=AUTH) as r:
        assert r.status == 200
    baseline = gateway.rss_peak_kb()
    size = 1024 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        block = b"u" * (1 << 20)
        for _ in range(size >> 20):
            yield block

    async with client.post(f"{gateway.url}/upload", data=body(), headers=AUTH) as r:
        assert (await r.json())["received"] == size
    received = 0
    async with client.get(f"{gateway.url}/big/{size}", headers=AUTH) as r:
        async for chunk in r.content.iter_any():
            received += len(chunk)
    assert received == size
    growth_mb = (gateway.rss_peak_kb() - baseline) / 1024
    assert growth_mb < 64, f"peak RSS grew by {growth_mb:.0f} MB while streaming 1 GB each way"


async def test_workers_share_one_port_and_stop_cleanly(running: Any, client: aiohttp.ClientSession,
                                                        redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    gateway = running(workers=2, redis={"url": redis_url, "key_prefix": key_prefix})
    async with client.post(f"{gateway.url}/platform/tokens", json=[{"ttl": 600}], headers=AUTH) as r:
        token = (await r.json())["result"][0]
    pids = set()
    for _ in range(60):  # new connections are spread over the workers by the kernel
        async with aiohttp.ClientSession() as fresh:
            async with fresh.get(f"{gateway.url}/_gateway/health") as r:
                pids.add((await r.json())["result"][0]["pid"])
            async with fresh.get(f"{gateway.url}/x", headers={"Authorization": f"FlespiToken {token['key']}"}) as r:
                assert r.status == 200
    assert len(pids) == 2
    code, stderr = gateway.stop()
    assert code == 0, stderr
    lines = (tmp_path / "requests.log").read_bytes().splitlines()
    assert len([line for line in lines if b'"uri":"/x"' in line]) == 60


async def test_a_log_path_gone_since_the_check_is_a_config_error_at_start(tmp_path: Path, upstream: Upstream) -> None:
    """Valid when checked, unwritable when the start opens it: one line naming the key, no traceback."""
    directory = tmp_path / "logs"
    directory.mkdir()
    settings = build_settings({"upstream": upstream.url, "log": {"path": str(directory / "requests.log")},
                               "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")}})
    directory.rmdir()
    server = GatewayServer(settings)
    with pytest.raises(ConfigError) as raised:
        await server.start("127.0.0.1", free_port())
    assert str(raised.value) == f"log.path: cannot open {str(directory / 'requests.log')!r} (No such file or directory)"
    await server.close()


async def test_a_port_taken_since_the_check_is_a_config_error_at_start(tmp_path: Path, upstream: Upstream) -> None:
    settings = build_settings({"upstream": upstream.url, "log": {"path": "off"},
                               "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")}})
    port = free_port()
    server = GatewayServer(settings)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(ConfigError) as raised:
            await server.start("127.0.0.1", port)
    await server.close()
    assert str(raised.value) == f"listen.port: cannot listen on 127.0.0.1:{port} (Address already in use)"



def test_a_taken_mqtt_port_is_refused_by_the_check_and_at_start(tmp_path: Path, upstream: Upstream) -> None:
    """`mqtt.listen` is bound by `--check-config` as `listen` is (exit 2, the key named), and a
    port taken since the check is a one-line configuration error at start, not a traceback."""
    mqtt_port = free_port()
    config = {"upstream": upstream.url, "listen": {"host": "127.0.0.1", "port": free_port()}, "log": {"path": "off"},
              "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")},
              "mqtt": {"listen": {"host": "127.0.0.1", "port": mqtt_port}, "broker": "mqtt://127.0.0.1:1"}}
    path = write_config(tmp_path / "mqtt.yaml", config)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", mqtt_port))
        holder.listen()
        result = check_config(path)
        assert result.returncode == 2, result.stderr
        assert f"mqtt.listen.port: cannot listen on 127.0.0.1:{mqtt_port}" in result.stderr
        process = run_gateway_process(path)
        assert process.wait(30) == 2
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    assert f"mqtt.listen.port: cannot listen on 127.0.0.1:{mqtt_port}" in stderr and "Traceback" not in stderr

def readme_run_command() -> str:
    """The README's first command: the one that installs and runs."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Run it**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    [command] = block.strip().splitlines()
    return command


async def test_readme_run_command_needs_no_key_and_shows_one_once(tmp_path: Path, upstream: Upstream,
                                                                   client: aiohttp.ClientSession) -> None:
    """What the README's command runs after its install (`.venv/bin/gateway --config config.yaml`,
    here the tests' venv's), on a copy of the shipped config.yaml in a fresh directory, with no key
    given: the first start makes a master token and prints its key once; a restart makes none."""
    install, _, run = readme_run_command().rpartition(" && ")
    assert install == "python3 -m venv .venv && .venv/bin/pip install -q ."
    assert run == ".venv/bin/gateway --config config.yaml"
    (tmp_path / "config.yaml").write_bytes((ROOT / "config.yaml").read_bytes())
    script = Path(sys.executable).parent / "gateway"
    argv = [str(script) if script.exists() else sys.executable, *([] if script.exists() else ["-m", "gateway"]),
            *run.split()[1:]]
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(GATEWAY_LISTEN__PORT=str(port), GATEWAY_UPSTREAM=upstream.url)
    headers: dict[str, str] = {}

    async def serve(name: str, first: bool) -> tuple[list[dict[str, Any]], bytes, bytes]:
        """Start, (on the first start read the key,) list the tokens with it, stop."""
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        process = launch(argv, tmp_path, env, out, err)
        try:
            await asyncio.to_thread(wait_for_port, port, 30)
            if first:  # printed before the port opens
                keys = re.findall(rb"^    ([A-Za-z0-9]{64})$", err.read_bytes(), re.MULTILINE)
                assert len(keys) == 1, err.read_bytes()
                headers["Authorization"] = f"FlespiToken {keys[0].decode()}"
            async with client.get(f"http://127.0.0.1:{port}/platform/tokens/all", headers=headers) as reply:
                assert reply.status == 200
                listed: list[dict[str, Any]] = (await reply.json())["result"]
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0
        return listed, out.read_bytes(), err.read_bytes()

    tokens, first_out, first_err = await serve("first", first=True)
    key = headers["Authorization"].split()[1].encode()
    assert first_err.count(key) == 1 and first_err.count(FIRST_KEY_NOTICE) == 1
    assert key not in first_out  # the request log (stdout in config.yaml) never has it
    assert [(token["id"], token["access"]) for token in tokens] == [(1, {"type": 1})]
    again, again_out, again_err = await serve("again", first=False)
    assert [(token["id"], token["created"]) for token in again] == [(1, tokens[0]["created"])]
    assert FIRST_KEY_NOTICE not in again_err and key not in again_err + again_out
    assert (tmp_path / "gateway-data.json.lock").exists()  # the store beside config.yaml


def launch(argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)


async def test_an_mqtt_port_taken_since_the_check_is_a_config_error_at_start(tmp_path: Path,
                                                                            upstream: Upstream) -> None:
    mqtt_port = free_port()
    settings = build_settings({"upstream": upstream.url, "log": {"path": "off"},
                               "redis": {"url": "memory://", "data_file": str(tmp_path / "data.json")},
                               "mqtt": {"listen": {"host": "127.0.0.1", "port": mqtt_port},
                                        "broker": "mqtt://127.0.0.1:1"}})
    server = GatewayServer(settings)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", mqtt_port))
        holder.listen()
        with pytest.raises(ConfigError) as raised:
            await server.start("127.0.0.1", 0)
    await server.close()
    assert str(raised.value) == f"mqtt.listen.port: cannot listen on 127.0.0.1:{mqtt_port} (Address already in use)"
