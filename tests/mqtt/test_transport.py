"""MQTT over WebSocket on the HTTP listener, and a broker restart: clients are disconnected cleanly
and can connect again."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

from support.gateways import GatewayFactory, GatewayHandle, base_config
from support.keys import MASTER_KEY
from support.mqtt import Client, Mosquitto
from support.servers import ROOT, free_port


async def test_mqtt_over_websocket(mgw: GatewayHandle) -> None:
    port = int(mgw.url.rsplit(":", 1)[1])
    token = await mgw.create_token(access={"type": 2, "acl": [
        {"uri": "mqtt", "topic": "ws/#", "actions": ["publish", "subscribe"]}]})
    ws = Client(port, token["key"], 5, transport="websockets")
    tcp = Client(mgw.server.mqtt_port, MASTER_KEY, 4)
    try:
        assert await ws.connect() == 0
        assert await tcp.connect() == 0
        assert await ws.subscribe("ws/+", "other/#") == [1, 0x87]
        assert await tcp.publish("ws/a", b"over tcp", qos=1) == 0
        assert (await ws.message()).payload == b"over tcp"
        assert await ws.publish("elsewhere", b"no", qos=1) == 0x87
        refused = Client(port, "Z" * 64, 4, transport="websockets")
        assert await refused.connect() == 4
        refused.close()
    finally:
        ws.close()
        tcp.close()


async def test_a_plain_get_on_the_websocket_path_is_refused(mgw: GatewayHandle) -> None:
    async with mgw.session.get(mgw.url + "/mqtt") as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == 400


async def test_broker_restart(mgw: GatewayHandle, mosquitto: Mosquitto) -> None:
    v5 = Client(mgw.server.mqtt_port, MASTER_KEY, 5)
    v3 = Client(mgw.server.mqtt_port, MASTER_KEY, 4)
    assert await v5.connect() == 0 and await v3.connect() == 0
    mosquitto.stop()
    try:
        assert await v5.wait_disconnect() == 0x89  # DISCONNECT "server busy": the broker went away
        assert await v3.wait_disconnect() != 0
        down = Client(mgw.server.mqtt_port, MASTER_KEY, 5)
        assert await down.connect() == 0x88  # while it is away: server unavailable
        down.close()
    finally:
        v5.close()
        v3.close()
        mosquitto.start()
    back = Client(mgw.server.mqtt_port, MASTER_KEY, 5)
    try:
        assert await back.connect() == 0
        assert await back.subscribe("after/restart") == [1]
        assert await back.publish("after/restart", b"works", qos=1) == 0
        assert (await back.message()).payload == b"works"
    finally:
        back.close()


async def test_the_gateway_process_serves_mqtt(tmp_path: Path, redis_url: str, key_prefix: str,
                                               live_mosquitto: Mosquitto) -> None:
    """`python -m gateway` as a user runs it (uvloop's event loop, whose transports differ)."""
    port, mqtt_port = free_port(), free_port()
    config = base_config("http://127.0.0.1:9", redis_url, key_prefix, listen={"host": "127.0.0.1", "port": port},
                         mqtt={"listen": {"host": "127.0.0.1", "port": mqtt_port}, "broker": live_mosquitto.url})
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "--config", str(path), cwd=ROOT,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", mqtt_port), timeout=0.2):
                break
            await asyncio.sleep(0.05)
        for version in (5, 4):
            client = Client(mqtt_port, MASTER_KEY, version)
            try:
                assert await client.connect() == 0
                assert await client.subscribe("proc/x") == [1]
                assert await client.publish("proc/x", b"uvloop", qos=1) == 0
                assert (await client.message()).payload == b"uvloop"
            finally:
                client.close()
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")


async def test_gateway_shutdown_tells_5_clients(make_mqtt_gateway: GatewayFactory) -> None:
    gw = await make_mqtt_gateway()
    client = Client(gw.server.mqtt_port, MASTER_KEY, 5)
    try:
        assert await client.connect() == 0
        await gw.server.close()
        assert await client.wait_disconnect() == 0x8B  # server shutting down
    finally:
        client.close()
