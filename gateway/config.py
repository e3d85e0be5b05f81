"""Configuration: read once from YAML plus environment overrides into frozen dataclasses.

Each section is a frozen dataclass whose `parse` reads its own keys from a `Table`, checks them
with the shared validators below and names the full key in every message
(`proxy.connect_timeout: must be a number > 0`). Unknown keys are refused, so a typo never turns
into a silent default.

Environment overrides: `GATEWAY_<SECTION>__<KEY>=value` sets `section.key` (double underscore
between levels, case-insensitive), e.g. `GATEWAY_LISTEN__PORT=9000`, `GATEWAY_REDIS__URL=redis://h:6379/0`,
`GATEWAY_UPSTREAM=http://127.0.0.1:3000`. Values are parsed as YAML scalars (so `true`, `5`, `1.5`
keep their types; lists and mappings in flow style, `[a, b]`). `GATEWAY_MASTER_TOKEN` is an alias of
`bootstrap_master_token`; `GATEWAY_CONFIG` and `GATEWAY_LOG_LEVEL` belong to the command line. A
message about a value that came from the environment starts with the variable's name.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import ssl
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from http import HTTPMethod
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import yaml
from yarl import URL

from gateway.policy.acl_validation import is_plain_path
from gateway.policy.clientaddr import TrustedProxies
from gateway.policy.origins import preset_problems

ENV_PREFIX = "GATEWAY_"
MASTER_TOKEN_VARIABLE = "GATEWAY_MASTER_TOKEN"
# Read by the command line itself, not configuration keys.
COMMAND_LINE_VARIABLES = frozenset({"GATEWAY_CONFIG", "GATEWAY_LOG_LEVEL", "GATEWAY_URL"})  # URL: `gateway token`'s
KEY_PATTERN = re.compile(r"^[A-Za-z0-9]{64}$")
NO_CONFIG_FILE = ("none found: give --config FILE, set GATEWAY_CONFIG, or put config.yaml in the working "
                  "directory (a configuration from the environment alone needs GATEWAY_UPSTREAM)")


# flespi's own web applications, for `{"preset": "flespi"}` (override in `origin_presets`).
FLESPI_ORIGINS = ("https://flespi.io", "https://*.flespi.io", "https://flespi.com", "https://*.flespi.com")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key (and the variable that set it)."""

    def __init__(self, key: str, problem: str, variable: str | None = None) -> None:
        where = f"{variable}: {key}" if variable else key
        super().__init__(f"{where}: {problem}")
        self.key, self.problem, self.variable = key, problem, variable


# -- validators shared by every section ----------------------------------------------------------
# Each takes the full key (for the message) and the value as read, and returns it typed.

def number(key: str, value: Any, *, above: float | None = None, at_least: float | None = None) -> float:
    """A finite int or float (never a bool), `> above` or `>= at_least`."""
    bound = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else ""
    problem = f"must be a number {bound}".rstrip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(key, problem)
    if math.isinf(value):
        raise ConfigError(key, f"{problem}, and finite")
    if (above is not None and not value > above) or (at_least is not None and not value >= at_least):
        raise ConfigError(key, problem)
    return float(value)


def integer(key: str, value: Any, *, at_least: int, at_most: int | None = None) -> int:
    problem = f"must be an integer from {at_least} to {at_most}" if at_most is not None \
        else f"must be an integer >= {at_least}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, problem)
    if value < at_least or (at_most is not None and value > at_most):
        raise ConfigError(key, problem)
    return value


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, "must be true or false")
    return value


def text(key: str, value: Any, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ConfigError(key, "must be a string" if empty else "must be a non-empty string")
    return value


def one_of(key: str, value: Any, choices: Collection[str], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, f"{value!r} is not {what} ({', '.join(choices)})")
    return value


def string_list(key: str, value: Any, plural: str, singular: str) -> tuple[str, ...]:
    """A YAML list of strings (one string alone is refused: it is a common slip for a list of one)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list of {plural}")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(key, f"{item!r} is not a valid {singular}")
    return tuple(value)


def http_url(key: str, value: Any) -> URL:
    """An upstream: http:// or https://, a host, no query or fragment. The value is not echoed: it
    may carry credentials."""
    problem = "must be an http:// or https:// URL with a host"
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    try:
        url = URL(value)
        _ = url.port  # an out-of-range port raises here
    except ValueError as exc:
        raise ConfigError(key, problem) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(key, problem)
    if url.query_string or url.fragment:
        raise ConfigError(key, "must not have a query or fragment")
    return url


def path_prefix(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.endswith("/"):
        raise ConfigError(key, "must be a path that starts and ends with /")
    return value


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_IDENTITY_HEADER = re.compile(r"[A-Za-z0-9-]+")


def header_names(key: str, value: Any) -> tuple[str, ...]:
    """Header names (RFC 9110 tokens); `*` alone stands for any."""
    names = string_list(key, value, "names", "name")
    for item in names:
        if not _HEADER_NAME.fullmatch(item):
            raise ConfigError(key, f"{item!r} is not a valid name")
    if "*" in names and len(names) > 1:
        raise ConfigError(key, "'*' (any) must be the only item")
    return names


def _kind(key: str, path: Path) -> str:
    """"file", "directory", "other" or "missing"; a path the user may not even look at is refused."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise ConfigError(key, f"{str(path)!r} cannot be reached ({exc.strerror})") from exc
    return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "other"


def readable_file(key: str, path: str, what: str = "") -> None:
    """`what` names the file in the message when the key alone does not (a URL's option)."""
    label = f"{what} {path!r}" if what else repr(path)
    if _kind(key, Path(path)) != "file":
        raise ConfigError(key, f"{label} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"{label} is not readable")


# os.access, unlike a trial open, changes nothing and blocks on nothing (a FIFO), and it reports
# a read-only file system even to root.

def writable_file(key: str, path: str) -> None:
    """The file can be opened for appending, or created."""
    kind = _kind(key, Path(path))
    if kind == "directory":
        raise ConfigError(key, f"{path!r} is a directory")
    if kind != "missing":
        if not os.access(path, os.W_OK):
            raise ConfigError(key, f"{path!r} is not writable")
        return
    writable_directory(key, path)


def writable_directory(key: str, path: str) -> None:
    """Files can be created beside `path`."""
    parent = Path(path).parent
    if _kind(key, parent) != "directory":
        raise ConfigError(key, f"{path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path!r}: directory {str(parent)!r} is not writable")


def ca_certificates(key: str, path: str, what: str = "") -> ssl.SSLContext:
    """Load a PEM CA file now: a bad one stops the start instead of failing every TLS connection."""
    readable_file(key, path, what)
    try:
        return ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        label = f"{what} {path!r}" if what else repr(path)
        raise ConfigError(key, f"{label} holds no usable PEM CA certificates ({reason})") from exc


class Table:
    """One mapping of the configuration (the top level or a section), read one key at a time.

    Keys outside `known` are refused at once, before any value is judged: a misspelt key is
    the likelier mistake than the value error it would otherwise surface as.
    """

    __slots__ = ("key", "_values")

    def __init__(self, key: str, value: Any, known: Iterable[str]) -> None:
        self.key = key
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a mapping")
        self._values: Mapping[Any, Any] = value
        names = sorted(known)
        for item in value:
            if item not in names:
                close = difflib.get_close_matches(str(item), names, n=1)
                hint = f"; did you mean {self.name(close[0])}?" if close else ""
                raise ConfigError(self.name(str(item)), f"unknown key{hint}")

    def name(self, item: str) -> str:
        return f"{self.key}.{item}" if self.key else item

    def get(self, item: str, default: Any = None) -> Any:
        """The value as written, `default` when absent. An explicit null stays None: the typed
        readers refuse it (`port:` with nothing after it is a slip, not a wish for the default)."""
        return self._values.get(item, default)

    def number(self, item: str, default: float, *, above: float | None = None, at_least: float | None = None) -> float:
        return number(self.name(item), self.get(item, default), above=above, at_least=at_least)

    def integer(self, item: str, default: int, *, at_least: int, at_most: int | None = None) -> int:
        return integer(self.name(item), self.get(item, default), at_least=at_least, at_most=at_most)

    def flag(self, item: str, default: bool) -> bool:
        return flag(self.name(item), self.get(item, default))

    def text(self, item: str, default: str, *, empty: bool = True) -> str:
        return text(self.name(item), self.get(item, default), empty=empty)

    def section(self, item: str, cls: type[Any]) -> Table:
        return Table(self.name(item), self._values.get(item), settable(cls))


def settable(cls: type[Any]) -> tuple[str, ...]:
    """The keys a section accepts: its dataclass fields."""
    return tuple(each.name for each in fields(cls) if each.init)


# -- sections --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port

    @classmethod
    def parse(cls, table: Table) -> ListenSettings:
        defaults = cls()
        return cls(host=table.text("host", defaults.host, empty=False),
                   port=table.integer("port", defaults.port, at_least=0, at_most=65535))


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with `prefix` go to `upstream` (nginx `location` semantics)."""

    prefix: str
    upstream: URL
    # Like nginx proxy_pass with a URI part: the matched prefix is replaced by the URL's path.
    # Worked out once here: every proxied request asks.
    replaces_prefix: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "replaces_prefix",
                           self.upstream.raw_path not in ("", "/") or str(self.upstream).endswith("/"))


def parse_routes(top: Table) -> tuple[Route, ...]:
    """`upstream` (one URL for every path) or `routes` (prefix: URL), never both: with both, which
    one serves `/` would depend on a rule nobody wrote down."""
    upstream, routes = top.get("upstream"), top.get("routes")
    if upstream is not None and routes is not None:
        raise ConfigError("upstream", "cannot be used together with routes (give the catch-all as routes./)")
    if upstream is not None:
        return (Route("/", http_url("upstream", upstream)),)
    if routes is None:
        raise ConfigError("upstream", "required (or routes)")
    if not isinstance(routes, Mapping) or not routes:
        raise ConfigError("routes", "must be a non-empty mapping of path prefix to upstream URL")
    table = []
    for prefix, url in routes.items():
        key = f"routes.{prefix}"
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError(key, "a route prefix must start with /")
        table.append(Route(prefix, http_url(key, url)))  # YAML mappings cannot repeat a prefix
    table.sort(key=lambda route: len(route.prefix), reverse=True)
    return tuple(table)


REDIS_SCHEMES = ("memory://", "redis://", "rediss://", "unix://")
# TLS options redis-py takes from a rediss:// URL's query string that name files, and what each must be.
REDIS_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def host_port(key: str, value: Any, what: str) -> tuple[str, int]:
    """`host:port` (`[::1]:26379` for IPv6), as one item of a list of servers."""
    problem = f"{value!r} is not host:port" if isinstance(value, str) else f"must be a list of {what} as host:port"
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, problem)
    return host, int(port)


def _server_list(table: Table, name: str, what: str, one: str) -> tuple[tuple[str, int], ...]:
    """A required, non-empty list of `host:port` items, none twice (`redis.sentinel.hosts`,
    `redis.cluster.nodes`)."""
    key = table.name(name)
    raw = table.get(name)
    if raw is None:
        raise ConfigError(key, f"required: the {what}, as host:port")
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(key, f"must be a non-empty list of {what} as host:port")
    servers = tuple(host_port(key, item, what) for item in raw)
    if len(set(servers)) != len(servers):
        raise ConfigError(key, f"names a {one} twice")
    return servers


def _check_server_credentials(table: Table, settings: SentinelSettings | ClusterSettings) -> None:
    """TLS files only with ssl, each a readable file; a username only with a password."""
    files = {name: value for name in REDIS_TLS_FILES if (value := getattr(settings, name))}
    if files and not settings.ssl:
        raise ConfigError(table.name(next(iter(files))), "needs ssl: true")
    try:
        _check_redis_tls_files(files)
    except ConfigError as exc:
        raise ConfigError(table.name(exc.key), exc.problem) from exc
    if settings.username and not settings.password:
        raise ConfigError(table.name("username"), "needs a password")


def _server_options(settings: SentinelSettings | ClusterSettings,
                    credentials: tuple[str, str] | None = None) -> dict[str, Any]:
    """What redis-py takes for the credentials and TLS of a connection: to a data node, or with
    other `credentials` (a sentinel's user name and password) and the same TLS."""
    username, password = credentials if credentials is not None else (settings.username, settings.password)
    options: dict[str, Any] = {}
    if password:
        options["password"] = password
    if username:
        options["username"] = username
    if settings.ssl:
        options["ssl"] = True
        options.update({name: value for name in REDIS_TLS_FILES if (value := getattr(settings, name))})
    return options


@dataclass(frozen=True, slots=True)
class SentinelSettings:
    """The master is whichever server the sentinels name for `service`; credentials and TLS are
    those of a `redis://`/`rediss://` URL, given as keys (the sentinels may have a password of
    their own)."""

    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)
    sentinel_username: str = ""
    sentinel_password: str = field(default="", repr=False)
    ssl: bool = False
    ssl_ca_certs: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    @classmethod
    def parse(cls, table: Table) -> SentinelSettings:
        hosts = _server_list(table, "hosts", "sentinels", "sentinel")
        if table.get("service") is None:
            raise ConfigError(table.name("service"), "required: the name the sentinels monitor the master by")
        settings = cls(
            hosts=hosts,
            service=table.text("service", "", empty=False),
            db=table.integer("db", 0, at_least=0),
            username=table.text("username", ""),
            password=table.text("password", ""),
            sentinel_username=table.text("sentinel_username", ""),
            sentinel_password=table.text("sentinel_password", ""),
            ssl=table.flag("ssl", False),
            ssl_ca_certs=table.text("ssl_ca_certs", ""),
            ssl_certfile=table.text("ssl_certfile", ""),
            ssl_keyfile=table.text("ssl_keyfile", ""),
        )
        _check_server_credentials(table, settings)
        if settings.sentinel_username and not settings.sentinel_password:
            raise ConfigError(table.name("sentinel_username"), "needs a sentinel_password")
        return settings

    def connection_options(self) -> dict[str, Any]:
        """What redis-py takes for a connection to the master or a replica."""
        return {"db": self.db, **_server_options(self)}

    def sentinel_options(self) -> dict[str, Any]:
        """What redis-py takes for a connection to a sentinel (TLS as for the master)."""
        return _server_options(self, (self.sentinel_username, self.sentinel_password))


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """A Redis Cluster, found through any of `nodes` (the client learns the rest and the slot map
    from them); credentials and TLS as for `redis.sentinel`. A cluster has database 0 only."""

    nodes: tuple[tuple[str, int], ...] = ()
    username: str = ""
    password: str = field(default="", repr=False)
    ssl: bool = False
    ssl_ca_certs: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    @classmethod
    def parse(cls, table: Table) -> ClusterSettings:
        settings = cls(
            nodes=_server_list(table, "nodes", "cluster nodes", "node"),
            username=table.text("username", ""),
            password=table.text("password", ""),
            ssl=table.flag("ssl", False),
            ssl_ca_certs=table.text("ssl_ca_certs", ""),
            ssl_certfile=table.text("ssl_certfile", ""),
            ssl_keyfile=table.text("ssl_keyfile", ""),
        )
        _check_server_credentials(table, settings)
        return settings

    def connection_options(self) -> dict[str, Any]:
        """What redis-py takes for a connection to any node."""
        return _server_options(self)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "memory://"
    key_prefix: str = "{gw}:"
    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    data_file: str = "gateway-data.json"
    sentinel: SentinelSettings | None = None
    cluster: ClusterSettings | None = None
    # Replicas that must hold an API change before it is acknowledged (Redis WAIT; on a cluster,
    # on every master); None: 1 with sentinel (a failover would otherwise lose what was
    # acknowledged), 0 (no WAIT) otherwise.
    wait_replicas: int | None = None
    wait_timeout: float = 0.5

    @property
    def embedded(self) -> bool:
        return self.sentinel is None and self.cluster is None and self.url.startswith("memory://")

    @property
    def replicas_to_wait(self) -> int:
        if self.wait_replicas is not None:
            return self.wait_replicas
        return 1 if self.sentinel is not None else 0

    @classmethod
    def parse(cls, table: Table, base: Path | None = None) -> RedisSettings:
        """`base`: the config file's directory, which a relative `data_file` is taken from (as nginx
        takes relative paths from its prefix), so that where the gateway is started from does not
        decide which store it opens."""
        defaults = cls()
        data_file = table.text("data_file", defaults.data_file, empty=False)
        if base is not None and not os.path.isabs(data_file):
            data_file = str(base / data_file)
        sentinel = None
        if table.get("sentinel") is not None:
            sentinel = SentinelSettings.parse(table.section("sentinel", SentinelSettings))
            if table.get("url") is not None:
                raise ConfigError(table.name("sentinel"), f"cannot be used together with {table.name('url')}")
        cluster = None
        if table.get("cluster") is not None:
            cluster = ClusterSettings.parse(table.section("cluster", ClusterSettings))
            for other in ("url", "sentinel"):
                if table.get(other) is not None:
                    raise ConfigError(table.name("cluster"), f"cannot be used together with {table.name(other)}")
        wait = table.get("wait_replicas", MISSING)
        settings = cls(
            url=table.text("url", defaults.url),
            key_prefix=table.text("key_prefix", defaults.key_prefix),
            socket_timeout=table.number("socket_timeout", defaults.socket_timeout, above=0),
            connect_timeout=table.number("connect_timeout", defaults.connect_timeout, above=0),
            data_file=data_file,
            sentinel=sentinel,
            cluster=cluster,
            wait_replicas=None if wait is MISSING else table.integer("wait_replicas", 0, at_least=0),
            wait_timeout=table.number("wait_timeout", defaults.wait_timeout, above=0),
        )
        if sentinel is not None:
            return settings
        if cluster is not None:
            return settings
        key = table.name("url")
        if not settings.url.startswith(REDIS_SCHEMES):
            raise ConfigError(key, f"must start with {', '.join(REDIS_SCHEMES[:-1])} or {REDIS_SCHEMES[-1]}")
        if settings.embedded:
            if settings.replicas_to_wait:
                raise ConfigError(table.name("wait_replicas"), "the embedded store (memory://) has no replicas")
            # Loaded at start; its journal, lock and next snapshot are created beside it.
            data_key = table.name("data_file")
            if _kind(data_key, Path(settings.data_file)) != "missing":
                readable_file(data_key, settings.data_file)
            writable_directory(data_key, settings.data_file)
        else:
            _check_redis_url(key, settings.url)
        return settings


def _check_redis_url(key: str, url: str) -> None:
    """What redis-py would refuse when the gateway starts; messages never repeat the URL (a password)."""
    parts = urlsplit(url)
    if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(key, "the path must be a database number (redis://host:6379/0)")
    try:  # builds a connection object as the first command will; it opens nothing yet
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as exc:  # a bad port, or a query option redis-py does not take
        raise ConfigError(key, f"not a valid Redis URL ({exc})".replace(url, "...")) from exc
    if not url.startswith("rediss://"):
        return
    options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    try:
        _check_redis_tls_files(options)
    except ConfigError as exc:
        raise ConfigError(key, exc.problem) from exc


def _check_redis_tls_files(options: Mapping[str, str]) -> None:
    """The files a rediss:// URL's query names (`?ssl_ca_certs=/etc/ca.pem`), loaded as redis-py will."""
    for name in REDIS_TLS_FILES:
        if name in options:
            readable_file(name, options[name], name)
    if "ssl_ca_certs" in options:
        ca_certificates("ssl_ca_certs", options["ssl_ca_certs"], "ssl_ca_certs")
    if "ssl_ca_path" in options and not Path(options["ssl_ca_path"]).is_dir():
        raise ConfigError("ssl_ca_path", f"ssl_ca_path {options['ssl_ca_path']!r} is not a directory")
    if "ssl_certfile" in options:
        try:
            ssl.create_default_context().load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("ssl_certfile", "ssl_certfile holds no usable PEM certificate and private key "
                              f"({getattr(exc, 'reason', None) or exc})") from exc


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_age: float = 30.0
    refresh_after: float = 0.0  # 0: a third of max_age
    max_entries: int = 200_000  # about 0.65 KB each (bench/cache_cost.py): ~130 MB
    negative_ttl: float = 5.0  # 0: unknown keys are not remembered
    revalidate_after: float = 0.5
    # The invalidation subscription is PINGed this often; unanswered for `invalidation_deadline`,
    # it is not taken as live (cached tokens are re-read before use until it answers).
    invalidation_ping: float = 0.1
    invalidation_deadline: float = 0.5

    @property
    def refresh_interval(self) -> float:
        return self.refresh_after or self.max_age / 3

    @classmethod
    def parse(cls, table: Table) -> CacheSettings:
        defaults = cls()
        max_age = table.number("max_age", defaults.max_age, above=0)
        refresh_after = table.number("refresh_after", defaults.refresh_after, at_least=0)
        if refresh_after > max_age:
            raise ConfigError(table.name("refresh_after"),
                              f"must be from 0 (a third of max_age) to {table.name('max_age')} ({max_age:g})")
        return cls(
            max_age=max_age, refresh_after=refresh_after,
            max_entries=table.integer("max_entries", defaults.max_entries, at_least=1),
            negative_ttl=table.number("negative_ttl", defaults.negative_ttl, at_least=0),
            revalidate_after=table.number("revalidate_after", defaults.revalidate_after, at_least=0),
            invalidation_ping=table.number("invalidation_ping", defaults.invalidation_ping, above=0),
            invalidation_deadline=table.number("invalidation_deadline", defaults.invalidation_deadline, above=0),
        )


IDENTITY_HEADERS = ("token_id_header", "account_id_header", "request_id_header")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 0  # 0: no limit
    preserve_host: bool = False
    forward_authorization: bool = False
    token_id_header: str = "X-Token-Id"
    account_id_header: str = "X-Account-Id"
    request_id_header: str = "X-Request-ID"
    ca_file: str | None = None  # PEM CA certificates for https upstreams; None: the system trust store
    # Seconds a request waits for a free upstream connection when `pool_size` caps them (then 503).
    pool_timeout: float = 10.0

    def ssl_context(self) -> ssl.SSLContext:
        """A client context for https upstreams: `ca_file`'s CAs or the system's, host names checked."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["http/1.1"])  # both proxy paths speak HTTP/1.1 only
        return context

    @classmethod
    def parse(cls, table: Table) -> ProxySettings:
        defaults = cls()
        headers: dict[str, str] = {}
        for item in IDENTITY_HEADERS:
            name = table.text(item, getattr(defaults, item))
            if not _IDENTITY_HEADER.fullmatch(name):
                raise ConfigError(table.name(item), "must be a header name (letters, digits and -)")
            for other, taken in headers.items():
                if taken.lower() == name.lower():  # blame the one written, when only one was
                    blamed, kept = (other, item) if table.get(item) is None else (item, other)
                    raise ConfigError(table.name(blamed), f"must differ from {table.name(kept)}")
            headers[item] = name
        ca_file = table.get("ca_file")
        if ca_file is not None:
            ca_certificates(table.name("ca_file"), text(table.name("ca_file"), ca_file, empty=False))
        return cls(
            connect_timeout=table.number("connect_timeout", defaults.connect_timeout, above=0),
            read_timeout=table.number("read_timeout", defaults.read_timeout, above=0),
            pool_size=table.integer("pool_size", defaults.pool_size, at_least=0),
            pool_timeout=table.number("pool_timeout", defaults.pool_timeout, above=0),
            preserve_host=table.flag("preserve_host", defaults.preserve_host),
            forward_authorization=table.flag("forward_authorization", defaults.forward_authorization),
            ca_file=ca_file, **headers,
        )


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """What one client connection may hold, per worker; the defaults follow nginx's.

    Sizes in bytes, times in seconds. Each limit is answered with a JSON error, then a close.
    """

    max_request_line: int = 8190  # the request target (414); nginx: large_client_header_buffers 8k
    max_header_size: int = 16384  # one header field (431)
    max_head_size: int = 65536  # the whole head, request line included (431)
    max_headers: int = 256  # header fields in one request (431)
    max_body_size: int = 0  # a proxied request's body (413); 0: unlimited, the upstream decides
    api_body_size: int = 1_048_576  # a platform API request's body (413); nginx: client_max_body_size 1m
    header_timeout: float = 60.0  # from a head's first byte to its end (408); nginx: client_header_timeout
    keepalive_timeout: float = 75.0  # an idle connection between requests is closed; nginx: keepalive_timeout
    send_timeout: float = 60.0  # a client that takes nothing of its reply this long is dropped; nginx: send_timeout
    max_connections: int = 10_000  # open client connections per worker; beyond, new ones get 503 and a close

    @classmethod
    def parse(cls, table: Table) -> LimitsSettings:
        defaults = cls()
        sizes = {name: table.integer(name, getattr(defaults, name), at_least=1)
                 for name in ("max_request_line", "max_header_size", "max_head_size", "max_headers", "api_body_size",
                              "max_connections")}
        if sizes["max_head_size"] < sizes["max_header_size"]:  # one field alone would overflow the head
            if table.get("max_head_size") is None:  # blame the one written, when only one was
                raise ConfigError(table.name("max_header_size"), f"must be at most {table.name('max_head_size')} "
                                                                 f"({sizes['max_head_size']})")
            raise ConfigError(table.name("max_head_size"), f"must be at least {table.name('max_header_size')} "
                                                           f"({sizes['max_header_size']})")
        return cls(
            max_body_size=table.integer("max_body_size", defaults.max_body_size, at_least=0),
            header_timeout=table.number("header_timeout", defaults.header_timeout, above=0),
            keepalive_timeout=table.number("keepalive_timeout", defaults.keepalive_timeout, above=0),
            send_timeout=table.number("send_timeout", defaults.send_timeout, above=0),
            **sizes,
        )


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class LogSettings:
    path: str = "-"  # "-": stdout; "off": no request log
    queue_size: int = 100_000
    flush_interval: float = 1.0
    format: str = "text"  # of the application's own log (stderr); the request log is always JSON lines

    @classmethod
    def parse(cls, table: Table) -> LogSettings:
        defaults = cls()
        path = table.text("path", defaults.path, empty=False)
        if path not in ("-", "off"):
            writable_file(table.name("path"), path)
        return cls(path=path, queue_size=table.integer("queue_size", defaults.queue_size, at_least=1),
                   flush_interval=table.number("flush_interval", defaults.flush_interval, above=0),
                   format=one_of(table.name("format"), table.get("format", defaults.format), LOG_FORMATS,
                                 "a log format"))


@dataclass(frozen=True, slots=True)
class InternalSettings:
    """Who may read the gateway's health, readiness and metrics (`<internal_prefix>health`, ...).

    Matched against the client address the token checks use: the peer, or, behind a trusted
    proxy, the address that proxy forwarded (README, "The client address and trusted proxies"), so
    a proxy in front on the same host does not open them to everyone it serves.
    """

    allow: tuple[str, ...] = ("127.0.0.0/8", "::1")

    @classmethod
    def parse(cls, table: Table) -> InternalSettings:
        key = table.name("allow")
        items = string_list(key, table.get("allow", list(cls().allow)), "addresses or CIDR networks",
                            "address or CIDR network")
        for item in items:
            try:
                ipaddress.ip_network(item.strip())
            except ValueError as exc:
                raise ConfigError(key, f"{item!r} is not an IP address or CIDR network ({exc})") from None
        return cls(allow=items)


@dataclass(frozen=True, slots=True)
class UsageSettings:
    """Limits per account and window; 0 = unlimited. Accounts may override them."""

    window: int = 60
    flush_interval: float = 0.5
    api_calls: int = 0
    traffic: int = 0

    @classmethod
    def parse(cls, table: Table) -> UsageSettings:
        defaults = cls()
        window = table.integer("window", defaults.window, at_least=1)
        flush_interval = table.number("flush_interval", defaults.flush_interval, above=0)
        if flush_interval > window:  # counts would be exchanged less than once a window: nothing blocks
            raise ConfigError(table.name("flush_interval"),
                              f"must not be longer than {table.name('window')} ({window})")
        return cls(window=window, flush_interval=flush_interval,
                   api_calls=table.integer("api_calls", defaults.api_calls, at_least=0),
                   traffic=table.integer("traffic", defaults.traffic, at_least=0))


@dataclass(frozen=True, slots=True)
class HousekeepingSettings:
    sweep_interval: float = 5.0
    grace: float = 2.0
    recycle_bin_days: float = 30.0

    @classmethod
    def parse(cls, table: Table) -> HousekeepingSettings:
        defaults = cls()
        return cls(sweep_interval=table.number("sweep_interval", defaults.sweep_interval, above=0),
                   grace=table.number("grace", defaults.grace, at_least=0),
                   recycle_bin_days=table.number("recycle_bin_days", defaults.recycle_bin_days, at_least=0))


@dataclass(frozen=True, slots=True)
class TokenLogSettings:
    enabled: bool = True
    per_token: int = 1000
    per_account: int = 10000

    @classmethod
    def parse(cls, table: Table) -> TokenLogSettings:
        defaults = cls()
        return cls(enabled=table.flag("enabled", defaults.enabled),
                   per_token=table.integer("per_token", defaults.per_token, at_least=1),
                   per_account=table.integer("per_account", defaults.per_account, at_least=1))


@dataclass(frozen=True, slots=True)
class AclSettings:
    """How ACL uris map to paths of a non-flespi upstream (`{uri: "/api/v2/orders/{selector}/{submodule}"}`)."""

    group_uri: str = "gw/groups"
    uri_patterns: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, table: Table, platform_prefixes: tuple[str, ...]) -> AclSettings:
        group_uri = table.text("group_uri", cls().group_uri, empty=False)
        key = table.name("uri_patterns")
        patterns = table.get("uri_patterns", {})
        if not isinstance(patterns, Mapping) or not all(isinstance(k, str) for k in patterns):
            raise ConfigError(key, "must map ACL uris to path patterns")
        from gateway.policy.acl import parse_uri_patterns  # not at the top: acl -> paths -> config (Route)

        try:  # as the token compiler will, with the platform prefixes in force
            parse_uri_patterns(patterns, platform_prefixes)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from exc
        return cls(group_uri, tuple((k, str(v)) for k, v in patterns.items()))


# What flespi's clients send: the key, the acting account and the application name, and JSON bodies.
DEFAULT_CORS_HEADERS = ("Authorization", "Content-Type", "x-flespi-cid", "x-flespi-app")
HTTP_METHODS = tuple(method.value for method in HTTPMethod)


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """Preflight answers and the headers shared replies carry; whether a reply is shared is per token."""

    enabled: bool = True
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    expose_headers: tuple[str, ...] = ("Retry-After",)
    max_age: int = 600

    @classmethod
    def parse(cls, table: Table) -> CorsSettings:
        defaults = cls()
        key = table.name("allow_methods")
        methods = tuple(item.upper() for item in header_names(key, table.get("allow_methods", defaults.allow_methods)))
        for method in methods:
            if method != "*":
                one_of(key, method, HTTP_METHODS, "an HTTP method")
        return cls(
            enabled=table.flag("enabled", defaults.enabled),
            allow_methods=methods,
            allow_headers=header_names(table.name("allow_headers"), table.get("allow_headers", defaults.allow_headers)),
            expose_headers=header_names(table.name("expose_headers"),
                                        table.get("expose_headers", defaults.expose_headers)),
            max_age=table.integer("max_age", defaults.max_age, at_least=0),
        )


@dataclass(frozen=True, slots=True)
class PanelSettings:
    """The token management web panel at `<internal_prefix>panel/` (static files; no state of its own)."""

    enabled: bool = True

    @classmethod
    def parse(cls, table: Table) -> PanelSettings:
        return cls(enabled=table.flag("enabled", cls().enabled))


MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883}
MQTT_PORT = 1883
MQTT_WEBSOCKET_PATH = "/mqtt"
MQTT_MAX_PACKET = 1024 * 1024
MQTT_LARGEST = 268_435_455 + 5  # the largest remaining length MQTT can encode, with its fixed header
MQTT_CONNECT_TIMEOUT = 10.0
MQTT_CHECK_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """The MQTT broker behind the gateway: `mqtt://user:password@host:port` (`mqtts://` for TLS).

    The gateway logs in with these credentials; a client's key never goes further than the gateway.
    The password is kept out of `repr` (and so out of any message or log line).
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, key: str, value: Any) -> BrokerAddress:
        # The URL is never echoed in a message: it may carry the broker's password.
        problem = "must be an mqtt:// or mqtts:// URL with a host (mqtt://user:password@host:port)"
        if not isinstance(value, str):
            raise ConfigError(key, problem)
        try:
            url = URL(value)
            port = url.port
        except ValueError as exc:
            raise ConfigError(key, problem) from exc
        if url.scheme not in MQTT_SCHEMES or not url.host:
            raise ConfigError(key, problem)
        if url.path not in ("", "/") or url.query_string or url.fragment:
            raise ConfigError(key, "must not have a path, query or fragment")
        if url.password is not None and not url.user:
            raise ConfigError(key, "a password needs a user name")
        return cls(host=url.host, port=port or MQTT_SCHEMES[url.scheme], tls=url.scheme == "mqtts",
                   username=url.user or None, password=url.password)


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """The MQTT front (docs/mqtt.md): present only when the `mqtt` section is."""

    broker: BrokerAddress
    listen: ListenSettings = field(default_factory=lambda: ListenSettings(port=MQTT_PORT))
    websocket_path: str = MQTT_WEBSOCKET_PATH  # on the HTTP listener; "" for none
    max_packet_size: int = MQTT_MAX_PACKET  # bytes, a packet's whole size, either way
    connect_timeout: float = MQTT_CONNECT_TIMEOUT  # for the client's CONNECT, and for the broker's CONNACK
    check_interval: float = MQTT_CHECK_INTERVAL  # live sessions re-checked: expiry, usage blocks, accessed
    broker_ca_file: str | None = None  # PEM CAs for an mqtts:// broker; None: the system trust store

    def broker_tls(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.broker_ca_file) if self.broker.tls else None

    @classmethod
    def parse(cls, table: Table) -> MqttSettings:
        if table.get("broker") is None:
            raise ConfigError(table.name("broker"), "required (mqtt://user:password@host:port)")
        broker = BrokerAddress.parse(table.name("broker"), table.get("broker"))
        listen = table.section("listen", ListenSettings)
        path = table.text("websocket_path", MQTT_WEBSOCKET_PATH)
        if path and (not path.startswith("/") or not is_plain_path(path)):
            raise ConfigError(table.name("websocket_path"), 'must be a plain path that starts with / (or "" for none)')
        ca_file = table.get("broker_ca_file")
        if ca_file is not None:
            ca_certificates(table.name("broker_ca_file"), text(table.name("broker_ca_file"), ca_file, empty=False))
            if not broker.tls:
                raise ConfigError(table.name("broker_ca_file"), "needs an mqtts:// broker")
        return cls(
            broker=broker,
            listen=ListenSettings(host=listen.text("host", "127.0.0.1", empty=False),
                                  port=listen.integer("port", MQTT_PORT, at_least=0, at_most=65535)),
            websocket_path=path,
            max_packet_size=table.integer("max_packet_size", MQTT_MAX_PACKET, at_least=64, at_most=MQTT_LARGEST),
            connect_timeout=table.number("connect_timeout", MQTT_CONNECT_TIMEOUT, above=0),
            check_interval=table.number("check_interval", MQTT_CHECK_INTERVAL, above=0),
            broker_ca_file=ca_file,
        )


def parse_presets(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if value is None:
        return (("flespi", FLESPI_ORIGINS),)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, list) for k, v in value.items()):
        raise ConfigError("origin_presets", "must map preset names to lists of origins")
    problems = preset_problems(value)
    if problems:
        raise ConfigError("origin_presets", problems[0])
    presets = {"flespi": list(FLESPI_ORIGINS), **value}
    return tuple((name, tuple(str(o) for o in origins)) for name, origins in presets.items())


def master_token(value: Any) -> str | None:
    """The key itself is never put in a message."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not KEY_PATTERN.match(value):
        raise ConfigError("bootstrap_master_token", "must be 64 characters [A-Za-z0-9]")
    return value


def trusted_proxies(value: Any) -> tuple[str, ...]:
    items = string_list("trusted_proxies", value, "addresses or CIDR networks", "address or CIDR network")
    try:
        TrustedProxies.parse(items)
    except ValueError as exc:
        raise ConfigError("trusted_proxies", str(exc)) from exc
    return items


# The realm goes into `WWW-Authenticate: FlespiToken realm="..."` as is: printable ASCII, no quote.
_REALM = re.compile(r'[ !#-\[\]-~]*')


@dataclass(frozen=True, slots=True)
class Settings:
    routes: tuple[Route, ...]
    listen: ListenSettings = field(default_factory=ListenSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    housekeeping: HousekeepingSettings = field(default_factory=HousekeepingSettings)
    token_logs: TokenLogSettings = field(default_factory=TokenLogSettings)
    acl: AclSettings = field(default_factory=AclSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    panel: PanelSettings = field(default_factory=PanelSettings)
    mqtt: MqttSettings | None = None  # the MQTT front, when configured
    internal: InternalSettings = field(default_factory=InternalSettings)
    origin_presets: tuple[tuple[str, tuple[str, ...]], ...] = (("flespi", FLESPI_ORIGINS),)
    bootstrap_master_token: str | None = None
    platform_prefixes: tuple[str, ...] = ("/platform/", "/auth/")
    internal_prefix: str = "/_gateway/"
    trusted_proxies: tuple[str, ...] = ()
    realm: str = "gateway"
    workers: int = 1
    accessed_flush_interval: float = 0.1

    @classmethod
    def parse(cls, raw: Any, base: Path | None = None) -> Settings:
        """`base`: the config file's directory (None: no file; relative paths stay relative)."""
        top = Table("", raw, TOP_LEVEL_KEYS)
        defaults = cls(routes=())
        platform = top.get("platform_prefixes", list(defaults.platform_prefixes))
        platform_prefixes = tuple(
            path_prefix("platform_prefixes", item)
            for item in string_list("platform_prefixes", platform, "path prefixes", "path prefix"))
        internal_prefix = path_prefix("internal_prefix", top.get("internal_prefix", defaults.internal_prefix))
        if internal_prefix == "/":
            raise ConfigError("internal_prefix", "must not be / (it would take every path)")
        if internal_prefix in platform_prefixes:
            raise ConfigError("internal_prefix", "must differ from platform_prefixes")
        for prefix in platform_prefixes:  # one inside the other: which answers a path would be a guess
            if internal_prefix.startswith(prefix) or prefix.startswith(internal_prefix):
                raise ConfigError("internal_prefix", f"must not overlap platform_prefixes ({prefix})")
        realm = top.text("realm", defaults.realm)
        if not _REALM.fullmatch(realm):
            raise ConfigError("realm", 'must be printable ASCII without " or \\')
        settings = cls(
            routes=parse_routes(top),
            listen=ListenSettings.parse(top.section("listen", ListenSettings)),
            redis=RedisSettings.parse(top.section("redis", RedisSettings), base),
            cache=CacheSettings.parse(top.section("cache", CacheSettings)),
            proxy=ProxySettings.parse(top.section("proxy", ProxySettings)),
            limits=LimitsSettings.parse(top.section("limits", LimitsSettings)),
            log=LogSettings.parse(top.section("log", LogSettings)),
            usage=UsageSettings.parse(top.section("usage", UsageSettings)),
            housekeeping=HousekeepingSettings.parse(top.section("housekeeping", HousekeepingSettings)),
            token_logs=TokenLogSettings.parse(top.section("token_logs", TokenLogSettings)),
            acl=AclSettings.parse(top.section("acl", AclSettings), platform_prefixes),
            cors=CorsSettings.parse(top.section("cors", CorsSettings)),
            panel=PanelSettings.parse(top.section("panel", PanelSettings)),
            mqtt=None if top.get("mqtt") is None else MqttSettings.parse(top.section("mqtt", MqttSettings)),
            internal=InternalSettings.parse(top.section("internal", InternalSettings)),
            origin_presets=parse_presets(top.get("origin_presets")),
            bootstrap_master_token=master_token(top.get("bootstrap_master_token")),
            platform_prefixes=platform_prefixes,
            internal_prefix=internal_prefix,
            trusted_proxies=trusted_proxies(top.get("trusted_proxies", [])),
            realm=realm,
            workers=top.integer("workers", defaults.workers, at_least=1),
            accessed_flush_interval=top.number("accessed_flush_interval", defaults.accessed_flush_interval, above=0),
        )
        mqtt = settings.mqtt
        if mqtt is not None and mqtt.websocket_path and mqtt.websocket_path.startswith(
                (*platform_prefixes, internal_prefix)):
            raise ConfigError("mqtt.websocket_path", "must not lie under platform_prefixes or internal_prefix")
        own = (*platform_prefixes, internal_prefix)
        for route in settings.routes:
            taken = next((prefix for prefix in own if route.prefix.startswith(prefix)), None)
            if taken is not None:  # the gateway answers every path under its own prefixes itself
                raise ConfigError(f"routes.{route.prefix}", f"is never proxied: paths under {taken} are the "
                                                            "gateway's own (internal_prefix, platform_prefixes)")
        if (settings.redis.embedded and settings.log.path not in ("-", "off")
                and _same_file(settings.log.path, settings.redis.data_file)):
            raise ConfigError("log.path", "must differ from redis.data_file (the embedded store's file)")
        if settings.redis.embedded and settings.workers > 1:
            raise ConfigError("workers", "the embedded store (redis.url memory://) serves one process; "
                                         "set redis.url to share")
        return settings


def _same_file(one: str, other: str) -> bool:
    return Path(one).resolve() == Path(other).resolve()


SECTIONS = (*(each.name for each in fields(Settings) if each.default_factory is not MISSING), "mqtt")

# -- reloading (SIGHUP) ---------------------------------------------------------------------------
# What a running process cannot take over: the socket it listens on, the store connections every
# service holds, the connection limits aiohttp was built with, the paths registered in its router,
# the background writers' schedules and the process count. A reload keeps the running values of
# these (and says so); everything else applies to the requests that start after it.
RESTART_ONLY = ("listen", "redis", "limits", "usage", "housekeeping", "token_logs", "panel", "platform_prefixes",
                "internal_prefix", "workers", "accessed_flush_interval", "bootstrap_master_token", "mqtt")
# Within a reloadable section: aiohttp's relay holds one connector whose size is fixed.
RESTART_ONLY_PROXY = ("pool_size",)
# The app log's format is set on the process's handlers at start (workers inherit them).
RESTART_ONLY_LOG = ("format",)


def _changed(name: str, running: Any, loaded: Any) -> list[str]:
    """The keys under `name` whose values differ (a section's own keys, one level down)."""
    if running == loaded:
        return []
    if hasattr(running, "__dataclass_fields__") and type(running) is type(loaded):
        return [f"{name}.{each.name}" for each in fields(running)
                if getattr(running, each.name) != getattr(loaded, each.name)]
    return [name]


def reload_plan(running: Settings, loaded: Settings) -> tuple[Settings, tuple[str, ...]]:
    """The settings a reload applies: `loaded`, with the keys only a restart can change kept as
    they run; and those keys, where the file now says otherwise."""
    kept = [key for name in RESTART_ONLY for key in _changed(name, getattr(running, name), getattr(loaded, name))]
    proxy = loaded.proxy
    for name in RESTART_ONLY_PROXY:
        if getattr(proxy, name) != getattr(running.proxy, name):
            kept.append(f"proxy.{name}")
    proxy = replace(proxy, **{name: getattr(running.proxy, name) for name in RESTART_ONLY_PROXY})
    for name in RESTART_ONLY_LOG:
        if getattr(loaded.log, name) != getattr(running.log, name):
            kept.append(f"log.{name}")
    log_settings = replace(loaded.log, **{name: getattr(running.log, name) for name in RESTART_ONLY_LOG})
    effective = replace(loaded, proxy=proxy, log=log_settings,
                        **{name: getattr(running, name) for name in RESTART_ONLY})
    return effective, tuple(kept)


def reloaded_keys(running: Settings, effective: Settings) -> tuple[str, ...]:
    """The keys a reload changes (for its log line)."""
    return tuple(key for each in fields(Settings)
                 for key in _changed(each.name, getattr(running, each.name), getattr(effective, each.name)))
TOP_LEVEL_KEYS = frozenset(settable(Settings)) - {"routes"} | {"upstream", "routes"}


def build_settings(raw: Any, base: Path | None = None) -> Settings:
    """Settings from an already-read mapping (the file's content with overrides applied); `base`:
    the directory of the file it came from."""
    return Settings.parse(raw, base)


# -- reading the file and the environment -----------------------------------------------------------

class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as a configuration wants it: a repeated key is an error (PyYAML keeps the last one, so
    a second `proxy:` would silently drop the first), and only true/false are booleans (YAML 1.1
    also reads `off`, `no`, `y` as false or true: `log.path: off` must stay the string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # unhashable: PyYAML's own check reports it
                continue
            if repeated:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


_BOOL = "tag:yaml.org,2002:bool"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(content: str) -> Any:
    return yaml.load(content, Loader=_StrictLoader)


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        content = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}", "not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}", f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        loaded = parse_yaml(content)
    except DuplicateKey as exc:
        raise ConfigError(f"config file {path}", str(exc)) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"config file {path}", f"{where}not valid YAML ({exc.problem})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}", f"not valid YAML ({exc})") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}", "the top level must be a mapping")
    return loaded or {}


def load_settings(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (None: none; the environment alone), apply environment overrides, validate."""
    raw = read_file(path) if path is not None else {}
    sources = apply_env_overrides(raw, os.environ if environ is None else environ)
    if path is None and raw.get("upstream") is None and raw.get("routes") is None:
        raise ConfigError("config file", NO_CONFIG_FILE)
    try:
        return build_settings(raw, Path(path).absolute().parent if path is not None else None)
    except ConfigError as exc:
        variable = source_of(exc.key, sources)
        if variable is None:
            raise
        hint = _spelling_hint(variable, exc.problem)
        raise ConfigError(exc.key, f"unknown key{hint}" if hint else exc.problem, variable) from exc


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set the keys the environment names in `raw`; returns which variable set which key."""
    sources: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in COMMAND_LINE_VARIABLES:
            continue
        if name == MASTER_TOKEN_VARIABLE:
            path = ["bootstrap_master_token"]
        else:
            path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            continue
        key = ".".join(path)
        if key in sources and raw_value(raw, path) != _scalar(value):
            raise ConfigError(key, f"set differently by {sources[key]}", name)
        target = raw
        for part in path[:-1]:
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
                target[part] = child
            target = child
        target[path[-1]] = _scalar(value)
        sources[key] = name
    return sources


def raw_value(raw: Mapping[str, Any], path: list[str]) -> Any:
    value: Any = raw
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def source_of(key: str, sources: Mapping[str, str]) -> str | None:
    """The variable that set `key` or the section holding it."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        variable = sources.get(".".join(parts[:end]))
        if variable is not None:
            return variable
    return None


def _spelling_hint(variable: str, problem: str) -> str:
    """`GATEWAY_PROXY_CONNECT_TIMEOUT` is a likely slip for `GATEWAY_PROXY__CONNECT_TIMEOUT`."""
    if not problem.startswith("unknown key") or "__" in variable:
        return ""
    name = variable[len(ENV_PREFIX):].lower()
    for section in sorted(SECTIONS, key=len, reverse=True):
        if name.startswith(section + "_"):
            return f" (for {section}.{name[len(section) + 1:]} set {ENV_PREFIX}{section.upper()}__" \
                   f"{name[len(section) + 1:].upper()})"
    return ""


def _scalar(value: str) -> Any:
    """`5`, `1.5`, `true`, `null` keep their YAML types; lists and mappings only in flow style
    (`[a, b]`, `{k: v}`), so that `GATEWAY_REDIS__KEY_PREFIX=app:` stays the string it reads as."""
    try:
        parsed = parse_yaml(value) if value.strip() else value
    except yaml.YAMLError:
        return value
    if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")):
        return value
    return parsed
