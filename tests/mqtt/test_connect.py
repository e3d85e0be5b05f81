"""CONNECT through the gateway to a real mosquitto: the key as user name, the CONNACK codes of
each refusal, and the key never reaching the broker."""
from __future__ import annotations

import asyncio

import pytest

from support.gateways import GatewayFactory, GatewayHandle
from support.keys import MASTER_KEY
from support.mqtt import Client, Mosquitto

VERSIONS = [pytest.param(5, id="5.0"), pytest.param(4, id="3.1.1")]


def port(gw: GatewayHandle) -> int:
    return gw.server.mqtt_port


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("spelling", ["bare", "scheme"])
async def test_a_valid_key_connects_and_messages_flow(mgw: GatewayHandle, mosquitto: Mosquitto, version: int,
                                                      spelling: str) -> None:
    token = await mgw.create_token(access={"type": 0})
    username = token["key"] if spelling == "bare" else f"FlespiToken {token['key']}"
    client = Client(port(mgw), username, version, client_id=f"c-{spelling}-{version}", password="ignored")
    try:
        assert await client.connect() == 0
        assert await client.subscribe("room/+/temp") == [1]
        assert await client.publish("room/1/temp", b"21.5", qos=1) == 0
        got = await client.message()
        assert (got.topic, got.payload, got.qos) == ("room/1/temp", b"21.5", 1)
    finally:
        client.close()
    log = mosquitto.logged()
    assert token["key"] not in log and "ignored" not in log
    assert f"{token['id']}/c-{spelling}-{version}" in log  # the client id, in the token's namespace


@pytest.mark.parametrize("version", VERSIONS)
async def test_refusals_have_their_connack_codes(mgw: GatewayHandle, version: int) -> None:
    v5 = version == 5
    disabled = await mgw.create_token(access={"type": 0}, enabled=False)
    noapi = await mgw.create_token(access={"type": 3})
    elsewhere = await mgw.create_token(access={"type": 0}, ips="10.9.9.9")
    expired = await mgw.create_token(access={"type": 0}, ttl=0, expire=1)
    cases = [
        ("Z" * 64, 0x86 if v5 else 4),  # unknown
        (None, 0x86 if v5 else 4),  # no user name at all
        ("not a key", 0x86 if v5 else 4),
        (expired["key"], 0x86 if v5 else 4),
        (disabled["key"], 0x87 if v5 else 5),
        (noapi["key"], 0x87 if v5 else 5),
        (elsewhere["key"], 0x87 if v5 else 5),
    ]
    for key, code in cases:
        client = Client(port(mgw), key, version)
        try:
            assert await client.connect() == code, key
            assert await client.wait_disconnect() is not None  # then the gateway closes
        finally:
            client.close()


async def test_a_refusal_is_in_the_token_logs(mgw: GatewayHandle) -> None:
    disabled = await mgw.create_token(access={"type": 0}, enabled=False)
    client = Client(port(mgw), disabled["key"], 5)
    try:
        assert await client.connect() == 0x87
    finally:
        client.close()
    ok = Client(port(mgw), MASTER_KEY, 5, client_id="logged")
    try:
        assert await ok.connect() == 0
    finally:
        ok.close()
    for _ in range(100):
        status, body = await mgw.call("GET", f"/platform/tokens/{disabled['id']}/logs")
        assert status == 200, body
        records = [r for r in body["result"] if r.get("method") == "MQTT"]
        if records:
            break
        await asyncio.sleep(0.05)
    assert records and records[0]["uri"] == "connect" and records[0]["status"] == 401


async def test_store_unavailable_is_server_unavailable(make_mqtt_gateway: GatewayFactory, own_redis: object) -> None:
    gw = await make_mqtt_gateway(redis={"url": own_redis.url})  # type: ignore[attr-defined]
    token = await gw.create_token(access={"type": 0})
    own_redis.stop()  # type: ignore[attr-defined]
    for version, code in ((5, 0x88), (4, 3)):
        client = Client(port(gw), token["key"] if version == 4 else "Q" * 64, version)
        try:
            assert await client.connect() == code
        finally:
            client.close()


async def test_broker_unreachable_is_server_unavailable(make_gateway: GatewayFactory) -> None:
    from support.servers import free_port
    gw = await make_gateway(mqtt={"listen": {"host": "127.0.0.1", "port": 0},
                                  "broker": f"mqtt://u:p@127.0.0.1:{free_port()}"})
    for version, code in ((5, 0x88), (4, 3)):
        client = Client(port(gw), MASTER_KEY, version)
        try:
            assert await client.connect() == code
        finally:
            client.close()
