"""A Sentinel-managed Redis on loopback: one master, one replica, three sentinels (quorum 2), with
failover timings short enough for tests (down after 1 s)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from .servers import RedisProcess, free_port, wait_for_port

SERVICE = "gwtest"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelSet:
    """`servers` are the two data servers, whichever is master now; `master_port()` asks the
    sentinels. A test that kills or pauses one calls `restore()` (or `revive`) before it ends."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
        first = RedisProcess(persistent=True)
        self.servers = [first, RedisProcess(persistent=True, extra=["--replicaof", "127.0.0.1", str(first.port)])]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            pytest.fail("redis-sentinel is not installed (.ci/run installs it)")
        for server in self.servers:
            server.start()
        for index, port in enumerate(self.sentinel_ports):
            config = self.dir / f"sentinel-{index}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.servers[0].port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels.append(subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
        for port in self.sentinel_ports:
            wait_for_port(port, 10)
        self.wait_healthy()

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], socket_timeout=1.0)

    def master_port(self) -> int:
        with self.sentinel() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def server_on(self, port: int) -> RedisProcess:
        return next(server for server in self.servers if server.port == port)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Every sentinel agrees on a master that is up, sees the two others and a replica in
        sync: a failover can happen again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._healthy():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError("the sentinel set did not settle")

    def _healthy(self) -> bool:
        ports = set()
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                [state] = [m for m in client.execute_command("SENTINEL", "MASTERS")
                           if _field(m, "name") == SERVICE]
                flags = _field(state, "flags")
                if flags != "master" or int(_field(state, "num-other-sentinels")) < 2 \
                        or int(_field(state, "num-slaves")) < 1:
                    return False
                ports.add(int(_field(state, "port")))
        if len(ports) != 1:
            return False
        [port] = ports
        with redis.Redis(port=port, socket_timeout=1.0) as master:
            info = master.info("replication")
        replicas = [info[name] for name in info if name.startswith("slave") and isinstance(info[name], dict)]
        return info["role"] == "master" and any(r.get("state") == "online" for r in replicas)

    def kill(self, port: int) -> RedisProcess:
        server = self.server_on(port)
        assert server.process is not None
        server.process.kill()
        server.process.wait(10)
        server.process = None
        return server

    def pause(self, port: int) -> None:
        process = self.server_on(port).process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        process = self.server_on(port).process
        assert process is not None
        os.kill(process.pid, signal.SIGCONT)

    def revive(self, server: RedisProcess) -> None:
        """Start a killed server again as it was (it believes itself a master, as after a crash
        and restart); the sentinels turn it into a replica of the new master."""
        extra = [arg for arg in server.extra]
        if "--replicaof" in extra:
            at = extra.index("--replicaof")
            del extra[at:at + 3]
        server.extra = extra
        server.start()

    def cleanup(self) -> None:
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            process.wait(10)
        for server in self.servers:
            if server.process is not None:
                os.kill(server.process.pid, signal.SIGCONT)
            server.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def _field(entry: object, name: str) -> str:
    """A field of a SENTINEL MASTERS entry (redis-py gives a dict, or a flat list)."""
    if isinstance(entry, dict):
        value = entry.get(name, entry.get(name.encode()))
    else:
        items = list(entry)  # type: ignore[call-overload]
        pairs = dict(zip(items[::2], items[1::2], strict=True))
        value = pairs.get(name, pairs.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else str(value)
