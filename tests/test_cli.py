"""`gateway token ...` and `gateway account ...`, run as a user would, against a real gateway."""
from __future__ import annotations

import asyncio
import calendar
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.cli_tokens import duration, expire_time

from support.gateways import GatewayHandle
from support.keys import MASTER_KEY
from support.servers import ROOT


def gateway_cli(*argv: str, env: dict[str, str] | None = None, url: str | None = None,
                key: str | None = MASTER_KEY) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    if key is not None:
        environ["GATEWAY_MASTER_TOKEN"] = key
    if url is not None:
        environ["GATEWAY_URL"] = url
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=environ)


async def cli(gw: GatewayHandle, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("url", gw.url)
    return await asyncio.to_thread(gateway_cli, *argv, **kwargs)


async def cli_json(gw: GatewayHandle, *argv: str) -> list[dict[str, Any]]:
    done = await cli(gw, *argv, "--json")
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)["result"]
    return result


def test_durations_and_times() -> None:
    assert [duration(t) for t in ("90", "45s", "30m", "12h", "7d", "2w")] == [90, 45, 1800, 43200, 604800, 1209600]
    assert expire_time("2027-01-01") == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert expire_time("2027-01-01T12:30:00") == calendar.timegm((2027, 1, 1, 12, 30, 0))
    assert expire_time("2027-01-01T12:30:00+02:00") == calendar.timegm((2027, 1, 1, 10, 30, 0))
    assert expire_time("+30d", now=lambda: 1000.0) == 1000 + 30 * 86400
    assert expire_time("1798761600") == 1798761600


async def test_token_lifecycle_from_the_shell(gw: GatewayHandle, tmp_path: Path) -> None:
    acl = tmp_path / "acl.json"
    acl.write_text(json.dumps([{"uri": "gw/devices", "methods": ["GET"], "ids": [7]}]))
    [made] = await cli_json(gw, "token", "create", "--acl", f"@{acl}", "--info", "shell", "--ttl", "7d",
                            "--expire", "2027-01-01", "--ips", "127.0.0.1", "--origins", "https://a.example.com",
                            "--metadata", '{"owner": "ops"}')
    assert made["access"]["type"] == 2 and made["access"]["acl"][0]["ids"] == [7]
    assert made["ttl"] == 7 * 86400 and made["expire"] == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert made["ips"] == "127.0.0.1" and made["origins"] == ["https://a.example.com"]
    assert made["metadata"] == {"owner": "ops"} and made["info"] == "shell" and len(made["key"]) == 64
    assert (await gw.call("GET", "/gw/devices/7", key=made["key"]))[0] == 200
    assert (await gw.call("GET", "/gw/devices/8", key=made["key"]))[0] == 403
    token_id = str(made["id"])

    table = await cli(gw, "token", "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "INFO", "TYPE"]
    assert any(row.split()[:3] == [token_id, "shell", "acl"] for row in rows)
    assert made["key"] not in table.stdout

    assert [t["id"] for t in await cli_json(gw, "token", "get", "info=sh*")] == [made["id"]]
    assert [t["id"] for t in await cli_json(gw, "token", "list", "{ttl == 604800}", "--fields", "id")] == [made["id"]]
    [changed] = await cli_json(gw, "token", "update", token_id, "--info", "renamed", "--ttl", "1h", "--expire", "0")
    assert changed["info"] == "renamed" and changed["ttl"] == 3600 and changed["expire"] == 0
    [disabled] = await cli_json(gw, "token", "disable", token_id)
    assert disabled["enabled"] is False
    assert (await gw.call("GET", "/gw/devices/7", key=made["key"]))[1]["errors"][0]["reason"] == "token is disabled"
    [enabled] = await cli_json(gw, "token", "enable", token_id)
    assert enabled["enabled"] is True

    rotated = await cli(gw, "token", "rotate", token_id, "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    new_key = next(word for word in rotated.stdout.split() if len(word) == 64 and word.isalnum())
    assert new_key != made["key"] and "shown only now" in rotated.stdout
    for key in (made["key"], new_key):  # the old key is in its hour of grace
        assert (await gw.call("GET", "/gw/devices/7", key=key))[0] == 200

    deleted = await cli(gw, "token", "delete", token_id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted: {token_id}"
    assert (await gw.call("GET", "/gw/devices/7", key=new_key))[0] == 401
    [restored] = await cli_json(gw, "token", "restore", token_id)
    assert restored["id"] == made["id"]
    assert (await gw.call("GET", "/gw/devices/7", key=new_key))[0] == 200


async def test_todays_create_flags_still_work(gw: GatewayHandle) -> None:
    [made] = await cli_json(gw, "token", "create", "--type", "3", "--info", "noapi", "--expire", "4102444800",
                            "--url", gw.url)
    assert made["access"] == {"type": 3} and made["expire"] == 4102444800
    [shared] = await cli_json(gw, "token", "create", "--template", "toolbox", "--item", "5", "--ttl", "30m")
    assert shared["access"]["type"] == 2 and shared["ttl"] == 1800


async def test_errors_exit_non_zero_with_the_reasons(gw: GatewayHandle) -> None:
    refused = await cli(gw, "token", "create", "--info", "no validity")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "400 ttl: token must have 'ttl' or 'expire'" in refused.stderr
    bad_selector = await cli(gw, "token", "get", "{ttl >")
    assert bad_selector.returncode == 1 and "400 selector: invalid selector" in bad_selector.stderr
    wrong_key = await cli(gw, "token", "list", key="x" * 64)
    assert wrong_key.returncode == 1 and "401: invalid or expired access token" in wrong_key.stderr
    no_key = await cli(gw, "token", "list", key=None)
    assert no_key.returncode == 2 and "master key" in no_key.stderr
    bad_duration = await cli(gw, "token", "create", "--ttl", "7 days")
    assert bad_duration.returncode == 2 and "not a duration" in bad_duration.stderr
    bad_json = await cli(gw, "token", "create", "--ttl", "1h", "--metadata", "{nope")
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr
    nothing = await cli(gw, "token", "update", "1")
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    unreachable = await cli(gw, "token", "list", url="http://127.0.0.1:9")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr


async def test_url_from_the_config_and_key_from_the_option(gw: GatewayHandle, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    listen = {"port": int(gw.url.rsplit(":", 1)[1])}
    config.write_text(yaml.safe_dump({"upstream": "http://127.0.0.1:1", "listen": listen}))
    done = await asyncio.to_thread(gateway_cli, "--config", str(config), "token", "get", "1", "--token", MASTER_KEY,
                                   "--json", key=None)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"][0]["id"] == 1


async def test_accounts_from_the_shell(gw: GatewayHandle) -> None:
    [acme] = await cli_json(gw, "account", "create", "--name", "acme", "--limits", '{"api_calls": 100}',
                            "--metadata", '{"plan": "gold"}')
    assert acme["name"] == "acme" and acme["limits"] == {"api_calls": 100} and acme["cid"] == 0
    [child] = await cli_json(gw, "account", "create", "--name", "acme-eu", "--cid", str(acme["id"]))
    assert child["cid"] == acme["id"]
    listed = await cli(gw, "account", "list")
    assert listed.returncode == 0
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [[str(acme["id"]), "acme"],
                                                                              [str(child["id"]), "acme-eu"]]
    assert [a["id"] for a in await cli_json(gw, "account", "list", f"all,cid={acme['id']}")] == [child["id"]]
    [changed] = await cli_json(gw, "account", "update", str(acme["id"]), "--limits", '{"api_calls": null}')
    assert changed["limits"] == {"api_calls": None}
    bad = await cli(gw, "account", "update", str(acme["id"]), "--limits", '{"calls": 1}')
    assert bad.returncode == 1 and "limits.calls" in bad.stderr
    [made] = await cli_json(gw, "token", "create", "--ttl", "1h", "--cid", str(child["id"]))
    assert made["cid"] == child["id"]
    gone = await cli_json(gw, "account", "delete", str(acme["id"]))
    assert sorted(a["id"] for a in gone) == [acme["id"], child["id"]]
    assert (await gw.call("GET", "/gw/devices/1", key=made["key"]))[0] == 401


async def test_logs_and_follow(gw: GatewayHandle) -> None:
    token = await gw.create_token(info="followed")
    assert (await gw.call("GET", "/gw/devices/1", key=token["key"]))[0] == 200
    environ = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    environ.update(GATEWAY_URL=gw.url, GATEWAY_MASTER_TOKEN=MASTER_KEY)
    # Popen returns at once; the follower runs beside this test's requests (read in a thread below).
    follower = subprocess.Popen([sys.executable, "-m", "gateway", "token", "logs", str(token["id"]), "--follow",  # noqa: ASYNC220
                                 "--interval", "0.2"], cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        assert follower.stdout is not None
        reader = asyncio.create_task(asyncio.to_thread(read_lines, follower.stdout, lines, 3))
        await asyncio.sleep(1.5)
        assert (await gw.call("GET", "/gw/devices/2", key=token["key"]))[0] == 200  # after the follower started
        await asyncio.wait_for(reader, 20)
    finally:
        follower.terminate()
        follower.wait(10)
    assert "event 1" in lines[0]
    assert "GET /gw/devices/1 200" in lines[1]
    assert "GET /gw/devices/2 200" in lines[2]
    assert token["key"] not in "".join(lines)
    once = await cli(gw, "token", "logs", str(token["id"]), "--count", "1", "--json")
    assert once.returncode == 0
    [last] = [json.loads(line) for line in once.stdout.splitlines()]
    assert last["uri"] == "/gw/devices/2"


def read_lines(stream: Any, into: list[str], count: int) -> None:
    while len(into) < count:
        line = stream.readline()
        if not line:
            return
        into.append(line)


def test_keygen_still_works() -> None:
    done = gateway_cli("keygen", key=None)
    assert done.returncode == 0 and len(done.stdout.strip()) == 64 and done.stdout.strip().isalnum()
