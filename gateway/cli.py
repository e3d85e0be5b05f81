"""Command line: `gateway --config config.yaml`, `gateway --check-config` (like `nginx -t`), `gateway --version`."""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from gateway import __version__
from gateway.cli_tokens import EXIT_USAGE, add_commands, key_from, resolve_url, run_command
from gateway.config import ConfigError, ListenSettings, Settings, load_settings
from gateway.tokens import new_key

DISTRIBUTION = "flespi-token-gateway"


def default_config() -> str | None:
    explicit = os.environ.get("GATEWAY_CONFIG")
    if explicit:
        return explicit
    return "config.yaml" if Path("config.yaml").exists() else None


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="gateway", description="Token authorization gateway (flespi token model).")
    parse.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parse.add_argument("--config", "-c", default=None,
                       help="YAML config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    parse.add_argument("--check-config", "-t", action="store_true",
                       help="check the configuration as a start would (files, the listen address), then exit")
    parse.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), help="Python logging level")
    commands = parse.add_subparsers(dest="command")
    commands.add_parser("keygen", help="print a new random 64-character token key (for bootstrap_master_token)")
    migrate = commands.add_parser(
        "migrate", help="copy a store from one Redis into the Redis Cluster of the configuration (or back)",
        description="Copy every token record, index, the recycle bin, accounts and counters between one "
                    "Redis (its own key layout) and the Redis Cluster that redis.cluster configures (the "
                    "sharded layout, docs/redis.md). Safe to run again: the result is the same.")
    direction = migrate.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", metavar="URL", help="redis://... to copy into the cluster")
    direction.add_argument("--to", dest="destination", metavar="URL", help="redis://... to copy the cluster into")
    direction.add_argument("--in-place", action="store_true",
                           help="the cluster's own data as earlier builds kept it (all in the prefix's slot)")
    migrate.add_argument("--prefix", default=None,
                         help="key prefix on that Redis (default: redis.key_prefix of the configuration)")
    migrate.add_argument("--usage", action="store_true", help="copy the usage counters and blocked tokens too")
    migrate.add_argument("--logs", action="store_true", help="copy the token and account log lists too")
    migrate.add_argument("--force", action="store_true", help="copy even into a target that already holds data")
    migrate.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                         help="wait after locking the source, for the API changes under way there to land "
                              "(default 5; 0 only when no gateway serves the source)")
    add_commands(commands)
    return parse


def read_settings(path: str | None) -> Settings:
    return load_settings(path if path is not None else default_config())


class _ConfigNeeded(Exception):
    pass


def api_command(args: argparse.Namespace) -> int:
    """`gateway token|account ...`: the configuration is read only for what the options and the
    environment leave open (the listen address, the bootstrap key)."""
    loaded: list[Settings] = []

    def settings() -> Settings:
        if not loaded:
            try:
                loaded.append(read_settings(args.config))
            except ConfigError as exc:
                raise _ConfigNeeded(str(exc)) from None
        return loaded[0]
    try:
        url = resolve_url(args, os.environ, lambda: (settings().listen.host, settings().listen.port))
        key = key_from(args, os.environ, lambda: settings().bootstrap_master_token)
    except _ConfigNeeded as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_command(args, url, key)


def migrate_command(args: argparse.Namespace) -> int:
    """`gateway migrate --from URL` / `--to URL`: between one Redis and the configured cluster."""
    import redis.exceptions

    from gateway.store.migrate import MigrationRefused, migrate, one_slot_side, open_cluster_side, open_single
    from gateway.store.tokens import MIGRATION_SETTLE
    try:
        settings = read_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    cluster = settings.redis.cluster
    if cluster is None:
        print("gateway migrate: the configuration has no redis.cluster to copy into or out of", file=sys.stderr)
        return 2
    prefix = settings.redis.key_prefix
    sharded = open_cluster_side(cluster, prefix)
    single = one_slot_side(sharded) if args.in_place else open_single(args.source or args.destination,
                                                                       args.prefix or prefix)
    source, target = (sharded, single) if args.destination else (single, sharded)
    print(f"gateway migrate: from {source.name} to {target.name}")
    try:
        migrate(source, target, usage=args.usage, logs=args.logs, force=args.force,
                settle=MIGRATION_SETTLE if args.settle is None else max(0.0, args.settle))
    except MigrationRefused as exc:
        print(f"gateway migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, redis.exceptions.RedisError) as exc:
        print(f"gateway migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if single.client is not sharded.client:
            single.client.close()
        sharded.client.close()
    print("gateway migrate: done")
    return 0


def check_startup(settings: Settings) -> None:
    """What would still stop a start after the file parsed: the port, the embedded store's file."""
    check_listen(settings.listen, reuse_port=settings.workers > 1)
    if settings.mqtt is not None:
        try:
            check_listen(settings.mqtt.listen, reuse_port=settings.workers > 1)
        except ConfigError as exc:  # bind_listen names the HTTP section's keys
            raise ConfigError(f"mqtt.{exc.key}", exc.problem) from exc
    if settings.redis.embedded:
        from gateway.store.embedded import check_files  # fakeredis: imported only when it is used

        check_snapshot(settings.redis.data_file)
        check_files(settings.redis.data_file)


def check_listen(listen: ListenSettings, reuse_port: bool) -> None:
    """Bind the listen address the way the server will (every address the host resolves to,
    SO_REUSEADDR, SO_REUSEPORT with workers), then let it go. So a port held by another process is
    refused unless the kernel would let the workers share it (it is held through SO_REUSEPORT by
    the same user, as a running gateway with workers is)."""
    from gateway.server import bind_listen

    for sock in bind_listen(listen, reuse_port):
        sock.close()


def check_snapshot(data_file: str) -> None:
    """The embedded store loads its snapshot at start; one it cannot read stops the start."""
    path = Path(data_file)
    if not path.exists():
        return
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError("redis.data_file", f"{data_file!r} is not a snapshot of the embedded store "
                                             f"({getattr(exc, 'strerror', None) or exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError("redis.data_file", f"{data_file!r} is not a snapshot of the embedded store")


class JsonFormatter(logging.Formatter):
    """`log.format: json`: one JSON object a line, as the request log is, so one collector reads both."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {"timestamp": record.created, "level": record.levelname, "logger": record.name,
                                   "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def use_log_format(format_name: str) -> None:
    if format_name == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "keygen":
        print(new_key())
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("token", "account"):
        return api_command(args)
    if args.command == "migrate":
        return migrate_command(args)
    try:
        settings = read_settings(args.config)
        if args.command != "token":  # a start, or its rehearsal
            check_startup(settings)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    use_log_format(settings.log.format)
    if args.check_config:
        print(f"gateway: configuration {args.config or default_config() or '(environment)'} is valid")
        return 0
    from gateway.server import run

    try:
        return run(settings, args.config or default_config())
    except ConfigError as exc:  # what changed since the check (a port taken meanwhile), or the store's lock
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
