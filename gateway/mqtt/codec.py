"""MQTT 3.1.1 and 5.0 packets: framing, decoding with every field checked, and encoding.

Small and strict by design: the gateway forwards a packet only once it has read all of it the way
the broker will, so a packet it cannot read completely is refused (`Malformed`), never passed on.
Packets are forwarded as the client wrote them wherever the gateway changes nothing; only CONNECT
(credentials, client id), CONNACK (topic aliases), SUBSCRIBE and SUBACK (refused filters) are
re-encoded.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
         PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
         UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH"}
V311, V5 = 4, 5
# The low four bits of the first byte each type must carry (PUBLISH's are its flags).
FIXED_FLAGS = {PUBREL: 2, SUBSCRIBE: 2, UNSUBSCRIBE: 2}

# 5.0 reason codes the gateway itself sends.
SUCCESS = 0x00
UNSPECIFIED = 0x80
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_VERSION = 0x84
BAD_CREDENTIALS = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
BAD_AUTH_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
SERVER_SHUTTING_DOWN = 0x8B
SERVER_BUSY = 0x89
PACKET_ID_NOT_FOUND = 0x92
# 3.1.1 CONNACK return codes.
V3_UNSUPPORTED_VERSION, V3_SERVER_UNAVAILABLE, V3_BAD_CREDENTIALS, V3_NOT_AUTHORIZED = 1, 3, 4, 5
V3_SUBACK_FAILURE = 0x80

# 5.0 properties: id -> kind. Kinds: b byte, h two-byte int, i four-byte int, v variable int,
# s UTF-8 string, d binary data, p string pair.
PROPERTY_KINDS = {
    0x01: "b", 0x02: "i", 0x03: "s", 0x08: "s", 0x09: "d", 0x0B: "v", 0x11: "i", 0x12: "s", 0x13: "h",
    0x15: "s", 0x16: "d", 0x17: "b", 0x18: "i", 0x19: "b", 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: "h",
    0x22: "h", 0x23: "h", 0x24: "b", 0x25: "b", 0x26: "p", 0x27: "i", 0x28: "b", 0x29: "b", 0x2A: "b",
}
PAYLOAD_FORMAT, MESSAGE_EXPIRY, SUBSCRIPTION_ID, SESSION_EXPIRY = 0x01, 0x02, 0x0B, 0x11
AUTH_METHOD, AUTH_DATA, REASON_STRING, RECEIVE_MAXIMUM = 0x15, 0x16, 0x1F, 0x21
TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS, USER_PROPERTY, MAXIMUM_PACKET_SIZE = 0x22, 0x23, 0x26, 0x27
# Which properties each packet may carry (a will's are its own); others are a protocol error.
ALLOWED = {
    CONNECT: frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27}),
    CONNACK: frozenset({0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27,
                        0x28, 0x29, 0x2A}),
    PUBLISH: frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26}),
    PUBACK: frozenset({0x1F, 0x26}), PUBREC: frozenset({0x1F, 0x26}), PUBREL: frozenset({0x1F, 0x26}),
    PUBCOMP: frozenset({0x1F, 0x26}), SUBSCRIBE: frozenset({0x0B, 0x26}), SUBACK: frozenset({0x1F, 0x26}),
    UNSUBSCRIBE: frozenset({0x26}), UNSUBACK: frozenset({0x1F, 0x26}),
    DISCONNECT: frozenset({0x11, 0x1C, 0x1F, 0x26}), AUTH: frozenset({0x15, 0x16, 0x1F, 0x26}),
}
WILL_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
REPEATABLE = frozenset({USER_PROPERTY, SUBSCRIPTION_ID})
MAX_REMAINING = 268_435_455

Value = int | str | bytes | tuple[str, str]
Properties = list[tuple[int, Value]]


class Malformed(Exception):
    """A packet the gateway cannot read as the protocol says: `code` is the 5.0 reason code."""

    def __init__(self, reason: str, code: int = MALFORMED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# -- framing ---------------------------------------------------------------------------------------

def frame(buffer: bytes | bytearray, start: int, limit: int) -> tuple[int, int, int] | None:
    """The packet at `start`: (first byte, where its body starts, where it ends), or None while
    incomplete. Refuses a remaining length in more than four bytes, or a packet over `limit`."""
    end = len(buffer)
    if end - start < 2:
        return None
    length, shift, index = 0, 0, start + 1
    while True:
        if index >= end:
            return None
        byte = buffer[index]
        length |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise Malformed("remaining length longer than four bytes")
    if index - start + length > limit:
        raise Malformed("packet too large", PACKET_TOO_LARGE)
    if end - index < length:
        return None
    return buffer[start], index, index + length


def varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING:
        raise ValueError("variable byte integer out of range")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


# -- reading ----------------------------------------------------------------------------------------

class Reader:
    """Fields of one packet body, in order; every read past the end is `Malformed`."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, count: int) -> bytes:
        if count > self.end - self.pos:
            raise Malformed("packet ends inside a field")
        chunk = bytes(self.data[self.pos:self.pos + count])
        self.pos += count
        return chunk

    def byte(self) -> int:
        if self.pos >= self.end:
            raise Malformed("packet ends inside a field")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise Malformed("variable byte integer longer than four bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")  # refuses surrogates and overlong forms, as MQTT requires
        except UnicodeDecodeError:
            raise Malformed("a string is not valid UTF-8") from None
        if "\x00" in value:
            raise Malformed("a string contains U+0000")
        return value

    def properties(self, allowed: frozenset[int]) -> Properties:
        length = self.varint()
        if length > self.left():
            raise Malformed("properties longer than the packet")
        stop, found, seen = self.pos + length, [], set()
        while self.pos < stop:
            ident = self.varint()
            kind = PROPERTY_KINDS.get(ident)
            if kind is None or ident not in allowed:
                raise Malformed(f"property 0x{ident:02x} is not allowed here", PROTOCOL_ERROR)
            if ident in seen and ident not in REPEATABLE:
                raise Malformed(f"property 0x{ident:02x} given twice", PROTOCOL_ERROR)
            seen.add(ident)
            value: Value
            if kind == "b":
                value = self.byte()
            elif kind == "h":
                value = self.u16()
            elif kind == "i":
                value = self.u32()
            elif kind == "v":
                value = self.varint()
            elif kind == "s":
                value = self.text()
            elif kind == "d":
                value = self.binary()
            else:
                value = (self.text(), self.text())
            found.append((ident, value))
        if self.pos != stop:
            raise Malformed("a property runs past the properties' length")
        return found

    def done(self) -> None:
        if self.pos != self.end:
            raise Malformed("bytes after the last field")


# -- writing ----------------------------------------------------------------------------------------

def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("binary field over 65535 bytes")
    return u16(len(value)) + value


def text(value: str) -> bytes:
    return binary(value.encode("utf-8"))


def properties(props: Iterable[tuple[int, Value]]) -> bytes:
    out = bytearray()
    for ident, value in props:
        out += varint(ident)
        kind = PROPERTY_KINDS[ident]
        if isinstance(value, tuple):
            out += text(value[0]) + text(value[1])
        elif isinstance(value, bytes):
            out += binary(value)
        elif isinstance(value, str):
            out += text(value)
        elif kind == "b":
            out.append(value)
        elif kind == "v":
            out += varint(value)
        else:
            out += value.to_bytes(2 if kind == "h" else 4, "big")
    return varint(len(out)) + bytes(out)


# -- CONNECT / CONNACK --------------------------------------------------------------------------------

@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Connect:
    version: int
    clean: bool
    keepalive: int
    client_id: str
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties = field(default_factory=list)
    protocol_name: str = "MQTT"

    def encode(self) -> bytes:
        flags = (0x02 if self.clean else 0) | (0x80 if self.username is not None else 0)
        flags |= 0x40 if self.password is not None else 0
        if self.will is not None:
            flags |= 0x04 | (self.will.qos << 3) | (0x20 if self.will.retain else 0)
        body = bytearray(text(self.protocol_name) + bytes((self.version, flags)) + u16(self.keepalive))
        if self.version == V5:
            body += properties(self.properties)
        body += text(self.client_id)
        if self.will is not None:
            if self.version == V5:
                body += properties(self.will.properties)
            body += text(self.will.topic) + binary(self.will.payload)
        if self.username is not None:
            body += text(self.username)
        if self.password is not None:
            body += binary(self.password)
        return packet(CONNECT << 4, bytes(body))


class UnsupportedVersion(Malformed):
    """A CONNECT of a protocol level the gateway does not speak (answered 3.1.1 code 1, or 0x84)."""


def decode_connect(first: int, body: bytes | bytearray | memoryview) -> Connect:
    if first != CONNECT << 4:
        raise Malformed("CONNECT with reserved flags set")
    read = Reader(body)
    name = read.text()
    version = read.byte()
    if name != "MQTT" or version not in (V311, V5):
        raise UnsupportedVersion(f"protocol {name!r} level {version} is not MQTT 3.1.1 or 5.0", UNSUPPORTED_VERSION)
    flags = read.byte()
    if flags & 0x01:
        raise Malformed("CONNECT reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise Malformed("CONNECT will flags are inconsistent")
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if version == V311 and has_password and not has_user:
        raise Malformed("a password without a user name")
    keepalive = read.u16()
    props = read.properties(ALLOWED[CONNECT]) if version == V5 else []
    client_id = read.text()
    will = None
    if will_flag:
        will_props = read.properties(WILL_PROPERTIES) if version == V5 else []
        will = Will(read.text(), read.binary(), will_qos, will_retain, will_props)
    username = read.text() if has_user else None
    password = read.binary() if has_password else None
    read.done()
    return Connect(version, bool(flags & 0x02), keepalive, client_id, will, username, password, props)


@dataclass(slots=True)
class Connack:
    session_present: bool
    code: int
    properties: Properties = field(default_factory=list)

    def encode(self, version: int) -> bytes:
        body = bytes((1 if self.session_present else 0, self.code))
        if version == V5:
            body += properties(self.properties)
        return packet(CONNACK << 4, body)


def decode_connack(first: int, body: bytes | bytearray | memoryview, version: int) -> Connack:
    if first != CONNACK << 4:
        raise Malformed("CONNACK with reserved flags set")
    read = Reader(body)
    flags = read.byte()
    if flags & 0xFE:
        raise Malformed("CONNACK reserved flags set")
    code = read.byte()
    props = read.properties(ALLOWED[CONNACK]) if version == V5 else []
    read.done()
    return Connack(bool(flags & 1), code, props)


# -- PUBLISH ------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Publish:
    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties
    payload_at: int  # where the payload starts in the body


def decode_publish(first: int, body: bytes | bytearray | memoryview, version: int) -> Publish:
    qos = (first >> 1) & 0x03
    dup = bool(first & 0x08)
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3")
    if dup and qos == 0:
        raise Malformed("PUBLISH with DUP set at QoS 0", PROTOCOL_ERROR)
    read = Reader(body)
    topic = read.text()
    packet_id = read.u16() if qos else 0
    if qos and not packet_id:
        raise Malformed("PUBLISH with packet identifier 0")
    props = read.properties(ALLOWED[PUBLISH]) if version == V5 else []
    return Publish(topic, qos, bool(first & 0x01), dup, packet_id, props, read.pos)


def property_value(props: Properties, ident: int) -> Value | None:
    for key, value in props:
        if key == ident:
            return value
    return None


# -- acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK has its own) ---------------------------

def decode_ack(kind: int, first: int, body: bytes | bytearray | memoryview, version: int) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK, PUBREC, PUBREL or PUBCOMP."""
    if first & 0x0F != FIXED_FLAGS.get(kind, 0):
        raise Malformed(f"{NAMES[kind]} with wrong fixed-header flags")
    read = Reader(body)
    packet_id = read.u16()
    if not packet_id:
        raise Malformed(f"{NAMES[kind]} with packet identifier 0")
    code = SUCCESS
    if version == V5 and read.left():
        code = read.byte()
        if read.left():
            read.properties(ALLOWED[kind])
    read.done()
    return packet_id, code


def encode_ack(kind: int, packet_id: int, version: int, code: int = SUCCESS, reason: str | None = None) -> bytes:
    body = u16(packet_id)
    if version == V5 and (code != SUCCESS or reason):
        body += bytes((code,)) + properties([(REASON_STRING, reason)] if reason else [])
    return packet((kind << 4) | FIXED_FLAGS.get(kind, 0), body)


# -- SUBSCRIBE / SUBACK / UNSUBSCRIBE -----------------------------------------------------------------

@dataclass(slots=True)
class Subscribe:
    packet_id: int
    properties: Properties
    filters: list[tuple[str, int]]  # (filter, options byte)

    def encode(self, version: int) -> bytes:
        body = bytearray(u16(self.packet_id))
        if version == V5:
            body += properties(self.properties)
        for topic_filter, options in self.filters:
            body += text(topic_filter) + bytes((options,))
        return packet((SUBSCRIBE << 4) | 2, bytes(body))


def decode_subscribe(first: int, body: bytes | bytearray | memoryview, version: int) -> Subscribe:
    if first & 0x0F != 2:
        raise Malformed("SUBSCRIBE with wrong fixed-header flags")
    read = Reader(body)
    packet_id = read.u16()
    if not packet_id:
        raise Malformed("SUBSCRIBE with packet identifier 0")
    props = read.properties(ALLOWED[SUBSCRIBE]) if version == V5 else []
    filters = []
    while read.left():
        topic_filter = read.text()
        options = read.byte()
        # 3.1.1: only the QoS bits; 5.0: QoS, no-local, retain-as-published, retain handling.
        reserved = 0xFC if version == V311 else 0xC0
        if options & reserved or options & 0x03 == 3 or (version == V5 and (options >> 4) & 0x03 == 3):
            raise Malformed("SUBSCRIBE options with reserved bits or values")
        filters.append((topic_filter, options))
    if not filters:
        raise Malformed("SUBSCRIBE without a topic filter", PROTOCOL_ERROR)
    return Subscribe(packet_id, props, filters)


@dataclass(slots=True)
class Suback:
    packet_id: int
    properties: Properties
    codes: list[int]

    def encode(self, version: int, kind: int = SUBACK) -> bytes:
        body = bytearray(u16(self.packet_id))
        if version == V5:
            body += properties(self.properties)
        body += bytes(self.codes)
        return packet(kind << 4, bytes(body))


def decode_suback(first: int, body: bytes | bytearray | memoryview, version: int, kind: int = SUBACK) -> Suback:
    """A SUBACK, or (kind UNSUBACK) an UNSUBACK: 3.1.1's has no codes."""
    if first & 0x0F:
        raise Malformed(f"{NAMES[kind]} with reserved flags set")
    read = Reader(body)
    packet_id = read.u16()
    props = read.properties(ALLOWED[kind]) if version == V5 else []
    codes = list(read.take(read.left()))
    return Suback(packet_id, props, codes)


def decode_unsubscribe(first: int, body: bytes | bytearray | memoryview, version: int) -> tuple[int, list[str]]:
    if first & 0x0F != 2:
        raise Malformed("UNSUBSCRIBE with wrong fixed-header flags")
    read = Reader(body)
    packet_id = read.u16()
    if not packet_id:
        raise Malformed("UNSUBSCRIBE with packet identifier 0")
    if version == V5:
        read.properties(ALLOWED[UNSUBSCRIBE])
    filters = []
    while read.left():
        filters.append(read.text())
    if not filters:
        raise Malformed("UNSUBSCRIBE without a topic filter", PROTOCOL_ERROR)
    return packet_id, filters


# -- DISCONNECT, AUTH, PING -------------------------------------------------------------------------------

def decode_disconnect(first: int, body: bytes | bytearray | memoryview, version: int) -> tuple[int, Properties]:
    if first & 0x0F:
        raise Malformed("DISCONNECT with reserved flags set")
    read = Reader(body)
    code, props = SUCCESS, []
    if version == V5 and read.left():
        code = read.byte()
        if read.left():
            props = read.properties(ALLOWED[DISCONNECT])
    read.done()
    return code, props


def encode_disconnect(code: int, reason: str | None = None) -> bytes:
    """A 5.0 DISCONNECT from the gateway (3.1.1 has none from the server: the connection is closed)."""
    return packet(DISCONNECT << 4, bytes((code,)) + properties([(REASON_STRING, reason)] if reason else []))


def check_empty(kind: int, first: int, body: bytes | bytearray | memoryview) -> None:
    """PINGREQ and PINGRESP: no flags, no body."""
    if first & 0x0F or len(body):
        raise Malformed(f"{NAMES[kind]} must be two bytes")


PINGRESP_PACKET = bytes((PINGRESP << 4, 0))
