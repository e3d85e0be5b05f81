"""What every MQTT session of a process shares: the token rules, the writers, the broker's
address, and the sessions themselves, by token, so that a change to a token reaches its sessions."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from gateway.auth.authenticator import Authenticator
from gateway.auth.checks import RequestFacts, mqtt_facts
from gateway.config import MqttSettings
from gateway.errors import Denied
from gateway.mqtt import codec
from gateway.mqtt.codec import Connect
from gateway.mqtt.session import OPEN, BrokerProtocol, Session
from gateway.policy.acl_validation import is_platform_path
from gateway.store.cache import TokenCache
from gateway.tokens import Token, TokenType
from gateway.writers.logs import LogWriter, RequestIds, request_record
from gateway.writers.usage import UsageMeter

log = logging.getLogger("gateway.mqtt")
STALE_LISTENER = "mqtt-sessions"  # told when the invalidation channel had a gap
# A CONNACK's code as the metrics name it (`gateway_mqtt_connects_total{outcome}`), by version;
# any other code is `other`, so the label's values stay few.
V5_OUTCOMES = {0: "accepted", codec.UNSPECIFIED: "unspecified", codec.UNSUPPORTED_VERSION: "unsupported_version",
               0x85: "client_id_rejected", codec.BAD_CREDENTIALS: "bad_credentials",
               codec.NOT_AUTHORIZED: "not_authorized", codec.SERVER_UNAVAILABLE: "server_unavailable",
               codec.SERVER_BUSY: "server_busy", codec.BAD_AUTH_METHOD: "bad_auth_method"}
V3_OUTCOMES = {0: "accepted", codec.V3_UNSUPPORTED_VERSION: "unsupported_version", 2: "client_id_rejected",
               codec.V3_SERVER_UNAVAILABLE: "server_unavailable", codec.V3_BAD_CREDENTIALS: "bad_credentials",
               codec.V3_NOT_AUTHORIZED: "not_authorized"}


def connect_outcome(version: int, code: int) -> str:
    return (V5_OUTCOMES if version == codec.V5 else V3_OUTCOMES).get(code, "other")


class MqttCounts:
    """What the metrics read of the MQTT front (gateway.metrics): plain integers, one add each."""

    __slots__ = ("connects", "messages_in", "bytes_in", "messages_out", "bytes_out", "refused_publishes",
                 "refused_subscriptions", "withheld")

    def __init__(self) -> None:
        self.connects: dict[str, int] = {}  # CONNACKs sent, by `connect_outcome`
        self.messages_in = 0  # PUBLISH client -> broker, sent on
        self.bytes_in = 0
        self.messages_out = 0  # PUBLISH broker -> client, delivered
        self.bytes_out = 0
        self.refused_publishes = 0  # a client's PUBLISH its token may not make
        self.refused_subscriptions = 0  # each topic filter refused
        self.withheld = 0  # a broker's PUBLISH the token may no longer receive

    def connack(self, version: int, code: int) -> None:
        outcome = connect_outcome(version, code)
        self.connects[outcome] = self.connects.get(outcome, 0) + 1


class MqttFront:
    def __init__(self, settings: MqttSettings, auth: Authenticator, cache: TokenCache, usage: UsageMeter,
                 logs: LogWriter, platform_prefixes: tuple[str, ...]) -> None:
        self.settings = settings
        self.auth = auth
        self.cache = cache
        self.usage = usage
        self.logs = logs
        self.platform_prefixes = platform_prefixes
        self.request_ids = RequestIds()
        self.counts = MqttCounts()
        self.by_digest: dict[str, set[Session]] = {}
        self._tls: ssl.SSLContext | None = settings.broker_tls()
        self._background: set[asyncio.Task[Any]] = set()
        self.closing = False
        cache.on_invalidate = self.invalidated
        cache.listeners[STALE_LISTENER] = self.recheck_all

    @property
    def now(self) -> float:
        return time.time()

    def facts(self, client_ip: str) -> RequestFacts:
        return mqtt_facts(client_ip, time.time())

    def sessions(self) -> list[Session]:
        return [session for group in self.by_digest.values() for session in group]

    # -- the rules a session asks for -----------------------------------------------------------

    def rest_allows(self, token: Token, path: str) -> bool:
        """Whether the token's REST access grants GET on `path` (for flespi's own topics)."""
        if token.type is TokenType.MASTER:
            return True
        if is_platform_path(path, self.platform_prefixes):
            return False
        if token.type is TokenType.STANDARD:
            return True
        if token.type is not TokenType.ACL or token.acl is None:
            return False
        try:
            return bool(token.acl.authorize("GET", path, token.group_members) == path)  # `all` rewritten: not all
        except Denied:
            return False

    # -- the broker ---------------------------------------------------------------------------------

    async def connect_broker(self, protocol: BrokerProtocol) -> None:
        broker = self.settings.broker
        await asyncio.get_running_loop().create_connection(
            lambda: protocol, broker.host, broker.port, ssl=self._tls,
            server_hostname=broker.host if self._tls is not None else None)

    def broker_credentials(self) -> tuple[str | None, bytes | None]:
        broker = self.settings.broker
        return broker.username, broker.password.encode() if broker.password is not None else None

    @staticmethod
    def broker_client_id(token: Token, connect: Connect) -> str:
        """Each token's sessions in a namespace of its own at the broker (`<token id>/<client id>`),
        so that no token can take over, or resume, another token's session. An empty id stays
        empty: the broker then assigns one."""
        return f"{token.id}/{connect.client_id}" if connect.client_id else ""

    # -- sessions, by token ---------------------------------------------------------------------------

    def opened(self, session: Session) -> None:
        assert session.token is not None
        session.digest = session.token.digest  # the key it connected with, whatever reloads bring
        self.by_digest.setdefault(session.digest, set()).add(session)

    def closed(self, session: Session) -> None:
        group = self.by_digest.get(session.digest)
        if group is not None:
            group.discard(session)
            if not group:
                del self.by_digest[session.digest]

    def event(self, facts: RequestFacts, token: Token, what: str, status: int, started: float, size: int,
              request_id: str, client_id: str) -> None:
        """A connect, disconnect or refusal in the request log and the token's logs: method `MQTT`,
        the event as `uri`, an HTTP-like status; the client id as `app`."""
        self.logs.emit(request_record(time.time(), token.id, token.cid, facts.client_ip, client_id, "MQTT", what,
                                      status, time.perf_counter() - started, size, request_id))

    def invalidated(self, digest: str) -> None:
        """A token changed (or went) on some instance: its sessions are checked again at once."""
        group = self.by_digest.get(digest)
        if group:
            for session in list(group):
                self._spawn(self._recheck(session))

    def recheck_all(self) -> None:
        for session in self.sessions():
            self._spawn(self._recheck(session))

    async def _recheck(self, session: Session) -> None:
        token, facts = session.token, session.facts
        if token is None or facts is None or session.state != OPEN:
            return
        facts.now = time.time()
        try:
            current = await self.auth.authenticate_digest(session.digest, facts)
        except Denied as denied:
            session.revoke(denied)
            return
        session.revise(current)

    def sweep(self) -> None:
        """Every open session against its cached token: expiry, usage blocks, IP, `accessed`. No
        I/O unless the cache must reload an entry."""
        now = time.time()
        for session in self.sessions():
            token, facts = session.token, session.facts
            if token is None or facts is None:
                continue
            facts.now = now
            try:
                current = self.auth.authenticate_cached(session.digest, facts)
            except Denied as denied:
                session.revoke(denied)
                continue
            if current is None:
                self._spawn(self._recheck(session))
            elif current is not token:
                session.revise(current)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval)
            try:
                self.sweep()
            except Exception:
                log.exception("MQTT session check failed")

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self) -> None:
        """The gateway stops: 5.0 clients are told so; every session ends."""
        self.closing = True
        for session in self.sessions():
            session.close(codec.SERVER_SHUTTING_DOWN, reason="gateway shutting down")
        for task in list(self._background):
            task.cancel()
        self.cache.on_invalidate = None
