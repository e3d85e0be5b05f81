"""A live session follows its token, on every instance: deleted, disabled, expired, usage-blocked or
with a narrower ACL, the session ends within a second (5.0: DISCONNECT 0x87); `accessed` advances
while it is up; usage counts its messages; its connect and disconnect are in the token's logs."""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from gateway.mqtt import codec

from support.gateways import GatewayFactory, GatewayHandle
from support.keys import MASTER_KEY
from support.mqtt import Client
from support.usage import room_in_window

ACL = [{"uri": "mqtt", "topic": "live/#", "actions": ["publish", "subscribe"]}]


async def session(gw: GatewayHandle, key: str, version: int = 5) -> Client:
    client = Client(gw.server.mqtt_port, key, version)
    assert await client.connect() == 0
    return client


async def ended_within(client: Client, seconds: float) -> int | None:
    started = time.monotonic()
    code = await client.wait_disconnect(seconds + 1)
    assert time.monotonic() - started < seconds, "the session outlived its token by more than a second"
    return code


@pytest.fixture
async def pair(make_mqtt_gateway: GatewayFactory) -> tuple[GatewayHandle, GatewayHandle]:
    """Two instances on one Redis: the session on the first, the change made through the second."""
    return await make_mqtt_gateway(), await make_mqtt_gateway()


@pytest.mark.parametrize(("change", "body"), [
    ("delete", None),
    ("disable", {"enabled": False}),
    ("narrow", {"access": {"type": 2, "acl": [{"uri": "mqtt", "topic": "live/other", "actions": ["subscribe"]}]}}),
    ("ips", {"ips": "10.1.2.3"}),
])
async def test_revoked_on_another_instance(pair: tuple[GatewayHandle, GatewayHandle], change: str,
                                           body: dict[str, Any] | None) -> None:
    serving, other = pair
    token = await other.create_token(access={"type": 2, "acl": ACL})
    client = await session(serving, token["key"])
    try:
        assert await client.subscribe("live/+") == [1]
        path = f"/platform/tokens/{token['id']}"
        status, reply = await (other.call("DELETE", path) if body is None else other.call("PUT", path, json=body))
        assert status == 200, reply
        assert await ended_within(client, 1.0) == 0x87
    finally:
        client.close()


async def test_a_change_that_keeps_the_grants_keeps_the_session(pair: tuple[GatewayHandle, GatewayHandle]) -> None:
    serving, other = pair
    token = await other.create_token(access={"type": 2, "acl": ACL})
    client = await session(serving, token["key"])
    master = await session(serving, MASTER_KEY)
    try:
        assert await client.subscribe("live/+") == [1]
        status, reply = await other.call("PUT", f"/platform/tokens/{token['id']}", json={"info": "renamed"})
        assert status == 200, reply
        await asyncio.sleep(0.5)
        await master.publish("live/x", b"still here", qos=1)
        assert (await client.message()).payload == b"still here"
        assert not client.disconnected.is_set()
    finally:
        client.close()
        master.close()


async def test_3_1_1_sessions_are_closed(pair: tuple[GatewayHandle, GatewayHandle]) -> None:
    serving, other = pair
    token = await other.create_token(access={"type": 0})
    client = await session(serving, token["key"], 4)
    try:
        assert (await other.call("DELETE", f"/platform/tokens/{token['id']}"))[0] == 200
        assert await ended_within(client, 1.0) != 0
    finally:
        client.close()


async def test_expiry_ends_the_session(mgw: GatewayHandle) -> None:
    token = await mgw.create_token(access={"type": 0}, ttl=0, expire=int(time.time()) + 2)
    client = await session(mgw, token["key"])
    try:
        code = await client.wait_disconnect(4)
        assert code == 0x87 and time.time() < token["expire"] + 1.0
    finally:
        client.close()


async def test_accessed_advances_and_events_are_logged(mgw: GatewayHandle) -> None:
    token = await mgw.create_token(access={"type": 0})
    client = await session(mgw, token["key"])
    try:
        status, body = await mgw.call("GET", f"/platform/tokens/{token['id']}")
        first = body["result"][0]["accessed"]
        await asyncio.sleep(2.2)
        status, body = await mgw.call("GET", f"/platform/tokens/{token['id']}")
        assert status == 200 and body["result"][0]["accessed"] >= first + 2
    finally:
        client.close()
    for _ in range(100):
        _, body = await mgw.call("GET", f"/platform/tokens/{token['id']}/logs")
        events = [record["uri"] for record in body["result"] if record.get("method") == "MQTT"]
        if len(events) >= 2:
            break
        await asyncio.sleep(0.05)
    assert events[0] == "connect" and events[1].startswith("disconnect")
    assert token["key"] not in str(body)


async def test_usage_counts_messages_and_blocks(make_mqtt_gateway: GatewayFactory) -> None:
    gw = await make_mqtt_gateway(usage={"api_calls": 40, "flush_interval": 0.1})
    await room_in_window(8)  # counted and blocked in one window
    token = await gw.create_token(access={"type": 0})
    client = await session(gw, token["key"])
    try:
        for index in range(60):
            await client.publish("count/me", str(index).encode(), qos=0)
        assert await client.wait_disconnect(3) == 0x87
        again = Client(gw.server.mqtt_port, token["key"])
        assert await again.connect() == 0x87  # blocked: not authorized
        again.close()
    finally:
        client.close()


async def test_an_idle_session_is_not_charged_for_its_checks(make_mqtt_gateway: GatewayFactory) -> None:
    """Checked every 0.2 s: were each check a call, 10 calls would last two seconds. Messages count."""
    gw = await make_mqtt_gateway(usage={"api_calls": 10, "flush_interval": 0.1})
    await room_in_window(12)  # counted and blocked in one window
    token = await gw.create_token(access={"type": 0})
    client = await session(gw, token["key"])
    try:
        assert not await asyncio.to_thread(client.disconnected.wait, 3.0), "an idle session was disconnected"
        assert await client.subscribe("idle/me") == [1]
        assert await client.publish("idle/me", b"1", qos=1) == 0
        assert (await client.message()).payload == b"1"
        for index in range(20):
            await client.publish("idle/me", str(index).encode(), qos=0)
        assert await client.wait_disconnect(3) == 0x87
    finally:
        client.close()


@pytest.mark.parametrize(("version", "refused"), [pytest.param(5, 0x87, id="5.0"), pytest.param(4, 5, id="3.1.1")])
async def test_a_usage_blocked_token_cannot_connect(make_mqtt_gateway: GatewayFactory, version: int,
                                                    refused: int) -> None:
    gw = await make_mqtt_gateway(usage={"api_calls": 20, "flush_interval": 0.1})
    await room_in_window(8)  # counted and blocked in one window
    token = await gw.create_token(access={"type": 0})
    client = await session(gw, token["key"], version)
    try:
        for index in range(40):
            await client.publish("count/me", str(index).encode(), qos=0)
        await client.wait_disconnect(3)  # 5.0: 0x87; 3.1.1: the connection closed
    finally:
        client.close()
    again = Client(gw.server.mqtt_port, token["key"], version)
    try:
        assert await again.connect() == refused
    finally:
        again.close()


async def test_a_traffic_limit_blocks_the_session(make_mqtt_gateway: GatewayFactory) -> None:
    gw = await make_mqtt_gateway(usage={"traffic": 2000, "flush_interval": 0.1})
    await room_in_window(8)  # counted and blocked in one window
    token = await gw.create_token(access={"type": 0})
    client = await session(gw, token["key"])
    try:
        assert await client.publish("bytes/me", b"x" * 100, qos=1) in (0, 0x10)  # under the limit (0x10: no subscriber)
        assert not await asyncio.to_thread(client.disconnected.wait, 0.6)
        for _ in range(5):
            await client.publish("bytes/me", b"x" * 1000, qos=0)
        assert await client.wait_disconnect(3) == 0x87
    finally:
        client.close()
    for _ in range(100):  # the token's logs are written in batches
        _, body = await gw.call("GET", f"/platform/tokens/{token['id']}/logs")
        reasons = [record["uri"] for record in body["result"] if record.get("method") == "MQTT"]
        if any("bytes of traffic" in reason for reason in reasons):
            break
        await asyncio.sleep(0.05)
    assert any("bytes of traffic" in reason for reason in reasons), reasons


@pytest.mark.parametrize(("acl", "ends"), [
    pytest.param([{"uri": "mqtt", "topic": "live/#", "actions": ["subscribe"]}], True, id="will-no-longer-granted"),
    pytest.param([{"uri": "mqtt", "topic": "live/will", "actions": ["publish"]}], False, id="will-still-granted"),
])
async def test_an_acl_change_rechecks_the_will(pair: tuple[GatewayHandle, GatewayHandle],
                                               acl: list[dict[str, Any]], ends: bool) -> None:
    """The broker holds the will: one the token no longer grants ends the session with a normal
    DISCONNECT, which discards it (it is never published)."""
    serving, other = pair
    token = await other.create_token(access={"type": 2, "acl": ACL})
    watcher = await session(serving, MASTER_KEY)
    client = Client(serving.server.mqtt_port, token["key"], 5)
    try:
        assert await watcher.subscribe("live/will") == [1]
        assert await client.connect(will=("live/will", b"gone")) == 0
        status, reply = await other.call("PUT", f"/platform/tokens/{token['id']}",
                                         json={"access": {"type": 2, "acl": acl}})
        assert status == 200, reply
        if ends:
            assert await ended_within(client, 1.0) == 0x87
            await watcher.no_message(0.5)
        else:
            assert not await asyncio.to_thread(client.disconnected.wait, 1.0)
    finally:
        client.close()
        watcher.close()


def _packets(sock: socket.socket, wanted: int) -> list[tuple[int, bytes]]:
    """Packets read until one of type `wanted` (first byte, body), with the codec's framing."""
    buffer, got = bytearray(), []
    while True:
        framed = codec.frame(buffer, 0, 1 << 20)
        if framed is None:
            chunk = sock.recv(4096)
            assert chunk, f"closed before a packet of type {wanted}: {got}"
            buffer += chunk
            continue
        first, at, end = framed
        got.append((first, bytes(buffer[at:end])))
        del buffer[:end]
        if first >> 4 == wanted:
            return got


async def test_a_client_still_publishing_when_its_session_ends_reads_why(mgw: GatewayHandle) -> None:
    """The session ended by the gateway (its token deleted) while the client goes on publishing: it
    gets DISCONNECT 0x87, and what it sends after is read and dropped until the connection ends in
    order (a FIN, never a reset that could overtake the reason)."""
    token = await mgw.create_token()
    with socket.create_connection(("127.0.0.1", mgw.server.mqtt_port), timeout=5) as sock:
        sock.sendall(codec.Connect(codec.V5, True, 60, "still-publishing", username=token["key"]).encode())
        [(_, body)] = await asyncio.to_thread(_packets, sock, codec.CONNACK)
        assert body[1] == 0
        status, _ = await mgw.call("DELETE", f"/platform/tokens/{token['id']}")
        assert status == 200
        _, body = (await asyncio.to_thread(_packets, sock, 14))[-1]  # DISCONNECT
        assert body[0] == 0x87
        publish = codec.packet(codec.PUBLISH << 4, codec.text("after/the/end") + b"\x00" + b"x" * 1000)
        for _ in range(5):  # a reset would fail the second send at the latest
            sock.sendall(publish)
            await asyncio.sleep(0.05)
        assert sock.recv(4096) == b""
