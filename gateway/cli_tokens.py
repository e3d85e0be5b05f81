"""`gateway token create ...`: create a token through a running gateway's API."""
from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from gateway.api.templates import TEMPLATES

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> int:
    """`90`, `45s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    match = re.fullmatch(r"(\d+)([smhdw]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 30m, 12h, 7d)")
    return int(match.group(1)) * UNITS[match.group(2) or "s"]


def add_commands(commands: Any) -> None:
    token = commands.add_parser("token", help="manage tokens through a running gateway")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a token (optionally from a template)")
    create.add_argument("--template", choices=sorted(TEMPLATES), help="a named sharing recipe")
    create.add_argument("--item", type=int, help="the item (device) id the template is for")
    create.add_argument("--ttl", type=duration, help="sliding validity, e.g. 7d")
    create.add_argument("--expire", type=int, help="UNIX time until which the token is valid")
    create.add_argument("--info", default="", help="description")
    create.add_argument("--type", type=int, choices=(0, 1, 3), default=0,
                        help="without a template: 0 standard, 1 master, 3 NOAPI")
    create.add_argument("--url", help="the gateway (default: from the config's listen section)")
    create.add_argument("--cid", type=int, help="create it for this subaccount (x-flespi-cid)")


def token_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"info": args.info}
    if args.template:
        if args.item is None:
            raise SystemExit("gateway: --template needs --item")
        body["template"] = {"name": args.template, "item": args.item}
    else:
        body["access"] = {"type": args.type}
    if args.ttl:
        body["ttl"] = args.ttl
    if args.expire:
        body["expire"] = args.expire
    return body


def create_token(args: argparse.Namespace, base_url: str, master_key: str | None) -> int:
    if not master_key:
        print("gateway: set GATEWAY_MASTER_TOKEN (or bootstrap_master_token) to a master key", file=sys.stderr)
        return 2
    headers = {"Authorization": f"FlespiToken {master_key}", "Content-Type": "application/json"}
    if args.cid is not None:
        headers["x-flespi-cid"] = str(args.cid)
    request = urllib.request.Request(f"{base_url.rstrip('/')}/platform/tokens", data=orjson.dumps([token_body(args)]),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            created = orjson.loads(response.read())["result"][0]
            sys.stdout.write(orjson.dumps(created, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"gateway: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway: cannot reach {base_url}: {exc}", file=sys.stderr)
        return 1


def master_key_from(environ: os._Environ[str], configured: str | None) -> str | None:
    return environ.get("GATEWAY_MASTER_TOKEN") or configured
