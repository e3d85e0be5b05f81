"""MQTT over WebSocket on the HTTP listener, and a broker restart: clients are disconnected cleanly
and can connect again."""
from __future__ import annotations

from support.gateways import GatewayHandle
from support.keys import MASTER_KEY
from support.mqtt import Client, Mosquitto


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
