"""The OpenAPI 3.1 document: valid, served, true to live replies, and fuzzed with schemathesis."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import jsonschema
import orjson
import pytest
import redis
import schemathesis
import yaml
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.app import BOOTSTRAP_EXPIRE, openapi_document
from gateway.tokens import key_digest

from support.gateways import GatewayHandle
from support.keys import MASTER_KEY
from support.servers import RedisProcess, free_port, run_gateway_process, wait_for_port

DOCUMENT: dict[str, Any] = orjson.loads(openapi_document())
REGISTRY = Registry().with_resource("urn:gateway", Resource.from_contents(DOCUMENT, default_specification=DRAFT202012))


def test_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")


async def test_document_is_served(gw: GatewayHandle) -> None:
    async with gw.request("GET", "/_gateway/openapi.json", key=None) as response:
        assert response.status == 200 and response.content_type == "application/json"
        assert await response.read() == openapi_document()


def reply_validator(path: str, method: str, status: int) -> jsonschema.Draft202012Validator:
    """A validator for the JSON body the document promises for that operation and status."""
    response = DOCUMENT["paths"][path][method]["responses"][str(status)]
    pointer = "/paths/" + path.replace("~", "~0").replace("/", "~1") + f"/{method}/responses/{status}"
    if "$ref" in response:
        pointer = response["$ref"][1:]
    ref = "urn:gateway#" + pointer + "/content/application~1json/schema"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=REGISTRY)


def operation_of(path: str) -> str:
    """The documented path template a concrete path falls under."""
    for template in DOCUMENT["paths"]:
        pattern = template.split("/")
        parts = path.split("/")
        if len(pattern) == len(parts) and all(p in (q, "{selector}") for p, q in zip(pattern, parts, strict=True)):
            return template
    raise AssertionError(f"{path} is not documented")


async def test_live_replies_match_the_document(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="documented", metadata={"a": "b"}, origins=["https://a.example.com"])
    acl = await gw.create_token(access={"type": 2, "acl": [{"uri": "gw/devices", "methods": ["GET"], "ids": [1]}]})
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/platform/tokens", None), ("GET", "/platform/tokens/all?fields=id,info", None),
        ("GET", f"/platform/tokens/{token['id']},{acl['id']}", None),
        ("POST", "/platform/tokens", [{"ttl": 60}, {"expire": 2 ** 31, "template": {"name": "trackit", "item": 3}}]),
        ("POST", "/platform/tokens", [{"ttl": "x", "bogus": 1}]), ("GET", "/platform/tokens/{ttl>", None),
        ("PUT", f"/platform/tokens/{token['id']}", {"info": "changed"}),
        ("PATCH", f"/platform/tokens/{token['id']}", {"enabled": True}),
        ("POST", f"/platform/tokens/{token['id']}/rotate", {"grace": 60}),
        ("GET", f"/platform/tokens/{token['id']}/logs", None),
        ("GET", "/platform/logs?data=%7B%22count%22%3A2%7D", None),
        ("GET", "/platform/logs?data=nope", None),
        ("DELETE", f"/platform/tokens/{acl['id']}", None), ("GET", "/platform/recycle-bin/tokens", None),
        ("GET", f"/platform/recycle-bin/tokens/{acl['id']}", None),
        ("POST", f"/platform/recycle-bin/tokens/{acl['id']}/restore", None),
        ("POST", "/platform/subaccounts", {"name": "documented", "limits": {"api_calls": 5, "traffic": None}}),
        ("GET", "/platform/subaccounts", None), ("GET", "/platform/subaccounts/all,cid=0", None),
        ("PUT", "/platform/subaccounts/all", {"metadata": {"x": "y"}}),
        ("GET", "/platform/customer", None), ("PUT", "/platform/customer", {"metadata": {"k": "v"}}),
        ("GET", "/auth/info", None), ("DELETE", "/platform/subaccounts/all", None),
        ("DELETE", "/platform/recycle-bin/tokens/all", None), ("GET", "/platform/tokens/all,cid=12345", None),
    ]
    seen = set()
    for method, target, body in calls:
        path = target.split("?")[0]
        async with gw.request(method, target, json=body) as response:
            reply = await response.json()
            template = operation_of(path)
            reply_validator(template, method.lower(), response.status).validate(reply)
            seen.add((template, method.lower(), response.status))
    assert {status for *_, status in seen} == {200, 400, 403}
    async with gw.request("GET", "/platform/tokens", key="y" * 64) as response:
        assert response.status == 401 and "FlespiToken" in response.headers["WWW-Authenticate"]
        reply_validator("/platform/tokens", "get", 401).validate(await response.json())
    async with gw.request("GET", "/_gateway/health", key=None) as response:
        reply_validator("/_gateway/health", "get", 200).validate(await response.json())
    # and the document is strict enough to catch a reply it does not describe
    with pytest.raises(jsonschema.ValidationError):
        reply_validator("/platform/tokens", "get", 200).validate({"result": [{"id": 1, "key": "k" * 64}]})
    with pytest.raises(jsonschema.ValidationError):
        reply_validator("/platform/tokens", "get", 400).validate({"errors": [{"reason": "no code"}]})


# -- schemathesis against a live gateway process --------------------------------------------------

@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, redis.Redis]]:
    """A gateway process on its own Redis, and a client of that Redis."""
    store = RedisProcess()
    store.start()
    port = free_port()
    config = tmp_path_factory.mktemp("fuzz") / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port}, "upstream": "http://127.0.0.1:9",
        "redis": {"url": store.url}, "bootstrap_master_token": MASTER_KEY, "log": {"path": "off"},
        "housekeeping": {"sweep_interval": 1}}))
    process = run_gateway_process(config)
    try:
        wait_for_port(port)
        client = redis.Redis.from_url(store.url)
        yield f"http://127.0.0.1:{port}", client
        client.close()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
        store.cleanup()
        # an exception the gateway logged is a failure even if every reply looked right
        assert b"Traceback" not in stderr, stderr.decode(errors="replace")[-4000:]


MASTER_RECORD = {"id": 1, "digest": key_digest(MASTER_KEY), "info": "bootstrap master token", "enabled": True,
                 "access": {"type": 1}, "expire": BOOTSTRAP_EXPIRE, "ttl": 0, "created": 0, "accessed": 0, "ips": "",
                 "origins": "*", "cid": 0, "metadata": {}}


def keep_master(client: redis.Redis) -> None:
    """Fuzzed calls may delete, disable, rotate or narrow the master token itself (`all` selects
    it); put it back as it was before each case, so every case runs with a working key."""
    prefix, digest = "{gw}:", MASTER_RECORD["digest"]
    raw = client.get(f"{prefix}tok:{digest}")
    current = json.loads(raw) if raw else None
    if current == MASTER_RECORD and client.hget(f"{prefix}ids", "1") == digest.encode():
        return
    with client.pipeline(transaction=True) as pipe:
        pipe.set(f"{prefix}tok:{digest}", json.dumps(MASTER_RECORD))
        pipe.hset(f"{prefix}ids", "1", digest)
        pipe.sadd(f"{prefix}cid:0", "1")
        pipe.zadd(f"{prefix}expiry", {"1": BOOTSTRAP_EXPIRE})
        pipe.publish(f"{prefix}invalidate", digest)
        pipe.execute()
    time.sleep(0.02)  # the gateway's subscriber drops its cached copy


FUZZED = schemathesis.openapi.from_dict(DOCUMENT)
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance,
          schemathesis.checks.response_headers_conformance]


@FUZZED.parametrize()
@hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                     derandomize=True, database=None)
def test_schemathesis_finds_no_error_and_no_undocumented_reply(case: Any,
                                                               live_gateway: tuple[str, redis.Redis]) -> None:
    base_url, client = live_gateway
    keep_master(client)
    headers = {"Authorization": f"FlespiToken {MASTER_KEY}"}
    if case.operation.path.startswith("/_gateway/"):
        headers = {}
    response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)
    ANSWERED.setdefault(f"{case.method} {case.operation.path}", set()).add(response.status_code)


ANSWERED: dict[str, set[int]] = {}


def test_the_fuzzer_reached_the_gateway(live_gateway: tuple[str, redis.Redis]) -> None:
    """After the fuzzing above: every operation was called, and answered both 200 and 400 where
    it takes input, so the fuzzer's requests got past the token checks into the API."""
    documented = {f"{method.upper()} {path}" for path, methods in DOCUMENT["paths"].items() for method in methods}
    assert documented <= set(ANSWERED)  # (it also tries undocumented methods: those must be refused)
    assert all(200 in ANSWERED[name] for name in documented), {n: ANSWERED[n] for n in sorted(documented)}
    assert all(status >= 400 for name, statuses in ANSWERED.items() if name not in documented for status in statuses)
    taking_input = ("POST /platform/tokens", "PUT /platform/tokens/{selector}", "POST /platform/subaccounts",
                    "GET /platform/tokens/{selector}")
    assert all(400 in ANSWERED[name] for name in taking_input), ANSWERED
    _, client = live_gateway
    assert int(client.get("{gw}:next_id") or 0) > 1  # a token was created
    assert int(client.get("{gw}:next_account_id") or 0) >= 1  # and an account
