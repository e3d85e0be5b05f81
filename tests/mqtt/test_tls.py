"""An `mqtts://` broker: mosquitto with a TLS listener whose certificate a test CA (trustme) signed.
With that CA in `mqtt.broker_ca_file` sessions work; with another CA the broker is not trusted and
CONNECT is answered "server unavailable" (0x88 on 5.0, 3 on 3.1.1)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from support.gateways import GatewayFactory, GatewayHandle
from support.mqtt import Client, Mosquitto

VERSIONS = [pytest.param(5, id="5.0"), pytest.param(4, id="3.1.1")]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_mosquitto(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    folder = tmp_path_factory.mktemp("mqtt-tls")
    issued = ca.issue_cert("127.0.0.1")
    cert, key = folder / "broker.pem", folder / "broker.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    broker = Mosquitto(tls=(cert, key))
    broker.start()
    yield broker
    broker.cleanup()


def ca_file(ca: trustme.CA, folder: Path) -> str:
    path = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def tls_gateway(make_gateway: GatewayFactory, broker: Mosquitto, ca_path: str) -> GatewayHandle:
    return await make_gateway(mqtt={"listen": {"host": "127.0.0.1", "port": 0}, "broker": broker.tls_url,
                                    "broker_ca_file": ca_path, "check_interval": 0.2})


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_tls_broker_carries_the_session(make_gateway: GatewayFactory, tls_mosquitto: Mosquitto,
                                                ca: trustme.CA, tmp_path: Path, version: int) -> None:
    gw = await tls_gateway(make_gateway, tls_mosquitto, ca_file(ca, tmp_path))
    token = await gw.create_token(access={"type": 0})
    client = Client(gw.server.mqtt_port, token["key"], version, client_id=f"tls-{version}")
    try:
        assert await client.connect() == 0
        assert await client.subscribe("secure/+") == [1]
        assert await client.publish("secure/1", b"sealed", qos=1) == 0
        got = await client.message()
        assert (got.topic, got.payload) == ("secure/1", b"sealed")
    finally:
        client.close()
    assert f"{token['id']}/tls-{version}" in tls_mosquitto.logged()  # it did go through the TLS broker


@pytest.mark.parametrize(("version", "code"), [pytest.param(5, 0x88, id="5.0"), pytest.param(4, 3, id="3.1.1")])
async def test_an_untrusted_broker_is_unavailable(make_gateway: GatewayFactory, tls_mosquitto: Mosquitto,
                                                  tmp_path: Path, version: int, code: int) -> None:
    gw = await tls_gateway(make_gateway, tls_mosquitto, ca_file(trustme.CA(), tmp_path))
    token = await gw.create_token(access={"type": 0})
    client = Client(gw.server.mqtt_port, token["key"], version, client_id=f"untrusted-{version}")
    try:
        assert await client.connect() == code
    finally:
        client.close()
    assert f"untrusted-{version}" not in tls_mosquitto.logged()  # no CONNECT reached the broker
