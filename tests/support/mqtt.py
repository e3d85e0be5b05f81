"""MQTT for the tests: a mosquitto of the test's own (free port, its own password file, never the
system's), and paho-mqtt clients driven from async tests (paho runs its network loop in a thread;
every wait here is awaited in another thread so that the gateway's event loop keeps running)."""
from __future__ import annotations

import asyncio
import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .servers import LocalServer, free_port, wait_for_port

BROKER_USER = "gateway"
BROKER_PASSWORD = "broker-secret-9"
WAIT = 5.0


class Mosquitto(LocalServer):
    """Debian's mosquitto, logging everything it receives to a file."""

    binary = "mosquitto"

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: a certificate and its key for a second listener, TLS only (`tls_port`)."""
        super().__init__("gw-mosquitto-")
        self.tls_port = free_port() if tls is not None else None
        self.log = self.dir / "mosquitto.log"
        passwd = self.dir / "passwd"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), BROKER_USER, BROKER_PASSWORD], check=True,
                       capture_output=True)
        passwd.chmod(0o600)
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
            f"persistence false\nuser root\nlog_dest file {self.log}\nlog_type all\nconnection_messages true\n"
            "max_keepalive 65535\n")
        if tls is not None:  # certfile and keyfile belong to the listener above them
            with (self.dir / "mosquitto.conf").open("a") as conf:
                conf.write(f"listener {self.tls_port} 127.0.0.1\ncertfile {tls[0]}\nkeyfile {tls[1]}\n")

    @property
    def url(self) -> str:
        return f"mqtt://{BROKER_USER}:{BROKER_PASSWORD}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.launch(["-c", str(self.dir / "mosquitto.conf")])
        if self.tls_port is not None:
            wait_for_port(self.tls_port, 10)

    @property
    def tls_url(self) -> str:
        return f"mqtts://{BROKER_USER}:{BROKER_PASSWORD}@127.0.0.1:{self.tls_port}"

    def logged(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


# paho reports a 3.1.1 CONNACK return code as the 5.0 reason code of the same meaning: back to 3.1.1.
V311_CONNACK = {0: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


def code_of(value: Any) -> int:
    return int(value.value) if isinstance(value, ReasonCode) else int(value)


class Client:
    """One paho client (3.1.1 or 5.0, TCP or WebSocket) with awaitable steps."""

    def __init__(self, port: int, key: str | None, version: int = 5, client_id: str = "", clean: bool = True,
                 transport: str = "tcp", ws_path: str = "/mqtt", password: str | None = None) -> None:
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs: dict[str, Any] = {} if version == 5 else {"clean_session": clean}
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                transport=transport, reconnect_on_failure=False, **kwargs)
        if transport == "websockets":
            self.paho.ws_set_options(path=ws_path)
        if key is not None:
            self.paho.username_pw_set(key, password)
        self.port, self.version, self.clean = port, version, clean
        self.connected = threading.Event()
        self.connack: int | None = None
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self.disconnect_code: int | None = None
        self.messages: queue.Queue[Received] = queue.Queue()
        self.acks: dict[int, Any] = {}
        self.acked = threading.Condition()
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_ack
        self.paho.on_unsubscribe = self._on_ack
        self.paho.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        code = code_of(reason)
        self.connack = code if self.version == 5 else V311_CONNACK[code]
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnect_code = code_of(reason)
        self.disconnected.set()
        with self.acked:
            self.acked.notify_all()  # an acknowledgement waited for will not come
        self.connected.set()  # a refused CONNECT ends here too

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.put(Received(message.topic, message.payload, message.qos, bool(message.retain)))

    def _on_ack(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self.acked:
            self.acks[mid] = [code_of(each) for each in reasons]
            self.acked.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self.acked:
            self.acks[mid] = code_of(reason)
            self.acked.notify_all()

    async def connect(self, keepalive: int = 30, will: tuple[str, bytes] | None = None,
                      properties: Properties | None = None) -> int:
        """The CONNACK's code (0: accepted)."""
        if will is not None:
            self.paho.will_set(will[0], will[1], qos=1)
        extra: dict[str, Any] = {"clean_start": self.clean} if self.version == 5 else {}
        await asyncio.to_thread(self.paho.connect, "127.0.0.1", self.port, keepalive, properties=properties, **extra)
        self.paho.loop_start()
        if not await asyncio.to_thread(self.connected.wait, WAIT):
            raise AssertionError("no CONNACK")
        if self.connack is None:
            raise AssertionError(f"connection closed without CONNACK (code {self.disconnect_code})")
        return self.connack

    async def _ack(self, mid: int) -> Any:
        def wait() -> Any:
            with self.acked:
                if not self.acked.wait_for(lambda: mid in self.acks or self.disconnected.is_set(), WAIT):
                    raise AssertionError(f"no acknowledgement for message {mid}")
                return self.acks.get(mid)
        return await asyncio.to_thread(wait)

    async def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """The SUBACK's codes, one per filter."""
        _, mid = self.paho.subscribe([(each, qos) for each in filters])
        codes: list[int] = await self._ack(mid)
        return codes

    async def unsubscribe(self, *filters: str) -> Any:
        _, mid = self.paho.unsubscribe(list(filters))
        return await self._ack(mid)

    async def publish(self, topic: str, payload: bytes = b"x", qos: int = 0, retain: bool = False) -> int | None:
        """QoS 1 and 2: the acknowledgement's code (None if the connection closed first)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return 0
        code: int | None = await self._ack(info.mid)
        return code

    async def message(self, timeout: float = WAIT) -> Received:
        return await asyncio.to_thread(self.messages.get, True, timeout)

    async def no_message(self, within: float = 0.3) -> None:
        try:
            got = await asyncio.to_thread(self.messages.get, True, within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {got}")

    async def wait_disconnect(self, timeout: float = WAIT) -> int | None:
        if not await asyncio.to_thread(self.disconnected.wait, timeout):
            raise AssertionError("still connected")
        return self.disconnect_code

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()
