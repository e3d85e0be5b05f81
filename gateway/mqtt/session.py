"""One MQTT client session: the client's connection, the gateway's own connection to the broker
for it, and the token that decides what passes between them (docs/mqtt.md).

The client's bytes are read packet by packet (`codec.frame`); what the gateway leaves unchanged is
forwarded as the client wrote it, in one write per read. Transport-agnostic: TCP
(`listener.ClientProtocol`) and WebSocket (`websocket.serve`) both feed it bytes and give it a
`ClientSide` to write to.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol, cast

from gateway.auth.authenticator import extract_key
from gateway.auth.checks import RequestFacts
from gateway.errors import INVALID_TOKEN, Denied
from gateway.mqtt import codec
from gateway.mqtt.codec import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    V5,
    V311,
    Connack,
    Connect,
    Malformed,
    Suback,
)
from gateway.policy.mqtt_topics import MqttGrants, filter_problem, may_publish, may_subscribe, name_problem
from gateway.tokens import Token, TokenType

if TYPE_CHECKING:
    from gateway.mqtt.front import MqttFront

log = logging.getLogger("gateway.mqtt")
WAIT_CONNECT, AUTHENTICATING, WAIT_CONNACK, OPEN, CLOSED = range(5)
KINDS = {TokenType.MASTER: "master", TokenType.STANDARD: "standard", TokenType.ACL: "acl", TokenType.NOAPI: "noapi"}
DECISIONS_KEPT = 1024  # topic decisions remembered per session and direction
# Broker CONNACK codes that speak of the gateway's own credentials, not the client's: the client
# is told the service is unavailable instead.
BROKER_CREDENTIAL_CODES = frozenset({codec.V3_BAD_CREDENTIALS, codec.V3_NOT_AUTHORIZED, codec.BAD_CREDENTIALS,
                                     codec.NOT_AUTHORIZED, codec.BAD_AUTH_METHOD})


class ClientSide(Protocol):
    """The client's connection, whatever carries it."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def connack_code(denied: Denied, version: int) -> int:
    """The CONNACK code for a refused token: unknown or expired, "bad user name or password";
    a store failure, "server unavailable"; any other refusal, "not authorized"."""
    if denied.status == 401 and denied.reason == INVALID_TOKEN:
        return codec.BAD_CREDENTIALS if version == V5 else codec.V3_BAD_CREDENTIALS
    if denied.status >= 500:
        return codec.SERVER_UNAVAILABLE if version == V5 else codec.V3_SERVER_UNAVAILABLE
    return codec.NOT_AUTHORIZED if version == V5 else codec.V3_NOT_AUTHORIZED


class BrokerProtocol(asyncio.Protocol):
    """The gateway's connection to the broker for one session."""

    __slots__ = ("session", "transport")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.session.from_broker(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.session.broker_lost()

    def pause_writing(self) -> None:  # the broker reads slower than the client writes
        self.session.client.pause_reading()

    def resume_writing(self) -> None:
        self.session.client.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Session:
    """The state of one client connection, from its first byte to its close."""

    def __init__(self, front: MqttFront, client: ClientSide, client_ip: str) -> None:
        self.front = front
        self.client = client
        self.client_ip = client_ip
        self.state = WAIT_CONNECT
        self.version = V311
        self.inbound = bytearray()  # from the client, not yet handled
        self.outbound = bytearray()  # from the broker, not yet handled
        self.broker: BrokerProtocol | None = None
        self.token: Token | None = None
        self.digest = ""  # the key's, once the session is open (MqttFront.opened)
        self.kind = ""
        self.facts: RequestFacts | None = None
        self.request_id = ""
        self.client_id = ""
        self.started = time.perf_counter()
        self.subscriptions: set[str] = set()
        self.will_topic: str | None = None  # the will the broker holds for this session, if any
        # SUBSCRIBE packet id -> the codes of the filters the gateway refused (None: sent on).
        self.partial: dict[int, list[int | None]] = {}
        # QoS 2 messages from the broker the gateway withheld and acknowledged itself.
        self.withheld: set[int] = set()
        # QoS 2 messages from the client the gateway refused (PUBREC 0x87): their PUBREL ends here.
        self.refused: set[int] = set()
        self.may_publish: dict[str, bool] = {}
        self.may_deliver: dict[str, bool] = {}
        self.traffic = 0
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            front.settings.connect_timeout, self._timed_out)
        self._task: asyncio.Task[None] | None = None
        self._rechecking = False

    # -- from the client ------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.inbound += data
        try:
            if self.state == OPEN:
                self._client_packets()
            elif self.state == WAIT_CONNECT:
                self._read_connect()
            elif len(self.inbound) > self.front.settings.max_packet_size:
                raise Malformed("too much sent before the connection was accepted", codec.PACKET_TOO_LARGE)
        except Malformed as problem:
            self._refuse_packet(problem)
        except Exception:  # never forward what could not be judged
            log.exception("unexpected error handling an MQTT packet; connection closed")
            self.close(codec.UNSPECIFIED)

    def _read_connect(self) -> None:
        framed = codec.frame(self.inbound, 0, self.front.settings.max_packet_size)
        if framed is None:
            return
        first, at, end = framed
        if first >> 4 != CONNECT:
            raise Malformed("the first packet must be CONNECT", codec.PROTOCOL_ERROR)
        body = bytes(self.inbound[at:end])
        del self.inbound[:end]
        try:
            connect = codec.decode_connect(first, body)
        except codec.UnsupportedVersion:
            self.front.counts.connack(V311, codec.V3_UNSUPPORTED_VERSION)
            self.client.write(Connack(False, codec.V3_UNSUPPORTED_VERSION).encode(V311))
            self.close(None)
            return
        self.version = connect.version
        self.state = AUTHENTICATING
        self._task = asyncio.ensure_future(self._open(connect))

    def _client_packets(self) -> None:
        buffer, limit, pos = self.inbound, self.front.settings.max_packet_size, 0
        out: list[bytes] = []
        try:
            while self.state == OPEN:
                framed = codec.frame(buffer, pos, limit)
                if framed is None:
                    break
                first, at, end = framed
                kind = first >> 4
                if kind == PUBLISH:
                    if self._client_publish(first, buffer, at, end):
                        out.append(bytes(buffer[pos:end]))
                elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
                    packet_id, _ = codec.decode_ack(kind, first, bytes(buffer[at:end]), self.version)
                    if kind == PUBREL and packet_id in self.refused:
                        self.refused.discard(packet_id)
                        self.client.write(codec.encode_ack(PUBCOMP, packet_id, V5, codec.PACKET_ID_NOT_FOUND))
                    else:
                        out.append(bytes(buffer[pos:end]))
                elif kind == SUBSCRIBE:
                    sent = self._subscribe(first, bytes(buffer[at:end]))
                    if sent is not None:
                        out.append(sent)
                elif kind == UNSUBSCRIBE:
                    _, filters = codec.decode_unsubscribe(first, bytes(buffer[at:end]), self.version)
                    self.subscriptions.difference_update(filters)
                    out.append(bytes(buffer[pos:end]))
                elif kind == PINGREQ:
                    codec.check_empty(kind, first, bytes(buffer[at:end]))
                    out.append(bytes(buffer[pos:end]))
                elif kind == DISCONNECT:
                    codec.decode_disconnect(first, bytes(buffer[at:end]), self.version)
                    out.append(bytes(buffer[pos:end]))
                    self._flush(out)
                    self.close(None, reason="client disconnected")
                    return
                elif kind == AUTH:
                    raise Malformed("AUTH without enhanced authentication", codec.PROTOCOL_ERROR)
                else:
                    raise Malformed(f"{codec.NAMES.get(kind, 'reserved packet type')} from a client",
                                    codec.PROTOCOL_ERROR)
                pos = end
        finally:
            del buffer[:pos]
            self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.broker is not None:
            self.broker.write(b"".join(out))
            out.clear()

    def _client_publish(self, first: int, buffer: bytearray, at: int, end: int) -> bool:
        publish = codec.decode_publish(first, bytes(buffer[at:end]), self.version)
        topic = publish.topic
        if self.version == V5 and publish.properties:
            if codec.property_value(publish.properties, codec.TOPIC_ALIAS) is not None:
                raise Malformed("topic aliases are not accepted (none were offered)", codec.TOPIC_ALIAS_INVALID)
            if codec.property_value(publish.properties, codec.SUBSCRIPTION_ID) is not None:
                raise Malformed("a subscription identifier in a client's PUBLISH", codec.PROTOCOL_ERROR)
        allowed = self.may_publish.get(topic)
        if allowed is None:
            if name_problem(topic) is not None:
                raise Malformed(f"invalid topic name {topic[:64]!r}", codec.TOPIC_NAME_INVALID)
            allowed = may_publish(self.kind, self._grants(), topic)
            self._remember(self.may_publish, topic, allowed)
        token = self.token
        if allowed and token is not None:
            size = end - at
            self.traffic += size
            counts = self.front.counts
            counts.messages_in += 1
            counts.bytes_in += size
            self.front.usage.record_message(token, token.cid, size, self.front.now)
            return True
        self.front.counts.refused_publishes += 1
        self._event(f"publish {topic[:128]}", 403)
        if self.version == V311:
            self.close(None, reason="publish refused")  # 3.1.1 has no way to say no (docs/mqtt.md)
        elif publish.qos == 1:
            self.client.write(codec.encode_ack(PUBACK, publish.packet_id, V5, codec.NOT_AUTHORIZED))
        elif publish.qos == 2:
            if len(self.refused) < 65535:
                self.refused.add(publish.packet_id)
            self.client.write(codec.encode_ack(PUBREC, publish.packet_id, V5, codec.NOT_AUTHORIZED))
        return False

    def _subscribe(self, first: int, body: bytes) -> bytes | None:
        """The SUBSCRIBE to send on (only the granted filters), or None when every one was refused
        and the gateway answered itself."""
        subscribe = codec.decode_subscribe(first, body, self.version)
        codes: list[int | None] = []
        granted: list[tuple[str, int]] = []
        for topic_filter, options in subscribe.filters:
            if filter_problem(topic_filter) is not None:
                codes.append(codec.TOPIC_FILTER_INVALID if self.version == V5 else codec.V3_SUBACK_FAILURE)
            elif self._may_subscribe(topic_filter):
                codes.append(None)
                granted.append((topic_filter, options))
                self.subscriptions.add(topic_filter)
            else:
                codes.append(codec.NOT_AUTHORIZED if self.version == V5 else codec.V3_SUBACK_FAILURE)
                self.front.counts.refused_subscriptions += 1
                self._event(f"subscribe {topic_filter[:128]}", 403)
        if len(granted) == len(codes):
            return codec.packet(first, body)
        if not granted:
            self.client.write(Suback(subscribe.packet_id, [], [code or 0 for code in codes]).encode(self.version))
            return None
        self.partial[subscribe.packet_id] = codes
        subscribe.filters = granted
        return subscribe.encode(self.version)

    def _may_subscribe(self, topic_filter: str) -> bool:
        token = self.token
        if token is None:
            return False

        def rest_allows(path: str) -> bool:
            return self.front.rest_allows(token, path)

        return may_subscribe(self.kind, self._grants(), rest_allows, topic_filter)

    def _grants(self) -> MqttGrants | None:
        token = self.token
        return token.acl.mqtt if token is not None and token.acl is not None else None

    @staticmethod
    def _remember(decisions: dict[str, bool], topic: str, allowed: bool) -> None:
        if len(decisions) >= DECISIONS_KEPT:
            decisions.clear()
        decisions[topic] = allowed

    # -- opening: the token, then the broker ---------------------------------------------------------

    async def _open(self, connect: Connect) -> None:
        try:
            await self._opening(connect)
        except asyncio.CancelledError:
            raise
        except Exception:  # an error while opening denies, never allows
            log.exception("unexpected error opening an MQTT session; refused")
            if self.state != CLOSED:
                self._refuse_connect(codec.UNSPECIFIED if self.version == V5 else codec.V3_SERVER_UNAVAILABLE,
                                     self.token, 500, "connect: internal error")

    async def _opening(self, connect: Connect) -> None:
        front = self.front
        self.client_id = connect.client_id
        self.request_id = front.request_ids.next()
        facts = self.facts = front.facts(self.client_ip)
        try:
            if codec.property_value(connect.properties, codec.AUTH_METHOD) is not None:
                self._refuse_connect(codec.BAD_AUTH_METHOD, None)
                return
            token = await front.auth.authenticate(extract_key(connect.username), facts)
        except Denied as denied:
            self._refuse_connect(connack_code(denied, self.version), facts.token, denied.status)
            return
        if self.state == CLOSED:
            return
        facts.recheck = True  # the CONNECT was counted; the sweeps' checks of these facts are not calls
        self._adopt(token)
        if connect.will is not None and (name_problem(connect.will.topic) is not None
                                         or not may_publish(self.kind, self._grants(), connect.will.topic)):
            self._refuse_connect(codec.NOT_AUTHORIZED if self.version == V5 else codec.V3_NOT_AUTHORIZED, token, 403,
                                 "connect: will topic refused")
            return
        broker = BrokerProtocol(self)
        try:
            await asyncio.wait_for(front.connect_broker(broker), front.settings.connect_timeout)
        except (TimeoutError, OSError) as exc:
            log.warning("MQTT broker unreachable (%s)", type(exc).__name__)
            self._refuse_connect(codec.SERVER_UNAVAILABLE if self.version == V5 else codec.V3_SERVER_UNAVAILABLE,
                                 token, 503, "connect: broker unavailable")
            return
        if self.state == CLOSED:
            broker.close()
            return
        self.broker = broker
        self.will_topic = connect.will.topic if connect.will is not None else None
        username, password = front.broker_credentials()
        forwarded = Connect(connect.version, connect.clean, connect.keepalive, front.broker_client_id(token, connect),
                            connect.will, username, password,
                            # The broker may not alias topics to the client: every topic is checked.
                            [(ident, value) for ident, value in connect.properties
                             if ident not in (codec.TOPIC_ALIAS_MAXIMUM, codec.AUTH_METHOD, codec.AUTH_DATA)])
        self.state = WAIT_CONNACK
        broker.write(forwarded.encode())

    def _adopt(self, token: Token) -> None:
        self.token = token
        self.kind = KINDS[token.type]
        self.may_publish.clear()
        self.may_deliver.clear()

    def _refuse_connect(self, code: int, token: Token | None, status: int = 401, what: str = "connect") -> None:
        if token is not None:
            self.token = token
            self._event(what, status)
        self.front.counts.connack(self.version, code)
        self.client.write(Connack(False, code).encode(self.version))
        self.close(None)

    # -- from the broker --------------------------------------------------------------------------

    def from_broker(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.outbound += data
        try:
            self._broker_packets()
        except Malformed as problem:
            log.warning("malformed packet from the MQTT broker (%s); session closed", problem.reason)
            self.close(codec.UNSPECIFIED, reason="broker sent a malformed packet")
        except Exception:
            log.exception("unexpected error handling a packet from the MQTT broker; session closed")
            self.close(codec.UNSPECIFIED)

    def _broker_packets(self) -> None:
        buffer, pos = self.outbound, 0
        out: list[bytes] = []
        try:
            while self.state in (OPEN, WAIT_CONNACK):
                framed = codec.frame(buffer, pos, codec.MAX_REMAINING + 5)
                if framed is None:
                    break
                first, at, end = framed
                kind = first >> 4
                if self.state == WAIT_CONNACK:
                    if kind != CONNACK:
                        raise Malformed("the broker's first packet is not CONNACK")
                    pos = end
                    out.append(self._connack(first, bytes(buffer[at:end])))
                    continue
                if kind == PUBLISH:
                    if self._deliver(first, buffer, at, end):
                        out.append(bytes(buffer[pos:end]))
                elif kind == SUBACK and self.partial:
                    out.append(self._merged_suback(first, bytes(buffer[at:end])))
                elif kind == PUBREL and self.withheld:
                    packet_id, _ = codec.decode_ack(PUBREL, first, bytes(buffer[at:end]), self.version)
                    if packet_id in self.withheld:
                        self.withheld.discard(packet_id)
                        self._to_broker(codec.encode_ack(PUBCOMP, packet_id, self.version))
                    else:
                        out.append(bytes(buffer[pos:end]))
                elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP, DISCONNECT, AUTH):
                    out.append(bytes(buffer[pos:end]))
                else:
                    raise Malformed(f"{codec.NAMES.get(kind, 'reserved packet type')} from the broker")
                pos = end
        finally:
            del buffer[:pos]
            if out:
                self.client.write(b"".join(out))

    def _connack(self, first: int, body: bytes) -> bytes:
        connack = codec.decode_connack(first, body, self.version)
        if connack.code != 0:
            code = connack.code
            if code in BROKER_CREDENTIAL_CODES:
                log.error("the MQTT broker refused the gateway's credentials (code 0x%02x)", code)
                code = codec.SERVER_UNAVAILABLE if self.version == V5 else codec.V3_SERVER_UNAVAILABLE
            self._event("connect: broker refused", 503 if code != connack.code else 400)
            self.front.counts.connack(self.version, code)
            self.client.write(Connack(connack.session_present, code, connack.properties).encode(self.version))
            self.close(None)
            return b""
        self.state = OPEN
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.front.opened(self)
        self.front.counts.connack(self.version, 0)
        self._event("connect", 200)
        # No topic aliases from the client: each PUBLISH names its topic, and each is checked.
        connack.properties = [(ident, value) for ident, value in connack.properties
                              if ident != codec.TOPIC_ALIAS_MAXIMUM]
        encoded = connack.encode(self.version)
        if self.inbound:  # sent by the client before it was accepted: now it can be read
            asyncio.get_running_loop().call_soon(self.feed, b"")
        return encoded

    def _deliver(self, first: int, buffer: bytearray, at: int, end: int) -> bool:
        """Whether a message from the broker may reach the client: what its token may subscribe to.
        Subscriptions are checked when made; this holds after an ACL change and for a session the
        broker kept from an earlier connection."""
        token = self.token
        if token is None:
            return False
        size = end - at
        if self.kind != "master":
            publish = codec.decode_publish(first, bytes(buffer[at:end]), self.version)
            allowed = self.may_deliver.get(publish.topic)
            if allowed is None:
                allowed = bool(publish.topic) and self._may_subscribe(publish.topic)
                self._remember(self.may_deliver, publish.topic, allowed)
            if not allowed:
                self.front.counts.withheld += 1
                if publish.qos == 1:
                    self._to_broker(codec.encode_ack(PUBACK, publish.packet_id, self.version))
                elif publish.qos == 2:
                    self.withheld.add(publish.packet_id)
                    self._to_broker(codec.encode_ack(PUBREC, publish.packet_id, self.version))
                return False
        self.traffic += size
        counts = self.front.counts
        counts.messages_out += 1
        counts.bytes_out += size
        self.front.usage.record_message(token, token.cid, size, self.front.now)
        return True

    def _merged_suback(self, first: int, body: bytes) -> bytes:
        suback = codec.decode_suback(first, body, self.version)
        codes = self.partial.pop(suback.packet_id, None)
        if codes is None:
            return codec.packet(first, body)
        answers = iter(suback.codes)
        suback.codes = [next(answers, codec.UNSPECIFIED) if code is None else code for code in codes]
        return suback.encode(self.version)

    def _to_broker(self, data: bytes) -> None:
        if self.broker is not None:
            self.broker.write(data)

    # -- following the token ------------------------------------------------------------------------

    def revise(self, token: Token) -> None:
        """The token as it is now (reloaded after a change, or re-checked): what it no longer grants
        ends the session. That includes the will: the broker holds it and MQTT has no way to take it
        back but a normal DISCONNECT (`revoke`), which discards it."""
        if self.state != OPEN:
            return
        self._adopt(token)
        will_topic = self.will_topic
        if will_topic is not None and not may_publish(self.kind, self._grants(), will_topic):
            self.revoke(Denied(403, f"will topic {will_topic[:128]} no longer granted"))
            return
        for topic_filter in self.subscriptions:
            if not self._may_subscribe(topic_filter):
                self.revoke(Denied(403, f"subscription {topic_filter[:128]} no longer granted"))
                return

    def revoke(self, denied: Denied) -> None:
        """The token no longer allows this session: 5.0 is told why, then the session ends. The
        broker gets a normal DISCONNECT: a revoked token's will is not published."""
        if self.state == CLOSED:
            return
        self._event(f"disconnect: {denied.reason}", denied.status)
        if self.broker is not None:
            self.broker.write(bytes((DISCONNECT << 4, 0)))
        code = codec.SERVER_BUSY if denied.status >= 500 else codec.NOT_AUTHORIZED
        self.close(code, reason=denied.reason, logged=True)

    # -- the end ----------------------------------------------------------------------------------------

    def _refuse_packet(self, problem: Malformed) -> None:
        log.info("MQTT packet refused (%s)", problem.reason)
        if self.token is not None:
            self._event(f"refused: {problem.reason[:128]}", 400)
        self.close(problem.code if self.state == OPEN else None, reason=problem.reason, logged=True)

    def _timed_out(self) -> None:
        self.timer = None
        if self.state in (WAIT_CONNECT, AUTHENTICATING, WAIT_CONNACK):
            if self.state == WAIT_CONNACK:
                code = codec.SERVER_UNAVAILABLE if self.version == V5 else codec.V3_SERVER_UNAVAILABLE
                self.front.counts.connack(self.version, code)
                self.client.write(Connack(False, code).encode(self.version))
            self.close(None)

    def broker_lost(self) -> None:
        """The broker closed the connection (or went away): so does the client's."""
        if self.state == OPEN:
            self.close(codec.SERVER_BUSY, reason="broker connection lost")
        else:
            self.close(None)

    def client_lost(self) -> None:
        """The client's connection is gone: the broker's goes too, without DISCONNECT, so the broker
        publishes the will as it would for the client itself."""
        self.close(None, reason="connection lost")

    def close(self, code: int | None, reason: str | None = None, logged: bool = False) -> None:
        """End the session once: 5.0 clients of an open session get DISCONNECT `code` first."""
        if self.state == CLOSED:
            return
        was_open = self.state == OPEN
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        if code is not None and was_open and self.version == V5:
            self.client.write(codec.encode_disconnect(code, reason))
        if was_open:
            self.front.closed(self)
            if not logged:
                self._event("disconnect" + (f": {reason}" if reason else ""), 200)
        self.client.close()
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        self.inbound.clear()
        self.outbound.clear()

    def _event(self, what: str, status: int) -> None:
        token, facts = self.token, self.facts
        if token is not None and facts is not None:
            self.front.event(facts, token, what, status, self.started, self.traffic, self.request_id, self.client_id)
