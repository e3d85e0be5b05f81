"""`gateway token ...` and `gateway account ...`: the platform API of a running gateway, from a shell.

The gateway is `--url`, else `$GATEWAY_URL` (the CLI's own variable, not a configuration
override), else the configuration's listen address; the key is `--token`, else
`$GATEWAY_MASTER_TOKEN`, else the configuration's `bootstrap_master_token`. Replies are printed as
tables, or as the API's JSON with `--json`. Exit status: 0 done, 1 the API refused (its reasons on
stderr), 2 bad usage or configuration, 3 the gateway could not be reached.
"""
from __future__ import annotations

import argparse
import calendar
import datetime
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.api.templates import TEMPLATES

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
TYPE_NAMES = {"standard": 0, "master": 1, "acl": 2, "noapi": 3}
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
TOKEN_COLUMNS = ("id", "info", "type", "enabled", "expire", "ttl", "accessed", "cid")
ACCOUNT_COLUMNS = ("id", "name", "cid", "limits", "metadata")
TIMEOUT = 30.0


class UsageError(Exception):
    """A bad command line value the parser could not catch itself (exit 2)."""


# -- values of options --------------------------------------------------------------------------

def duration(text: str) -> int:
    """`90`, `45s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    match = re.fullmatch(r"(\d{1,12})([smhdw]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 30m, 12h, 7d, 2w)")
    return int(match.group(1)) * UNITS[match.group(2) or "s"]


def expire_time(text: str, now: Callable[[], float] = time.time) -> int:
    """`1798761600` (UNIX time), `2027-01-01` or `2027-01-01T12:00:00` (UTC), `+30d` (from now), `0` (none)."""
    text = text.strip()
    if re.fullmatch(r"\d{1,12}", text):
        return int(text)
    if text.startswith("+"):
        return int(now()) + duration(text[1:])
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use a UNIX time, 2027-01-01, 2027-01-01T12:00 or +30d)") from None
    if moment.tzinfo is not None:
        return int(moment.timestamp())
    return calendar.timegm(moment.timetuple())


def token_type(text: str) -> int:
    if text.lower() in TYPE_NAMES:
        return TYPE_NAMES[text.lower()]
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise argparse.ArgumentTypeError(f"not a token type: {text!r} (0 standard, 1 master, 2 acl, 3 noapi)")


def json_value(text: str) -> Any:
    """JSON given inline, or `@file` to read it from a file (`@-`: standard input)."""
    if text.startswith("@"):
        try:
            text = sys.stdin.read() if text == "@-" else Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None


def json_object(text: str) -> dict[str, Any]:
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def origins_value(text: str) -> Any:
    """`*`, a comma-separated list of patterns, or JSON (a list, with `{"preset": ...}` items)."""
    stripped = text.strip()
    if stripped.startswith(("[", "{", '"', "@")):
        return json_value(stripped)
    if stripped == "*":
        return "*"
    return [item.strip() for item in stripped.split(",") if item.strip()]


# -- the command line ---------------------------------------------------------------------------

def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the gateway (default: $GATEWAY_URL, else the config's listen address)")
    parser.add_argument("--token", help="master key (default: $GATEWAY_MASTER_TOKEN, else bootstrap_master_token)")
    parser.add_argument("--cid", type=int, help="act as this subaccount (x-flespi-cid)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON reply")


def _token_fields(parser: argparse.ArgumentParser, creating: bool) -> None:
    parser.add_argument("--type", type=token_type, help="0/standard, 1/master, 2/acl (with --acl), 3/noapi")
    parser.add_argument("--acl", type=json_value, help="ACL entries as JSON, or @file")
    parser.add_argument("--template", choices=sorted(TEMPLATES), help="a named sharing recipe (needs --item)")
    parser.add_argument("--item", type=int, help="the item (device) id the template is for")
    parser.add_argument("--ttl", type=duration, help="sliding validity after last use, e.g. 3600, 12h, 7d")
    parser.add_argument("--expire", type=expire_time, help="valid until: UNIX time, 2027-01-01 (UTC) or +30d")
    parser.add_argument("--info", default="" if creating else None, help="description")
    parser.add_argument("--ips", help="allowed client addresses: '10.0.0.*, 2001:db8::/32' ('' any)")
    parser.add_argument("--origins", type=origins_value,
                        help="allowed origins: '*', 'https://a.com,https://*.b.com' or JSON")
    parser.add_argument("--metadata", type=json_object, help="JSON object of string values, or @file")
    if creating:
        parser.add_argument("--disabled", action="store_true", help="create it disabled")
    else:
        state = parser.add_mutually_exclusive_group()
        state.add_argument("--enable", dest="enabled", action="store_const", const=True, help="enable it")
        state.add_argument("--disable", dest="enabled", action="store_const", const=False, help="disable it")


def add_commands(commands: Any) -> None:
    token = commands.add_parser("token", help="manage tokens through a running gateway")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "list tokens (default selector: all)"), ("get", "show tokens")):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("selector", nargs="?" if name == "list" else None, default="all",
                            help="all, ids 1,2, field=pattern, {expression}, with an optional ,cid=N")
        parser.add_argument("--fields", help="only these fields, e.g. id,info")
        _connection_options(parser)
    create = actions.add_parser("create", help="create a token")
    _token_fields(create, creating=True)
    _connection_options(create)
    update = actions.add_parser("update", help="change fields of the selected tokens")
    update.add_argument("selector")
    _token_fields(update, creating=False)
    _connection_options(update)
    for name, text in (("enable", "enable tokens"), ("disable", "disable tokens"),
                       ("delete", "delete tokens (into the recycle bin)"),
                       ("restore", "restore tokens from the recycle bin")):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("selector")
        _connection_options(parser)
    rotate = actions.add_parser("rotate", help="give tokens new keys (ids, fields and logs stay)")
    rotate.add_argument("selector")
    rotate.add_argument("--grace", type=duration, default=0, help="the old key keeps working this long, e.g. 1h")
    _connection_options(rotate)
    logs = actions.add_parser("logs", help="the tokens' recent log records")
    logs.add_argument("selector")
    logs.add_argument("--count", type=int, help="the newest N records only")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new records, like tail -f")
    logs.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    _connection_options(logs)

    account = commands.add_parser("account", help="manage subaccounts through a running gateway")
    verbs = account.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = verbs.add_parser("list", help="list subaccounts (default selector: all)")
    listing.add_argument("selector", nargs="?", default="all")
    _connection_options(listing)
    made = verbs.add_parser("create", help="create a subaccount")
    made.add_argument("--name", required=True)
    made.add_argument("--limits", type=json_object, help='{"api_calls": N, "traffic": BYTES} per usage window')
    made.add_argument("--metadata", type=json_object, help="JSON object of string values, or @file")
    _connection_options(made)
    changed = verbs.add_parser("update", help="change subaccounts")
    changed.add_argument("selector")
    changed.add_argument("--name")
    changed.add_argument("--limits", type=json_object, help='{"api_calls": N, "traffic": BYTES}; null = default')
    changed.add_argument("--metadata", type=json_object)
    _connection_options(changed)
    gone = verbs.add_parser("delete", help="delete subaccounts with their subaccounts and tokens")
    gone.add_argument("selector")
    _connection_options(gone)


# -- talking to the gateway ---------------------------------------------------------------------

class Refused(Exception):
    def __init__(self, status: int, errors: list[dict[str, Any]]) -> None:
        super().__init__(status)
        self.status = status
        self.errors = errors


class Unreachable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Client:
    base_url: str
    key: str
    cid: int | None = None

    def call(self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None) -> list[Any]:
        url = self.base_url.rstrip("/") + urllib.parse.quote(path, safe="/,=*?{}!&|<>()'\":.@+-_~")
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"FlespiToken {self.key}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.cid is not None:
            headers["x-flespi-cid"] = str(self.cid)
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                reply = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise Refused(exc.code, _errors_of(exc.read(), exc.code)) from None
        except (OSError, ValueError) as exc:
            raise Unreachable(f"cannot reach {self.base_url}: {getattr(exc, 'reason', exc)}") from None
        result = reply.get("result") if isinstance(reply, dict) else None
        return result if isinstance(result, list) else []


def _errors_of(raw: bytes, status: int) -> list[dict[str, Any]]:
    try:
        body = json.loads(raw)
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors:
            return [error for error in errors if isinstance(error, dict)]
    except ValueError:
        pass
    return [{"code": status, "reason": raw.decode(errors="replace")[:200] or f"HTTP {status}"}]


# -- the commands -------------------------------------------------------------------------------

def token_body(args: argparse.Namespace, creating: bool) -> dict[str, Any]:
    """The token object the options describe (only what was given, for an update)."""
    body: dict[str, Any] = {}
    if args.template:
        if args.item is None:
            raise UsageError("--template needs --item")
        if args.type is not None or args.acl is not None:
            raise UsageError("give either --template or --type/--acl")
        body["template"] = {"name": args.template, "item": args.item}
    elif args.item is not None:
        raise UsageError("--item goes with --template")
    elif args.acl is not None:
        if args.type not in (None, 2):
            raise UsageError("--acl is for ACL tokens (--type 2)")
        body["access"] = {"type": 2, "acl": args.acl}
    elif args.type is not None:
        body["access"] = {"type": args.type}
    elif creating:
        body["access"] = {"type": 0}
    for name in ("info", "ttl", "expire", "ips", "origins", "metadata"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if creating and args.disabled:
        body["enabled"] = False
    if not creating and args.enabled is not None:
        body["enabled"] = args.enabled
    return body


def run_token(args: argparse.Namespace, client: Client) -> list[Any]:
    selector = getattr(args, "selector", None)
    if args.action in ("list", "get"):
        query = {"fields": args.fields} if args.fields else None
        return client.call("GET", f"/platform/tokens/{selector}", query=query)
    if args.action == "create":
        return client.call("POST", "/platform/tokens", token_body(args, creating=True))
    if args.action == "update":
        body = token_body(args, creating=False)
        if not body:
            raise UsageError("nothing to change: give at least one field option")
        return client.call("PUT", f"/platform/tokens/{selector}", body)
    if args.action in ("enable", "disable"):
        return client.call("PUT", f"/platform/tokens/{selector}", {"enabled": args.action == "enable"})
    if args.action == "delete":
        return client.call("DELETE", f"/platform/tokens/{selector}")
    if args.action == "restore":
        return client.call("POST", f"/platform/recycle-bin/tokens/{selector}/restore")
    if args.action == "rotate":
        return client.call("POST", f"/platform/tokens/{selector}/rotate", {"grace": args.grace})
    raise UsageError(f"unknown action {args.action}")


def run_account(args: argparse.Namespace, client: Client) -> list[Any]:
    if args.action == "list":
        return client.call("GET", f"/platform/subaccounts/{args.selector}")
    if args.action == "delete":
        return client.call("DELETE", f"/platform/subaccounts/{args.selector}")
    body = {name: getattr(args, name) for name in ("name", "limits", "metadata") if getattr(args, name) is not None}
    if args.action == "create":
        return client.call("POST", "/platform/subaccounts", body)
    if not body:
        raise UsageError("nothing to change: give --name, --limits or --metadata")
    return client.call("PUT", f"/platform/subaccounts/{args.selector}", body)


def follow_logs(args: argparse.Namespace, client: Client, out: Any) -> int:
    """Print the tokens' log records, then (with --follow) the new ones as they come."""
    data: dict[str, Any] = {}
    if args.count:
        data["count"] = args.count
    printed: set[str] = set()
    since: float | None = None
    while True:
        query = {"data": json.dumps({**data, "from": since} if since is not None else data)}
        records = client.call("GET", f"/platform/tokens/{args.selector}/logs", query=query)
        for record in records:
            line = json.dumps(record, sort_keys=True)
            if line in printed:
                continue  # the poll starts at the newest time already seen, which it repeats
            printed.add(line)
            out.write((line if args.json else log_line(record)) + "\n")
            stamp = record.get("timestamp")
            if isinstance(stamp, (int, float)):
                since = max(since or 0.0, float(stamp))
        out.flush()
        if not args.follow:
            return 0
        data.pop("count", None)
        time.sleep(max(0.1, args.interval))


def log_line(record: Mapping[str, Any]) -> str:
    stamp = record.get("timestamp")
    when = (datetime.datetime.fromtimestamp(float(stamp), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            if isinstance(stamp, (int, float)) else "-")
    code = record.get("event_code")
    what = (f"{record.get('method', '')} {record.get('uri', '')} {record.get('status', '')} {record.get('host', '')}"
            if code == 1000 else str(record.get("reason", "")))
    return f"{when}  token {record.get('token_id')}  event {code}  {what}".rstrip()


# -- printing -----------------------------------------------------------------------------------

def cell(name: str, value: Any) -> str:
    if name == "type" and isinstance(value, int):
        return {0: "standard", 1: "master", 2: "acl", 3: "noapi"}.get(value, str(value))
    if name in ("expire", "accessed", "created", "deleted") and isinstance(value, int):
        return "-" if value == 0 else datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    shown = [name for name in columns if any(name in row for row in rows)] or list(rows[0])
    cells = [[cell(name, row.get(name)) for name in shown] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, name in enumerate(shown)]
    lines = ["  ".join(name.upper().ljust(width) for name, width in zip(shown, widths, strict=False)).rstrip()]
    lines += ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=False)).rstrip()
              for line in cells]
    return "\n".join(lines)


def token_rows(result: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for item in result:
        row = dict(item)
        if isinstance(row.get("access"), dict):
            row["type"] = row["access"].get("type")
        rows.append(row)
    return rows


def show(args: argparse.Namespace, result: list[Any], out: Any) -> None:
    if args.json:
        out.write(json.dumps({"result": result}, indent=2) + "\n")
        return
    if args.command == "account":
        out.write(table(result, ACCOUNT_COLUMNS) + "\n")
        return
    if args.action in ("delete",):
        out.write(f"deleted: {', '.join(str(item.get('id')) for item in result) or '(none)'}\n")
        return
    columns = TOKEN_COLUMNS + (("key",) if args.action in ("create", "rotate") else ())
    out.write(table(token_rows(result), columns) + "\n")
    if args.action in ("create", "rotate") and result:
        out.write("the key is shown only now: keep it\n")


# -- entry --------------------------------------------------------------------------------------

def resolve_url(args: argparse.Namespace, environ: Mapping[str, str], listen: Callable[[], tuple[str, int]]) -> str:
    if args.url:
        return str(args.url)
    if environ.get("GATEWAY_URL"):
        return environ["GATEWAY_URL"]
    host, port = listen()
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_command(args: argparse.Namespace, url: str, key: str | None, out: Any = None, err: Any = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if not key:
        print("gateway: no master key: give --token or set GATEWAY_MASTER_TOKEN", file=err)
        return EXIT_USAGE
    client = Client(url, key, args.cid)
    try:
        if args.command == "token" and args.action == "logs":
            return follow_logs(args, client, out)
        result = run_token(args, client) if args.command == "token" else run_account(args, client)
    except UsageError as exc:
        print(f"gateway: {exc}", file=err)
        return EXIT_USAGE
    except Refused as refused:
        for error in refused.errors:
            where = f" {error['field']}" if error.get("field") else ""
            index = f" (item {error['index']})" if "index" in error else ""
            print(f"gateway: {error.get('code', refused.status)}{where}{index}: {error.get('reason', '')}", file=err)
        return EXIT_REFUSED
    except Unreachable as exc:
        print(f"gateway: {exc}", file=err)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 0
    show(args, result, out)
    return 0


def master_key_from(environ: Mapping[str, str], configured: str | None) -> str | None:
    return environ.get("GATEWAY_MASTER_TOKEN") or configured


def key_from(args: argparse.Namespace, environ: Mapping[str, str], configured: Callable[[], str | None]) -> str | None:
    return args.token or master_key_from(environ, None) or configured()
