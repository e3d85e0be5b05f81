"""Command line: `gateway --config config.yaml`, `gateway --check-config` (like `nginx -t`)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, Settings, load_settings
from .cli_tokens import EXIT_USAGE, add_commands, key_from, resolve_url, run_command
from .tokens import new_key


def default_config() -> str | None:
    explicit = os.environ.get("GATEWAY_CONFIG")
    if explicit:
        return explicit
    return "config.yaml" if Path("config.yaml").exists() else None


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="gateway", description="Token authorization gateway (flespi token model).")
    parse.add_argument("--config", "-c", default=None, help="YAML config file (default: $GATEWAY_CONFIG or ./config.yaml)")
    parse.add_argument("--check-config", "-t", action="store_true", help="only check the configuration, then exit")
    parse.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), help="Python logging level")
    commands = parse.add_subparsers(dest="command")
    commands.add_parser("keygen", help="print a new random 64-character token key (for bootstrap_master_token)")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "keygen":
        print(new_key())
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("token", "account"):
        return api_command(args)
    try:
        settings = read_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"gateway: configuration {args.config or default_config() or '(environment)'} is valid")
        return 0
    from .server import run

    return run(settings)
