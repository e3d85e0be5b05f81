"""The platform API (docs/api.md), served by the gateway itself.

Paths (all under the acting account: the token's own, or `x-flespi-cid` when it names a
subaccount of it):

- `/platform/tokens[/{selector}]`            GET, POST (no selector), PUT, DELETE (to the recycle bin)
- `/platform/tokens/{selector}/logs`         GET, `data={"from":..,"to":..,"count":..}`
- `/platform/logs`                           GET, `data={"from":..,"to":..,"count":..,"token_id":..}`
- `/platform/recycle-bin/tokens[/{selector}]` GET, DELETE (purge now)
- `/platform/recycle-bin/tokens/{selector}/restore`  POST: back under the old id and key
- `/platform/subaccounts[/{selector}]`       GET, POST, PUT, DELETE (with descendants and tokens)
- `/auth/info`                               GET, any usable token: its own record
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.store.accounts import ROOT_ACCOUNT, AccountDirectory, AccountStore
from gateway.errors import Denied, FieldProblem, InvalidInput
from gateway.writers.logs import LogWriter
from gateway.store.tokens import TokenStore
from gateway.api.templates import expand_template
from gateway.writers.tokenlogs import RedisLogSink, select
from gateway.tokens import PUBLIC_FIELDS, Token, TokenType, key_digest, new_key
from gateway.policy.paths import AUTH_INFO, PLATFORM
from gateway.api.validation import DEFAULTS, TokenValidator, account_problems, validity_problems

MAX_BODY = 1024 * 1024
EVENT_CREATED, EVENT_UPDATED, EVENT_DELETED = 1, 2, 3
ACCOUNT_FIELDS = ("id", "name", "cid", "limits", "metadata", "created")


@dataclass(slots=True)
class Call:
    """One API request: who makes it, as which account, on what."""

    request: web.Request
    token: Token
    cid: int
    parts: list[str]

    @property
    def method(self) -> str:
        return "GET" if self.request.method == "HEAD" else self.request.method


Handler = Callable[[Call], Awaitable[list[dict[str, Any]]]]


def public(record: dict[str, Any], fields: tuple[str, ...] = PUBLIC_FIELDS) -> dict[str, Any]:
    return {name: record.get(name) for name in fields}


def parse_selector(selector: str | None, what: str = "token") -> list[int] | None:
    """`all` (or none) -> None; `1,2,3` -> ids; anything else is a 400 naming the selector."""
    if selector is None or selector == "all":
        return None
    ids: list[int] = []
    for part in selector.split(","):
        if not part.isdigit() or not part.isascii() or int(part) < 1:
            raise InvalidInput([FieldProblem("selector", f"invalid {what} selector '{selector}': use all or ids like 1,2")])
        ids.append(int(part))
    return ids


def parse_fields(request: web.Request, known: tuple[str, ...]) -> tuple[str, ...]:
    raw = request.query.get("fields")
    if raw is None:
        return known
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise InvalidInput([FieldProblem("fields", f"unknown field in 'fields': {', '.join(unknown) or raw!r}")])
    return names


def parse_data(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """flespi's `data=` query parameter: a JSON object of options."""
    raw = request.query.get("data")
    if raw is None:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput([FieldProblem("data", "'data' must be a JSON object")]) from None
    if not isinstance(data, dict):
        raise InvalidInput([FieldProblem("data", "'data' must be a JSON object")])
    problems = [FieldProblem(f"data.{name}", f"unknown option '{name}'") for name in data if name not in allowed]
    for name in ("from", "to"):
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], (int, float))):
            problems.append(FieldProblem(f"data.{name}", f"'{name}' must be a UNIX time"))
    for name in ("count", "token_id"):
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], int) or data[name] < 1):
            problems.append(FieldProblem(f"data.{name}", f"'{name}' must be a positive integer"))
    if problems:
        raise InvalidInput(problems)
    return data


async def read_json(request: web.Request, limit: int = MAX_BODY) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise Denied(413, f"request body larger than {limit} bytes")
    body = b""
    while len(body) <= limit:  # read(n) returns what has arrived so far, not n bytes
        piece = await request.content.read(limit + 1 - len(body))
        if not piece:
            break
        body += piece
    if len(body) > limit:
        raise Denied(413, f"request body larger than {limit} bytes")
    try:
        return orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        raise InvalidInput([FieldProblem("", "request body is not valid JSON")]) from None


def items_of(body: Any) -> list[Any]:
    items = body if isinstance(body, list) else [body]
    if not items:
        raise InvalidInput([FieldProblem("", "nothing to create")])
    return items


def indexed(body: Any, problems_of: Callable[[Any], list[FieldProblem]]) -> list[FieldProblem]:
    listed = isinstance(body, list)
    return [FieldProblem(p.field, p.reason, index if listed else None)
            for index, item in enumerate(items_of(body)) for p in problems_of(item)]


def ok(result: list[dict[str, Any]]) -> web.Response:
    return web.Response(body=orjson.dumps({"result": result}), content_type="application/json")


class PlatformApi:
    def __init__(self, tokens: TokenStore, accounts: AccountStore, directory: AccountDirectory,
                 validator: TokenValidator, logs: LogWriter, token_logs: RedisLogSink | None) -> None:
        self._tokens = tokens
        self._accounts = accounts
        self._directory = directory
        self._validator = validator
        self._logs = logs
        self._token_logs = token_logs
        self.body_limit = MAX_BODY  # bytes of a request body (413 beyond); `limits.api_body_size`
        self._routes: dict[tuple[str, int, str], Handler] = {
            ("tokens", 1, "GET"): self.list_tokens, ("tokens", 1, "POST"): self.create_tokens,
            ("tokens", 2, "GET"): self.list_tokens, ("tokens", 2, "PUT"): self.update_tokens,
            ("tokens", 2, "DELETE"): self.delete_tokens, ("tokens", 3, "GET"): self.token_logs,
            ("logs", 1, "GET"): self.platform_logs,
            ("recycle-bin", 2, "GET"): self.list_bin, ("recycle-bin", 3, "GET"): self.list_bin,
            ("recycle-bin", 3, "DELETE"): self.purge_bin, ("recycle-bin", 4, "POST"): self.restore,
            ("subaccounts", 1, "GET"): self.list_accounts, ("subaccounts", 1, "POST"): self.create_accounts,
            ("subaccounts", 2, "GET"): self.list_accounts, ("subaccounts", 2, "PUT"): self.update_accounts,
            ("subaccounts", 2, "DELETE"): self.delete_accounts,
        }

    def handles(self, path: str) -> bool:
        if path == AUTH_INFO:
            return True
        parts = path[len(PLATFORM):].rstrip("/").split("/") if path.startswith(PLATFORM) else []
        return bool(parts) and parts[0] in ("tokens", "logs", "recycle-bin", "subaccounts")

    async def dispatch(self, request: web.Request, token: Token, path: str, cid: int) -> web.Response:
        """`cid`: the account the request acts for (`RequestFacts.account_of`)."""
        if path == AUTH_INFO:
            if request.method not in ("GET", "HEAD"):
                raise Denied(405, f"method {request.method} is not allowed on {path}")
            return ok([token.public_record()])
        if token.type is not TokenType.MASTER:
            raise Denied(403, f"access to {path.lstrip('/')} is denied: master token required")
        parts = path[len(PLATFORM):].rstrip("/").split("/")
        call = Call(request, token, cid, parts)
        if parts[0] == "recycle-bin" and (len(parts) < 2 or parts[1] != "tokens"
                                          or len(parts) == 4 and parts[3] != "restore"):
            raise Denied(404, f"unknown path {path}")
        if parts[0] == "tokens" and len(parts) == 3 and parts[2] != "logs":
            raise Denied(404, f"unknown path {path}")
        handler = self._routes.get((parts[0], len(parts), call.method))
        if handler is None:
            if any(key[:2] == (parts[0], len(parts)) for key in self._routes):
                raise Denied(405, f"method {request.method} is not allowed on {path}")
            raise Denied(404, f"unknown path {path}")
        return ok(await handler(call))

    # -- tokens -------------------------------------------------------------------------------

    async def _select_tokens(self, call: Call) -> list[dict[str, Any]]:
        ids = parse_selector(call.parts[1] if len(call.parts) > 1 else None)
        if ids is None:
            ids = await self._tokens.account_ids(call.cid)
        return [record for record in await self._tokens.get_many(ids) if record.get("cid", 0) == call.cid]

    async def list_tokens(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, PUBLIC_FIELDS)
        return [public(record, fields) for record in await self._select_tokens(call)]

    async def create_tokens(self, call: Call) -> list[dict[str, Any]]:
        raw = await read_json(call.request, self.body_limit)
        expanded = [expand_template(item) for item in items_of(raw)]
        body = [item for item, _ in expanded] if isinstance(raw, list) else expanded[0][0]
        problems = indexed(body, lambda item: self._validator.problems(item, partial=False))
        template_problems = [FieldProblem(p.field, p.reason, index if isinstance(raw, list) else None)
                             for index, (_, found) in enumerate(expanded) for p in found]
        if template_problems:
            raise InvalidInput(template_problems)
        if problems:
            raise InvalidInput(problems)
        items = items_of(body)
        now = int(time.time())
        created = []
        for token_id, item in zip(await self._tokens.allocate_ids(len(items)), items):
            key = new_key()
            created.append((key, {**DEFAULTS, **item, "id": token_id, "digest": key_digest(key), "created": now,
                                  "accessed": 0, "cid": call.cid}))
        records = [record for _, record in created]
        await self._tokens.insert(records)
        await self._tokens.publish(record["digest"] for record in records)
        self._log_events(EVENT_CREATED, records, call.token)
        return [{**public(record), "key": key} for key, record in created]

    async def update_tokens(self, call: Call) -> list[dict[str, Any]]:
        changes = await read_json(call.request, self.body_limit)
        problems = self._validator.problems(changes, partial=True)
        if problems:
            raise InvalidInput(problems)
        updated = [{**record, **changes} for record in await self._select_tokens(call)]
        for record in updated:
            found = validity_problems(record)
            if found:
                raise InvalidInput([FieldProblem(p.field, f"token {record['id']}: {p.reason}") for p in found])
        for record in updated:
            await self._tokens.replace(record)
        await self._tokens.publish(record["digest"] for record in updated)
        self._log_events(EVENT_UPDATED, updated, call.token)
        return [public(record) for record in updated]

    async def delete_tokens(self, call: Call) -> list[dict[str, Any]]:
        records = await self._select_tokens(call)
        await self._delete(records, call.token)
        return [{"id": record["id"]} for record in records]

    async def _delete(self, records: list[dict[str, Any]], by: Token) -> None:
        if not records:
            return
        await self._tokens.remove(records, to_bin=True)
        await self._tokens.publish(record["digest"] for record in records)
        self._log_events(EVENT_DELETED, records, by)

    def _log_events(self, code: int, records: list[dict[str, Any]], by: Token) -> None:
        now = time.time()
        for record in records:
            self._logs.emit({"timestamp": now, "event_code": code, "token_id": record["id"],
                             "cid": record.get("cid", 0), "by_token_id": by.id})

    # -- logs ---------------------------------------------------------------------------------

    def _log_reader(self) -> RedisLogSink:
        if self._token_logs is None:
            raise Denied(404, "token logs are not kept (token_logs.enabled is false)")
        return self._token_logs

    async def token_logs(self, call: Call) -> list[dict[str, Any]]:
        reader = self._log_reader()
        data = parse_data(call.request, frozenset({"from", "to", "count"}))
        ids = parse_selector(call.parts[1])
        keys = [reader.account_key(call.cid)] if ids is None else [reader.token_key(i) for i in ids]
        records = [r for r in await reader.read(keys) if int(r.get("cid") or 0) == call.cid]
        return select(records, data.get("from"), data.get("to"), None, data.get("count"))

    async def platform_logs(self, call: Call) -> list[dict[str, Any]]:
        reader = self._log_reader()
        data = parse_data(call.request, frozenset({"from", "to", "count", "token_id"}))
        records = await reader.read([reader.account_key(call.cid)])
        return select(records, data.get("from"), data.get("to"), data.get("token_id"), data.get("count"))

    # -- recycle bin --------------------------------------------------------------------------

    async def _select_binned(self, call: Call) -> list[dict[str, Any]]:
        ids = parse_selector(call.parts[2] if len(call.parts) > 2 else None)
        return [record for record in await self._tokens.binned(ids) if record.get("cid", 0) == call.cid]

    async def list_bin(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, PUBLIC_FIELDS + ("deleted",))
        return [public(record, fields) for record in await self._select_binned(call)]

    async def purge_bin(self, call: Call) -> list[dict[str, Any]]:
        records = await self._select_binned(call)
        await self._tokens.purge_bin(0, [record["id"] for record in records])
        return [{"id": record["id"]} for record in records]

    async def restore(self, call: Call) -> list[dict[str, Any]]:
        restored = []
        now = int(time.time())
        for record in await self._select_binned(call):
            # Restored tokens count as used now, so a ttl token is not expired on arrival.
            if await self._tokens.restore({**record, "accessed": now}):
                restored.append({**record, "accessed": now})
        await self._tokens.publish(record["digest"] for record in restored)
        self._log_events(EVENT_CREATED, restored, call.token)
        return [public(record) for record in restored]

    # -- subaccounts --------------------------------------------------------------------------

    async def _select_accounts(self, call: Call) -> list[dict[str, Any]]:
        ids = parse_selector(call.parts[1] if len(call.parts) > 1 else None, "account")
        tree = await self._directory.reload()
        below = set(tree.descendants(call.cid))
        wanted = below if ids is None else below & set(ids)
        return [record for record in await self._accounts.all() if int(record["id"]) in wanted]

    async def list_accounts(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, ACCOUNT_FIELDS)
        return [public(record, fields) for record in await self._select_accounts(call)]

    async def create_accounts(self, call: Call) -> list[dict[str, Any]]:
        body = await read_json(call.request, self.body_limit)
        problems = indexed(body, lambda item: account_problems(item, partial=False))
        if problems:
            raise InvalidInput(problems)
        items = items_of(body)
        now = int(time.time())
        ids = await self._accounts.allocate_ids(len(items))
        records = [{"limits": {}, "metadata": {}, **item, "id": account_id, "cid": call.cid, "created": now}
                   for account_id, item in zip(ids, items)]
        await self._accounts.save(records)
        await self._directory.reload()  # usable as x-flespi-cid by the very next request here
        return [public(record, ACCOUNT_FIELDS) for record in records]

    async def update_accounts(self, call: Call) -> list[dict[str, Any]]:
        changes = await read_json(call.request, self.body_limit)
        problems = account_problems(changes, partial=True)
        if problems:
            raise InvalidInput(problems)
        updated = [{**record, **changes} for record in await self._select_accounts(call)]
        if updated:
            await self._accounts.save(updated)
            await self._directory.reload()
        return [public(record, ACCOUNT_FIELDS) for record in updated]

    async def delete_accounts(self, call: Call) -> list[dict[str, Any]]:
        chosen = await self._select_accounts(call)
        tree = await self._directory.reload()
        doomed = sorted({int(r["id"]) for r in chosen} | {d for r in chosen for d in tree.descendants(int(r["id"]))})
        for cid in doomed:
            await self._delete(await self._tokens.get_many(await self._tokens.account_ids(cid)), call.token)
        if doomed:
            await self._accounts.delete(doomed)
            await self._directory.reload()
        return [{"id": cid} for cid in doomed if cid != ROOT_ACCOUNT]
