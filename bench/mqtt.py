"""The MQTT front against mosquitto itself: the same clients, once straight to the broker and once
through the gateway, in one run.

    python bench/mqtt.py [--messages N] [--sessions N] [--latency N]

Measures QoS 0 and QoS 1 publish throughput (messages a second delivered to a subscriber; QoS 1
counted by the publisher's PUBACKs), end-to-end latency (one message at a time, publish to
delivery), connections a second (CONNECT to CONNACK, then DISCONNECT), the gateway's memory per idle
session with `--sessions` open, and the Redis commands the gateway sent per message. Targets:
QoS 0 at least 0.5 x mosquitto direct, under 20 KB per idle session, no Redis round trip per message.

Everything listens on 127.0.0.1 on free ports: a redis-server, a mosquitto with its own password
file, and `python -m gateway` with the MQTT front; all stopped at the end. The clients are raw
asyncio sockets in this process (pre-built packets, bytes counted), so that the client is not what
limits either side.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import HOST, MASTER_KEY
from harness.procs import Processes, cpu_seconds, free_port, rss_mb, wait_for_port
from harness.servers import start_gateway, start_redis
from harness.tools import ensure_tools, find_binary

BROKER_USER, BROKER_PASSWORD = "bench", "bench-secret"


def connect_packet(user: str, password: str | None, client_id: str, keepalive: int = 0) -> bytes:
    """A 3.1.1 CONNECT, clean session."""
    body = b"\x00\x04MQTT\x04" + bytes((0x82 | (0x40 if password else 0),)) + keepalive.to_bytes(2, "big")
    for field in (client_id, user, password):
        if field is not None:
            raw = field.encode()
            body += len(raw).to_bytes(2, "big") + raw
    return bytes((0x10,)) + varint(len(body)) + body


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | (qos << 1),)) + varint(len(body)) + body


def subscribe_packet(topic: str, qos: int = 0) -> bytes:
    body = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic.encode() + bytes((qos,))
    return bytes((0x82,)) + varint(len(body)) + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, user: str, password: str | None, client_id: str) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 22)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(connect_packet(user, password, client_id))
        connack = await reader.readexactly(4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {connack!r}")
        return cls(reader, writer)

    async def subscribe(self, topic: str, qos: int = 0) -> None:
        self.writer.write(subscribe_packet(topic, qos))
        suback = await self.reader.readexactly(5)
        if suback[0] != 0x90 or suback[4] > 2:
            raise RuntimeError(f"SUBACK refused: {suback!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"\xe0\x00")
            self.writer.close()


class Target:
    def __init__(self, name: str, port: int, user: str, password: str | None) -> None:
        self.name, self.port, self.user, self.password = name, port, user, password

    async def connection(self, client_id: str) -> Connection:
        return await Connection.open(self.port, self.user, self.password, client_id)


async def qos0_throughput(target: Target, messages: int, payload: int) -> float:
    """Messages a second from one publisher to one subscriber, at QoS 0."""
    sub = await target.connection("bench-sub")
    await sub.subscribe("bench/t")
    pub = await target.connection("bench-pub")
    packet = publish_packet("bench/t", b"x" * payload)
    batch = packet * 500
    expected = len(packet) * messages

    async def receive() -> None:
        got = 0
        while got < expected:
            chunk = await sub.reader.read(1 << 20)
            if not chunk:
                raise RuntimeError("the subscriber's connection closed")
            got += len(chunk)

    started = time.perf_counter()
    receiving = asyncio.ensure_future(receive())
    for _ in range(messages // 500):
        pub.writer.write(batch)
        await pub.writer.drain()
    await asyncio.wait_for(receiving, 120)
    elapsed = time.perf_counter() - started
    pub.close()
    sub.close()
    return messages / elapsed


async def qos1_throughput(target: Target, messages: int, payload: int, window: int = 20) -> float:
    """PUBACKed publishes a second, `window` in flight (mosquitto's default receive maximum)."""
    pub = await target.connection("bench-pub1")
    packets = [publish_packet("bench/q1", b"x" * payload, 1, (index % 60000) + 1) for index in range(messages)]
    started = time.perf_counter()
    sent = acked = 0
    while sent < min(window, messages):
        pub.writer.write(packets[sent])
        sent += 1
    while acked < messages:
        head = await pub.reader.readexactly(4)
        if head[0] != 0x40:
            raise RuntimeError(f"expected PUBACK, got {head!r}")
        acked += 1
        if sent < messages:
            pub.writer.write(packets[sent])
            sent += 1
    elapsed = time.perf_counter() - started
    pub.close()
    return messages / elapsed


async def latency(target: Target, rounds: int, qos: int) -> tuple[float, float]:
    """p50 and p99 in ms, publish to delivery, one message at a time."""
    sub = await target.connection(f"bench-lsub{qos}")
    await sub.subscribe("bench/lat", qos)
    pub = await target.connection(f"bench-lpub{qos}")
    samples = []
    for index in range(rounds):
        packet = publish_packet("bench/lat", b"p" * 16, qos, index % 60000 + 1)
        started = time.perf_counter()
        pub.writer.write(packet)
        await sub.reader.readexactly(1)
        length = (await sub.reader.readexactly(1))[0]
        body = await sub.reader.readexactly(length)
        samples.append((time.perf_counter() - started) * 1000)
        if qos:
            at = 2 + len("bench/lat")
            sub.writer.write(b"\x40\x02" + body[at:at + 2])  # PUBACK with the broker's packet id
            await pub.reader.readexactly(4)  # the publisher's own PUBACK
    pub.close()
    sub.close()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def connections_per_second(target: Target, count: int, concurrency: int = 20) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            connection = await target.connection(f"bench-c{index}")
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    return count / (time.perf_counter() - started)


async def idle_sessions(target: Target, count: int, pid: int) -> tuple[float, list[Connection]]:
    """KB of the gateway's RSS per idle session, with `count` of them open."""
    before = rss_mb(pid)
    semaphore = asyncio.Semaphore(100)
    opened: list[Connection] = []

    async def one(index: int) -> None:
        async with semaphore:
            opened.append(await target.connection(f"bench-idle{index}"))

    await asyncio.gather(*(one(index) for index in range(count)))
    await asyncio.sleep(2)  # a check round or more over every session
    after = rss_mb(pid)
    return (after - before) * 1024 / count, opened


def redis_commands(port: int) -> int:
    done = subprocess.run(["redis-cli", "-p", str(port), "info", "stats"], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    raise RuntimeError("no total_commands_processed in INFO")


def start_mosquitto(procs: Processes) -> int:
    binary = find_binary("mosquitto")
    if binary is None:
        raise SystemExit("mosquitto is needed (apt-get install mosquitto mosquitto-clients)")
    directory = procs.workdir / "mosquitto"
    directory.mkdir()
    passwd = directory / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), BROKER_USER, BROKER_PASSWORD], check=True,
                   capture_output=True)
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} {HOST}\nallow_anonymous false\npassword_file {passwd}\npersistence false\n"
                    "user root\nmax_queued_messages 0\nmax_inflight_messages 20\nmax_connections -1\n")
    process = procs.start("mosquitto", [binary, "-c", str(conf)])
    wait_for_port(port, process)
    return port


async def measure(args: argparse.Namespace, direct: Target, through: Target, redis_port: int, pid: int,
                  broker_pid: int) -> list[str]:
    """The table's rows. With QoS 0 also the CPU time each server spent per message (the figure the
    machine's load moves least: a loaded machine starves the clients of both runs alike)."""
    rows = []
    for name, run in (
        ("QoS 0 msg/s", lambda t: qos0_throughput(t, args.messages, args.payload)),
        ("QoS 1 msg/s", lambda t: qos1_throughput(t, args.messages // 5, args.payload)),
        ("connections/s", lambda t: connections_per_second(t, args.connections)),
    ):
        figures = {}
        cpu: dict[str, tuple[float, float]] = {}
        for target in (direct, through):
            commands = redis_commands(redis_port)
            gateway_cpu, broker_cpu = cpu_seconds([pid]), cpu_seconds([broker_pid])
            figures[target.name] = await run(target)
            cpu[target.name] = (cpu_seconds([pid]) - gateway_cpu, cpu_seconds([broker_pid]) - broker_cpu)
            if target is through and name.startswith("QoS 0"):
                per_message = (redis_commands(redis_port) - commands) / args.messages
                rows.append(f"| Redis commands per QoS 0 message (gateway) | {per_message:.4f} | | | "
                            f"{'met' if per_message < 0.01 else 'MISSED'} (none per message) |")
        if name.startswith("QoS 0"):
            gateway_us = cpu[through.name][0] / args.messages * 1e6
            broker_through, broker_direct = (cpu[n][1] / args.messages * 1e6 for n in (through.name, direct.name))
            rows.append(f"| CPU µs per QoS 0 message: gateway / mosquitto | {gateway_us:.1f} / {broker_through:.1f} "
                        f"| - / {broker_direct:.1f} | | |")
        ratio = figures[through.name] / figures[direct.name]
        target_text = ""
        if name.startswith("QoS 0"):
            target_text = f"{'met' if ratio >= 0.5 else 'MISSED'} (>= 0.5 x direct)"
        rows.append(f"| {name} | {figures[through.name]:,.0f} | {figures[direct.name]:,.0f} | {ratio:.2f} | "
                    f"{target_text} |")
    for qos in (0, 1):
        through_p50, through_p99 = await latency(through, args.latency, qos)
        direct_p50, direct_p99 = await latency(direct, args.latency, qos)
        rows.append(f"| QoS {qos} latency p50 / p99 (ms) | {through_p50:.3f} / {through_p99:.3f} | "
                    f"{direct_p50:.3f} / {direct_p99:.3f} | {through_p50 / direct_p50:.2f} (p50) | |")
    per_session, opened = await idle_sessions(through, args.sessions, pid)
    rows.append(f"| gateway memory per idle session ({args.sessions:,} open) | {per_session:.1f} KB | | | "
                f"{'met' if per_session < 20 else 'MISSED'} (< 20 KB) |")
    for connection in opened:
        connection.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--payload", type=int, default=32)
    parser.add_argument("--latency", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=1000)
    # A gateway session holds two descriptors (the client's and the broker's): 10,000 need a
    # descriptor limit above 20,000 for the gateway's process (`ulimit -n`).
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    tools = ensure_tools(("redis-server",))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the processes started
    if 2 * args.sessions + 100 > hard:
        print(f"descriptor limit {hard}: --sessions lowered from {args.sessions:,} to {(hard - 100) // 2:,}")
        args.sessions = (hard - 100) // 2
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-mqtt-"))
    procs = Processes(workdir)
    try:
        redis_port, _ = start_redis(procs, str(tools["redis-server"]))
        broker_port = start_mosquitto(procs)
        mqtt_port = free_port()
        gateway = start_gateway(procs, "gateway", "http://127.0.0.1:9", f"redis://{HOST}:{redis_port}/0", 1,
                                settings={"mqtt": {"listen": {"host": HOST, "port": mqtt_port},
                                                   "broker": f"mqtt://{BROKER_USER}:{BROKER_PASSWORD}@{HOST}:"
                                                             f"{broker_port}"},
                                          "log": {"path": "off"}})
        wait_for_port(mqtt_port, gateway.process)
        direct = Target("mosquitto direct", broker_port, BROKER_USER, BROKER_PASSWORD)
        through = Target("through the gateway", mqtt_port, MASTER_KEY, None)
        loop_factory = None
        with contextlib.suppress(ImportError):
            import uvloop
            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            broker_pid = next(process.pid for name, process in procs.running if name == "mosquitto")
            rows = runner.run(measure(args, direct, through, redis_port, gateway.process.pid, broker_pid))
        with open("/proc/loadavg") as handle:
            load = handle.read().split()[0]
        print(f"\nMQTT front, {args.messages:,} messages of {args.payload} bytes, one gateway worker "
              f"(interpreted unless built compiled), mosquitto {direct.port}; load average {load} on "
              f"{len(__import__('os').sched_getaffinity(0))} CPUs\n")
        print("| measure | through the gateway | mosquitto direct | ratio | target |")
        print("|---|---:|---:|---:|---|")
        for row in rows:
            print(row)
        return 0
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
