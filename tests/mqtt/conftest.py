"""The MQTT front's fixtures: one mosquitto per test session (restarted by the test that stops it),
and gateways with the MQTT front pointed at it."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from support.gateways import GatewayFactory, GatewayHandle
from support.mqtt import Mosquitto


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
def live_mosquitto(mosquitto: Mosquitto) -> Mosquitto:
    """The broker, running (a test before may have stopped it)."""
    if mosquitto.process is None or mosquitto.process.poll() is not None:
        mosquitto.start()
    return mosquitto


def mqtt_section(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    return {"listen": {"host": "127.0.0.1", "port": 0}, "broker": broker.url, "check_interval": 0.2, **extra}


@pytest.fixture
async def make_mqtt_gateway(make_gateway: GatewayFactory, live_mosquitto: Mosquitto) -> AsyncIterator[GatewayFactory]:
    async def factory(**overrides: Any) -> GatewayHandle:
        return await make_gateway(mqtt=mqtt_section(live_mosquitto, **overrides.pop("mqtt", {})), **overrides)
    yield factory


@pytest.fixture
async def mgw(make_mqtt_gateway: GatewayFactory) -> GatewayHandle:
    return await make_mqtt_gateway()
