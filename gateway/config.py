"""Configuration: read once from YAML plus environment overrides into frozen dataclasses.

Environment overrides: `GATEWAY_<SECTION>__<KEY>=value` sets `section.key` (double underscore
between levels, case-insensitive), e.g. `GATEWAY_LISTEN__PORT=9000`, `GATEWAY_REDIS__URL=redis://h:6379/0`,
`GATEWAY_UPSTREAM=http://127.0.0.1:3000`. Values are parsed as YAML scalars (so `true`, `5`, `1.5`
keep their types). `GATEWAY_MASTER_TOKEN` is an alias of `bootstrap_master_token`.
"""
from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

ENV_PREFIX = "GATEWAY_"
# Variables of the command line, not configuration keys (`GATEWAY_URL`: where `gateway token` calls).
NOT_OVERRIDES = frozenset({"GATEWAY_CONFIG", "GATEWAY_URL", "GATEWAY_LOG_LEVEL"})
KEY_PATTERN = re.compile(r"^[A-Za-z0-9]{64}$")


# flespi's own web applications, for `{"preset": "flespi"}` (override in `origin_presets`).
FLESPI_ORIGINS = ("https://flespi.io", "https://*.flespi.io", "https://flespi.com", "https://*.flespi.com")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8080


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


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "memory://"
    key_prefix: str = "{gw}:"
    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    data_file: str = "gateway-data.json"

    @property
    def embedded(self) -> bool:
        return self.url.startswith("memory://")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_age: float = 30.0
    refresh_after: float = 0.0  # 0: a third of max_age
    max_entries: int = 200_000  # about 0.65 KB each (bench/cache_cost.py): ~130 MB
    negative_ttl: float = 5.0
    revalidate_after: float = 0.5

    @property
    def refresh_interval(self) -> float:
        return self.refresh_after or self.max_age / 3


@dataclass(frozen=True, slots=True)
class ProxySettings:
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 0
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


@dataclass(frozen=True, slots=True)
class LogSettings:
    path: str = "-"
    queue_size: int = 100_000
    flush_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class UsageSettings:
    """Limits per account and window; 0 = unlimited. Accounts may override them."""

    window: int = 60
    flush_interval: float = 0.5
    api_calls: int = 0
    traffic: int = 0


@dataclass(frozen=True, slots=True)
class HousekeepingSettings:
    sweep_interval: float = 5.0
    grace: float = 2.0
    recycle_bin_days: float = 30.0


@dataclass(frozen=True, slots=True)
class TokenLogSettings:
    enabled: bool = True
    per_token: int = 1000
    per_account: int = 10000


@dataclass(frozen=True, slots=True)
class AclSettings:
    """How ACL uris map to paths of a non-flespi upstream (`{uri: "/api/v2/orders/{selector}/{submodule}"}`)."""

    group_uri: str = "gw/groups"
    uri_patterns: tuple[tuple[str, str], ...] = ()


# What flespi's clients send: the key, the acting account and the application name, and JSON bodies.
DEFAULT_CORS_HEADERS = ("Authorization", "Content-Type", "x-flespi-cid", "x-flespi-app")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """Preflight answers and the headers shared replies carry; whether a reply is shared is per token."""

    enabled: bool = True
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = DEFAULT_CORS_HEADERS
    expose_headers: tuple[str, ...] = ("Retry-After",)
    max_age: int = 600


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
    origin_presets: tuple[tuple[str, tuple[str, ...]], ...] = (("flespi", FLESPI_ORIGINS),)
    bootstrap_master_token: str | None = None
    platform_prefixes: tuple[str, ...] = ("/platform/", "/auth/")
    internal_prefix: str = "/_gateway/"
    trusted_proxies: tuple[str, ...] = ()
    realm: str = "gateway"
    workers: int = 1
    accessed_flush_interval: float = 0.1


def load_settings(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply environment overrides, validate, build Settings."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        raw = loaded or {}
    apply_env_overrides(raw, os.environ if environ is None else environ)
    return build_settings(raw)


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if name == "GATEWAY_MASTER_TOKEN":
            raw["bootstrap_master_token"] = value
            continue
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            continue
        target = raw
        for part in path[:-1]:
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
                target[part] = child
            target = child
        target[path[-1]] = _scalar(value)


def _scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


KNOWN_TOP = {
    "listen", "upstream", "routes", "redis", "cache", "proxy", "log", "bootstrap_master_token",
    "platform_prefixes", "internal_prefix", "trusted_proxies", "realm", "workers",
    "accessed_flush_interval", "usage", "housekeeping", "token_logs", "acl", "origin_presets", "cors", "limits",
}


def build_settings(raw: Mapping[str, Any]) -> Settings:
    unknown = sorted(set(raw) - KNOWN_TOP)
    if unknown:
        raise ConfigError(f"unknown config key: {unknown[0]}")
    settings = Settings(
        routes=_routes(raw),
        listen=_section(ListenSettings, raw, "listen"),
        redis=_section(RedisSettings, raw, "redis"),
        cache=_section(CacheSettings, raw, "cache"),
        proxy=_section(ProxySettings, raw, "proxy"),
        limits=_section(LimitsSettings, raw, "limits"),
        log=_section(LogSettings, raw, "log"),
        usage=_section(UsageSettings, raw, "usage"),
        housekeeping=_section(HousekeepingSettings, raw, "housekeeping"),
        token_logs=_section(TokenLogSettings, raw, "token_logs"),
        acl=_acl(raw.get("acl")),
        cors=_cors(raw.get("cors")),
        origin_presets=_presets(raw.get("origin_presets")),
        bootstrap_master_token=_master_token(raw.get("bootstrap_master_token")),
        platform_prefixes=_prefixes(raw.get("platform_prefixes", ["/platform/", "/auth/"])),
        internal_prefix=_prefix("internal_prefix", raw.get("internal_prefix", "/_gateway/")),
        trusted_proxies=_trusted(raw.get("trusted_proxies", [])),
        realm=_typed("realm", raw.get("realm", "gateway"), str),
        workers=_positive_int("workers", raw.get("workers", 1)),
        accessed_flush_interval=_positive_float("accessed_flush_interval", raw.get("accessed_flush_interval", 0.1)),
    )
    _validate(settings)
    return settings


def _acl(value: Any) -> AclSettings:
    from .acl import parse_uri_patterns

    if value is None:
        return AclSettings()
    if not isinstance(value, dict) or set(value) - {"group_uri", "uri_patterns"}:
        raise ConfigError("acl: must be a mapping with group_uri and/or uri_patterns")
    group_uri = _typed("acl.group_uri", value.get("group_uri", "gw/groups"), str)
    patterns = value.get("uri_patterns") or {}
    if not isinstance(patterns, dict):
        raise ConfigError("acl.uri_patterns: must map ACL uris to path patterns")
    try:
        parse_uri_patterns(patterns)
    except ValueError as exc:
        raise ConfigError(f"acl.uri_patterns: {exc}") from exc
    return AclSettings(group_uri, tuple((str(k), str(v)) for k, v in patterns.items()))


def _cors(value: Any) -> CorsSettings:
    if value is None:
        return CorsSettings()
    if not isinstance(value, dict):
        raise ConfigError("cors: must be a mapping")
    unknown = sorted(set(value) - set(CorsSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown config key: cors.{unknown[0]}")
    defaults = CorsSettings()
    max_age = _typed("cors.max_age", value.get("max_age", defaults.max_age), int)
    if max_age < 0:
        raise ConfigError("cors.max_age: must be 0 or more seconds")
    methods = _names("cors.allow_methods", value.get("allow_methods", defaults.allow_methods))
    return CorsSettings(
        enabled=_typed("cors.enabled", value.get("enabled", defaults.enabled), bool),
        allow_methods=tuple(method.upper() for method in methods),
        allow_headers=_names("cors.allow_headers", value.get("allow_headers", defaults.allow_headers)),
        expose_headers=_names("cors.expose_headers", value.get("expose_headers", defaults.expose_headers)),
        max_age=max_age,
    )


def _names(key: str, value: Any) -> tuple[str, ...]:
    """Header or method names (both RFC 9110 tokens); `*` alone stands for any."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: must be a list of names")
    for item in value:
        if not isinstance(item, str) or not _HEADER_NAME.fullmatch(item):
            raise ConfigError(f"{key}: {item!r} is not a valid name")
    if "*" in value and len(value) > 1:
        raise ConfigError(f"{key}: '*' (any) must be the only item")
    return tuple(value)


def _presets(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    from .origins import preset_problems

    if value is None:
        return (("flespi", FLESPI_ORIGINS),)
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        raise ConfigError("origin_presets: must map preset names to lists of origins")
    problems = preset_problems(value)
    if problems:
        raise ConfigError(f"origin_presets: {problems[0]}")
    presets = {"flespi": list(FLESPI_ORIGINS), **value}
    return tuple((str(name), tuple(str(o) for o in origins)) for name, origins in presets.items())


def _section(cls: type[Any], raw: Mapping[str, Any], name: str) -> Any:
    values = raw.get(name, {})
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: must be a mapping")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in cls.__dataclass_fields__:
            raise ConfigError(f"unknown config key: {name}.{key}")
        kwargs[key] = _cast(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**kwargs)


def _cast(key: str, value: Any, default: Any) -> Any:
    if default is None:  # an optional path: absent or null means none
        return None if value is None else _typed(key, value, str)
    if isinstance(default, bool):
        return _typed(key, value, bool)
    if isinstance(default, int):
        return _typed(key, value, int)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number")
        return float(value)
    return _typed(key, value, type(default))


def _typed(key: str, value: Any, kind: type[Any]) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{key}: must be of type {kind.__name__}")
    return value


def _positive_int(key: str, value: Any) -> int:
    number: int = _typed(key, value, int)
    if number < 1:
        raise ConfigError(f"{key}: must be at least 1")
    return number


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number")
    return float(value)


def _upstream_url(key: str, value: Any) -> URL:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be an http:// or https:// URL")
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{key}: must be an http:// or https:// URL, got {value!r}")
    if url.query_string or url.fragment:
        raise ConfigError(f"{key}: must not have a query or fragment")
    return url


def _routes(raw: Mapping[str, Any]) -> tuple[Route, ...]:
    upstream, routes = raw.get("upstream"), raw.get("routes")
    if upstream is None and routes is None:
        raise ConfigError("upstream: required (or routes)")
    table: list[Route] = []
    if upstream is not None:
        table.append(Route("/", _upstream_url("upstream", upstream)))
    if routes is not None:
        if not isinstance(routes, dict) or not routes:
            raise ConfigError("routes: must be a non-empty mapping of path prefix to upstream URL")
        for prefix, url in routes.items():
            key = f"routes.{prefix}"
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                raise ConfigError(f"{key}: a route prefix must start with /")
            if any(route.prefix == prefix for route in table):
                raise ConfigError(f"{key}: duplicate route prefix")
            table.append(Route(prefix, _upstream_url(key, url)))
    table.sort(key=lambda route: len(route.prefix), reverse=True)
    return tuple(table)


def _master_token(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not KEY_PATTERN.match(value):
        raise ConfigError("bootstrap_master_token: must be 64 characters [A-Za-z0-9]")
    return value


def _prefix(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.endswith("/"):
        raise ConfigError(f"{key}: must be a path that starts and ends with /")
    return value


def _prefixes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("platform_prefixes: must be a list of path prefixes")
    return tuple(_prefix("platform_prefixes", item) for item in value)


def _trusted(value: Any) -> tuple[str, ...]:
    from .clientaddr import TrustedProxies

    if not isinstance(value, list):
        raise ConfigError("trusted_proxies: must be a list of addresses or CIDR networks")
    try:
        TrustedProxies.parse([str(item) for item in value])
    except ValueError as exc:
        raise ConfigError(f"trusted_proxies: {exc}") from exc
    return tuple(str(item) for item in value)


def _validate(settings: Settings) -> None:
    if not 0 <= settings.listen.port <= 65535:
        raise ConfigError("listen.port: must be 0..65535")
    url = settings.redis.url
    if not url.startswith(("memory://", "redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url: must start with memory://, redis://, rediss:// or unix://")
    if settings.redis.embedded and settings.workers > 1:
        raise ConfigError("workers: the embedded store (redis.url memory://) serves one process; set redis.url to share")
    cache = settings.cache
    if cache.max_age <= 0:
        raise ConfigError("cache.max_age: must be positive")
    if cache.refresh_after < 0 or cache.refresh_after > cache.max_age:
        raise ConfigError("cache.refresh_after: must be between 0 (a third of max_age) and cache.max_age")
    if cache.max_entries < 1:
        raise ConfigError("cache.max_entries: must be at least 1")
    if settings.usage.window < 1 or settings.usage.flush_interval <= 0:
        raise ConfigError("usage.window: must be at least 1 second (and usage.flush_interval positive)")
    if settings.usage.api_calls < 0 or settings.usage.traffic < 0:
        raise ConfigError("usage.api_calls: limits must be 0 (unlimited) or positive")
    if settings.housekeeping.sweep_interval <= 0 or settings.housekeeping.grace < 0:
        raise ConfigError("housekeeping.sweep_interval: must be positive")
    if settings.token_logs.per_token < 1 or settings.token_logs.per_account < 1:
        raise ConfigError("token_logs.per_token: caps must be at least 1")
    if settings.log.queue_size < 1:
        raise ConfigError("log.queue_size: must be at least 1")
    for header in ("token_id_header", "account_id_header", "request_id_header"):
        if not re.fullmatch(r"[A-Za-z0-9-]+", getattr(settings.proxy, header)):
            raise ConfigError(f"proxy.{header}: must be a header name")
    _validate_limits(settings.limits)
    if settings.proxy.pool_timeout <= 0:
        raise ConfigError("proxy.pool_timeout: must be a positive number of seconds")
    if settings.proxy.ca_file is not None:
        _check_ca_file(settings.proxy, settings.proxy.ca_file)
    if settings.internal_prefix in settings.platform_prefixes:
        raise ConfigError("internal_prefix: must differ from platform_prefixes")


def _validate_limits(limits: LimitsSettings) -> None:
    for name in ("max_request_line", "max_header_size", "max_head_size", "max_headers", "api_body_size",
                 "max_connections"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name}: must be at least 1")
    if limits.max_body_size < 0:
        raise ConfigError("limits.max_body_size: must be 0 (unlimited) or a size in bytes")
    for name in ("header_timeout", "keepalive_timeout", "send_timeout"):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"limits.{name}: must be a positive number of seconds")
    if limits.max_head_size < limits.max_header_size:
        raise ConfigError("limits.max_head_size: must be at least limits.max_header_size")


def _check_ca_file(proxy: ProxySettings, path: str) -> None:
    """Load the CA file once now: a bad one stops the start instead of failing every https request."""
    if not Path(path).is_file():
        raise ConfigError(f"proxy.ca_file: {path!r} is not a file")
    try:
        proxy.ssl_context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(f"proxy.ca_file: {path!r} holds no usable PEM CA certificates ({reason})") from exc
