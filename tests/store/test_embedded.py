"""The embedded store on disk: journal, snapshot, compaction, the lock, and `kill -9` during creation.

The files are real, the fake Redis is fakeredis itself, and the process tests run `python -m
gateway` as a user would and kill it for real."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.config import ConfigError
from gateway.store.embedded import (
    COMPACT_AFTER_SEGMENTS,
    DataFiles,
    Direct,
    EmbeddedStore,
    check_files,
    dump,
    open_embedded,
)

from support.keys import MASTER_KEY
from support.servers import ROOT, Upstream, free_port, wait_for_port

AUTH = {"Authorization": f"FlespiToken {MASTER_KEY}"}


def keys_of(store: EmbeddedStore) -> list[list[Any]]:
    return sorted(dump(Direct(store.server)), key=lambda item: str(item[0]))


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    return str(tmp_path / "data.json")


@pytest.fixture
async def opened(data_file: str) -> AsyncIterator[list[EmbeddedStore]]:
    """Stores a test opened; closed at its end if the test did not."""
    stores: list[EmbeddedStore] = []
    yield stores
    for store in stores:
        await store.close()  # a second close does nothing


async def reopen(data_file: str, opened: list[EmbeddedStore]) -> EmbeddedStore:
    store = open_embedded(data_file)
    opened.append(store)
    return store


async def write_everything(store: EmbeddedStore, round_: int) -> None:
    """Each kind of write the gateway makes: plain commands, a watched transaction, a Lua script,
    relative and absolute expiries, deletions and trims."""
    client = store.client
    await client.incrby("next_id", 2)
    await client.set(f"tok:{round_}", orjson.dumps({"id": round_, "info": "ü\n\"x"}))
    await client.set(f"grace:{round_}", "old", ex=3600)
    await client.set(f"gone:{round_}", "soon", exat=int(time.time()) + 7200)
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch("next_id")
        pipe.multi()
        pipe.hset("ids", str(round_), f"digest-{round_}")
        pipe.sadd("cid:0", str(round_))
        pipe.zadd("expiry", {str(round_): 2 ** 40})
        await pipe.execute()
    script = "for i = 1, #ARGV do redis.call('LPUSH', KEYS[1], ARGV[i]) end redis.call('LTRIM', KEYS[1], 0, 4) return 1"
    await client.eval(script, 1, "logs", *(f"r{round_}-{i}" for i in range(4)))
    await client.hset("used", mapping={f"digest-{round_}": str(1000 + round_), "binary": b"\x00\xff\r\n"})
    await client.delete(f"tok:{round_ - 1}")
    await client.zpopmin("queue")  # a write that changes nothing
    await store.sync()


async def test_journal_replays_every_kind_of_write(data_file: str, opened: list[EmbeddedStore]) -> None:
    store = await reopen(data_file, opened)
    for round_ in range(3):
        await write_everything(store, round_)
    before = keys_of(store)
    await store.close()
    again = await reopen(data_file, opened)
    assert keys_of(again) == before  # expiry times included: replayed at the time they first ran
    by_key = {item[0]: item for item in before}
    assert by_key["logs"][2] == ["r2-3", "r2-2", "r2-1", "r2-0", "r1-3"]
    assert by_key["used"][2]["binary"] == "\x00\xff\r\n"
    assert by_key["grace:2"][3] is not None and "tok:1" not in by_key


async def test_compaction_folds_the_journal_into_the_snapshot(data_file: str, opened: list[EmbeddedStore]) -> None:
    store = await reopen(data_file, opened)
    files = DataFiles(Path(data_file))
    await write_everything(store, 1)
    assert await store.compact()
    await write_everything(store, 2)  # after the compaction: in the new segment only
    before = keys_of(store)
    assert files.segments() == [store.journal.segment]
    snapshot = orjson.loads(files.snapshot.read_bytes())
    assert snapshot["embedded_store"] == 2 and snapshot["journal"] == store.journal.segment - 1
    await store.close()
    for path in [files.snapshot, files.lock, files.segment(files.segments()[0])]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    again = await reopen(data_file, opened)
    assert keys_of(again) == before


async def test_a_torn_last_frame_is_cut_off(data_file: str, opened: list[EmbeddedStore],
                                            caplog: pytest.LogCaptureFixture) -> None:
    store = await reopen(data_file, opened)
    await write_everything(store, 1)
    before = keys_of(store)
    segment = store.files.segment(store.journal.segment)
    await store.close()
    whole = segment.stat().st_size
    append(segment, b'0badc0de [1700000000.0,[["set","torn"')  # a crash in the middle of a write
    again = await reopen(data_file, opened)
    assert keys_of(again) == before
    assert segment.stat().st_size == whole
    assert "torn write" in caplog.text


async def test_a_damaged_older_segment_stops_the_start(data_file: str, opened: list[EmbeddedStore]) -> None:
    store = await reopen(data_file, opened)
    await write_everything(store, 1)
    damaged = store.files.segment(store.journal.segment)
    await store.close()
    await (await reopen(data_file, opened)).close()  # now an older segment
    data = bytearray(damaged.read_bytes())
    data[40] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as refused:
        open_embedded(data_file)
    assert str(damaged) in str(refused.value) and "checksum" in str(refused.value)
    with pytest.raises(ConfigError):
        check_files(data_file)  # `--check-config` says so too


async def test_reads_the_snapshot_earlier_builds_wrote(data_file: str, opened: list[EmbeddedStore]) -> None:
    Path(data_file).write_bytes(orjson.dumps({
        "{gw}:next_id": ["string", "7"], "{gw}:ids": ["hash", {"7": "abc"}], "{gw}:cid:0": ["set", ["7"]],
        "{gw}:expiry": ["zset", [["7", 1099511627776.0]]], "{gw}:logs:acct:0": ["list", ["b", "a"]]}))
    os.chmod(data_file, 0o644)
    store = await reopen(data_file, opened)
    client = store.client
    assert await client.get("{gw}:next_id") == b"7" and await client.hget("{gw}:ids", "7") == b"abc"
    assert await client.zscore("{gw}:expiry", "7") == 2 ** 40
    assert await client.lrange("{gw}:logs:acct:0", 0, -1) == [b"b", b"a"]
    assert stat.S_IMODE(os.stat(data_file).st_mode) == 0o600


async def test_one_process_per_data_file(data_file: str, opened: list[EmbeddedStore]) -> None:
    await reopen(data_file, opened)
    with pytest.raises(ConfigError) as refused:
        open_embedded(data_file)
    assert f"{data_file!r} is in use by another gateway (pid {os.getpid()})" in str(refused.value)


# -- the real process --------------------------------------------------------------------------------

def gateway_config(path: Path, port: int, upstream: Upstream, data_file: str, **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port}, "upstream": upstream.url, "log": {"path": "off"},
        "bootstrap_master_token": MASTER_KEY, "redis": {"url": "memory://", "data_file": data_file}, **extra}))
    return path


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def start(config: Path, stderr: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    with open(stderr, "ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_second_gateway_on_the_same_file_is_refused(tmp_path: Path, upstream: Upstream,
                                                            processes: list[subprocess.Popen[bytes]]) -> None:
    data_file = str(tmp_path / "data.json")
    first_port = free_port()
    first = start(gateway_config(tmp_path / "a.yaml", first_port, upstream, data_file), tmp_path / "a.err")
    processes.append(first)
    await asyncio.to_thread(wait_for_port, first_port, 30)
    second = gateway_config(tmp_path / "b.yaml", free_port(), upstream, data_file)
    expected = (f"gateway: configuration error: redis.data_file: {data_file!r} is in use by another gateway "
                f"(pid {first.pid}); one embedded store serves one process\n")
    for args in ([], ["--check-config"]):
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "--config", str(second),
                                         *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr.splitlines()[-1] + "\n") == (2, expected), result.stderr
    assert first.poll() is None  # the first one serves on, undisturbed


async def test_data_file_is_found_beside_the_config_file(tmp_path: Path, upstream: Upstream,
                                                         processes: list[subprocess.Popen[bytes]]) -> None:
    here, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    port = free_port()
    config = gateway_config(here / "gateway.yaml", port, upstream, "store.json")
    process = start(config, tmp_path / "err", cwd=elsewhere)
    processes.append(process)
    await asyncio.to_thread(wait_for_port, port, 30)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert (here / "store.json.lock").exists() and list(elsewhere.iterdir()) == []
    assert any(path.name.startswith("store.json.journal.") for path in here.iterdir())


async def test_kill_9_during_creation_loses_no_acknowledged_token(
        tmp_path: Path, upstream: Upstream, processes: list[subprocess.Popen[bytes]]) -> None:
    """Many creations in flight, the process killed at a random moment, again and again: every
    token the API answered for is there after the restart, with its key. Enough rounds for the
    compaction (after COMPACT_AFTER_SEGMENTS starts) to run, and be killed, too; the last check
    reads a compacted snapshot."""
    data_file = str(tmp_path / "data.json")
    port = free_port()
    config = gateway_config(tmp_path / "gw.yaml", port, upstream, data_file)
    url = f"http://127.0.0.1:{port}"
    acknowledged: dict[int, tuple[str, str]] = {}  # id -> (info, key)
    rng = random.Random(1)
    rounds = COMPACT_AFTER_SEGMENTS + 3
    in_flight = 24

    async def create(session: aiohttp.ClientSession, worker: int, stop: asyncio.Event) -> None:
        serial = 0
        while not stop.is_set():
            serial += 1
            info = f"w{worker}-{serial}-{rng.random()}"
            try:
                async with session.post(f"{url}/platform/tokens", headers=AUTH,
                                        json=[{"ttl": 3600, "info": info}, {"ttl": 7200, "info": info + "b"}]) as reply:
                    if reply.status != 200:
                        continue
                    body = await reply.json()
            except (TimeoutError, aiohttp.ClientError):
                return  # the process is gone: this one was never answered
            for token in body["result"]:
                acknowledged[token["id"]] = (token["info"], token["key"])

    async def check(session: aiohttp.ClientSession) -> None:
        async with session.get(f"{url}/platform/tokens/all", params={"fields": "id,info"}, headers=AUTH) as reply:
            assert reply.status == 200
            stored = {token["id"]: token["info"] for token in (await reply.json())["result"]}
        missing = {token_id for token_id, (info, _) in acknowledged.items() if stored.get(token_id) != info}
        assert not missing, f"acknowledged but lost after kill -9: {sorted(missing)[:10]}"
        sample = rng.sample(sorted(acknowledged), min(40, len(acknowledged)))
        for token_id in sample:
            headers = {"Authorization": f"FlespiToken {acknowledged[token_id][1]}"}
            async with session.get(f"{url}/auth/info", headers=headers) as reply:
                assert reply.status == 200, token_id

    compacted = False
    timeout = aiohttp.ClientTimeout(total=10)
    for round_ in range(rounds):
        process = start(config, tmp_path / "gateway.err")
        processes.append(process)
        await asyncio.to_thread(wait_for_port, port, 30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await check(session)
            stop = asyncio.Event()
            workers = [asyncio.ensure_future(create(session, i, stop)) for i in range(in_flight)]
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            stop.set()
            await asyncio.gather(*workers)
        snapshot = Path(data_file)
        compacted = compacted or (snapshot.exists() and orjson.loads(snapshot.read_bytes()).get("journal", 0) > 0)
        assert round_ < 2 or acknowledged, (tmp_path / "gateway.err").read_text()[-2000:]
    process = start(config, tmp_path / "gateway.err")
    processes.append(process)
    await asyncio.to_thread(wait_for_port, port, 30)
    # With this many segments the last start compacts (if a round's did not finish already): the
    # tokens are then checked once more, as the new snapshot holds them.
    deadline = time.monotonic() + 120
    while not compacted and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        snapshot = Path(data_file)
        compacted = snapshot.exists() and orjson.loads(snapshot.read_bytes()).get("journal", 0) > 0
    assert compacted, "no compaction ran during the test"
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await check(session)
    assert len(acknowledged) > 100
    print(f"{len(acknowledged)} tokens acknowledged over {rounds} kills")
