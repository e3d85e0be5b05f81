"""The MQTT front in /_gateway/metrics: open sessions, CONNACKs by outcome, messages and bytes each
way, refusals; read through a real session against mosquitto, by prometheus-client's parser."""
from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from support.gateways import GatewayHandle
from support.mqtt import Client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ACL = [{"uri": "mqtt", "topic": "metered/#", "actions": ["publish", "subscribe"]}]


async def scrape(gw: GatewayHandle) -> tuple[Samples, str]:
    async with gw.request("GET", "/_gateway/metrics", key=None) as response:
        assert response.status == 200
        text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found, text


async def test_sessions_connects_messages_and_refusals_are_counted(mgw: GatewayHandle) -> None:
    first, _ = await scrape(mgw)
    token = await mgw.create_token(access={"type": 2, "acl": ACL})
    refused = Client(mgw.server.mqtt_port, "Z" * 64, 5)
    try:
        assert await refused.connect() == 0x86
    finally:
        refused.close()
    client = Client(mgw.server.mqtt_port, token["key"], 5)
    try:
        assert await client.connect() == 0
        assert await client.subscribe("metered/in") == [1]
        assert await client.subscribe("elsewhere/#") == [0x87]
        assert await client.publish("metered/in", b"12345", qos=1) == 0
        assert (await client.message()).payload == b"12345"
        assert await client.publish("elsewhere/x", b"no", qos=1) == 0x87
        found, text = await scrape(mgw)
    finally:
        client.close()

    def grew(name: str, **labels: str) -> float:
        sample = (name, tuple(sorted(labels.items())))
        return found.get(sample, 0) - first.get(sample, 0)

    assert found[("gateway_mqtt_sessions", ())] == 1
    assert grew("gateway_mqtt_connects_total", outcome="accepted") == 1
    assert grew("gateway_mqtt_connects_total", outcome="bad_credentials") == 1
    assert grew("gateway_mqtt_messages_total", direction="to_broker") == 1
    assert grew("gateway_mqtt_messages_total", direction="to_client") == 1
    # A QoS 1 PUBLISH body: topic (2 + 10), packet id (2), properties length (1), payload (5).
    assert grew("gateway_mqtt_bytes_total", direction="to_broker") == 20
    assert grew("gateway_mqtt_bytes_total", direction="to_client") == 20
    assert grew("gateway_mqtt_refusals_total", kind="publish") == 1
    assert grew("gateway_mqtt_refusals_total", kind="subscribe") == 1
    assert token["key"] not in text
    mqtt_labels = {label for name, labels in found if name.startswith("gateway_mqtt_") for label, _ in labels}
    assert mqtt_labels == {"outcome", "direction", "kind"}  # nothing per token
    for _ in range(100):  # the session's end reaches the gauge
        found, _ = await scrape(mgw)
        if found[("gateway_mqtt_sessions", ())] == 0:
            break
        await asyncio.sleep(0.05)
    assert found[("gateway_mqtt_sessions", ())] == 0
