"""flespi's selectors: the parser on its own, then every collection of the API through a gateway."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.selectors import parse_selector
from gateway.errors import InvalidInput

from support.gateways import GatewayHandle

FIELDS = frozenset({"id", "info", "enabled", "ttl", "cid", "access", "metadata"})
RECORDS: list[dict[str, Any]] = [
    {"id": 1, "info": "my app", "enabled": False, "ttl": 7200, "cid": 0, "access": {"type": 2},
     "metadata": {"o": "bob"}},
    {"id": 2, "info": "other", "enabled": True, "ttl": 10, "cid": 1, "access": {"type": 0}, "metadata": {}},
    {"id": 3, "info": "my other", "enabled": True, "ttl": 4000, "cid": 0, "access": {"type": 1}, "metadata": {}},
]


def chosen(text: str) -> list[int]:
    selector = parse_selector(text, FIELDS)
    return [r["id"] for r in RECORDS if selector.accepts(r)]


@pytest.mark.parametrize(("text", "ids"), [
    ("all", [1, 2, 3]),
    ("3,1,3", [1, 3]),
    ("info=my*", [1, 3]),
    ("info=?ther", [2]),
    ("info=my", []),
    ("metadata.o=b*", [1]),
    ("access.type=1", [3]),
    ("enabled=false", [1]),
    ("{enabled==false && ttl>3600}", [1]),
    ("{enabled == true || ttl <= 10}", [2, 3]),
    ("{!enabled}", [1]),
    ("{!(ttl > 100 && enabled)}", [1, 2]),
    ("{info == 'my app' || info == \"other\"}", [1, 2]),
    ("{access.type != 0 && metadata.o == null}", [3]),
    ("{ttl >= 4000}", [1, 3]),
    ("{ttl < 4000}", [2]),
    ("{info > 'n'}", [2]),
    ("{ttl == '10'}", []),  # a number never equals a string
    ("{ttl != '10'}", [1, 2, 3]),
    ("{ttl > 'a'}", []),
    ("{ttl > 1.5e3}", [1, 3]),
    ("all,cid=1", [2]),
    ("cid=0", [1, 3]),
    ("1,2,cid=0", [1]),
    ("info=*,cid=0", [1, 3]),
    ("{ttl > 1},cid=1", [2]),
])
def test_selectors_choose(text: str, ids: list[int]) -> None:
    assert chosen(text) == ids


def test_id_lists_keep_first_order_once() -> None:
    assert parse_selector("5,2,5,2,9", FIELDS).ids == (5, 2, 9)


@pytest.mark.parametrize("text", [
    "abc", "1,x", "0", "-1", "1,,2", ",", "1,", "x=1", "info=", "=x", "{", "}", "{}", "{ttl>}", "{ttl>1",
    "{a==1}", "{ttl $ 1}", "{ttl == 1} x", "{ttl==1},", "{ttl==1},cid=a", "{'a\\q'=='a'}", "{ttl == 'open}",
    "1,cid=x", "1,cid=", "cid=1,2", "1,cid=1,cid=2", "{ttl ==}", "{(ttl}", "{ttl)}", "{&& ttl}", "{ttl || }",
    "1" * 2000, "9" * 16, "{ttl > " + "1" * 40 + "}", "all,cid=" + "9" * 40, "{" + "(" * 40 + "ttl" + ")" * 40 + "}",
    "{" + "!" * 40 + "ttl}", "x" * 5000, "{ttl == 1e999}",
])
def test_bad_selectors_name_selector(text: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_selector(text, FIELDS)
    [problem] = raised.value.problems
    assert problem.field == "selector" and problem.reason.startswith("invalid selector")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}()!&|=<>'\"\\ ,*?.0123456789aceilnsdft_-", max_size=60))
def test_any_text_parses_or_is_refused_never_crashes(text: str) -> None:
    try:
        selector = parse_selector(text, FIELDS)
    except InvalidInput as refused:
        assert refused.problems[0].field == "selector"
        return
    for record in RECORDS:  # and whatever it parsed into evaluates on every record
        assert selector.accepts(record) in (True, False)


# -- through the gateway: every collection -----------------------------------------------------

async def ids_of(gw: GatewayHandle, path: str, **kwargs: Any) -> list[int]:
    status, body = await gw.call("GET", path, **kwargs)
    assert status == 200, body
    return [item["id"] for item in body["result"]]


async def test_token_selectors(gw: GatewayHandle) -> None:
    a = await gw.create_token(info="my app", ttl=7200, enabled=False)
    b = await gw.create_token(info="other", ttl=10)
    c = await gw.create_token(info="my other", ttl=4000, metadata={"team": "ops"})
    assert await ids_of(gw, f"/platform/tokens/{c['id']},{a['id']},{c['id']}") == [c["id"], a["id"]]
    assert await ids_of(gw, "/platform/tokens/info=my*") == [a["id"], c["id"]]
    assert await ids_of(gw, "/platform/tokens/{enabled==false && ttl>3600}") == [a["id"]]
    assert await ids_of(gw, "/platform/tokens/%7Bmetadata.team%20%3D%3D%20%22ops%22%7D") == [c["id"]]
    assert await ids_of(gw, "/platform/tokens/{(ttl<100 && ttl>0) || !enabled}") == [a["id"], b["id"]]
    # PUT and DELETE take the same selectors; PATCH is PUT
    status, body = await gw.call("PATCH", "/platform/tokens/info=my*", json={"metadata": {"tag": "x"}})
    assert status == 200 and [t["metadata"] for t in body["result"]] == [{"tag": "x"}, {"tag": "x"}]
    assert (await gw.call("DELETE", "/platform/tokens/{info=='other'}"))[1] == {"result": [{"id": b["id"]}]}
    assert await ids_of(gw, "/platform/recycle-bin/tokens/info=oth*") == [b["id"]]
    assert await ids_of(gw, "/platform/recycle-bin/tokens/{ttl==10}") == [b["id"]]
    assert await ids_of(gw, "/platform/recycle-bin/tokens/{ttl==11}") == []


async def test_bad_selectors_everywhere_are_400(gw: GatewayHandle) -> None:
    huge = "1" * 5000  # int() of it would raise: must be a 400 all the same
    for method, path in [("GET", "/platform/tokens/{ttl>"), ("PUT", "/platform/tokens/nope=1"),
                         ("DELETE", "/platform/tokens/1,cid=x"), ("GET", f"/platform/tokens/{huge}"),
                         ("GET", f"/platform/tokens/{{ttl>{huge}}}"), ("GET", f"/platform/tokens/all,cid={huge}"),
                         ("GET", "/platform/tokens/{x==1}/logs"), ("GET", "/platform/recycle-bin/tokens/{1"),
                         ("POST", "/platform/recycle-bin/tokens/abc/restore"), ("GET", "/platform/subaccounts/{ttl>1}"),
                         ("PUT", "/platform/subaccounts/x"), ("POST", "/platform/tokens/{/rotate")]:
        kwargs = {"json": {}} if method in ("PUT", "POST") else {}
        status, body = await gw.call(method, path, **kwargs)
        assert status == 400, (method, path, body)
        assert body["errors"][0]["field"] == "selector", (method, path)
        assert "1" * 100 not in body["errors"][0]["reason"]  # the reason shows the start only


async def test_cid_suffix_restricts_to_an_account_at_or_below(gw: GatewayHandle) -> None:
    status, body = await gw.call("POST", "/platform/subaccounts", json=[{"name": "child"}])
    child = body["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/subaccounts", json=[{"name": "grandchild"}],
                                 headers={"x-flespi-cid": str(child)})
    grandchild = body["result"][0]["id"]
    status, body = await gw.call("POST", "/platform/subaccounts", json=[{"name": "sibling"}])
    sibling = body["result"][0]["id"]
    mine = await gw.create_token(info="root's")
    status, body = await gw.call("POST", "/platform/tokens", json=[{"ttl": 60, "info": "child's"}],
                                 headers={"x-flespi-cid": str(child)})
    theirs = body["result"][0]
    assert await ids_of(gw, f"/platform/tokens/all,cid={child}") == [theirs["id"]]
    assert await ids_of(gw, f"/platform/tokens/{theirs['id']},cid={child}") == [theirs["id"]]
    assert await ids_of(gw, f"/platform/tokens/{theirs['id']},cid=0") == []
    assert mine["id"] in await ids_of(gw, "/platform/tokens/all,cid=0")
    assert await ids_of(gw, f"/platform/tokens/{theirs['id']}") == []  # not the acting account's
    # subaccounts: `all` is everything below, `,cid=N` N's own children
    assert await ids_of(gw, "/platform/subaccounts/all") == [child, grandchild, sibling]
    assert await ids_of(gw, f"/platform/subaccounts/all,cid={child}") == [grandchild]
    assert await ids_of(gw, "/platform/subaccounts/{name=='sibling' || name=='child'},cid=0") == [child, sibling]
    assert await ids_of(gw, f"/platform/subaccounts/{sibling},{child},{sibling}") == [sibling, child]
    # acting as the child: its own account and below only
    as_child = {"headers": {"x-flespi-cid": str(child)}}
    assert await ids_of(gw, f"/platform/tokens/all,cid={child}", **as_child) == [theirs["id"]]
    for path in (f"/platform/tokens/all,cid={sibling}", "/platform/tokens/all,cid=0",
                 f"/platform/subaccounts/all,cid={sibling}", "/platform/recycle-bin/tokens/all,cid=0",
                 "/platform/tokens/all,cid=999/logs"):
        status, body = await gw.call("GET", path, **as_child)
        assert status == 403, (path, body)
        assert "denied" in body["errors"][0]["reason"]
    assert await ids_of(gw, f"/platform/subaccounts/all,cid={grandchild}", **as_child) == []


async def test_token_logs_by_selector(gw: GatewayHandle) -> None:
    a = await gw.create_token(info="logs a")
    b = await gw.create_token(info="logs b")
    await gw.call("PUT", f"/platform/tokens/{a['id']},{b['id']}", json={"info": "logs c"})

    async def logged(selector: str) -> set[int]:
        status, body = await gw.call("GET", f"/platform/tokens/{selector}/logs")
        assert status == 200, body
        return {record["token_id"] for record in body["result"]}
    for _ in range(200):  # log records reach Redis within a flush interval
        if await logged(f"{a['id']},{b['id']}") == {a["id"], b["id"]}:
            break
        await asyncio.sleep(0.05)
    assert await logged("info=logs*") == {a["id"], b["id"]}
    assert await logged(f"{{id=={b['id']}}}") == {b["id"]}
    assert await logged("{id==0}") == set()
    assert {a["id"], b["id"]} <= await logged("all,cid=0")


async def test_unknown_platform_paths_are_404_never_proxied(gw: GatewayHandle, upstream: Any) -> None:
    for method, path in [("GET", "/platform/devices/all"), ("GET", "/platform"), ("POST", "/platform/x/y"),
                         ("GET", "/auth/other"), ("GET", "/auth"), ("GET", "/platform/tokens/1/other"),
                         ("DELETE", "/platform/customer/1"), ("GET", "/platform/recycle-bin/devices"),
                         ("GET", "/platform/tokens/1/logs/x"), ("PUT", "/platform/logs/1")]:
        before = len(upstream.requests)
        status, body = await gw.call(method, path)
        assert status == 404, (method, path, body)
        assert body == {"errors": [{"code": 404, "reason": f"unknown path {path}"}]}
        assert len(upstream.requests) == before, path


async def test_unknown_paths_under_a_configured_prefix(make_gateway: Any, upstream: Any) -> None:
    gw = await make_gateway(platform_prefixes=["/platform/", "/auth/", "/admin/"])
    token = await gw.create_token(access={"type": 0})
    assert (await gw.call("GET", "/admin/users"))[0] == 404
    assert (await gw.call("GET", "/admin/users", key=token["key"]))[0] == 403
    assert (await gw.call("GET", "/administrator", key=token["key"]))[0] == 200  # not under the prefix
    assert upstream.last.raw_path == "/administrator"


async def test_customer_is_the_acting_account(gw: GatewayHandle, upstream: Any) -> None:
    before = len(upstream.requests)
    assert await gw.call("GET", "/platform/customer", params={"fields": "id,name"}) == (
        200, {"result": [{"id": 0, "name": "root"}]})
    status, body = await gw.call("POST", "/platform/subaccounts", json={"name": "acme", "limits": {"api_calls": 5}})
    acme = body["result"][0]["id"]
    as_acme = {"headers": {"x-flespi-cid": str(acme)}}
    status, body = await gw.call("GET", "/platform/customer", **as_acme)
    assert status == 200 and body["result"][0]["id"] == acme and body["result"][0]["name"] == "acme"
    status, body = await gw.call("PUT", "/platform/customer", json={"metadata": {"plan": "gold"}}, **as_acme)
    assert status == 200 and body["result"][0]["metadata"] == {"plan": "gold"}
    status, body = await gw.call("PUT", "/platform/customer", json={"limits": {"api_calls": 0}, "bogus": 1}, **as_acme)
    assert status == 400 and sorted(e["field"] for e in body["errors"]) == ["bogus", "limits"]
    status, body = await gw.call("GET", f"/platform/subaccounts/{acme}")
    assert body["result"][0]["metadata"] == {"plan": "gold"} and body["result"][0]["limits"] == {"api_calls": 5}
    status, body = await gw.call("PUT", "/platform/customer", json={"name": "operator"})
    assert status == 200 and body["result"][0]["id"] == 0
    assert (await gw.call("GET", "/platform/customer"))[1]["result"][0]["name"] == "operator"
    assert await ids_of(gw, "/platform/subaccounts/all") == [acme]  # the root is no subaccount
    assert len(upstream.requests) == before


async def test_huge_acting_account_header_is_a_400(gw: GatewayHandle) -> None:
    for path in ("/platform/tokens/all", "/gw/devices/1"):  # the API and the proxied fast path
        status, body = await gw.call("GET", path, headers={"x-flespi-cid": "7" * 5000})
        assert status == 400, path
        assert body["errors"][0]["reason"] == "invalid x-flespi-cid header: must be an account id"
