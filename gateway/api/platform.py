"""The platform API (docs/api.md), served by the gateway itself.

Paths (all under the acting account: the token's own, or `x-flespi-cid` when it names a
subaccount of it):

- `/platform/tokens[/{selector}]`            GET, POST (no selector), PUT, DELETE (to the recycle bin)
- `/platform/tokens/{selector}/logs`         GET, `data={"from":..,"to":..,"count":..}`
- `/platform/logs`                           GET, `data={"from":..,"to":..,"count":..,"token_id":..}`
- `/platform/recycle-bin/tokens[/{selector}]` GET, DELETE (purge now)
- `/platform/recycle-bin/tokens/{selector}/restore`  POST: back under the old id and key
- `/platform/subaccounts[/{selector}]`       GET, POST, PUT, DELETE (with descendants and tokens)
- `/platform/tokens/{selector}/rotate`       POST `{"grace": seconds}`: new keys, same ids (beyond flespi)
- `/platform/customer`                       GET, PUT (`name`, `metadata`): the acting account itself
- `/auth/info`                               GET, any usable token: its own record

Selectors are flespi's (`selectors.py`); PATCH is taken as PUT. Any other path under a platform
prefix is answered 404 here and never proxied.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from gateway.api.selectors import Selector, parse_selector
from gateway.api.templates import expand_template
from gateway.api.validation import (
    DEFAULTS,
    TokenValidator,
    account_problems,
    customer_problems,
    grace_problems,
    parse_json,
    validity_problems,
)
from gateway.errors import MIGRATING, Denied, FieldProblem, InvalidInput, StoreUnavailable
from gateway.policy.paths import AUTH_INFO, PLATFORM
from gateway.store.accounts import ROOT_ACCOUNT, AccountDirectory, AccountStore
from gateway.store.tokens import MIGRATION_RETRY_AFTER, MIGRATION_SETTLE, TokenStore, grace_digests
from gateway.tokens import PUBLIC_FIELDS, Token, TokenType, key_digest, new_key
from gateway.writers.logs import LogWriter
from gateway.writers.tokenlogs import RedisLogSink, select

log = logging.getLogger("gateway.api")
MAX_BODY = 1024 * 1024
T = TypeVar("T")
EVENT_CREATED, EVENT_UPDATED, EVENT_DELETED, EVENT_ROTATED = 1, 2, 3, 4
ACCOUNT_FIELDS = ("id", "name", "cid", "limits", "metadata", "created")
TOKEN_NAMES = frozenset(PUBLIC_FIELDS)
BINNED_NAMES = frozenset((*PUBLIC_FIELDS, "deleted"))
ACCOUNT_NAMES = frozenset(ACCOUNT_FIELDS)
# The root account has no stored record of its own; this is what it answers as.
ROOT_RECORD: dict[str, Any] = {"id": ROOT_ACCOUNT, "name": "root", "cid": None, "limits": {}, "metadata": {},
                               "created": 0}


@dataclass(slots=True)
class Call:
    """One API request: who makes it, as which account, on what."""

    request: web.Request
    token: Token
    cid: int
    parts: list[str]
    body: bytes = b""  # a change's body, read whole before it is checked (`PlatformApi._change`)

    def json(self) -> Any:
        return parse_json(self.body or b"null")

    @property
    def method(self) -> str:
        """HEAD is answered as GET, PATCH as PUT (flespi's clients send either)."""
        return {"HEAD": "GET", "PATCH": "PUT"}.get(self.request.method, self.request.method)


Handler = Callable[[Call], Awaitable[list[dict[str, Any]]]]


def public(record: dict[str, Any], fields: tuple[str, ...] = PUBLIC_FIELDS) -> dict[str, Any]:
    return {name: record.get(name) for name in fields}


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
        data = parse_json(raw, "data")
    except InvalidInput as refused:
        if refused.problems[0].field != "data":  # a repeated key, named
            raise
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


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
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
    return body


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


SELECTOR_AT = {"tokens": 1, "subaccounts": 1, "recycle-bin": 2}


def shape_of(parts: list[str]) -> str:
    """`tokens/1,2/logs` -> `tokens/{s}/logs`: the path with its selector segment generalised."""
    at = SELECTOR_AT.get(parts[0])
    if at is None or len(parts) <= at or not parts[at]:
        return "/".join(parts)
    return "/".join([*parts[:at], "{s}", *parts[at + 1:]])


def unknown_path(path: str) -> Denied:
    return Denied(404, f"unknown path {path}")


class PlatformApi:
    def __init__(self, tokens: TokenStore, accounts: AccountStore, directory: AccountDirectory,
                 validator: TokenValidator, logs: LogWriter, token_logs: RedisLogSink | None,
                 platform_prefixes: tuple[str, ...] = (PLATFORM, "/auth/")) -> None:
        self._tokens = tokens
        self._accounts = accounts
        self._directory = directory
        self._validator = validator
        self._logs = logs
        self._token_logs = token_logs
        self.body_limit = MAX_BODY  # bytes of a request body (413 beyond); `limits.api_body_size`
        # (path shape, method) -> handler; `{s}` is a selector segment (`shape_of`).
        self._routes: dict[tuple[str, str], Handler] = {
            ("tokens", "GET"): self.list_tokens, ("tokens", "POST"): self.create_tokens,
            ("tokens/{s}", "GET"): self.list_tokens, ("tokens/{s}", "PUT"): self.update_tokens,
            ("tokens/{s}", "DELETE"): self.delete_tokens, ("tokens/{s}/logs", "GET"): self.token_logs,
            ("tokens/{s}/rotate", "POST"): self.rotate_tokens,
            ("customer", "GET"): self.get_customer, ("customer", "PUT"): self.update_customer,
            ("logs", "GET"): self.platform_logs,
            ("recycle-bin/tokens", "GET"): self.list_bin, ("recycle-bin/tokens/{s}", "GET"): self.list_bin,
            ("recycle-bin/tokens/{s}", "DELETE"): self.purge_bin,
            ("recycle-bin/tokens/{s}/restore", "POST"): self.restore,
            ("subaccounts", "GET"): self.list_accounts, ("subaccounts", "POST"): self.create_accounts,
            ("subaccounts/{s}", "GET"): self.list_accounts, ("subaccounts/{s}", "PUT"): self.update_accounts,
            ("subaccounts/{s}", "DELETE"): self.delete_accounts,
        }
        self._shapes = frozenset(shape for shape, _ in self._routes)

        # Every path under these is answered here (unknown ones with 404), never proxied.
        prefixes = tuple(dict.fromkeys((PLATFORM, *platform_prefixes)))
        self._prefixes = prefixes
        self._bare = frozenset(prefix.rstrip("/") for prefix in prefixes)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """What a front must hand to `dispatch` rather than proxy: the prefixes and their bare forms."""
        return self._prefixes + tuple(sorted(self._bare))

    def handles(self, path: str) -> bool:
        return path == AUTH_INFO or path.startswith(self._prefixes) or path in self._bare

    async def dispatch(self, request: web.Request, token: Token, path: str, cid: int) -> web.Response:
        """`cid`: the account the request acts for (`RequestFacts.account_of`)."""
        if path == AUTH_INFO:
            if request.method not in ("GET", "HEAD"):
                raise Denied(405, f"method {request.method} is not allowed on {path}")
            return ok([token.public_record()])
        if token.type is not TokenType.MASTER:
            raise Denied(403, f"access to {path.lstrip('/')} is denied: master token required")
        if not path.startswith(PLATFORM):
            raise unknown_path(path)
        parts = path[len(PLATFORM):].split("/")
        if parts[-1] == "" and len(parts) > 1:
            parts.pop()  # one trailing slash is allowed, as before
        call = Call(request, token, cid, parts)
        shape = shape_of(parts)
        if shape not in self._shapes:
            raise unknown_path(path)
        handler = self._routes.get((shape, call.method))
        if handler is None:
            raise Denied(405, f"method {request.method} is not allowed on {path}")
        if call.method == "GET":
            return ok(await handler(call))
        return ok(await self._change(handler, call, shape))

    async def _change(self, handler: Handler, call: Call, shape: str) -> list[dict[str, Any]]:
        """An API change (every route but GET): its body read whole, then refused while `gateway
        migrate` copies the store, else made. The check is one GET per change, before any write,
        so a refused change writes nothing. A change that found no marker may still be writing
        when a migration sets it: the migration waits MIGRATION_SETTLE seconds for that before it
        copies (`store/tokens.py`), so what follows the check must stay short (the body is read
        before it: a slow client does not stretch it)."""
        call.body = await read_body(call.request, self.body_limit)
        if await self._tokens.migrating():
            raise Denied(503, MIGRATING, {"Retry-After": str(MIGRATION_RETRY_AFTER)})
        checked = time.monotonic()
        try:
            return await handler(call)
        finally:
            took = time.monotonic() - checked
            if took > MIGRATION_SETTLE:
                log.warning("an API change (%s %s) took %.1f s after its check for a migration, longer than "
                            "a migration waits (%.0f s): one started meanwhile may have missed it",
                            call.method, shape, took, MIGRATION_SETTLE)

    # -- tokens -------------------------------------------------------------------------------

    async def _scope(self, call: Call, selector: Selector) -> Selector:
        """The selector bound to one account: its `,cid=N` (N must be the acting account or
        below it) or else the acting account."""
        if selector.cid is None:
            return Selector(selector.ids, selector.match, call.cid)
        if selector.cid != call.cid and not (await self._directory.reload()).is_within(selector.cid, call.cid):
            raise Denied(403, f"access to account {selector.cid} is denied for this token")
        return selector

    async def _select_tokens(self, call: Call) -> list[dict[str, Any]]:
        raw = call.parts[1] if len(call.parts) > 1 else None
        selector = await self._scope(call, parse_selector(raw, TOKEN_NAMES))
        assert selector.cid is not None
        ids = selector.ids if selector.ids is not None else await self._tokens.account_ids(selector.cid)
        return [record for record in await self._tokens.get_many(ids) if selector.accepts(record)]

    async def list_tokens(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, PUBLIC_FIELDS)
        return [public(record, fields) for record in await self._select_tokens(call)]

    async def create_tokens(self, call: Call) -> list[dict[str, Any]]:
        raw = call.json()
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
        for token_id, item in zip(await self._tokens.allocate_ids(len(items)), items, strict=True):
            key = new_key()
            created.append((key, {**DEFAULTS, **item, "id": token_id, "digest": key_digest(key), "created": now,
                                  "accessed": 0, "cid": call.cid}))
        records = [record for _, record in created]
        await self._tokens.insert(records)
        await self._tokens.publish(record["digest"] for record in records)
        self._log_events(EVENT_CREATED, records, call.token)
        return [{**public(record), "key": key} for key, record in created]

    async def update_tokens(self, call: Call) -> list[dict[str, Any]]:
        changes = call.json()
        problems = self._validator.problems(changes, partial=True)
        if problems:
            raise InvalidInput(problems)
        updated = [{**record, **changes} for record in await self._select_tokens(call)]
        for record in updated:
            found = validity_problems(record)
            if found:
                raise InvalidInput([FieldProblem(p.field, f"token {record['id']}: {p.reason}") for p in found])
        digests = [digest for record in updated for digest in (record["digest"], *grace_digests(record))]
        for record in updated:
            await self._announced(digests, self._tokens.replace(record))
        await self._tokens.publish(digests)
        self._log_events(EVENT_UPDATED, updated, call.token)
        return [public(record) for record in updated]

    async def rotate_tokens(self, call: Call) -> list[dict[str, Any]]:
        """New keys for the selected tokens, same ids, fields and logs; each old key keeps working
        for `grace` seconds (default 0: refused at once), on every instance (`TokenStore.rotate`)."""
        body = call.json()
        body = {} if body is None else body
        problems = grace_problems(body)
        if problems:
            raise InvalidInput(problems)
        grace = int(body.get("grace", 0))
        records = await self._select_tokens(call)
        now = int(time.time())
        rotated: list[tuple[str, str, dict[str, Any]]] = []
        for record in records:
            key = new_key()
            moved = await self._announced([old["digest"] for old in records],
                                          self._tokens.rotate(record, key_digest(key), now + grace if grace else None))
            if moved is not None:  # None: changed or deleted meanwhile, so not rotated (not listed)
                rotated.append((key, record["digest"], moved))
        # Every instance drops the old digest's cached record (gone, or now ending at the grace's
        # end) and any "no such key" it remembers for the new one.
        await self._tokens.publish(digest for _, old, moved in rotated for digest in (old, moved["digest"]))
        self._log_events(EVENT_ROTATED, [moved for _, _, moved in rotated], call.token,
                         {"grace": grace, "reason": "token key rotated"})
        return [{**public(moved), "key": key} for key, _, moved in rotated]

    async def delete_tokens(self, call: Call) -> list[dict[str, Any]]:
        records = await self._select_tokens(call)
        await self._delete(records, call.token)
        return [{"id": record["id"]} for record in records]

    async def _delete(self, records: list[dict[str, Any]], by: Token) -> None:
        if not records:  # perhaps an earlier DELETE's repeat, which deleted but could not announce
            await self._tokens.announce_earlier()
            return
        digests = [digest for record in records for digest in (record["digest"], *grace_digests(record))]
        await self._announced(digests, self._tokens.remove(records, to_bin=True))
        await self._tokens.publish(digests)
        self._log_events(EVENT_DELETED, records, by)

    async def _announced(self, digests: list[str], change: Awaitable[T]) -> T:
        """`change`; if it fails it may be half made (on a cluster a change is several steps):
        its digests are announced all the same, as soon as the store takes them."""
        try:
            return await change
        except StoreUnavailable:
            self._tokens.publish_later(digests)
            raise

    def _log_events(self, code: int, records: list[dict[str, Any]], by: Token,
                    extra: dict[str, Any] | None = None) -> None:
        now = time.time()
        for record in records:
            self._logs.emit({"timestamp": now, "event_code": code, "token_id": record["id"],
                             "cid": record.get("cid", 0), "by_token_id": by.id, **(extra or {})})

    # -- logs ---------------------------------------------------------------------------------

    def _log_reader(self) -> RedisLogSink:
        if self._token_logs is None:
            raise Denied(404, "token logs are not kept (token_logs.enabled is false)")
        return self._token_logs

    async def token_logs(self, call: Call) -> list[dict[str, Any]]:
        """Logs of the selected tokens: an id list reads the ids' logs (deleted tokens' too), `all`
        the account's, a field or expression selector those of the live tokens it matches."""
        reader = self._log_reader()
        data = parse_data(call.request, frozenset({"from", "to", "count"}))
        selector = await self._scope(call, parse_selector(call.parts[1], TOKEN_NAMES))
        assert selector.cid is not None
        if selector.ids is not None:
            keys = [reader.token_key(i, selector.cid) for i in selector.ids]
        elif selector.match is None:
            keys = [reader.account_key(selector.cid)]
        else:
            keys = [reader.token_key(int(record["id"]), selector.cid) for record in await self._select_tokens(call)]
        records = [r for r in await reader.read(keys) if int(r.get("cid") or 0) == selector.cid] if keys else []
        return select(records, data.get("from"), data.get("to"), None, data.get("count"))

    async def platform_logs(self, call: Call) -> list[dict[str, Any]]:
        reader = self._log_reader()
        data = parse_data(call.request, frozenset({"from", "to", "count", "token_id"}))
        records = await reader.read([reader.account_key(call.cid)])
        return select(records, data.get("from"), data.get("to"), data.get("token_id"), data.get("count"))

    # -- recycle bin --------------------------------------------------------------------------

    async def _select_binned(self, call: Call) -> list[dict[str, Any]]:
        raw = call.parts[2] if len(call.parts) > 2 else None
        selector = await self._scope(call, parse_selector(raw, BINNED_NAMES))
        return [record for record in await self._tokens.binned(selector.ids) if selector.accepts(record)]

    async def list_bin(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, (*PUBLIC_FIELDS, "deleted"))
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
        """Accounts below the acting one; with `,cid=N` only N's own subaccounts (`cid`: the parent)."""
        raw = call.parts[1] if len(call.parts) > 1 else None
        selector = parse_selector(raw, ACCOUNT_NAMES)
        if selector.cid is not None:
            selector = await self._scope(call, selector)
        tree = await self._directory.reload()
        below = set(tree.descendants(call.cid))
        chosen = [record for record in await self._accounts.all()
                  if int(record["id"]) in below and selector.accepts(record)]
        if selector.ids is None:
            return chosen
        by_id = {int(record["id"]): record for record in chosen}
        return [by_id[account_id] for account_id in selector.ids if account_id in by_id]

    async def list_accounts(self, call: Call) -> list[dict[str, Any]]:
        fields = parse_fields(call.request, ACCOUNT_FIELDS)
        return [public(record, fields) for record in await self._select_accounts(call)]

    async def create_accounts(self, call: Call) -> list[dict[str, Any]]:
        body = call.json()
        problems = indexed(body, lambda item: account_problems(item, partial=False))
        if problems:
            raise InvalidInput(problems)
        items = items_of(body)
        now = int(time.time())
        ids = await self._accounts.allocate_ids(len(items))
        records = [{"limits": {}, "metadata": {}, **item, "id": account_id, "cid": call.cid, "created": now}
                   for account_id, item in zip(ids, items, strict=True)]
        await self._accounts.save(records)
        await self._directory.reload()  # usable as x-flespi-cid by the very next request here
        return [public(record, ACCOUNT_FIELDS) for record in records]

    async def update_accounts(self, call: Call) -> list[dict[str, Any]]:
        changes = call.json()
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

    # -- the acting account ---------------------------------------------------------------------

    async def _customer(self, call: Call) -> dict[str, Any]:
        if call.cid == ROOT_ACCOUNT:
            stored = await self._accounts.get(ROOT_ACCOUNT)
            return {**ROOT_RECORD, **(stored or {}), "cid": None}
        record = await self._accounts.get(call.cid)
        if record is None:  # deleted since the request's account check
            raise Denied(404, f"account {call.cid} not found")
        return record

    async def get_customer(self, call: Call) -> list[dict[str, Any]]:
        """The acting account itself (`x-flespi-cid`, else the token's), as flespi answers it."""
        fields = parse_fields(call.request, ACCOUNT_FIELDS)
        return [public(await self._customer(call), fields)]

    async def update_customer(self, call: Call) -> list[dict[str, Any]]:
        """`name` and `metadata` of the acting account; its `limits` are set by its parent."""
        changes = call.json()
        problems = customer_problems(changes)
        if problems:
            raise InvalidInput(problems)
        record = {**await self._customer(call), **changes}
        await self._accounts.save([record])
        await self._directory.reload()
        return [public(record, ACCOUNT_FIELDS)]
