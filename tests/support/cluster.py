"""A Redis Cluster on loopback: three masters and three replicas, with a node timeout short enough
for tests (a killed master's replica takes over within a few seconds)."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time

import pytest
import redis

from .servers import CLUSTER_PORTS, RedisProcess, bindable

NODE_TIMEOUT_MS = 1000


def cluster_port(taken: set[int]) -> int:
    """A free port whose bus port is free too."""
    while True:
        port = random.choice(CLUSTER_PORTS)
        if port not in taken and bindable(port) and bindable(port + 10000):
            taken.add(port)
            return port


class RedisClusterSet:
    """Six nodes; `create` makes them one cluster. A test that kills a master calls `restore()`
    before it ends, so the set is whole again for the next."""

    def __init__(self) -> None:
        self.nodes = [RedisProcess(extra=["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS)])
                      for _ in range(6)]
        taken: set[int] = set()
        for node in self.nodes:
            node.port = cluster_port(taken)
            node.extra += ["--cluster-config-file", f"{node.dir}/nodes.conf"]

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed (.ci/run installs redis-server, which has it)")
        for node in self.nodes:
            node.start()
        subprocess.run([cli, "--cluster", "create", *self.hosts, "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        self.wait_ok()

    def client(self, node: RedisProcess) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=2)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok and sees three masters, each with a replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node.process is not None]
            if all(self._healthy(node) for node in running) and all(self._replicated(node) for node in running):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not become ok:\n{self.state()}")

    def state(self) -> str:
        """What every running node says of the cluster, for an error."""
        lines = []
        for node in self.nodes:
            if node.process is None:
                lines.append(f":{node.port} stopped")
                continue
            try:
                with self.client(node) as client:
                    info = client.execute_command("CLUSTER", "INFO").decode().split()[0]
                    seen = client.execute_command("CLUSTER", "NODES").decode().strip()
            except redis.RedisError as exc:
                lines.append(f":{node.port} {exc}")
                continue
            lines.append(f":{node.port} {info}\n  " + seen.replace("\n", "\n  "))
        return "\n".join(lines)

    def ensure_ok(self, timeout: float = 20.0) -> None:
        """Whole for the next test. A set that a test left broken (a failover that did not settle
        on a loaded machine) is made anew, empty, so that one test's failure is not every later
        cluster test's too; what was wrong is printed."""
        try:
            self.wait_ok(timeout)
        except RuntimeError as exc:
            print(f"\nthe test cluster is made anew: {exc}", file=sys.stderr)
            self.rebuild()

    def rebuild(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.kill()  # SIGKILL: a node left stopped (SIGSTOP) ignores SIGTERM
                node.process.wait(10)
                node.process = None
            shutil.rmtree(node.dir, ignore_errors=True)
            node.dir.mkdir(parents=True)
        self.start()

    def _view(self, node: RedisProcess) -> tuple[str, list[str]] | None:
        """The node's CLUSTER INFO and its CLUSTER NODES lines, or None if it does not answer."""
        try:
            with self.client(node) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                return info, client.execute_command("CLUSTER", "NODES").decode().splitlines()
        except redis.RedisError:
            return None

    def _healthy(self, node: RedisProcess) -> bool:
        view = self._view(node)
        if view is None:
            return False
        info, lines = view
        running = sum(1 for line in lines if "fail" not in line.split()[2] and "connected" in line)
        return "cluster_state:ok" in info and running == sum(1 for n in self.nodes if n.process is not None)

    def _replicated(self, node: RedisProcess) -> bool:
        """A master has a replica attached (just after `create`, or a restart, one may not yet)."""
        try:
            with self.client(node) as client:
                role = client.execute_command("ROLE")
        except redis.RedisError:
            return False
        return role[0] != b"master" or len(role[2]) > 0

    def masters(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None and self.role(node) == "master"]

    def role(self, node: RedisProcess) -> str:
        with self.client(node) as client:
            return str(client.execute_command("ROLE")[0].decode())

    def restore(self) -> None:
        """Start every stopped node again (it rejoins as a replica of whoever took its slots).
        A stopped master is started only once its replica holds its slots: it keeps nothing on
        disk, and back before the failover it would still own them, empty, and its replica would
        copy that emptiness (every token on it gone, the gateways' master tokens among them)."""
        stopped = [node for node in self.nodes if node.process is None]
        self.wait_taken_over(stopped)
        for node in stopped:
            node.start()
        self.wait_ok()

    def wait_taken_over(self, stopped: list[RedisProcess], timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok and that none of `stopped` owns a slot."""
        ports = {f":{node.port}@" for node in stopped}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._covered_without(node, ports) for node in self.nodes if node.process is not None):
                return
            time.sleep(0.1)
        raise RuntimeError(f"no replica took over the stopped masters' slots:\n{self.state()}")

    def _covered_without(self, node: RedisProcess, ports: set[str]) -> bool:
        view = self._view(node)
        if view is None:
            return False
        info, lines = view
        # A line is: id address flags master ping pong epoch link [slot ranges...]
        rows = [line.split() for line in lines]
        owning = [row for row in rows if len(row) > 8 and any(port in row[1] for port in ports)]
        return "cluster_state:ok" in info and not owning

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
