"""The packet codec on its own: framing bounds, what it refuses, and that what it encodes paho reads
back the same (paho-mqtt's own packet classes as the independent reader)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt import codec
from gateway.mqtt.codec import Connect, Malformed, Will


@settings(deadline=None)  # a loaded machine must not fail it
@given(st.integers(0, codec.MAX_REMAINING))
def test_variable_integers_round_trip(value: int) -> None:
    encoded = codec.varint(value)
    assert len(encoded) == 1 + (value > 127) + (value > 16383) + (value > 2097151)
    assert codec.Reader(encoded).varint() == value


@settings(deadline=None)  # a loaded machine must not fail it
@given(st.integers(0, 40_000), st.integers(0, 3))
def test_frame_waits_for_the_whole_packet(length: int, missing: int) -> None:
    head = bytes((0x30,)) + codec.varint(length)
    whole = head + b"x" * length
    assert codec.frame(whole, 0, 10 ** 6) == (0x30, len(head), len(whole))
    if missing and length >= missing:
        assert codec.frame(whole[:-missing], 0, 10 ** 6) is None


@pytest.mark.parametrize(("data", "framed"), [
    (b"\xc0\x00", (0xC0, 2, 2)), (b"\x30\x03\x00\x01a", (0x30, 2, 5)), (b"\x30\x03\x00\x01", None), (b"\x30", None),
    (b"\x30\x80", None), (b"\x30\x80\x01" + b"x" * 128, (0x30, 3, 131)),
])
def test_frame(data: bytes, framed: tuple[int, int, int] | None) -> None:
    assert codec.frame(data, 0, 1000) == framed


def test_frame_refuses_too_large_and_five_byte_lengths() -> None:
    with pytest.raises(Malformed) as raised:
        codec.frame(b"\x30\x80\x08", 0, 1000)
    assert raised.value.code == codec.PACKET_TOO_LARGE
    with pytest.raises(Malformed):
        codec.frame(b"\x30\xff\xff\xff\xff\x01", 0, 10 ** 9)


def connect_round_trip(connect: Connect) -> Connect:
    encoded = connect.encode()
    framed = codec.frame(encoded, 0, 10 ** 6)
    assert framed is not None
    first, at, end = framed
    return codec.decode_connect(first, encoded[at:end])


@pytest.mark.parametrize("version", [4, 5])
def test_connect_round_trip(version: int) -> None:
    props = [(codec.SESSION_EXPIRY, 60), (codec.USER_PROPERTY, ("a", "b")), (codec.RECEIVE_MAXIMUM, 10)]
    will = Will("w/t", b"\x00bye", 1, True, [(codec.PAYLOAD_FORMAT, 0)] if version == 5 else [])
    connect = Connect(version, False, 30, "client-é", will, "user", b"pw", props if version == 5 else [])
    assert connect_round_trip(connect) == connect


@pytest.mark.parametrize(("body", "why"), [
    (b"\x00\x04MQTT\x04\x03\x00\x3c\x00\x00", "reserved flag"),
    (b"\x00\x04MQTT\x04\x18\x00\x3c\x00\x00", "will QoS 3"),
    (b"\x00\x04MQTT\x04\x22\x00\x3c\x00\x00", "will retain without will"),
    (b"\x00\x04MQTT\x04\x42\x00\x3c\x00\x00\x00\x00", "3.1.1 password without user name"),
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\x00", "a byte after the last field"),
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x02\x23\x00\x00\x00", "a PUBLISH property in CONNECT"),
    (b"\x00\x04MQTT\x05\x02\x00\x3c\x04\x21\x00\x01\x21\x00\x00", "a property given twice (cut)"),
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x02\xc0\x80", "an overlong UTF-8 client id"),
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\x00", "U+0000 in the client id"),
])
def test_connect_refusals(body: bytes, why: str) -> None:
    with pytest.raises(Malformed):
        codec.decode_connect(0x10, body)


def test_unknown_protocol_level() -> None:
    with pytest.raises(codec.UnsupportedVersion):
        codec.decode_connect(0x10, b"\x00\x04MQTT\x03\x02\x00\x3c\x00\x00")


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_round_trip(version: int) -> None:
    subscribe = codec.Subscribe(7, [(codec.SUBSCRIPTION_ID, 3)] if version == 5 else [],
                                [("a/+", 1), ("b/#", 2 | (0x04 if version == 5 else 0))])
    encoded = subscribe.encode(version)
    framed = codec.frame(encoded, 0, 1000)
    assert framed is not None
    assert codec.decode_subscribe(framed[0], encoded[framed[1]:], version) == subscribe


@pytest.mark.parametrize(("version", "options"), [(4, 0x04), (4, 0x03), (5, 0x30), (5, 0x40)])
def test_subscribe_refuses_reserved_options(version: int, options: int) -> None:
    with pytest.raises(Malformed):
        codec.decode_subscribe(0x82, b"\x00\x01" + (b"\x00" if version == 5 else b"") + b"\x00\x01a" +
                               bytes((options,)), version)


def test_acks_and_disconnect() -> None:
    assert codec.encode_ack(codec.PUBACK, 5, 4) == b"\x40\x02\x00\x05"
    assert codec.encode_ack(codec.PUBREL, 5, 4) == b"\x62\x02\x00\x05"
    assert codec.decode_ack(codec.PUBACK, 0x40, b"\x00\x05\x87\x00", 5) == (5, 0x87)
    with pytest.raises(Malformed):
        codec.decode_ack(codec.PUBREL, 0x60, b"\x00\x05", 4)  # PUBREL's flags must be 0010
    with pytest.raises(Malformed):
        codec.decode_ack(codec.PUBACK, 0x40, b"\x00\x00", 4)  # packet id 0
    encoded = codec.encode_disconnect(0x87, "token is disabled")
    assert encoded[0] == 0xE0 and codec.decode_disconnect(0xE0, encoded[2:], 5) == (
        0x87, [(codec.REASON_STRING, "token is disabled")])


def test_publish() -> None:
    publish = codec.decode_publish(0x3B, b"\x00\x03a/b\x00\x09\x03\x23\x00\x01payload", 5)
    assert (publish.topic, publish.qos, publish.retain, publish.dup, publish.packet_id) == ("a/b", 1, True, True, 9)
    assert publish.properties == [(codec.TOPIC_ALIAS, 1)] and publish.payload_at == 11
    for first, body in ((0x36, b"\x00\x01a\x00\x01"), (0x38, b"\x00\x01a"), (0x32, b"\x00\x01a\x00\x00")):
        with pytest.raises(Malformed):
            codec.decode_publish(first, body, 4)


def test_what_paho_reads_back() -> None:
    """The CONNACK and SUBACK the gateway writes itself, read by paho's own decoder."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    connack = codec.Connack(True, 0x87, [(codec.REASON_STRING, "no")]).encode(5)
    props = Properties(PacketTypes.CONNACK)
    props.unpack(connack[4:])
    assert connack[2:4] == b"\x01\x87" and props.ReasonString == "no"
    suback = codec.Suback(3, [], [1, 0x87]).encode(5)
    assert suback == b"\x90\x05\x00\x03\x00\x01\x87"
    assert ReasonCode(PacketTypes.SUBACK, identifier=suback[-1]).getName() == "Not authorized"
