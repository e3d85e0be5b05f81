"""Configuration: every key's default, a valid value, the values it refuses and the exact message,
the same through environment variables, and `gateway --check-config` / a start as a process."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trustme
import yaml
from yarl import URL

import gateway
from gateway.config import (
    BrokerAddress,
    ClusterSettings,
    ConfigError,
    ListenSettings,
    LogSettings,
    MqttSettings,
    Route,
    SentinelSettings,
    Settings,
    build_settings,
    load_settings,
    reload_plan,
    reloaded_keys,
    settable,
)

from support.servers import ROOT, free_port

UPSTREAM = "http://127.0.0.1:1"
ABOVE_0 = "must be a number > 0"
AT_LEAST_0 = "must be a number >= 0"
INT_1 = "must be an integer >= 1"
INT_0 = "must be an integer >= 0"
FLAG = "must be true or false"
STRING = "must be a string"
NON_EMPTY = "must be a non-empty string"

# The kinds of wrong value each kind of key refuses, with the message.
POSITIVE = [(0, ABOVE_0), (-1, ABOVE_0), (-0.5, ABOVE_0), ("5", ABOVE_0), (True, ABOVE_0), (None, ABOVE_0),
            ([1], ABOVE_0), (float("nan"), ABOVE_0), (float("inf"), ABOVE_0 + ", and finite")]
NON_NEGATIVE = [(-1, AT_LEAST_0), (-0.001, AT_LEAST_0), ("1", AT_LEAST_0), (False, AT_LEAST_0), (None, AT_LEAST_0),
                (float("nan"), AT_LEAST_0)]
COUNT = [(0, INT_1), (-3, INT_1), (1.5, INT_1), (10.0, INT_1), ("10", INT_1), (True, INT_1), (None, INT_1)]
SIZE = [(-1, INT_0), (-3, INT_0), (2.5, INT_0), ("1", INT_0), (False, INT_0), (None, INT_0)]
FLAGS = [("yes", FLAG), (1, FLAG), (0, FLAG), (None, FLAG), ("true", FLAG)]
HEADER = [("X Token", "must be a header name (letters, digits and -)"),
          ("X-Token:", "must be a header name (letters, digits and -)"), (5, STRING), (None, STRING)]


class Key(NamedTuple):
    key: str  # dotted, as in the file
    default: Any  # the Settings attribute when the key is absent
    valid: Any  # a value to write...
    read: Any  # ...and the attribute it gives
    invalid: list[tuple[Any, str]]  # values refused, each with its message (after "key: ")


KEYS = [
    Key("listen.host", "127.0.0.1", "0.0.0.0", "0.0.0.0", [("", NON_EMPTY), (5, NON_EMPTY), (None, NON_EMPTY)]),
    Key("listen.port", 8080, 9000, 9000,
        [(v, "must be an integer from 0 to 65535") for v in (-1, 65536, "eighty", 80.0, True, None)]),
    Key("redis.url", "memory://", "redis://127.0.0.1:6390/2", "redis://127.0.0.1:6390/2", [
        ("mysql://x", "must start with memory://, redis://, rediss:// or unix://"), (5, STRING),
        ("redis://h:abc/0", "not a valid Redis URL (Port could not be cast to integer value as 'abc')"),
        ("redis://h:6379/zero", "the path must be a database number (redis://host:6379/0)"),
        ("redis://u:secret@h:6379/0?colour=blue", "not a valid Redis URL (AbstractConnection.__init__() got an "
                                                  "unexpected keyword argument 'colour')"),
        ("redis://h/0?socket_timeout=soon", "not a valid Redis URL (Invalid value for 'socket_timeout' in "
                                            "connection URL.)"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs '/nonexistent/ca.pem' is not a file"),
        ("rediss://h/0?ssl_keyfile=/nonexistent/key.pem", "ssl_keyfile '/nonexistent/key.pem' is not a file"),
        ("rediss://h/0?ssl_ca_path=/nonexistent", "ssl_ca_path '/nonexistent' is not a directory"),
    ]),
    Key("redis.key_prefix", "{gw}:", "app:", "app:", [(5, STRING), (None, STRING)]),
    Key("redis.socket_timeout", 0.5, 2, 2.0, POSITIVE),
    Key("redis.connect_timeout", 0.5, 1.5, 1.5, POSITIVE),
    Key("redis.data_file", "gateway-data.json", "store.json", "store.json", [
        ("", NON_EMPTY), (7, NON_EMPTY),
        ("missing/store.json", "'missing/store.json': directory 'missing' does not exist"),
        (".", "'.' is not a file"),
    ]),
    Key("redis.sentinel", None, {"hosts": ["127.0.0.1:26379"], "service": "gw"},
        SentinelSettings(hosts=(("127.0.0.1", 26379),), service="gw"), [(5, "must be a mapping")]),
    Key("redis.cluster", None, {"nodes": ["127.0.0.1:7000"]},
        ClusterSettings(nodes=(("127.0.0.1", 7000),)), [(5, "must be a mapping")]),
    Key("redis.wait_replicas", None, 0, 0, [
        *[(value, INT_0) for value, _ in SIZE], (2, "the embedded store (memory://) has no replicas")]),
    Key("redis.wait_timeout", 0.5, 2, 2.0, POSITIVE),
    Key("cache.max_age", 30.0, 10, 10.0, POSITIVE),
    Key("cache.refresh_after", 0.0, 12.5, 12.5,
        [*NON_NEGATIVE, (31, "must be from 0 (a third of max_age) to cache.max_age (30)")]),
    Key("cache.max_entries", 200_000, 50, 50, COUNT),
    Key("cache.negative_ttl", 5.0, 0, 0.0, NON_NEGATIVE),
    Key("cache.revalidate_after", 0.5, 0, 0.0, NON_NEGATIVE),
    Key("cache.invalidation_ping", 0.1, 1, 1.0, POSITIVE),
    Key("cache.invalidation_deadline", 0.5, 0.25, 0.25, POSITIVE),
    Key("proxy.connect_timeout", 5.0, 2, 2.0, POSITIVE),
    Key("proxy.read_timeout", 60.0, 0.25, 0.25, POSITIVE),
    Key("proxy.pool_size", 0, 32, 32, SIZE),
    Key("proxy.pool_timeout", 10.0, 0.5, 0.5, POSITIVE),
    Key("limits.max_request_line", 8190, 2048, 2048, COUNT),
    Key("limits.max_header_size", 16384, 4096, 4096,
        [*COUNT, (65537, "must be at most limits.max_head_size (65536)")]),
    Key("limits.max_head_size", 65536, 16384, 16384,
        [*COUNT, (16383, "must be at least limits.max_header_size (16384)")]),
    Key("limits.max_headers", 256, 64, 64, COUNT),
    Key("limits.max_body_size", 0, 10_000_000, 10_000_000, SIZE),
    Key("limits.api_body_size", 1_048_576, 65536, 65536, COUNT),
    Key("limits.header_timeout", 60.0, 5, 5.0, POSITIVE),
    Key("limits.keepalive_timeout", 75.0, 0.5, 0.5, POSITIVE),
    Key("limits.send_timeout", 60.0, 30, 30.0, POSITIVE),
    Key("limits.max_connections", 10_000, 100, 100, COUNT),
    Key("proxy.preserve_host", False, True, True, FLAGS),
    Key("proxy.forward_authorization", False, True, True, FLAGS),
    Key("proxy.token_id_header", "X-Token-Id", "X-Gw-Token", "X-Gw-Token",
        [*HEADER, ("x-account-id", "must differ from proxy.account_id_header")]),
    Key("proxy.account_id_header", "X-Account-Id", "X-Gw-Account", "X-Gw-Account",
        [*HEADER, ("x-token-id", "must differ from proxy.token_id_header")]),
    Key("proxy.request_id_header", "X-Request-ID", "X-Trace", "X-Trace",
        [*HEADER, ("X-Account-Id", "must differ from proxy.account_id_header")]),
    Key("proxy.ca_file", None, "<ca file>", "<ca file>", [
        ("", NON_EMPTY), (5, NON_EMPTY), ("/nonexistent/ca.pem", "'/nonexistent/ca.pem' is not a file"),
        ("/", "'/' is not a file"),
    ]),
    Key("log.path", "-", "off", "off", [
        ("", NON_EMPTY), (1, NON_EMPTY), (".", "'.' is a directory"),
        ("missing/requests.log", "'missing/requests.log': directory 'missing' does not exist"),
    ]),
    Key("log.queue_size", 100_000, 10, 10, COUNT),
    Key("log.flush_interval", 1.0, 0.2, 0.2, POSITIVE),
    Key("log.format", "text", "json", "json", [("xml", "'xml' is not a log format (text, json)"),
                                               ("JSON", "'JSON' is not a log format (text, json)"),
                                               (None, "None is not a log format (text, json)")]),
    Key("usage.window", 60, 120, 120, COUNT),
    Key("usage.flush_interval", 0.5, 2, 2.0, [*POSITIVE, (61, "must not be longer than usage.window (60)")]),
    Key("usage.api_calls", 0, 1000, 1000, SIZE),
    Key("usage.traffic", 0, 10_000_000, 10_000_000, SIZE),
    Key("housekeeping.sweep_interval", 5.0, 1, 1.0, POSITIVE),
    Key("housekeeping.grace", 2.0, 0, 0.0, NON_NEGATIVE),
    Key("housekeeping.recycle_bin_days", 30.0, 0.5, 0.5, NON_NEGATIVE),
    Key("token_logs.enabled", True, False, False, FLAGS),
    Key("token_logs.per_token", 1000, 10, 10, COUNT),
    Key("token_logs.per_account", 10000, 20, 20, COUNT),
    Key("acl.group_uri", "gw/groups", "shop/groups", "shop/groups", [("", NON_EMPTY), (3, NON_EMPTY)]),
    Key("acl.uri_patterns", (), {"orders": "/api/v2/orders/{selector}/{submodule}"},
        (("orders", "/api/v2/orders/{selector}/{submodule}"),), [
            ("orders", "must map ACL uris to path patterns"), ([], "must map ACL uris to path patterns"),
            ({"x": "nope"}, "uri 'x': pattern 'nope' must end with /{selector} or /{selector}/{submodule}"),
            ({"x": "/platform/x/{selector}"}, "uri 'x': pattern '/platform/x/{selector}' reaches a platform path"),
        ]),
    Key("cors.enabled", True, False, False, FLAGS),
    Key("cors.allow_methods", ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"), ["get", "OPTIONS"],
        ("GET", "OPTIONS"), [
            (["FOO"], "'FOO' is not an HTTP method (CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE)"),
            ("GET", "must be a list of names"), (["GET", "*"], "'*' (any) must be the only item"),
            (["GE T"], "'GE T' is not a valid name"), ([7], "7 is not a valid name"),
        ]),
    Key("cors.allow_headers", ("Authorization", "Content-Type", "x-flespi-cid", "x-flespi-app"), ["*"], ("*",), [
        ("Authorization", "must be a list of names"), (["bad header"], "'bad header' is not a valid name"),
        (None, "must be a list of names"),
    ]),
    Key("cors.expose_headers", ("Retry-After",), [], (), [([7], "7 is not a valid name"),
                                                          (["Retry-After", "*"], "'*' (any) must be the only item")]),
    Key("cors.max_age", 600, 0, 0, SIZE),
    Key("panel.enabled", True, False, False, FLAGS),
    # The whole section: absent is no MQTT front; its own keys are covered by the mqtt tests below.
    Key("mqtt", None, {"broker": "mqtt://127.0.0.1:1884"}, MqttSettings(BrokerAddress("127.0.0.1", 1884)),
        [(5, "must be a mapping"), ([], "must be a mapping")]),
    Key("internal.allow", ("127.0.0.0/8", "::1"), ["10.0.0.0/8", "2001:db8::5", "192.0.2.7"],
        ("10.0.0.0/8", "2001:db8::5", "192.0.2.7"), [
            ("127.0.0.1", "must be a list of addresses or CIDR networks"),
            (["127.0.0.1/8"], "'127.0.0.1/8' is not an IP address or CIDR network (127.0.0.1/8 has host bits set)"),
            (["localhost"], "'localhost' is not an IP address or CIDR network ('localhost' does not appear to be an "
                            "IPv4 or IPv6 network)"),
            ([8], "8 is not a valid address or CIDR network"), (None, "must be a list of addresses or CIDR networks"),
        ]),
    Key("origin_presets", (("flespi", gateway.config.FLESPI_ORIGINS),), {"mine": ["https://*.example.com"]},
        (("flespi", gateway.config.FLESPI_ORIGINS), ("mine", ("https://*.example.com",))), [
            ({"mine": "https://a.example.com"}, "must map preset names to lists of origins"),
            (["https://a.example.com"], "must map preset names to lists of origins"),
            ({"mine": []}, "preset 'mine' is empty"),
        ]),
    Key("bootstrap_master_token", None, "K" * 64, "K" * 64, [
        ("short", "must be 64 characters [A-Za-z0-9]"), ("K" * 63 + "!", "must be 64 characters [A-Za-z0-9]"),
        (12345, "must be 64 characters [A-Za-z0-9]"),
    ]),
    Key("platform_prefixes", ("/platform/", "/auth/"), ["/admin/"], ("/admin/",), [
        ("/platform/", "must be a list of path prefixes"),
        (["platform/"], "must be a path that starts and ends with /"),
        (["/platform"], "must be a path that starts and ends with /"), (None, "must be a list of path prefixes"),
    ]),
    Key("internal_prefix", "/_gateway/", "/_gw/", "/_gw/", [
        ("/", "must not be / (it would take every path)"), ("_gateway", "must be a path that starts and ends with /"),
        ("/platform/", "must differ from platform_prefixes"), (None, "must be a path that starts and ends with /"),
        ("/platform/gw/", "must not overlap platform_prefixes (/platform/)"),
    ]),
    Key("trusted_proxies", (), ["127.0.0.1", "10.0.0.0/8", "::1"], ("127.0.0.1", "10.0.0.0/8", "::1"), [
        ("127.0.0.1", "must be a list of addresses or CIDR networks"),
        (["nope"], "trusted proxy 'nope': 'nope' does not appear to be an IPv4 or IPv6 network"),
        ([1], "1 is not a valid address or CIDR network"),
    ]),
    Key("realm", "gateway", "my api", "my api", [
        ('a"b', 'must be printable ASCII without " or \\'),
        ("a\r\nX-Injected: 1", 'must be printable ASCII without " or \\'),
        ("é", 'must be printable ASCII without " or \\'), (1, STRING),
    ]),
    Key("workers", 1, 1, 1, [*COUNT, (2, "the embedded store (redis.url memory://) serves one process; set redis.url "
                                         "to share")]),
    Key("accessed_flush_interval", 0.1, 1, 1.0, POSITIVE),
]


def attribute(settings: Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def with_key(key: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A minimal configuration with `key` set to `value`."""
    raw: dict[str, Any] = {"upstream": UPSTREAM, **(base or {})}
    section, _, name = key.rpartition(".")
    if section:
        raw[section] = {**raw.get(section, {}), name: value}
    else:
        raw[name] = value
    return raw


@pytest.fixture(autouse=True)
def in_empty_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (log files, the embedded store's file) land in a directory of the test's own."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def real(value: Any, ca_file: str) -> Any:
    return ca_file if value == "<ca file>" else value


def test_every_key_is_covered() -> None:
    """The table above names every key a section accepts (a new key must come with its tests)."""
    keys = {entry.key for entry in KEYS}
    expected = set()
    for item in settable(Settings):
        kind = Settings.__dataclass_fields__[item].default_factory  # a section's class, for sections
        if kind is not dataclasses.MISSING and dataclasses.is_dataclass(kind):
            expected |= {f"{item}.{name}" for name in settable(kind)}
        elif item != "routes":
            expected.add(item)
    assert keys == expected


@pytest.mark.parametrize("entry", KEYS, ids=[entry.key for entry in KEYS])
def test_default(entry: Key) -> None:
    assert attribute(build_settings({"upstream": UPSTREAM}), entry.key) == entry.default


@pytest.mark.parametrize("entry", KEYS, ids=[entry.key for entry in KEYS])
def test_valid_value(entry: Key, ca_file: str) -> None:
    settings = build_settings(with_key(entry.key, real(entry.valid, ca_file)))
    read = attribute(settings, entry.key)
    assert read == real(entry.read, ca_file)
    assert type(read) is type(real(entry.read, ca_file))  # floats stay floats: compiled modules rely on it


INVALID = [(entry.key, value, problem) for entry in KEYS for value, problem in entry.invalid]


@pytest.mark.parametrize(("key", "value", "problem"), INVALID, ids=[f"{k}={v!r}" for k, v, _ in INVALID])
def test_invalid_value_names_the_key(key: str, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings(with_key(key, value))
    assert str(raised.value) == f"{key}: {problem}"
    assert raised.value.key == key and raised.value.variable is None


def test_secrets_are_never_repeated() -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings(with_key("redis.url", "redis://user:hunter2@h:6379/0?colour=blue"))
    assert "hunter2" not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        build_settings(with_key("bootstrap_master_token", "Z" * 63))
    assert "Z" * 10 not in str(raised.value)


# -- keys that act together ----------------------------------------------------------------------

SENTINEL = {"hosts": ["127.0.0.1:26379", "[::1]:26380"], "service": "gw"}


def test_sentinel_reads_every_key(ca_file: str) -> None:
    redis = build_settings({"upstream": UPSTREAM, "redis": {"sentinel": {
        **SENTINEL, "db": 3, "username": "gw", "password": "pw", "sentinel_username": "watch",
        "sentinel_password": "spw", "ssl": True, "ssl_ca_certs": ca_file}}}).redis
    sentinel = redis.sentinel
    assert sentinel is not None and not redis.embedded and redis.replicas_to_wait == 1
    assert sentinel.hosts == (("127.0.0.1", 26379), ("::1", 26380)) and sentinel.service == "gw"
    assert sentinel.connection_options() == {"db": 3, "username": "gw", "password": "pw", "ssl": True,
                                             "ssl_ca_certs": ca_file}
    assert sentinel.sentinel_options() == {"username": "watch", "password": "spw", "ssl": True,
                                           "ssl_ca_certs": ca_file}
    assert "pw" not in repr(redis)  # settings may be logged; passwords never are
    plain = build_settings({"upstream": UPSTREAM, "redis": {"sentinel": SENTINEL, "wait_replicas": 0}}).redis
    assert plain.replicas_to_wait == 0 and plain.sentinel is not None
    assert plain.sentinel.connection_options() == {"db": 0} and plain.sentinel.sentinel_options() == {}
    # The data nodes' password is not the sentinels': a sentinel without one gets none.
    secured = build_settings({"upstream": UPSTREAM, "redis": {"sentinel": {**SENTINEL, "password": "pw"}}}).redis
    assert secured.sentinel is not None and secured.sentinel.sentinel_options() == {}
    assert secured.sentinel.connection_options() == {"db": 0, "password": "pw"}
    assert build_settings(with_key("redis.url", "redis://h:6379/0")).redis.replicas_to_wait == 0


@pytest.mark.parametrize(("sentinel", "message"), [
    ({"service": "gw"}, "redis.sentinel.hosts: required: the sentinels, as host:port"),
    ({**SENTINEL, "hosts": []}, "redis.sentinel.hosts: must be a non-empty list of sentinels as host:port"),
    ({**SENTINEL, "hosts": "h:26379"}, "redis.sentinel.hosts: must be a non-empty list of sentinels as host:port"),
    ({**SENTINEL, "hosts": ["h"]}, "redis.sentinel.hosts: 'h' is not host:port"),
    ({**SENTINEL, "hosts": ["h:0"]}, "redis.sentinel.hosts: 'h:0' is not host:port"),
    ({**SENTINEL, "hosts": ["h:65536"]}, "redis.sentinel.hosts: 'h:65536' is not host:port"),
    ({**SENTINEL, "hosts": [":26379"]}, "redis.sentinel.hosts: ':26379' is not host:port"),
    ({**SENTINEL, "hosts": ["h:x"]}, "redis.sentinel.hosts: 'h:x' is not host:port"),
    ({**SENTINEL, "hosts": [26379]}, "redis.sentinel.hosts: must be a list of sentinels as host:port"),
    ({**SENTINEL, "hosts": ["h:1", "h:1"]}, "redis.sentinel.hosts: names a sentinel twice"),
    ({"hosts": ["h:1"]}, "redis.sentinel.service: required: the name the sentinels monitor the master by"),
    ({**SENTINEL, "service": ""}, "redis.sentinel.service: must be a non-empty string"),
    ({**SENTINEL, "service": 5}, "redis.sentinel.service: must be a non-empty string"),
    ({**SENTINEL, "db": -1}, "redis.sentinel.db: must be an integer >= 0"),
    ({**SENTINEL, "db": "0"}, "redis.sentinel.db: must be an integer >= 0"),
    ({**SENTINEL, "password": 5}, "redis.sentinel.password: must be a string"),
    ({**SENTINEL, "username": "gw"}, "redis.sentinel.username: needs a password"),
    ({**SENTINEL, "sentinel_username": "w"}, "redis.sentinel.sentinel_username: needs a sentinel_password"),
    ({**SENTINEL, "sentinel_password": None}, "redis.sentinel.sentinel_password: must be a string"),
    ({**SENTINEL, "ssl": "yes"}, "redis.sentinel.ssl: must be true or false"),
    ({**SENTINEL, "ssl_ca_certs": "/nonexistent.pem"}, "redis.sentinel.ssl_ca_certs: needs ssl: true"),
    ({**SENTINEL, "ssl": True, "ssl_ca_certs": "/nonexistent.pem"},
     "redis.sentinel.ssl_ca_certs: ssl_ca_certs '/nonexistent.pem' is not a file"),
    ({**SENTINEL, "ssl": True, "ssl_keyfile": "/nonexistent.pem"},
     "redis.sentinel.ssl_keyfile: ssl_keyfile '/nonexistent.pem' is not a file"),
    ({**SENTINEL, "master": "x"}, "redis.sentinel.master: unknown key"),
])
def test_sentinel_refuses(sentinel: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings({"upstream": UPSTREAM, "redis": {"sentinel": sentinel}})
    assert str(raised.value) == message


def test_sentinel_or_url_never_both() -> None:
    with pytest.raises(ConfigError, match=r"^redis\.sentinel: cannot be used together with redis\.url$"):
        build_settings({"upstream": UPSTREAM, "redis": {"url": "redis://h:6379/0", "sentinel": SENTINEL}})


def test_sentinel_from_the_environment() -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, "GATEWAY_REDIS__SENTINEL__HOSTS": "[127.0.0.1:26379]",
               "GATEWAY_REDIS__SENTINEL__SERVICE": "gw", "GATEWAY_REDIS__SENTINEL__PASSWORD": "pw"}
    sentinel = load_settings(None, environ).redis.sentinel
    assert sentinel == SentinelSettings(hosts=(("127.0.0.1", 26379),), service="gw", password="pw")
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {**environ, "GATEWAY_REDIS__SENTINEL__DB": "-2"})
    assert str(raised.value) == "GATEWAY_REDIS__SENTINEL__DB: redis.sentinel.db: must be an integer >= 0"

CLUSTER = {"nodes": ["127.0.0.1:7000", "[::1]:7001", "redis-3.local:7002"]}


def test_cluster_reads_every_key(tmp_path: Path, ca_file: str) -> None:
    cert = trustme.CA().issue_cert("redis.example")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    redis = build_settings({"upstream": UPSTREAM, "redis": {"cluster": {
        **CLUSTER, "username": "gw", "password": "pw", "ssl": True, "ssl_ca_certs": ca_file,
        "ssl_certfile": "cert.pem", "ssl_keyfile": "key.pem"}}}).redis
    cluster = redis.cluster
    assert cluster is not None and redis.sentinel is None and not redis.embedded and redis.replicas_to_wait == 0
    assert cluster.nodes == (("127.0.0.1", 7000), ("::1", 7001), ("redis-3.local", 7002))
    assert cluster.connection_options() == {"username": "gw", "password": "pw", "ssl": True, "ssl_ca_certs": ca_file,
                                            "ssl_certfile": "cert.pem", "ssl_keyfile": "key.pem"}
    assert "pw" not in repr(redis)
    plain = build_settings({"upstream": UPSTREAM, "redis": {"cluster": CLUSTER, "wait_replicas": 0}}).redis
    assert plain.cluster is not None and plain.cluster.connection_options() == {} and not plain.embedded


@pytest.mark.parametrize(("cluster", "message"), [
    ({}, "redis.cluster.nodes: required: the cluster nodes, as host:port"),
    ({"nodes": []}, "redis.cluster.nodes: must be a non-empty list of cluster nodes as host:port"),
    ({"nodes": "h:7000"}, "redis.cluster.nodes: must be a non-empty list of cluster nodes as host:port"),
    ({"nodes": ["h"]}, "redis.cluster.nodes: 'h' is not host:port"),
    ({"nodes": ["h:0"]}, "redis.cluster.nodes: 'h:0' is not host:port"),
    ({"nodes": ["h:70000"]}, "redis.cluster.nodes: 'h:70000' is not host:port"),
    ({"nodes": ["[]:7000"]}, "redis.cluster.nodes: '[]:7000' is not host:port"),
    ({"nodes": [7000]}, "redis.cluster.nodes: must be a list of cluster nodes as host:port"),
    ({"nodes": ["h:1", "h:1"]}, "redis.cluster.nodes: names a node twice"),
    ({**CLUSTER, "username": "gw"}, "redis.cluster.username: needs a password"),
    ({**CLUSTER, "username": 5}, "redis.cluster.username: must be a string"),
    ({**CLUSTER, "password": 5}, "redis.cluster.password: must be a string"),
    ({**CLUSTER, "ssl": "yes"}, "redis.cluster.ssl: must be true or false"),
    ({**CLUSTER, "ssl_ca_certs": "/nonexistent.pem"}, "redis.cluster.ssl_ca_certs: needs ssl: true"),
    ({**CLUSTER, "ssl_certfile": "/x.pem"}, "redis.cluster.ssl_certfile: needs ssl: true"),
    ({**CLUSTER, "ssl": True, "ssl_certfile": "/nonexistent.pem"},
     "redis.cluster.ssl_certfile: ssl_certfile '/nonexistent.pem' is not a file"),
    ({**CLUSTER, "ssl": True, "ssl_keyfile": "/nonexistent.pem"},
     "redis.cluster.ssl_keyfile: ssl_keyfile '/nonexistent.pem' is not a file"),
    ({**CLUSTER, "db": 1}, "redis.cluster.db: unknown key"),
])
def test_cluster_refuses(cluster: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings({"upstream": UPSTREAM, "redis": {"cluster": cluster}})
    assert str(raised.value) == message


@pytest.mark.parametrize("other", [{"url": "redis://h:6379/0"}, {"sentinel": SENTINEL}])
def test_cluster_never_with_url_or_sentinel(other: dict[str, Any]) -> None:
    name = next(iter(other))
    with pytest.raises(ConfigError, match=rf"^redis\.cluster: cannot be used together with redis\.{name}$"):
        build_settings({"upstream": UPSTREAM, "redis": {**other, "cluster": CLUSTER}})


def test_cluster_waits_for_replicas_when_asked() -> None:
    assert build_settings({"upstream": UPSTREAM, "redis": {"cluster": CLUSTER}}).redis.replicas_to_wait == 0
    redis = build_settings({"upstream": UPSTREAM, "redis": {"cluster": CLUSTER, "wait_replicas": 2}}).redis
    assert redis.replicas_to_wait == 2


def test_cluster_from_the_environment() -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, "GATEWAY_REDIS__CLUSTER__NODES": "[127.0.0.1:7000, 127.0.0.1:7001]",
               "GATEWAY_REDIS__CLUSTER__PASSWORD": "pw"}
    cluster = load_settings(None, environ).redis.cluster
    assert cluster == ClusterSettings(nodes=(("127.0.0.1", 7000), ("127.0.0.1", 7001)), password="pw")
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {**environ, "GATEWAY_REDIS__CLUSTER__SSL": "maybe"})
    assert str(raised.value).startswith("GATEWAY_REDIS__CLUSTER__SSL: redis.cluster.ssl: ")


def test_upstream_is_one_route_for_every_path() -> None:
    settings = build_settings({"upstream": "https://api.example.com:8443/v2/"})
    assert settings.routes == (Route("/", URL("https://api.example.com:8443/v2/")),)
    assert settings.routes[0].replaces_prefix


def test_routes_longest_prefix_first() -> None:
    settings = build_settings({"routes": {"/": "http://a", "/api/": "http://b/v2/", "/api/x/": "http://c"}})
    assert [route.prefix for route in settings.routes] == ["/api/x/", "/api/", "/"]
    assert [route.replaces_prefix for route in settings.routes] == [False, True, False]


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "upstream: required (or routes)"),
    ({"upstream": None}, "upstream: required (or routes)"),
    ({"upstream": UPSTREAM, "routes": {"/": UPSTREAM}},
     "upstream: cannot be used together with routes (give the catch-all as routes./)"),
    ({"upstream": "ftp://x"}, "upstream: must be an http:// or https:// URL with a host"),
    ({"upstream": "http://"}, "upstream: must be an http:// or https:// URL with a host"),
    ({"upstream": "http://h:99999"}, "upstream: must be an http:// or https:// URL with a host"),
    ({"upstream": 8000}, "upstream: must be an http:// or https:// URL with a host"),
    ({"upstream": "http://h/?a=1"}, "upstream: must not have a query or fragment"),
    ({"upstream": "http://h/#top"}, "upstream: must not have a query or fragment"),
    ({"routes": {}}, "routes: must be a non-empty mapping of path prefix to upstream URL"),
    ({"routes": ["/", UPSTREAM]}, "routes: must be a non-empty mapping of path prefix to upstream URL"),
    ({"routes": {"api": UPSTREAM}}, "routes.api: a route prefix must start with /"),
    ({"routes": {"/a/": "ftp://x"}}, "routes./a/: must be an http:// or https:// URL with a host"),
    ({"upstream": UPSTREAM, "surprise": 1}, "surprise: unknown key"),
    ({"upstream": UPSTREAM, "cache": {"max_agee": 3}}, "cache.max_agee: unknown key; did you mean cache.max_age?"),
    ({"upstrem": UPSTREAM}, "upstrem: unknown key; did you mean upstream?"),
    ({"upstream": UPSTREAM, "proxy": 5}, "proxy: must be a mapping"),
    ({"upstream": UPSTREAM, "cors": ["GET"]}, "cors: must be a mapping"),
    ({"upstream": UPSTREAM, "workers": 2, "redis": {"url": "redis://127.0.0.1:6390"}, "listen": {"port": 1.5}},
     "listen.port: must be an integer from 0 to 65535"),
    ({"routes": {"/": UPSTREAM, "/_gateway/x/": UPSTREAM}},
     "routes./_gateway/x/: is never proxied: paths under /_gateway/ are the gateway's own (internal_prefix, "
     "platform_prefixes)"),
    ({"routes": {"/platform/": UPSTREAM}},
     "routes./platform/: is never proxied: paths under /platform/ are the gateway's own (internal_prefix, "
     "platform_prefixes)"),
    ({"routes": {"/admin/x": UPSTREAM}, "platform_prefixes": ["/admin/"]},
     "routes./admin/x: is never proxied: paths under /admin/ are the gateway's own (internal_prefix, "
     "platform_prefixes)"),
    ({"upstream": UPSTREAM, "platform_prefixes": ["/_gateway/x/"]},
     "internal_prefix: must not overlap platform_prefixes (/_gateway/x/)"),
])
def test_whole_configuration_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings(raw)
    assert str(raised.value) == message


def test_a_null_section_is_its_defaults() -> None:
    """`cors:` with every key commented out, as the shipped file has it."""
    assert build_settings({"upstream": UPSTREAM, "cors": None, "proxy": None}) == build_settings({"upstream": UPSTREAM})


def test_refresh_after_may_equal_max_age_and_follows_it() -> None:
    assert build_settings(with_key("cache.refresh_after", 30)).cache.refresh_interval == 30
    assert build_settings(with_key("cache.max_age", 9)).cache.refresh_interval == 3
    raw = with_key("cache.refresh_after", 12, {"cache": {"max_age": 10}})
    with pytest.raises(ConfigError, match=r"^cache\.refresh_after: must be from 0 \(a third of max_age\) to "
                                          r"cache\.max_age \(10\)$"):
        build_settings(raw)


def test_workers_share_a_redis() -> None:
    settings = build_settings(with_key("workers", 4, {"redis": {"url": "redis://127.0.0.1:6390/0"}}))
    assert settings.workers == 4


def test_uri_patterns_are_judged_with_the_configured_platform_prefixes() -> None:
    raw = with_key("acl.uri_patterns", {"orders": "/admin/orders/{selector}"}, {"platform_prefixes": ["/admin/"]})
    with pytest.raises(ConfigError, match=r"^acl\.uri_patterns: uri 'orders': pattern '/admin/orders/\{selector\}' "
                                          r"reaches a platform path$"):
        build_settings(raw)
    assert build_settings(with_key("acl.uri_patterns", {"orders": "/admin/orders/{selector}"})).acl.uri_patterns


def test_log_path_may_be_a_new_or_existing_file(tmp_path: Path) -> None:
    assert build_settings(with_key("log.path", str(tmp_path / "new.log"))).log.path == str(tmp_path / "new.log")
    (tmp_path / "old.log").write_text("kept\n")
    assert build_settings(with_key("log.path", "old.log")).log.path == "old.log"
    assert (tmp_path / "old.log").read_text() == "kept\n"  # checked, not opened
    assert not (tmp_path / "new.log").exists()


def test_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        build_settings(with_key("proxy.ca_file", "ca.pem"))
    assert str(raised.value).startswith("proxy.ca_file: 'ca.pem' holds no usable PEM CA certificates (")


def test_redis_tls_files_are_loaded(tmp_path: Path, ca_file: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("redis.example")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    good = f"rediss://h:6380/0?ssl_ca_certs={ca_file}&ssl_certfile=cert.pem&ssl_keyfile=key.pem"
    assert build_settings(with_key("redis.url", good)).redis.url == good
    (tmp_path / "other-key.pem").write_bytes(trustme.CA().issue_cert("x").private_key_pem.bytes())
    bad_pair = "rediss://h:6380/0?ssl_certfile=cert.pem&ssl_keyfile=other-key.pem"
    with pytest.raises(ConfigError, match=r"^redis\.url: ssl_certfile holds no usable PEM certificate and private key"):
        build_settings(with_key("redis.url", bad_pair))
    with pytest.raises(ConfigError, match=r"^redis\.url: ssl_ca_certs 'cert.pem' holds no usable PEM CA certificates|"
                                          r"^redis\.url: ssl_ca_certs 'key.pem' holds no usable PEM CA certificates"):
        build_settings(with_key("redis.url", "rediss://h/0?ssl_ca_certs=key.pem"))


def test_settings_are_frozen() -> None:
    settings = build_settings({"upstream": UPSTREAM})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.proxy.read_timeout = 1  # type: ignore[misc]
    assert LogSettings().path == "-"  # sections still build from keywords alone (tests, bench)


# -- the file --------------------------------------------------------------------------------------

def test_file_values_and_null_default(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("upstream: http://127.0.0.1:1\nproxy:\n  read_timeout: 7\ncache:\n")
    settings = load_settings(path, {})
    assert settings.proxy.read_timeout == 7.0 and settings.cache == build_settings({"upstream": UPSTREAM}).cache


@pytest.mark.parametrize(("content", "message"), [
    ("upstream: http://a\nproxy: [unclosed\n", "line 3: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("upstream: http://a\n\tproxy: 1\n", "line 2: not valid YAML (found character '\\t' that cannot start any token)"),
    ("- upstream\n", "the top level must be a mapping"),
    ("upstream: http://a\nproxy:\n  read_timeout: 1\nproxy:\n  connect_timeout: 1\n", "line 4: duplicate key 'proxy'"),
    ("upstream: http://a\nproxy:\n  read_timeout: 1\n  read_timeout: 2\n", "line 4: duplicate key 'read_timeout'"),
    (b"upstream: \xff\n", "cannot be read ('utf-8' codec can't decode byte 0xff in position 10: invalid start byte)"),
])
def test_file_that_is_not_a_configuration(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as raised:
        load_settings(path, {})
    assert str(raised.value) == f"config file {path}: {message}"


@pytest.mark.parametrize(("written", "read"), [("off", "off"), ("no", "no"), ("yes", "yes"), ("on", "on")])
def test_only_true_and_false_are_booleans(written: str, read: str, tmp_path: Path) -> None:
    """YAML 1.1 reads `off` as false: `log: {path: off}` must stay the word the README gives."""
    path = tmp_path / "c.yaml"
    path.write_text(f"upstream: http://a\nrealm: {written}\ncors:\n  enabled: false\n")
    settings = load_settings(path, {})
    assert settings.realm == read and settings.cors.enabled is False
    path.write_text(f"upstream: http://a\ncors:\n  enabled: {written}\n")
    with pytest.raises(ConfigError, match=r"cors\.enabled: must be true or false$"):
        load_settings(path, {})


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("upstream: http://a\nproxy:\n  <<: {read_timeout: 3, connect_timeout: 1}\n  read_timeout: 4\n")
    proxy = load_settings(path, {}).proxy
    assert (proxy.read_timeout, proxy.connect_timeout) == (4.0, 1.0)


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(tmp_path / "nope.yaml", {})
    assert str(raised.value) == f"config file {tmp_path / 'nope.yaml'}: not found"


def test_no_file_at_all_says_so() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {})
    assert str(raised.value) == ("config file: none found: give --config FILE, set GATEWAY_CONFIG, or put "
                                 "config.yaml in the working directory (a configuration from the environment "
                                 "alone needs GATEWAY_UPSTREAM)")
    assert load_settings(None, {"GATEWAY_UPSTREAM": UPSTREAM}).routes[0].upstream == URL(UPSTREAM)


# -- environment overrides -------------------------------------------------------------------------

def variable(key: str) -> str:
    return "GATEWAY_" + key.upper().replace(".", "__")


def yaml_text(value: Any) -> str:
    """How a shell would write the value: a YAML scalar or flow collection (JSON is valid YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize("entry", KEYS, ids=[entry.key for entry in KEYS])
def test_every_key_from_the_environment(entry: Key, ca_file: str) -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, variable(entry.key): yaml_text(real(entry.valid, ca_file))}
    assert attribute(load_settings(None, environ), entry.key) == real(entry.read, ca_file)


def reads_back(value: Any) -> bool:
    """Whether a variable can carry the value: not NaN or infinity (JSON has none), and not a string
    that reads as another type (`"5"` is 5 from the environment)."""
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return not isinstance(value, str) or gateway.config._scalar(value) == value


ENV_INVALID = [(entry.key, value, problem) for entry in KEYS for value, problem in entry.invalid if reads_back(value)]


@pytest.mark.parametrize(("key", "value", "problem"), ENV_INVALID, ids=[f"{k}={v!r}" for k, v, _ in ENV_INVALID])
def test_environment_errors_name_the_variable(key: str, value: Any, problem: str) -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, variable(key): yaml_text(value)}
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ)
    assert str(raised.value) == f"{variable(key)}: {key}: {problem}"
    assert raised.value.variable == variable(key)


def test_environment_overrides_the_file_and_any_case(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "proxy": {"read_timeout": 10, "pool_size": 3}}))
    proxy = load_settings(path, {"GATEWAY_PROXY__READ_TIMEOUT": "20", "GATEWAY_proxy__preserve_host": "true"}).proxy
    assert (proxy.read_timeout, proxy.pool_size, proxy.preserve_host) == (20.0, 3, True)


@pytest.mark.parametrize(("environ", "message"), [
    ({"GATEWAY_MASTER_TOKEN": "tooshort"}, "GATEWAY_MASTER_TOKEN: bootstrap_master_token: must be 64 characters "
                                           "[A-Za-z0-9]"),
    ({"GATEWAY_MASTER_TOKEN": "A" * 64, "GATEWAY_BOOTSTRAP_MASTER_TOKEN": "B" * 64},
     "GATEWAY_MASTER_TOKEN: bootstrap_master_token: set differently by GATEWAY_BOOTSTRAP_MASTER_TOKEN"),
    ({"GATEWAY_PROXY_CONNECT_TIMEOUT": "5"}, "GATEWAY_PROXY_CONNECT_TIMEOUT: proxy_connect_timeout: unknown key "
                                             "(for proxy.connect_timeout set GATEWAY_PROXY__CONNECT_TIMEOUT)"),
    ({"GATEWAY_TOKEN_LOGS_PER_TOKEN": "5"}, "GATEWAY_TOKEN_LOGS_PER_TOKEN: token_logs_per_token: unknown key "
                                            "(for token_logs.per_token set GATEWAY_TOKEN_LOGS__PER_TOKEN)"),
    ({"GATEWAY_SURPRISE": "1"}, "GATEWAY_SURPRISE: surprise: unknown key"),
    ({"GATEWAY_CACHE__MAX_AGEE": "1"}, "GATEWAY_CACHE__MAX_AGEE: cache.max_agee: unknown key; did you mean "
                                       "cache.max_age?"),
    ({"GATEWAY_CORS": "{enabled: maybe}"}, "GATEWAY_CORS: cors.enabled: must be true or false"),
    ({"GATEWAY_ROUTES": "{/a/: ftp://x}", "GATEWAY_UPSTREAM": ""},  # empty is a value, not unset
     "GATEWAY_UPSTREAM: upstream: cannot be used together with routes (give the catch-all as routes./)"),
    ({"GATEWAY_UPSTREAM": "ftp://x"}, "GATEWAY_UPSTREAM: upstream: must be an http:// or https:// URL with a host"),
    ({"GATEWAY_ROUTES": "{/a/: 'ftp://x'}"}, "GATEWAY_ROUTES: routes./a/: must be an http:// or https:// URL with a "
                                             "host"),
    ({"GATEWAY_WORKERS": "2"}, "GATEWAY_WORKERS: workers: the embedded store (redis.url memory://) serves one "
                               "process; set redis.url to share"),
])
def test_environment_only_errors(environ: dict[str, str], message: str) -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, **environ} if "GATEWAY_ROUTES" not in environ else environ
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ)
    assert str(raised.value) == message
    assert "A" * 64 not in str(raised.value) and "B" * 64 not in str(raised.value)


def test_upstream_from_the_environment_contradicts_routes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"routes": {"/": UPSTREAM}}))
    with pytest.raises(ConfigError) as raised:
        load_settings(path, {"GATEWAY_UPSTREAM": UPSTREAM})
    assert str(raised.value) == ("GATEWAY_UPSTREAM: upstream: cannot be used together with routes "
                                 "(give the catch-all as routes./)")


def test_command_line_variables_are_not_keys() -> None:
    environ = {"GATEWAY_UPSTREAM": UPSTREAM, "GATEWAY_LOG_LEVEL": "DEBUG", "GATEWAY_CONFIG": "elsewhere.yaml",
               "GATEWAY_MASTER_TOKEN": "", "OTHER_THING": "1"}
    settings = load_settings(None, environ)
    assert settings.bootstrap_master_token is None


# -- the command line, as a process ---------------------------------------------------------------

def clean_environment(**extra: str) -> dict[str, str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    return {**environ, "PYTHONPATH": str(ROOT), **extra}


def gateway_command(*args: str, cwd: Path, env: dict[str, str] | None = None,
                    user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env or clean_environment(),
                          capture_output=True, text=True, timeout=60, user=user)


def write_config(path: Path, **config: Any) -> Path:
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"port": free_port()}, **config}))
    return path


def assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr == f"gateway: configuration error: {message}\n"  # one line, no traceback
    assert result.stdout == ""


def test_check_config_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path / "ok.yaml")
    result = gateway_command("--check-config", "--config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"gateway: configuration {path} is valid\n", "")


def test_check_config_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", proxy={"connect_timeout": -1})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path), "proxy.connect_timeout: must be a number > 0")


def test_check_config_names_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml")
    result = gateway_command("-t", "-c", str(path), cwd=tmp_path,
                             env=clean_environment(GATEWAY_PROXY__CONNECT_TIMEOUT="-1", GATEWAY_LOG_LEVEL="WARNING"))
    assert_refused(result, "GATEWAY_PROXY__CONNECT_TIMEOUT: proxy.connect_timeout: must be a number > 0")


def test_check_config_missing_files(tmp_path: Path) -> None:
    assert_refused(gateway_command("-t", "-c", str(tmp_path / "nope.yaml"), cwd=tmp_path),
                   f"config file {tmp_path / 'nope.yaml'}: not found")
    assert_refused(gateway_command("-t", cwd=tmp_path, env=clean_environment(GATEWAY_CONFIG=str(tmp_path / "x.yaml"))),
                   f"config file {tmp_path / 'x.yaml'}: not found")
    result = gateway_command("-t", cwd=tmp_path)  # no --config, no GATEWAY_CONFIG, no ./config.yaml
    assert result.returncode == 2 and result.stderr.startswith("gateway: configuration error: config file: none found")
    write_config(tmp_path / "config.yaml")
    assert gateway_command("-t", cwd=tmp_path).returncode == 0  # ./config.yaml is found


def test_check_config_unwritable_log_path(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    path = write_config(tmp_path / "c.yaml", log={"path": str(tmp_path / "logs")})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                   f"log.path: '{tmp_path / 'logs'}' is a directory")
    path = write_config(tmp_path / "c.yaml", log={"path": "gone/requests.log"})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                   "log.path: 'gone/requests.log': directory 'gone' does not exist")


def refusal_as_another_user(raw: dict[str, Any], cwd: Path) -> str:
    """The message `build_settings(raw)` raises for a user other than root, who may write anything:
    as root, in a child process that became `nobody` first (as a gateway started under a service
    user would run)."""
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as raised:
            build_settings(raw)
        return str(raised.value)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and never returns
        try:
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                build_settings(raw)
                message = "accepted"
            except ConfigError as exc:
                message = str(exc)
            os.write(writer, message.encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    return message


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to its user)."""
    directory = Path(tempfile.mkdtemp(prefix="gateway-config-"))
    directory.chmod(0o755)
    yield directory
    for child in sorted(directory.rglob("*"), reverse=True):
        child.chmod(0o700)
        child.rmdir() if child.is_dir() else child.unlink()
    directory.rmdir()


def test_files_without_permission(shared_directory: Path, tmp_path: Path) -> None:
    locked = shared_directory / "locked"
    locked.mkdir()
    (locked / "old.log").write_text("")
    (locked / "old.log").chmod(0o444)
    (locked / "ca.pem").write_text("")
    (locked / "ca.pem").chmod(0o200)
    locked.chmod(0o555)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    remote = {"redis": {"url": "redis://127.0.0.1:6390/0"}}  # no data file to check on the way
    cases = [
        (with_key("log.path", str(locked / "old.log"), remote), f"log.path: '{locked / 'old.log'}' is not writable"),
        (with_key("log.path", str(locked / "new.log"), remote),
         f"log.path: '{locked / 'new.log'}': directory '{locked}' is not writable"),
        (with_key("redis.data_file", str(locked / "store.json")),
         f"redis.data_file: '{locked / 'store.json'}': directory '{locked}' is not writable"),
        (with_key("proxy.ca_file", str(locked / "ca.pem"), remote),
         f"proxy.ca_file: '{locked / 'ca.pem'}' is not readable"),
    ]
    if os.geteuid() == 0:  # only another user's view has pytest's private directory out of reach
        cases.append((with_key("log.path", str(private / "x.log"), remote),
                      f"log.path: '{private / 'x.log'}' cannot be reached (Permission denied)"))
    try:
        for raw, message in cases:
            assert refusal_as_another_user(raw, shared_directory) == message
    finally:
        locked.chmod(0o755)


def test_check_config_bad_ca_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    path = write_config(tmp_path / "c.yaml", proxy={"ca_file": "ca.pem"})
    result = gateway_command("-t", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("gateway: configuration error: proxy.ca_file: 'ca.pem' holds no usable PEM CA")
    path = write_config(tmp_path / "c.yaml", redis={"url": "rediss://127.0.0.1:6390/0?ssl_ca_certs=/nonexistent.pem"})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                   "redis.url: ssl_ca_certs '/nonexistent.pem' is not a file")


def test_check_config_contradictions_and_methods(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", routes={"/": UPSTREAM})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                   "upstream: cannot be used together with routes (give the catch-all as routes./)")
    path = write_config(tmp_path / "c.yaml", cors={"allow_methods": ["FOO"]})
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path), "cors.allow_methods: 'FOO' is not an HTTP "
                   "method (CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE)")


def listening(port: int, reuse_port: bool) -> socket.socket:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    return holder


def test_check_config_port_in_use(tmp_path: Path) -> None:
    """A port another program listens on stops a start, so the check refuses it too."""
    port = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"port": port}}))
    with listening(port, reuse_port=False):
        assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                       f"listen.port: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert gateway_command("-t", "-c", str(path), cwd=tmp_path).returncode == 0


def test_check_config_port_shared_by_workers(tmp_path: Path) -> None:
    """With workers the port is bound with SO_REUSEPORT: held the same way by the same user (a running
    gateway with workers, say), the new workers would share it, so it is no error; held without it, it is."""
    port = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"port": port}, "workers": 2,
                                    "redis": {"url": "redis://127.0.0.1:6390/0"}}))
    with listening(port, reuse_port=True):
        result = gateway_command("-t", "-c", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    with listening(port, reuse_port=False):
        assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                       f"listen.port: cannot listen on 127.0.0.1:{port} (Address already in use)")


def test_check_config_address_not_on_this_machine(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"host": "192.0.2.1", "port": port}}))
    assert_refused(gateway_command("-t", "-c", str(path), cwd=tmp_path),
                   f"listen.host: cannot listen on 192.0.2.1:{port} (Cannot assign requested address)")
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"host": "no-such-host.invalid"}}))
    result = gateway_command("-t", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "gateway: configuration error: listen.host: 'no-such-host.invalid' does not resolve")


def test_check_config_unreadable_snapshot(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text("{not json")
    path = write_config(tmp_path / "c.yaml", redis={"data_file": "store.json"})
    result = gateway_command("-t", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gateway: configuration error: redis.data_file: {str(tmp_path / 'store.json')!r} "
                                    "is not a snapshot of the embedded store (")


def test_data_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """Not to the working directory: started from elsewhere, the gateway still opens its own store."""
    (tmp_path / "etc").mkdir()
    path = write_config(tmp_path / "etc" / "c.yaml", redis={"data_file": "store.json"})
    assert load_settings(path, {}).redis.data_file == str(tmp_path / "etc" / "store.json")
    assert load_settings(path, {"GATEWAY_REDIS__DATA_FILE": "/var/lib/g.json"}).redis.data_file == "/var/lib/g.json"
    bare = write_config(tmp_path / "etc" / "bare.yaml")
    assert load_settings(bare, {}).redis.data_file == str(tmp_path / "etc" / "gateway-data.json")
    assert load_settings(None, {"GATEWAY_UPSTREAM": UPSTREAM}).redis.data_file == "gateway-data.json"  # no file: here


def test_start_with_a_bad_configuration_exits_before_listening(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"port": port}, "log": {"flush_interval": 0}}))
    assert_refused(gateway_command("-c", str(path), cwd=tmp_path), "log.flush_interval: must be a number > 0")
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM, "listen": {"port": port}}))
    with listening(port, reuse_port=False):
        assert_refused(gateway_command("-c", str(path), cwd=tmp_path),
                       f"listen.port: cannot listen on 127.0.0.1:{port} (Address already in use)")


def test_version(tmp_path: Path) -> None:
    result = gateway_command("--version", cwd=tmp_path)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (result.returncode, result.stdout) == (0, f"gateway {declared}\n")
    assert importlib.metadata.version("flespi-token-gateway") == gateway.__version__ == declared


# -- the mqtt section ----------------------------------------------------------------------------------

BROKER = "mqtt://127.0.0.1:1884"
MQTT_URL = "must be an mqtt:// or mqtts:// URL with a host (mqtt://user:password@host:port)"


def mqtt(**section: Any) -> MqttSettings:
    settings = build_settings({"upstream": UPSTREAM, "mqtt": {"broker": BROKER, **section}}).mqtt
    assert settings is not None
    return settings


def test_mqtt_defaults() -> None:
    settings = mqtt()
    assert settings.listen == ListenSettings("127.0.0.1", 1883)
    assert (settings.websocket_path, settings.max_packet_size, settings.connect_timeout, settings.check_interval,
            settings.broker_ca_file) == ("/mqtt", 1024 * 1024, 10.0, 0.5, None)
    assert settings.broker_tls() is None


@pytest.mark.parametrize(("url", "broker"), [
    ("mqtt://h", BrokerAddress("h", 1883)),
    ("mqtt://h:1999", BrokerAddress("h", 1999)),
    ("mqtts://h", BrokerAddress("h", 8883, tls=True)),
    ("mqtt://gw:s3cret@10.0.0.1:1884", BrokerAddress("10.0.0.1", 1884, False, "gw", "s3cret")),
    ("mqtt://gw@h/", BrokerAddress("h", 1883, False, "gw", None)),
])
def test_mqtt_broker_urls(url: str, broker: BrokerAddress) -> None:
    assert mqtt(broker=url).broker == broker


@pytest.mark.parametrize(("url", "problem"), [
    ("http://h:1883", MQTT_URL), ("mqtt://", MQTT_URL), ("h:1883", MQTT_URL), (1883, MQTT_URL), (None, None),
    ("mqtt://h:99999", MQTT_URL), ("mqtt://h/topic", "must not have a path, query or fragment"),
    ("mqtt://h?x=1", "must not have a path, query or fragment"), ("mqtt://:pw@h", "a password needs a user name"),
])
def test_mqtt_broker_refused(url: Any, problem: str | None) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings({"upstream": UPSTREAM, "mqtt": {"broker": url}})
    assert str(raised.value) == f"mqtt.broker: {problem or 'required (mqtt://user:password@host:port)'}"


def test_mqtt_broker_password_is_never_repeated() -> None:
    settings = mqtt(broker="mqtt://gw:hunter2@h:1884")
    assert "hunter2" not in repr(settings)
    with pytest.raises(ConfigError) as raised:
        build_settings({"upstream": UPSTREAM, "mqtt": {"broker": "mqtt://gw:hunter2@h:1884/x"}})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(("key", "value", "read"), [
    ("listen", {"host": "0.0.0.0", "port": 0}, ListenSettings("0.0.0.0", 0)),
    ("listen", {"port": 11883}, ListenSettings("127.0.0.1", 11883)),
    ("websocket_path", "/ws/mqtt", "/ws/mqtt"),
    ("websocket_path", "", ""),
    ("max_packet_size", 4096, 4096),
    ("connect_timeout", 2, 2.0),
    ("check_interval", 0.1, 0.1),
])
def test_mqtt_valid_values(key: str, value: Any, read: Any) -> None:
    got = getattr(mqtt(**{key: value}), key)
    assert got == read and type(got) is type(read)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("listen", 5, "mqtt.listen: must be a mapping"),
    ("listen", {"port": 70000}, "mqtt.listen.port: must be an integer from 0 to 65535"),
    ("listen", {"host": ""}, "mqtt.listen.host: must be a non-empty string"),
    ("listen", {"hots": "x"}, "mqtt.listen.hots: unknown key; did you mean mqtt.listen.host?"),
    ("websocket_path", "mqtt", 'mqtt.websocket_path: must be a plain path that starts with / (or "" for none)'),
    ("websocket_path", "/a/../b", 'mqtt.websocket_path: must be a plain path that starts with / (or "" for none)'),
    ("websocket_path", "/platform/mqtt", "mqtt.websocket_path: must not lie under platform_prefixes or "
                                         "internal_prefix"),
    ("websocket_path", "/_gateway/mqtt", "mqtt.websocket_path: must not lie under platform_prefixes or "
                                         "internal_prefix"),
    ("max_packet_size", 10, "mqtt.max_packet_size: must be an integer from 64 to 268435460"),
    ("max_packet_size", 1.5, "mqtt.max_packet_size: must be an integer from 64 to 268435460"),
    ("connect_timeout", 0, "mqtt.connect_timeout: must be a number > 0"),
    ("check_interval", -1, "mqtt.check_interval: must be a number > 0"),
    ("broker_ca_file", "/nonexistent.pem", None),
    ("brokr", "x", "mqtt.brokr: unknown key; did you mean mqtt.broker?"),
])
def test_mqtt_invalid_values(key: str, value: Any, problem: str | None) -> None:
    with pytest.raises(ConfigError) as raised:
        mqtt(**{key: value})
    if problem is None:
        assert str(raised.value).startswith("mqtt.broker_ca_file: ")
    else:
        assert str(raised.value) == problem


def test_mqtt_broker_ca_file(ca_file: str) -> None:
    with pytest.raises(ConfigError) as raised:
        mqtt(broker_ca_file=ca_file)
    assert str(raised.value) == "mqtt.broker_ca_file: needs an mqtts:// broker"
    settings = mqtt(broker="mqtts://h", broker_ca_file=ca_file)
    assert settings.broker_ca_file == ca_file and settings.broker_tls() is not None


def test_mqtt_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"upstream": UPSTREAM}))
    settings = load_settings(path, {"GATEWAY_MQTT__BROKER": "mqtts://gw:pw@broker:8884",
                                    "GATEWAY_MQTT__LISTEN__PORT": "1999"})
    assert settings.mqtt is not None and settings.mqtt.broker == BrokerAddress("broker", 8884, True, "gw", "pw")
    assert settings.mqtt.listen.port == 1999
    with pytest.raises(ConfigError) as raised:
        load_settings(path, {"GATEWAY_MQTT__BROKER": "tcp://gw:pw@broker"})
    assert str(raised.value) == f"GATEWAY_MQTT__BROKER: mqtt.broker: {MQTT_URL}"


def test_log_path_must_not_be_the_embedded_store_file(tmp_path: Path) -> None:
    data = str(tmp_path / "data.json")
    raw = {"upstream": UPSTREAM, "redis": {"url": "memory://", "data_file": data}}
    with pytest.raises(ConfigError, match=r"^log\.path: must differ from redis\.data_file \(the embedded store's "
                                          r"file\)$"):
        build_settings({**raw, "log": {"path": str(tmp_path / "." / "data.json")}})
    assert build_settings({**raw, "log": {"path": str(tmp_path / "requests.log")}}).log.path.endswith("requests.log")


# -- reloading -------------------------------------------------------------------------------------

def test_reload_plan_keeps_what_needs_a_restart() -> None:
    running = build_settings({"upstream": UPSTREAM, "listen": {"port": 9000}, "proxy": {"pool_size": 4}})
    loaded = build_settings({"routes": {"/": UPSTREAM, "/v2/": "http://127.0.0.1:2/new/"}, "listen": {"port": 9001},
                             "workers": 3, "redis": {"url": "redis://127.0.0.1:6390/0"},
                             "proxy": {"pool_size": 8, "read_timeout": 5}, "cors": {"max_age": 7},
                             "trusted_proxies": ["10.0.0.0/8"], "cache": {"max_entries": 10}})
    effective, kept = reload_plan(running, loaded)
    assert kept == ("listen.port", "redis.url", "workers", "proxy.pool_size")
    assert (effective.listen, effective.redis, effective.workers) == (running.listen, running.redis, 1)
    assert (effective.proxy.pool_size, effective.proxy.read_timeout) == (4, 5)
    assert (effective.routes, effective.cors, effective.trusted_proxies, effective.cache) == (
        loaded.routes, loaded.cors, loaded.trusted_proxies, loaded.cache)
    assert reloaded_keys(running, effective) == ("routes", "cache.max_entries", "proxy.read_timeout", "cors.max_age",
                                                 "trusted_proxies")


def test_reload_plan_of_the_same_file_changes_nothing() -> None:
    running = build_settings({"upstream": UPSTREAM, "origin_presets": {"mine": ["https://a.example"]}})
    effective, kept = reload_plan(running, build_settings({"upstream": UPSTREAM,
                                                           "origin_presets": {"mine": ["https://a.example"]}}))
    assert (effective, kept, reloaded_keys(running, effective)) == (running, (), ())


def test_a_reload_keeps_the_log_format_as_it_runs() -> None:
    """The app log's handlers are set at start (workers inherit them): a changed `log.format` is
    said to need a restart, the rest of the log section is applied."""
    running = build_settings({"upstream": UPSTREAM})
    loaded = build_settings({"upstream": UPSTREAM, "log": {"format": "json", "flush_interval": 2}})
    effective, kept = reload_plan(running, loaded)
    assert kept == ("log.format",)
    assert (effective.log.format, effective.log.flush_interval) == (running.log.format, 2)
    assert reloaded_keys(running, effective) == ("log.flush_interval",)

