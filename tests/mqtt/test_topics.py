"""What each token may subscribe to and publish, end to end through the gateway to mosquitto."""
from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from support.gateways import GatewayHandle
from support.keys import MASTER_KEY
from support.mqtt import BROKER_PASSWORD, BROKER_USER, Client, Mosquitto

ACL = [
    {"uri": "mqtt", "topic": "acl/+/in", "actions": ["subscribe"]},
    {"uri": "mqtt", "topic": "acl/out/#", "actions": ["publish"]},
]


async def acl_token(gw: GatewayHandle, acl: list[dict[str, object]] = ACL) -> str:
    token = await gw.create_token(access={"type": 2, "acl": acl})
    return str(token["key"])


async def connected(gw: GatewayHandle, key: str, version: int = 5, **kwargs: object) -> Client:
    client = Client(gw.server.mqtt_port, key, version, **kwargs)  # type: ignore[arg-type]
    assert await client.connect() == 0
    return client


@pytest.mark.parametrize(("version", "refused"), [(5, 0x87), (4, 0x80)])
async def test_acl_subscriptions_refused_one_by_one(mgw: GatewayHandle, version: int, refused: int) -> None:
    client = await connected(mgw, await acl_token(mgw), version)
    master = await connected(mgw, MASTER_KEY)
    try:
        assert await client.subscribe("acl/x/in", "acl/#", "$share/g/acl/y/in", "other", "#") == [
            1, refused, 1, refused, refused]
        await master.publish("acl/x/in", b"one", qos=1)
        await master.publish("acl/z/in", b"two", qos=1)  # only "acl/#" (refused) would have matched
        await master.publish("acl/y/in", b"three", qos=1)  # the shared subscription
        got = sorted([(await client.message()).payload, (await client.message()).payload])
        assert got == [b"one", b"three"]
        await client.no_message()
        assert await client.subscribe("#") == [refused]  # every filter refused: answered by the gateway
    finally:
        client.close()
        master.close()


async def test_refused_publish_5_is_acknowledged_not_authorized(mgw: GatewayHandle) -> None:
    client = await connected(mgw, await acl_token(mgw))
    watcher = await connected(mgw, MASTER_KEY)
    try:
        assert await watcher.subscribe("#") == [1]
        assert await client.publish("acl/in/x", b"no", qos=1) == 0x87
        await client.publish("acl/in/x", b"no", qos=2)  # paho ignores PUBREC's code: see the raw test below
        await client.publish("acl/in/x", b"no", qos=0)
        assert await client.publish("acl/out/x", b"yes", qos=1) == 0
        assert await client.publish("acl/out/y", b"yes2", qos=2) == 0
        assert [(await watcher.message()).payload for _ in range(2)] == [b"yes", b"yes2"]
        await watcher.no_message()
    finally:
        client.close()
        watcher.close()


async def test_refused_publish_3_closes_the_connection(mgw: GatewayHandle) -> None:
    client = await connected(mgw, await acl_token(mgw), 4)
    try:
        await client.publish("acl/in/x", b"no", qos=1)
        assert await client.wait_disconnect() != 0
    finally:
        client.close()


@pytest.mark.parametrize("topic", ["flespi/message/gw/devices/1", "flespi/x", "$SYS/x"])
async def test_nobody_publishes_reserved_topics(mgw: GatewayHandle, mosquitto: Mosquitto, topic: str) -> None:
    master = await connected(mgw, MASTER_KEY)
    watcher = Client(mosquitto.port, BROKER_USER, password=BROKER_PASSWORD)  # straight to the broker
    try:
        assert await watcher.connect() == 0
        assert await watcher.subscribe("flespi/#") == [1]
        assert await master.publish(topic, b"forged", qos=1) == 0x87
        await watcher.no_message()
    finally:
        master.close()
        watcher.close()


async def test_sys_topics_for_master_only(mgw: GatewayHandle) -> None:
    standard = await connected(mgw, str((await mgw.create_token(access={"type": 0}))["key"]))
    master = await connected(mgw, MASTER_KEY)
    try:
        assert await standard.subscribe("$SYS/#", "#", "a/#") == [0x87, 0x87, 1]
        assert await master.subscribe("$SYS/broker/uptime") == [1]
        assert (await master.message()).topic == "$SYS/broker/uptime"
    finally:
        standard.close()
        master.close()


async def test_flespi_topics_follow_the_rest_acl(mgw: GatewayHandle, mosquitto: Mosquitto) -> None:
    status, body = await mgw.call("POST", "/platform/tokens", json=[{"ttl": 600, "template": {
        "name": "mqtt-messages", "item": 7}}])
    assert status == 200, body
    client = await connected(mgw, body["result"][0]["key"])
    backend = Client(mosquitto.port, BROKER_USER, password=BROKER_PASSWORD)
    try:
        assert await client.subscribe("flespi/message/gw/devices/7", "flespi/message/gw/devices/8",
                                      "flespi/message/gw/devices/+", "flespi/state/gw/devices/7/#") == [
            1, 0x87, 0x87, 1]
        assert await backend.connect() == 0
        await backend.publish("flespi/message/gw/devices/8", b"{}", qos=1)
        await backend.publish("flespi/message/gw/devices/7", b'{"ident":"7"}', qos=1)
        got = await client.message()
        assert (got.topic, got.payload) == ("flespi/message/gw/devices/7", b'{"ident":"7"}')
        await client.no_message()
    finally:
        client.close()
        backend.close()


async def test_a_kept_session_gets_only_what_the_token_grants_now(mgw: GatewayHandle) -> None:
    token = await mgw.create_token(access={"type": 2, "acl": ACL})
    first = Client(mgw.server.mqtt_port, token["key"], 4, client_id="kept", clean=False)
    assert await first.connect() == 0
    assert await first.subscribe("acl/a/in") == [1]
    first.close()
    status, body = await mgw.call("PUT", f"/platform/tokens/{token['id']}", json={"access": {"type": 2, "acl": [
        {"uri": "mqtt", "topic": "acl/out/#", "actions": ["publish"]}]}})
    assert status == 200, body
    master = await connected(mgw, MASTER_KEY)
    again = Client(mgw.server.mqtt_port, token["key"], 4, client_id="kept", clean=False)
    try:
        assert await again.connect() == 0 and again.session_present  # the broker kept the subscription...
        await master.publish("acl/a/in", b"not for you any more", qos=1)
        await again.no_message(0.5)  # ...but the gateway delivers only what the token grants now
    finally:
        again.close()
        master.close()


async def test_retained_qos2_and_will_pass_through(mgw: GatewayHandle) -> None:
    master = await connected(mgw, MASTER_KEY)
    try:
        assert await master.publish("keep/this", b"retained", qos=2, retain=True) == 0
        late = await connected(mgw, MASTER_KEY)
        assert await late.subscribe("keep/#", "will/#", qos=2) == [2, 2]
        got = await late.message()
        assert (got.topic, got.payload, got.retain, got.qos) == ("keep/this", b"retained", True, 2)
        # A will: the client's connection ends without DISCONNECT (mosquitto_sub killed).
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(mgw.server.mqtt_port), "-u", MASTER_KEY, "-V", "5",
            "-t", "nothing", "--will-topic", "will/gone", "--will-payload", "bye", "--will-qos", "1")
        await asyncio.sleep(0.5)
        sub.send_signal(signal.SIGKILL)
        await sub.wait()
        got = await late.message()
        assert (got.topic, got.payload) == ("will/gone", b"bye")
        late.close()
        await master.publish("keep/this", b"", qos=1, retain=True)  # clear it
    finally:
        master.close()


async def test_mosquitto_clients(mgw: GatewayHandle) -> None:
    token = await mgw.create_token(access={"type": 2, "acl": [
        {"uri": "mqtt", "topic": "cli/#", "actions": ["publish", "subscribe"]}]})
    port = str(mgw.server.mqtt_port)
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-u", f"FlespiToken {token['key']}", "-V", "311",
        "-t", "cli/+", "-C", "1", "-W", "5", stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.5)
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", token["key"], "-V", "5", "-t", "cli/x", "-m", "hello",
        "-q", "1")
    assert await pub.wait() == 0
    out, _ = await sub.communicate()
    assert out == b"hello\n" and sub.returncode == 0
    refused = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-u", "Z" * 64, "-V", "311", "-t", "cli/x", "-m", "x",
        stderr=asyncio.subprocess.PIPE)
    _, err = await refused.communicate()
    assert refused.returncode != 0 and b"bad user name or password" in err.lower(), err


def raw_session(port: int, packets: bytes) -> bytes:
    """Send bytes as they are, read until the gateway closes (what a client sees)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(packets)
        got = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += chunk


def connect_311(key: str) -> bytes:
    user = key.encode()
    body = b"\x00\x04MQTT\x04\x82\x00\x3c" + b"\x00\x00" + len(user).to_bytes(2, "big") + user
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize(("name", "after_connect"), [
    ("QoS 3 publish", b"\x36\x05\x00\x01a\x00\x01"),
    ("SUBSCRIBE with wrong flags", b"\x80\x06\x00\x01\x00\x01a\x00"),
    ("remaining length in five bytes", b"\x30\xff\xff\xff\xff\x01"),
    ("a second CONNECT", connect_311(MASTER_KEY)),
    ("a topic that is not UTF-8", b"\x30\x04\x00\x02\xff\xfe"),
    ("a wildcard in a topic name", b"\x30\x05\x00\x03a/+"),
    ("CONNACK from a client", b"\x20\x02\x00\x00"),
    ("reserved packet type 0", b"\x00\x00"),
])
async def test_malformed_packets_close_the_connection(mgw: GatewayHandle, name: str, after_connect: bytes) -> None:
    seen = await asyncio.to_thread(raw_session, mgw.server.mqtt_port, connect_311(MASTER_KEY) + after_connect)
    assert seen == b"\x20\x02\x00\x00", name  # accepted, then closed with nothing more


async def test_the_first_packet_must_be_connect(mgw: GatewayHandle) -> None:
    assert await asyncio.to_thread(raw_session, mgw.server.mqtt_port, b"\xc0\x00") == b""
    # MQTT 3.1 (protocol MQIsdp) is not spoken: CONNACK code 1.
    body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01c"
    assert await asyncio.to_thread(raw_session, mgw.server.mqtt_port, bytes((0x10, len(body))) + body) == \
        b"\x20\x02\x00\x01"


def connect_5(key: str) -> bytes:
    user = key.encode()
    body = b"\x00\x04MQTT\x05\x82\x00\x3c\x00" + b"\x00\x00" + len(user).to_bytes(2, "big") + user
    return bytes((0x10, len(body))) + body


async def test_refused_publish_5_raw(mgw: GatewayHandle) -> None:
    """A refused QoS 2 PUBLISH: PUBREC 0x87, and the PUBREL that may follow gets PUBCOMP 0x92 from
    the gateway (the broker never heard of it); a refused QoS 1: PUBACK 0x87."""
    key = await acl_token(mgw)
    sent = (connect_5(key) + b"\x34\x0d\x00\x08acl/in/x\x00\x01\x00" + b"\x62\x02\x00\x01"
            + b"\x32\x0d\x00\x08acl/in/y\x00\x02\x00" + b"\xe0\x00")
    seen = await asyncio.to_thread(raw_session, mgw.server.mqtt_port, sent)
    assert seen.startswith(b"\x20") and seen[3] == 0  # CONNACK, accepted (with the broker's properties)
    rest = seen[2 + seen[1]:]
    assert rest == b"\x50\x04\x00\x01\x87\x00" + b"\x70\x04\x00\x01\x92\x00" + b"\x40\x04\x00\x02\x87\x00"
