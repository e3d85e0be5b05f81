"""The lean RESP client (gateway/store/resp.py) against real redis-servers and a server that never answers."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreUnavailable
from gateway.store.resp import RespClient, lean_client, pack, script_sha
from gateway.store.tokens import TokenStore

from support.servers import RedisProcess, free_port


@pytest.fixture
async def lean(redis_url: str) -> AsyncIterator[RespClient]:
    client = RespClient(redis_url, timeout=2.0, connect_timeout=2.0)
    yield client
    await client.close()


def test_pack_speaks_the_protocol() -> None:
    assert pack([("SET", b"k\r\n", 12), ("ZADD", "z", 1.5, "m")]) == (
        b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n*4\r\n$4\r\nZADD\r\n$1\r\nz\r\n$3\r\n1.5\r\n$1\r\nm\r\n")
    assert pack([("SET", "clé", "")]) == b"*3\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$0\r\n\r\n"
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])  # type: ignore[list-item]


def test_only_plain_and_unix_urls_get_the_lean_client() -> None:
    assert lean_client("redis://127.0.0.1:6379/0", 1, 1) is not None
    assert lean_client("unix:///tmp/redis.sock", 1, 1) is not None
    assert lean_client("rediss://example.com:6380/0", 1, 1) is None
    assert lean_client("memory://", 1, 1) is None


async def test_concurrent_batches_share_one_connection_in_order(lean: RespClient, key_prefix: str) -> None:
    async def one(n: int) -> list[object]:
        key = f"{key_prefix}n{n}"
        return await lean.execute([("SET", key, n), ("INCRBY", key, n), ("GET", key), ("CLIENT", "ID")])

    results = await asyncio.gather(*(one(n) for n in range(300)))
    for n, (set_reply, incremented, read, _) in enumerate(results):
        assert (set_reply, incremented, read) == (b"OK", 2 * n, str(2 * n).encode())
    assert len({client_id for *_, client_id in results}) == 1  # pipelined on one connection


async def test_large_replies_arrive_whole(lean: RespClient, key_prefix: str) -> None:
    key = f"{key_prefix}big"
    values = [os.urandom(700) for _ in range(3000)]  # ~2 MB: many reads on the socket
    for start in range(0, len(values), 500):
        await lean.execute([("RPUSH", key, *values[start:start + 500])])
    [read] = await lean.execute([("LRANGE", key, 0, -1)])
    assert read == values


async def test_error_replies_raise_and_the_connection_goes_on(lean: RespClient, key_prefix: str) -> None:
    key = f"{key_prefix}list"
    await lean.execute([("RPUSH", key, "a")])
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await lean.execute([("INCR", key)])
    with pytest.raises(NoScriptError):
        await lean.execute([("EVALSHA", "0" * 40, 0)])
    assert await lean.execute([("LLEN", key)]) == [1]


async def test_scripts_are_loaded_again_after_a_flush(redis_url: str, key_prefix: str) -> None:
    lean = RespClient(redis_url, timeout=2.0, connect_timeout=2.0)
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = TokenStore(client, key_prefix, lean)
        double = store.script("return redis.call('INCRBY', KEYS[1], ARGV[1] * 2)")
        assert await double([f"{key_prefix}d"], [3]) == 6
        await lean.execute([("SCRIPT", "FLUSH")])
        assert await double([f"{key_prefix}d"], [5]) == 16
    finally:
        await lean.close()
        await client.aclose()


async def test_password_and_database_from_the_url(key_prefix: str) -> None:
    server = RedisProcess(extra=["--requirepass", "s3cret"])
    server.start()
    try:
        lean = RespClient(f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout=2.0, connect_timeout=2.0)
        await lean.execute([("SET", f"{key_prefix}k", "in three")])
        await lean.close()
        check = aioredis.Redis(port=server.port, password="s3cret", db=3)
        assert await check.get(f"{key_prefix}k") == b"in three"
        await check.aclose()
        wrong = RespClient(f"redis://:nope@127.0.0.1:{server.port}/0", timeout=2.0, connect_timeout=2.0)
        with pytest.raises(RedisConnectionError, match="refused the handshake"):
            await wrong.execute([("PING",)])
        await wrong.close()
    finally:
        server.cleanup()


async def test_unix_socket() -> None:
    path = f"/tmp/gw-test-{os.getpid()}-{free_port()}.sock"
    server = RedisProcess(extra=["--unixsocket", path, "--unixsocketperm", "700"])
    server.start()
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        lean = RespClient(f"unix://{path}", timeout=2.0, connect_timeout=2.0)
        assert await lean.execute([("PING",)]) == [b"PONG"]
        await lean.close()
    finally:
        server.cleanup()


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    accepted: list[socket.socket] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        while True:
            connection, _ = await loop.sock_accept(listener)
            accepted.append(connection)  # read nothing, answer nothing

    acceptor = asyncio.ensure_future(accept())
    lean = RespClient(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout=0.3, connect_timeout=1.0)
    try:
        started = time.monotonic()
        first = asyncio.ensure_future(lean.execute([("PING",)]))
        second = asyncio.ensure_future(lean.execute([("PING",)]))  # on the same connection
        for call in (first, second):
            with pytest.raises(RedisTimeoutError):
                await call
        assert time.monotonic() - started < 2.0
        assert len(accepted) == 1
        with pytest.raises(RedisTimeoutError):
            await lean.execute([("PING",)])
        assert len(accepted) == 2  # the timed-out connection was dropped, a new one made
    finally:
        await lean.close()
        acceptor.cancel()
        for connection in accepted:
            connection.close()
        listener.close()


async def test_redis_away_then_back(own_redis: RedisProcess, key_prefix: str) -> None:
    lean = RespClient(own_redis.url, timeout=0.5, connect_timeout=0.5)
    client = aioredis.Redis.from_url(own_redis.url)
    store = TokenStore(client, key_prefix, lean)
    try:
        assert await store.load_many(["a" * 64]) == [None]
        own_redis.stop()
        with pytest.raises(StoreUnavailable):
            await store.load_many(["a" * 64])
        with pytest.raises(StoreUnavailable):  # nothing listens: refused at once
            await store.load_many(["a" * 64])
        own_redis.start()
        # Back by itself: the next loads connect again. A loaded machine may need more than one
        # 0.5 s timeout to bring a fresh redis-server to its first answer, so a few tries.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await store.load_many(["a" * 64]) == [None]
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the lean client never reconnected"
                await asyncio.sleep(0.1)
    finally:
        await lean.close()
        await client.aclose()


async def test_replies_to_a_callback(lean: RespClient, key_prefix: str) -> None:
    key = f"{key_prefix}c"
    got: list[object] = []
    assert not lean.execute_then([("PING",)], got.append)  # no connection yet: nothing sent
    await lean.execute([("SET", key, 1)])
    answered = asyncio.Event()

    def answer(replies: object) -> None:
        got.append(replies)
        answered.set()
    assert lean.execute_then([("INCR", key), ("LPUSH", key, "x"), ("GET", key)], answer)
    async with asyncio.timeout(2):
        await answered.wait()
    [[incremented, wrong_type, read]] = got
    assert incremented == 2 and read == b"2"
    assert isinstance(wrong_type, hiredis.ReplyError) and "WRONGTYPE" in str(wrong_type)


async def test_loads_answered_to_a_callback_and_store_failures(own_redis: RedisProcess, key_prefix: str) -> None:
    """load_many_then: the records, or StoreUnavailable when Redis does not answer in time (a
    private server: it is paused)."""
    writes = RespClient(own_redis.url, timeout=2.0, connect_timeout=2.0)
    loads = RespClient(own_redis.url, timeout=0.3, connect_timeout=2.0)
    client = aioredis.Redis.from_url(own_redis.url)
    store = TokenStore(client, key_prefix, writes, loads)
    digest = "d" * 64
    await store.insert([{"id": 7, "digest": digest, "info": "", "enabled": True, "access": {"type": 0},
                         "expire": 0, "ttl": 60, "created": 1, "accessed": 0, "ips": "", "origins": "*", "cid": 0,
                         "metadata": {}}])
    try:
        assert not store.load_many_then([digest], print)  # the loads connection is not open yet
        assert [record["id"] if record else None for record in await store.load_many([digest, "e" * 64])] == [7, None]
        outcomes: asyncio.Queue[object] = asyncio.Queue()
        assert store.load_many_then([digest, "e" * 64], outcomes.put_nowait)
        records = await asyncio.wait_for(outcomes.get(), 2)
        assert isinstance(records, list) and records[0]["id"] == 7 and records[0]["digest"] == digest
        assert records[1] is None
        await client.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        assert store.load_many_then([digest], outcomes.put_nowait)
        assert isinstance(await asyncio.wait_for(outcomes.get(), 2), StoreUnavailable)
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")
        await writes.close()
        await loads.close()
        await client.aclose()


async def test_batched_writes_in_many_commands_lose_nothing(redis_url: str, key_prefix: str) -> None:
    """`accessed` goes in TOUCH calls of TOUCH_CHUNK tokens and log lines in LOG_PUSH calls of
    CALL_KEYS lists: more than one command's worth still lands whole, and the newest time stays."""
    from gateway.config import TokenLogSettings
    from gateway.store.tokens import TOUCH_CHUNK
    from gateway.writers.tokenlogs import CALL_KEYS, RedisLogSink

    lean = RespClient(redis_url, timeout=2.0, connect_timeout=2.0)
    client = aioredis.Redis.from_url(redis_url)
    store = TokenStore(client, key_prefix, lean)
    try:
        digests = [f"{n:064x}" for n in range(2 * TOUCH_CHUNK + 7)]
        await store.touch({digest: 1_900_000_000 for digest in digests})
        await store.touch({digests[0]: 1_800_000_000, digests[-1]: 1_950_000_000})
        times = await client.hmget(f"{key_prefix}used", digests)
        assert times == [b"1900000000"] * (len(digests) - 1) + [b"1950000000"]

        sink = RedisLogSink(store, TokenLogSettings(per_token=2, per_account=5))
        records = [{"token_id": n, "cid": 0, "n": n} for n in range(CALL_KEYS + 9)]
        sink.add(records, [b'{"n":%d}' % n for n in range(len(records))])
        await sink.flush()
        lists = [await client.lrange(sink.token_key(n, 0), 0, -1) for n in range(len(records))]
        assert lists == [[b'{"n":%d}' % n] for n in range(len(records))]
        assert await client.lrange(sink.account_key(0), 0, -1) == [
            b'{"n":%d}' % n for n in range(len(records) - 5, len(records))]

        # one busy token: more lines than one RPUSH chunk and than its cap, over two flushes
        busy = RedisLogSink(store, TokenLogSettings(per_token=1000, per_account=5000))
        lines = [b'{"m":%d}' % n for n in range(1100)]
        busy.add([{"token_id": 7, "cid": 1}] * 1100, lines)
        await busy.flush()
        assert await client.lrange(busy.token_key(7, 0), 0, -1) == lines[100:]
        busy.add([{"token_id": 7, "cid": 1}] * 10, [b'{"m":%d}' % n for n in range(1100, 1110)])
        await busy.flush()
        added = [b'{"m":%d}' % n for n in range(1100, 1110)]
        assert await client.lrange(busy.token_key(7, 0), 0, -1) == lines[110:] + added
        assert await client.llen(busy.account_key(1)) == 1110
    finally:
        await lean.close()
        await client.aclose()


async def test_preloaded_scripts_are_there_on_every_new_connection(own_redis: RedisProcess) -> None:
    """`preload` (a cluster master's script connection): each connection it opens loads the scripts
    first, so a first EVALSHA finds them, also after the server lost them and the connection
    was made again."""
    source = "return 'preloaded ' .. ARGV[1]"
    sha = script_sha(source)
    client = RespClient(own_redis.url, timeout=2.0, connect_timeout=2.0, preload=[source])
    try:
        async with aioredis.Redis.from_url(own_redis.url) as plain:
            assert await plain.script_exists(sha) == [False]
            assert await client.execute([("EVALSHA", sha, 0, "a")]) == [b"preloaded a"]
            await plain.script_flush()
            client.reset()  # as a failover does: the next call opens a new connection
            assert await client.execute([("EVALSHA", sha, 0, "b")]) == [b"preloaded b"]
    finally:
        await client.close()
