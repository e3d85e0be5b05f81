"""Token records in Redis (or the embedded store, which speaks the same protocol).

The key names are in `store/keys.py`, the Lua scripts in `store/scripts.py`.

A rotated key (`rotate`) with a grace period keeps a copy of the record under its old digest,
ending at the grace's end (`expire`, and the Redis key's own expiry); the live record lists such
copies in `graced` (old digest -> end) so that changes and deletion reach them too.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.config import RedisSettings
from gateway.counters import BATCH_BOUNDS, Buckets
from gateway.errors import NOT_REPLICATED, Denied, StoreUnavailable
from gateway.store.keys import Keys, keys_for
from gateway.store.resp import RespClient, reply_error, script_sha
from gateway.store.scripts import FOLD_ACCESSED, TOUCH
from gateway.tokens import records_from_replies

T = TypeVar("T")
STORE_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
# A PUBLISH that may go to another node of a cluster: its node could not be reached, a connection
# redis-py tore down under it (`None.writelines`), or no node known for the channel's slot.
PUBLISH_ELSEWHERE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, asyncio.TimeoutError,
                     AttributeError, redis.exceptions.RedisClusterException)
# No error is retried (so none reconnects inside the call that met it): see `subscription`.
NO_RETRY = Retry(NoBackoff(), 0, supported_errors=())
NEVER = 2 ** 40
# Tokens per TOUCH call of the batched `accessed` writes: ~0.5 ms of Redis time (2.3 µs a token in
# a million-field hash; the sorted set it replaced took 4.7 µs, 7 µs with the machine busy).
TOUCH_CHUNK = 256
FOLD_CHUNK = 1000
# Redis Cluster: the replies that mean "not here, or not now" while slots move (`RedisStore.call`).
CLUSTER_MOVING = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                  redis.exceptions.ClusterDownError)
CLUSTER_RETRY_FOR = 2.0
TORN_RETRIES = 2
# `gateway migrate` locks its source with the `migrating` marker (`store/migrate.py`). An API change
# reads it once, before its first write (`PlatformApi`), so a change that found no marker just
# before it was set still writes after: the migration waits MIGRATION_SETTLE seconds, then copies.
# What a change does after its check is a few Redis round trips (reads of what it changes, the
# writes, the WAIT): milliseconds, each command bounded by redis.socket_timeout (0.5 s by default)
# or, on a cluster, by CLUSTER_RETRY_FOR while a slot moves. A change that outlasts the bound is
# logged (`PlatformApi`), so it is seen if a migration began meanwhile.
MIGRATION_SETTLE = 5.0
# Refused changes may be tried again in this many seconds (`Retry-After`).
MIGRATION_RETRY_AFTER = 5


def cluster_unreachable(error: BaseException) -> bool:
    """redis-py's cluster client, with no node answering, reads the slot map again and fails with
    RedisClusterException ("cannot be connected"), not a RedisError: the store is unavailable as
    much as when one node times out. Its other RedisClusterExceptions (a command it cannot route)
    are bugs, and stay errors."""
    return isinstance(error, redis.exceptions.RedisClusterException) and isinstance(error.__cause__, STORE_ERRORS)


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """A client that fails fast: short socket timeouts and a single immediate retry."""
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=10,
    )


def grace_digests(record: dict[str, Any], now: float | None = None) -> list[str]:
    """The old digests of a rotated token whose grace has not ended."""
    graced = record.get("graced") or {}
    moment = time.time() if now is None else now
    return [digest for digest, until in graced.items() if until > moment]


def grace_copy(record: dict[str, Any], digest: str, until: int) -> dict[str, Any]:
    """What the old key of a rotated token reads during its grace: the token as it is, ending at
    `until` at the latest. `expire` carries the end, so every instance refuses the old key from
    then on, whatever it has cached; a ttl token is valid no longer than it would have been."""
    ends = min(until, expires_at(record))
    copy = {name: value for name, value in record.items() if name != "graced"}
    return {**copy, "digest": digest, "expire": ends, "ttl": 0}


def rotated(record: dict[str, Any], new_digest: str, grace_until: int | None) -> dict[str, Any]:
    """The record moved to `new_digest`: its old digests still in their grace (`graced`, digest ->
    end), the one it leaves among them when `grace_until` is given."""
    now = time.time()
    graced = {digest: until for digest, until in (record.get("graced") or {}).items() if until > now}
    if grace_until is not None:
        graced[record["digest"]] = grace_until
    moved = {**record, "digest": new_digest, "graced": graced}
    if not graced:
        del moved["graced"]
    return moved


def expires_at(record: dict[str, Any]) -> int:
    """When the token stops being valid, given what the record says now."""
    expire, ttl = int(record.get("expire", 0)), int(record.get("ttl", 0))
    ends = expire if expire > 0 else 0
    if ttl > 0:
        ends = max(ends, max(int(record.get("created", 0)), int(record.get("accessed", 0))) + ttl)
    return ends or NEVER


class RedisStore:
    """Shared plumbing: the client, key names, error mapping, change hooks for persistence."""

    def __init__(self, client: aioredis.Redis, prefix: str, lean: RespClient | None = None,
                 lean_loads: RespClient | None = None) -> None:
        self.client = client
        # redis-py's cluster client: it routes each command by its key's slot, so a command
        # without a key (SCRIPT LOAD, PUBLISH in a pipeline) is sent another way there.
        self.cluster = isinstance(client, RedisCluster)
        self.lean = lean  # for `batch`: the hot, batched traffic
        # Token loads on a connection of their own: a request waits for them, and on the shared
        # one they queued behind the batched writes (Redis runs each client's commands in order).
        self.lean_loads = lean_loads
        self.prefix = prefix
        # On a cluster, the sharded layout (`ClusterKeys`); elsewhere the one that always was.
        self.keys: Keys = keys_for(prefix, self.cluster)
        self.channel = self.keys.channel
        # The embedded store makes a change durable through this before the API answers.
        self.after_change: Callable[[], Awaitable[None]] | None = None
        # This process's own cache hears its changes at once, not a pub/sub round trip later.
        self.on_publish: Callable[[str], None] | None = None
        # What `subscription` listens on (Sentinel: a client that never reconnects by itself, so
        # that the cache hears of every gap and revalidates what it holds).
        self.listener = client
        # How many subscriptions the cache holds on the channel (`subscription`): on a cluster
        # two, on two masters, so that no one node's death leaves this instance deaf.
        self.subscriptions = 2 if self.cluster else 1
        self._subscribed_on: dict[int, str] = {}  # subscription number -> its master, while held
        self._subscription_failed: dict[int, str] = {}  # and the master it last failed on
        # Messages not yet published (`publish_later`), in order, and the announcer's wake-up.
        self._unannounced: dict[str, None] = {}
        self._announce = asyncio.Event()
        # API changes are acknowledged once this many replicas hold them (`require_replicas`).
        self.waiter: aioredis.Redis | None = None
        # On a cluster, the WAIT on every master instead (`ReplicaWait.confirmed`).
        self.cluster_wait: Callable[[int, int], Awaitable[bool]] | None = None
        self.replicas = 0
        self.wait_ms = 0
        # Round trips of the batched traffic (`batch`, `load_many_then`), for the metrics.
        self.batch_latency = Buckets(BATCH_BOUNDS)

    def require_replicas(self, waiter: aioredis.Redis, replicas: int, timeout: float) -> None:
        """`publish` (which follows every change the API makes) waits for `replicas` replicas to
        hold what was written before it, `timeout` at most, on `waiter` (whose socket timeout is
        longer than that)."""
        self.waiter, self.replicas, self.wait_ms = waiter, replicas, max(1, round(timeout * 1000))

    def require_replicas_on_cluster(self, confirmed: Callable[[int, int], Awaitable[bool]], replicas: int,
                                    timeout: float) -> None:
        """`require_replicas` on a cluster: `confirmed(replicas, wait_ms)` asks every master."""
        self.cluster_wait, self.replicas, self.wait_ms = confirmed, replicas, max(1, round(timeout * 1000))

    async def migrating(self) -> bool:
        """Whether `gateway migrate` is copying this store (its marker is set): one GET, made by
        each API change and housekeeping step, never by an authentication."""
        return bool(await self.call(lambda: self.client.exists(self.keys.migrating)))

    async def changed(self) -> None:
        if self.after_change is not None:
            await self.after_change()

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if self.cluster:
            return await self._call_on_cluster(operation)
        try:
            return await operation()
        except STORE_ERRORS as exc:
            raise _unavailable(exc) from exc
        except RuntimeError as exc:
            if torn_write(exc):  # written on a connection closed under it (`torn_write`)
                raise _unavailable(exc) from exc
            raise

    async def _call_on_cluster(self, operation: Callable[[], Awaitable[T]]) -> T:
        """`call`, repeated while the slot is on the move: a redirection, or TRYAGAIN (a command
        on several keys of a slot being migrated, some of them moved already), refuse a command
        before it runs, so repeating it is safe; CLUSTERDOWN while a failover elects a master.
        For CLUSTER_RETRY_FOR seconds at most, then the store is unavailable."""
        deadline = time.monotonic() + CLUSTER_RETRY_FOR
        pause = 0.01
        torn = 0
        while True:
            try:
                return await operation()
            except CLUSTER_MOVING as exc:
                if time.monotonic() + pause > deadline:
                    raise _unavailable(exc) from exc
            except redis.exceptions.ConnectionError as exc:
                # redis-py's cluster client closes every node connection when one of its pipelines
                # meets a connection error (to read the slot map again), under the commands of
                # other tasks: they read "Connection closed by server". Sent again, at most
                # TORN_RETRIES times (a node really down is not waited for here).
                torn += 1
                if torn > TORN_RETRIES:
                    raise _unavailable(exc) from exc
            except STORE_ERRORS as exc:
                raise _unavailable(exc) from exc
            except redis.exceptions.RedisClusterException as exc:
                if cluster_unreachable(exc):
                    raise _unavailable(exc) from exc
                raise
            except (AttributeError, RuntimeError) as exc:
                # redis-py's cluster client, when a node's connection is torn down under a command
                # while slots move, fails writing to it (`None.writelines`, or uvloop's closed
                # transport) before anything is sent: as safe to repeat as a redirection, and a
                # store failure if it persists.
                if not torn_write(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    raise _unavailable(exc) from exc
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    async def batch(self, commands: Sequence[Sequence[Any]], urgent: bool = False) -> list[Any]:
        """Commands sent together, their replies in order (raw: bytes, ints, lists), the first
        error reply raised; the lean client when there is one (`store/resp.py`), else a pipeline.
        `urgent`: a request is waiting for the replies (the loads' own connection)."""
        lean = self.lean_loads if urgent and self.lean_loads is not None else self.lean
        started = time.perf_counter()
        if lean is not None:
            replies = await lean.execute(commands)
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute()
        self.batch_latency.observe(time.perf_counter() - started)
        return replies

    async def pipelined(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Commands on redis-py, in one pipeline (not a transaction): on a cluster, one round trip
        per node, each node's commands in order. The commands must be safe to send again (the whole
        pipeline is, while slots move); replies in order, the first error raised."""
        if not commands:
            return []

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute()
        return await self.call(run)

    async def scripts(self, source: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """One script run once per call (its KEYS, its ARGV), all in one pipeline: on a cluster
        one round trip per node, where each call's keys must share a slot. A call refused while its
        slot moves is sent again (alone: the others ran), for CLUSTER_RETRY_FOR at most; the script
        is sent whole where a node lost it. Replies in order of the calls. On failure
        `ScriptsFailed`, which says which calls ran (the others may or may not have)."""
        sha = script_sha(source)
        replies: list[Any] = [None] * len(calls)
        done: set[int] = set()
        whole: set[int] = set()
        pending = list(range(len(calls)))
        deadline = time.monotonic() + CLUSTER_RETRY_FOR
        pause = 0.01
        while pending:
            async def run(todo: list[int] = pending) -> list[Any]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for index in todo:
                        keys, args = calls[index]
                        if index in whole:
                            pipe.execute_command("EVAL", source, len(keys), *keys, *args)
                        else:
                            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                    return await pipe.execute(raise_on_error=False)
            try:
                answers = await run()
            except (*STORE_ERRORS, AttributeError, RuntimeError) as exc:
                if isinstance(exc, (AttributeError, RuntimeError)) and not torn_write(exc):
                    raise
                raise ScriptsFailed(exc, done) from exc
            except redis.exceptions.RedisClusterException as exc:
                if cluster_unreachable(exc):
                    raise ScriptsFailed(exc, done) from exc
                raise
            again: list[int] = []
            fatal: BaseException | None = None
            moving: BaseException | None = None
            for index, answer in zip(pending, answers, strict=True):
                if isinstance(answer, redis.exceptions.NoScriptError):
                    whole.add(index)
                    again.append(index)
                elif isinstance(answer, CLUSTER_MOVING):
                    again.append(index)
                    moving = answer
                elif isinstance(answer, BaseException):
                    fatal = fatal or answer
                else:
                    replies[index] = answer
                    done.add(index)
            if fatal is not None:
                raise ScriptsFailed(fatal, done) from fatal
            if moving is not None:
                if time.monotonic() + pause > deadline:
                    raise ScriptsFailed(moving, done) from moving
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.2)
            pending = again
        return replies

    def script(self, source: str) -> Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]:
        """A Lua script run with EVALSHA, loaded again if the server lost it (restart, SCRIPT FLUSH).

        Batched writes use scripts rather than pipelines: one command and one reply for hundreds
        of list pushes or counter increments. Every key a script touches is passed in KEYS, all of
        one slot (the prefix's hash tag, or on a cluster the tag its caller grouped them by).
        """
        sha = script_sha(source)

        async def attempt(keys: Sequence[str], args: Sequence[Any]) -> Any:
            command = ("EVALSHA", sha, len(keys), *keys, *args)
            try:
                return (await self.batch([command]))[0]
            except redis.exceptions.NoScriptError:
                pass
            if self.cluster:  # EVAL goes to the node of the keys, and leaves the script cached there
                return (await self.batch([("EVAL", source, len(keys), *keys, *args)]))[0]
            return (await self.batch([("SCRIPT", "LOAD", source), command]))[1]

        async def run(keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await self.call(lambda: attempt(keys, args))
        return run

    async def publish(self, messages: Iterable[str], acknowledge: bool = True) -> None:
        """Invalidate `messages` on every instance. With `require_replicas` (and `acknowledge`), then
        wait until the replicas hold every write made before: Denied(503) if they do not in time,
        the change made on the master (and published) but not safe from a failover.

        WAIT counts what the replicas acknowledged of the writes made on its own connection; the
        INCR before it, on that connection, is such a write and comes after the change.

        Messages that could not be published are remembered (`publish_later`): published again in
        the background, and before those of any later change, so none is acknowledged before
        every earlier change was announced (a retried DELETE that finds nothing left to delete)."""
        messages = list(messages)
        if self.on_publish is not None:
            for message in messages:
                self.on_publish(message)
        earlier = list(self._unannounced)
        try:
            await self._publish([*earlier, *messages], acknowledge)
        except StoreUnavailable:
            self.publish_later(messages)
            raise
        for message in earlier:
            self._unannounced.pop(message, None)

    def publish_later(self, messages: Iterable[str]) -> None:
        """Messages of a change that failed, perhaps half made (or whose announcement failed):
        published by `run_announcer` as soon as the store takes them, and before any later
        change's (`publish`)."""
        for message in messages:
            self._unannounced[message] = None
        if self._unannounced:
            self._announce.set()

    async def announce_earlier(self) -> None:
        """For a change that made no write (a retried DELETE finding nothing): what earlier
        changes could not announce, first (StoreUnavailable if it still cannot be)."""
        if self._unannounced:
            await self.publish(())

    async def run_announcer(self, pause: float = 0.25) -> None:
        """Publish what `publish_later` remembered, every `pause` until the store takes it."""
        while True:
            await self._announce.wait()
            while self._unannounced:
                earlier = list(self._unannounced)
                try:
                    await self._publish(earlier, acknowledge=False)
                except StoreUnavailable:
                    await asyncio.sleep(pause)
                    continue
                for message in earlier:
                    self._unannounced.pop(message, None)
            self._announce.clear()

    async def _publish(self, messages: list[str], acknowledge: bool) -> None:
        if self.cluster:  # no pipeline for PUBLISH there; any node passes it to every node
            for message in messages:
                await self._publish_on_cluster(message)
            cluster_wait = self.cluster_wait
            if acknowledge and self.replicas > 0 and cluster_wait is not None and \
                    not await self.call(lambda: cluster_wait(self.replicas, self.wait_ms)):
                raise Denied(503, NOT_REPLICATED)
            return
        waits = acknowledge and self.replicas > 0 and self.waiter is not None
        client = self.waiter if waits and self.waiter is not None else self.client

        async def run() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.publish(self.channel, message)
                if waits:
                    pipe.incr(self.keys.writes)
                    pipe.execute_command("WAIT", self.replicas, self.wait_ms)
                return await pipe.execute()
        replies = await self.call(run)
        if waits and int(replies[-1]) < self.replicas:
            raise Denied(503, NOT_REPLICATED)

    async def heartbeat(self, message: str) -> None:
        """One message on the invalidation channel, to the store itself (not `on_publish`): the
        store's answer and the subscriber's hearing it back are what `store/health.py` watches."""
        if self.cluster:
            await self._publish_on_cluster(message)
            return
        await self.call(lambda: self.client.publish(self.channel, message))

    async def _publish_on_cluster(self, message: str) -> None:
        """PUBLISH has no key: every node passes it to every node's subscribers over the cluster
        bus, even while the cluster state is fail. It is sent at once to the node redis-py routes
        it to (the master of the channel's slot) and to the first other master by address: where
        every instance's two subscriptions are (`_subscription_node`), so it reaches them with
        no hop over the bus (which in Redis 7.0 sometimes takes ~40 ms), one of them also while
        the other master is dead. If neither takes it, every other node in turn (masters first,
        one attempt each); StoreUnavailable only when none does."""
        cluster = cast(RedisCluster, self.client)
        second = self._second_master()
        attempts = [cluster.publish(self.channel, message)]
        if second is not None:
            attempts.append(cluster.execute_command("PUBLISH", self.channel, message, target_nodes=second))
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if len(errors) < len(outcomes):
            return
        failure = errors[0]
        for error in errors:
            failure = _elsewhere(error)
        for node in sorted(cluster.get_nodes(), key=lambda node: (node.server_type != "primary", node.name)):
            if second is not None and node.name == second.name:
                continue
            try:
                await cluster.execute_command("PUBLISH", self.channel, message, target_nodes=node)
                return
            except Exception as exc:
                failure = _elsewhere(exc)
        raise _unavailable(failure) from failure

    def _second_master(self) -> Any:
        """The first master by address other than the one of the channel's slot (redis-py's slot
        map); None if there is none."""
        channel = self._channel_node()
        others = sorted((node for node in cast(RedisCluster, self.client).get_primaries()
                         if channel is None or node.name != channel.name), key=lambda node: node.name)
        return others[0] if others else None

    @asynccontextmanager
    async def subscription(self, number: int = 0) -> AsyncIterator[Any]:
        """The invalidation channel's pub/sub (on `listener`). Its connection does not retry:
        redis-py would reconnect and re-subscribe inside the failed read, silently, after round
        trips that a busy loop makes long; a lost connection is raised at once instead, and the
        caller subscribes again. Subscription confirmations are kept, and a reconnection redis-py
        still makes by itself (a PING finding the connection closed) raises (`_Subscription`).

        On a cluster, subscription `number` is on a master of its own (`_subscription_node`), on
        a connection outside redis-py's cluster client: that one closes every node connection
        when it reads the slot map again (after any node failed), which would cut every
        subscription at once. A message published on any node reaches every node's subscribers."""
        pool: aioredis.ConnectionPool | None = None
        node_name = ""
        listener: Any = self.listener
        if self.cluster:
            node = await self._subscription_node(number)
            node_name = node.name
            pool = aioredis.ConnectionPool(connection_class=node.connection_class, max_connections=2,
                                           **node.connection_kwargs)
            listener = aioredis.Redis(connection_pool=pool)
            self._subscribed_on[number] = node_name
        pubsub = listener.pubsub(ignore_subscribe_messages=False)
        connection: Any = None
        try:
            await self.call(lambda: pubsub.subscribe(self.channel))
            connection = pubsub.connection
            if connection is not None:
                kept, connection.retry = connection.retry, NO_RETRY
            subscription = _Subscription(pubsub)
            try:
                yield subscription
            finally:
                subscription.close()
        except Exception:
            if node_name:
                self._subscription_failed[number] = node_name  # the next try prefers another master
            raise
        finally:
            self._subscribed_on.pop(number, None)
            if connection is not None:
                connection.retry = kept  # the pool lends it out again
            with suppress(*STORE_ERRORS):
                await pubsub.aclose()
            if pool is not None:
                with suppress(*STORE_ERRORS):
                    await pool.disconnect()

    async def _subscription_node(self, number: int) -> Any:
        """The master for subscription `number`: for 0 the one of the channel's slot, where the
        changes are published (delivered there without a hop over the cluster bus, which can take
        tens of ms); for 1 the first other master by address, where they are published when that
        one is down (`_publish_on_cluster`). Never the one another subscription is on, nor the one
        this subscription last failed on, while there is another (the slot map may still name a
        dead master). A slot map not known yet is read first."""
        cluster = cast(RedisCluster, self.client)
        if not cluster.get_primaries():
            await self.call(cluster.initialize)
        primaries = sorted(cluster.get_primaries(), key=lambda node: node.name)
        if not primaries:
            raise _unavailable(redis.exceptions.ConnectionError("no master known"))
        channel = self._channel_node()
        if channel is not None:  # first for subscription 0, last for the other
            primaries.sort(key=lambda node: (node.name != channel.name) == (number == 0))
        taken = {name for other, name in self._subscribed_on.items() if other != number}
        free = [node for node in primaries if node.name not in taken] or primaries
        failed = self._subscription_failed.get(number)
        return ([node for node in free if node.name != failed] or free)[0]

    def _channel_node(self) -> Any:
        """The master of the channel's slot in redis-py's slot map; None if not known."""
        try:
            return cast(RedisCluster, self.client).get_node_from_key(self.channel)
        except redis.exceptions.RedisClusterException:
            return None


class TokenStore(RedisStore):
    def __init__(self, client: aioredis.Redis, prefix: str, lean: RespClient | None = None,
                 lean_loads: RespClient | None = None) -> None:
        super().__init__(client, prefix, lean, lean_loads)
        keys = self.keys
        self._ids = keys.ids
        self._used = keys.used
        self._legacy_accessed = keys.legacy_accessed
        self._touch = self.script(TOUCH)
        self._fold = self.script(FOLD_ACCESSED)
        self.expiry_key = keys.expiry
        self._next_id = keys.next_id
        self._bin = keys.bin
        self._bin_times = keys.bin_times
        self._tok = keys.token
        self._account = keys.account_tokens

    # -- hot path (cache misses) and batched writes ---------------------------------------------

    async def load(self, digest: str) -> dict[str, Any] | None:
        """The record and its accessed time."""
        [record] = await self.load_many([digest])
        return record

    async def load_many(self, digests: Sequence[str]) -> list[dict[str, Any] | None]:
        """Records (or None) in the order asked, in one round trip of three commands however many:
        MGET of the records, HMGET of their accessed times, and ZMSCORE (Redis 6.2+) of the times
        an instance of an older version may still be writing to the sorted set (none: no key,
        next to no Redis time).

        A record's `digest` is the very string object asked for (the cache keeps it as its key).
        """
        if not digests:
            return []

        raws, used, legacy = await self.call(lambda: self.batch(self._load_commands(digests), urgent=True))
        return records_from_replies(digests, raws, used, legacy)

    async def load_each(self, digests: Sequence[str]) -> list[dict[str, Any] | StoreUnavailable | None]:
        """`load_many`, where a digest that could not be read may get StoreUnavailable of its own
        (a cluster node that does not answer); here the batch is read whole or not at all."""
        return list(await self.load_many(digests))

    def load_many_then(self, digests: Sequence[str],
                       callback: Callable[[list[dict[str, Any] | StoreUnavailable | None] | Exception], None]
                       ) -> bool:
        """`load_many` without a task: `callback` gets the records, or the exception (a store
        failure as `StoreUnavailable`), straight from the reply. False, and nothing asked, when
        that is not possible (no lean client, or its connection not open yet): use `load_many`.
        A request waiting for its token goes on as soon as the reply is read, not one event-loop
        turn later."""
        lean = self.lean_loads
        if lean is None or not digests:
            return False
        started = time.perf_counter()

        def answer(replies: list[Any] | BaseException) -> None:
            self.batch_latency.observe(time.perf_counter() - started)
            # Every failure here is the store's: the connection fails with redis-py's errors only,
            # and an error reply is one of them (`reply_error`).
            if isinstance(replies, BaseException):
                callback(_unavailable(replies))
                return
            error = reply_error(replies)
            if error is not None:
                callback(_unavailable(error))
                return
            loaded: list[dict[str, Any] | StoreUnavailable | None] | Exception
            try:
                loaded = list(records_from_replies(digests, replies[0], replies[1], replies[2]))
            except Exception as exc:
                loaded = exc
            callback(loaded)
        return lean.execute_then(self._load_commands(digests), answer)

    def _load_commands(self, digests: Sequence[str]) -> list[tuple[Any, ...]]:
        tok = self.keys.token_prefix
        return [("MGET", *[tok + digest for digest in digests]), ("HMGET", self._used, *digests),
                ("ZMSCORE", self._legacy_accessed, *digests)]

    async def touch(self, accessed: dict[str, int]) -> None:
        """Record uses; a time older than the stored one is not written (`TOUCH`).

        In calls of TOUCH_CHUNK tokens, one after the other: a second of cache-miss traffic
        touches thousands of tokens, and one call for all of them would hold Redis for
        milliseconds, with every token load queued behind it. A step that fails leaves the later
        ones unwritten; the caller keeps them all (a repeat is harmless)."""
        if not accessed:
            return
        pairs, step = _pairs(accessed), 2 * TOUCH_CHUNK
        for start in range(0, len(pairs), step):
            await self._touch([self._used], pairs[start:start + step])

    async def fold_legacy_accessed(self) -> int:
        """Move what the old `accessed` sorted set holds into the `used` hash; how many moved.
        Nothing to do (one command) once no instance of an older version writes it any more."""
        moved = 0
        while True:
            count = int(await self._fold([self._legacy_accessed, self._used], [FOLD_CHUNK]))
            moved += count
            if count < FOLD_CHUNK:
                break
        return moved

    async def sweep_orphans(self, now: float | None = None) -> int:
        """Index entries a crash left without their record: none here (every change is one
        transaction); the cluster layout's store has some to look for (`store/sharded.py`)."""
        return 0

    # -- tokens API ---------------------------------------------------------------------------

    async def allocate_ids(self, count: int) -> list[int]:
        last = int(await self.call(lambda: self.client.incrby(self._next_id, count)))
        return list(range(last - count + 1, last + 1))

    def _write(self, pipe: Any, record: dict[str, Any]) -> None:
        pipe.set(self._tok(record["digest"]), orjson.dumps(record))
        pipe.hset(self._ids, str(record["id"]), record["digest"])
        pipe.sadd(self._account(int(record.get("cid", 0))), str(record["id"]))
        pipe.zadd(self.expiry_key, {str(record["id"]): expires_at(record)})

    async def insert(self, records: list[dict[str, Any]]) -> None:
        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for record in records:
                    self._write(pipe, record)
                await pipe.execute()
        await self.call(run)
        await self.changed()

    async def insert_if_absent(self, record: dict[str, Any]) -> bool:
        """Atomically create a record unless its key exists (bootstrap from several instances)."""
        return await self._write_if_absent(record)

    async def insert_first(self, record: dict[str, Any]) -> bool:
        """Create `record` as token 1 if no token was ever created here (`next_id` absent), in one
        watched transaction: of several instances starting on a new Redis, one creates it."""
        async def run() -> bool:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(self._next_id)
                if await pipe.exists(self._next_id):
                    return False
                pipe.multi()
                pipe.set(self._next_id, record["id"])
                self._write(pipe, record)
                await pipe.execute()
                return True
        try:
            written = await self.call(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, redis.exceptions.WatchError):
                return False
            raise
        if written:
            await self.changed()
        return written

    async def _write_if_absent(self, record: dict[str, Any], also: Callable[[Any], None] | None = None) -> bool:
        """Write a record (and `also`'s commands) in one transaction, unless its key is in use."""
        key = self._tok(record["digest"])

        async def run() -> bool:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                if await pipe.exists(key):
                    return False
                pipe.multi()
                self._write(pipe, record)
                if also is not None:
                    also(pipe)
                await pipe.execute()
                return True
        try:
            written = await self.call(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, redis.exceptions.WatchError):
                return False
            raise
        if written:
            await self.changed()
        return written

    async def account_ids(self, cid: int) -> list[int]:
        ids = await self.call(lambda: self.client.smembers(self._account(cid)))
        return sorted(int(value) for value in ids)

    async def get_many(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Records for the ids that exist, in the order asked; unknown ids are skipped."""
        wanted = [str(token_id) for token_id in ids]
        if not wanted:
            return []
        digests = await self.call(lambda: self.client.hmget(self._ids, wanted))
        found = [cast(bytes, digest).decode() for digest in digests if digest is not None]  # no decode_responses
        return [record for record in await self.load_many(found) if record is not None]

    async def replace(self, record: dict[str, Any]) -> None:
        """Write a changed record; the grace copies of its old keys take the change too."""
        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self._tok(record["digest"]), orjson.dumps(record))
                pipe.zadd(self.expiry_key, {str(record["id"]): expires_at(record)})
                self._write_grace_copies(pipe, record)
                await pipe.execute()
        await self.call(run)
        await self.changed()

    def _write_grace_copies(self, pipe: Any, record: dict[str, Any]) -> None:
        graced = record.get("graced") or {}
        for digest in grace_digests(record):
            until = int(graced[digest])
            pipe.set(self._tok(digest), orjson.dumps(grace_copy(record, digest, until)), exat=until)

    async def rotate(self, record: dict[str, Any], new_digest: str, grace_until: int | None) -> dict[str, Any] | None:
        """Move a token to a new key digest, keeping its id, fields, `accessed` and logs (by id).

        Without `grace_until` the old key is gone at once; with it, a copy under the old digest
        serves until then (`grace_copy`) and Redis drops it afterwards. One transaction, watched:
        None (nothing written) if the token changed key or was deleted meanwhile; else the record
        as now stored."""
        token_id, old = str(record["id"]), record["digest"]
        moved = rotated(record, new_digest, grace_until)

        async def run() -> bool:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(self._ids, self._tok(old))
                current = await pipe.hget(self._ids, token_id)
                if current is None or (current.decode() if isinstance(current, bytes) else current) != old:
                    return False
                pipe.multi()
                pipe.set(self._tok(new_digest), orjson.dumps(moved))
                pipe.hset(self._ids, token_id, new_digest)
                pipe.hset(self._used, new_digest, int(record.get("accessed", 0)))
                if grace_until is None:
                    pipe.delete(self._tok(old))
                    pipe.hdel(self._used, old)
                    pipe.zrem(self._legacy_accessed, old)
                else:
                    pipe.set(self._tok(old), orjson.dumps(grace_copy(moved, old, grace_until)), exat=grace_until)
                await pipe.execute()
                return True
        try:
            written = await self.call(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, redis.exceptions.WatchError):
                return None
            raise
        if not written:
            return None
        await self.changed()
        return moved

    async def remove(self, records: list[dict[str, Any]], *, to_bin: bool) -> None:
        """Delete records (all in one transaction); with `to_bin` keep them for restoring."""
        now = int(time.time())

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for record in records:
                    token_id = str(record["id"])
                    for digest in grace_digests(record):  # a rotated key's grace ends with the token
                        pipe.delete(self._tok(digest))
                        pipe.hdel(self._used, digest)
                    record = {name: value for name, value in record.items() if name != "graced"}
                    pipe.delete(self._tok(record["digest"]))
                    pipe.hdel(self._ids, token_id)
                    pipe.srem(self._account(int(record.get("cid", 0))), token_id)
                    pipe.hdel(self._used, record["digest"])
                    pipe.zrem(self._legacy_accessed, record["digest"])
                    pipe.zrem(self.expiry_key, token_id)
                    if to_bin:
                        pipe.hset(self._bin, token_id, orjson.dumps({**record, "deleted": now}))
                        pipe.zadd(self._bin_times, {token_id: now})
                await pipe.execute()
        await self.call(run)
        await self.changed()

    async def claim_expired(self, token_id: int) -> bool:
        """Exactly one caller, on any instance, gets True for a given expired token."""
        return bool(await self.call(lambda: self.client.zrem(self.expiry_key, str(token_id))))

    async def expiry_candidates(self, before: float, limit: int) -> list[int]:
        ids = await self.call(lambda: self.client.zrangebyscore(self.expiry_key, "-inf", before, start=0, num=limit))
        return [int(cast(bytes, value)) for value in ids]  # members only: no scores asked

    async def set_expiry(self, expiries: dict[int, int]) -> None:
        """Move tokens in the expiry index (token id -> when it stops being valid)."""
        if expiries:
            await self.call(lambda: self.client.zadd(self.expiry_key, {str(k): v for k, v in expiries.items()}))

    # -- recycle bin --------------------------------------------------------------------------

    async def binned(self, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        if ids is None:
            raw = list((await self.call(lambda: self.client.hgetall(self._bin))).values())
        else:
            wanted = [str(token_id) for token_id in ids]
            raw = [value for value in await self.call(lambda: self.client.hmget(self._bin, wanted)) if value]
        return sorted((orjson.loads(value) for value in raw), key=lambda record: int(record["id"]))

    async def restore(self, record: dict[str, Any]) -> bool:
        """Put a binned record back under its old id and key; False if the key is in use again."""
        restored = {key: value for key, value in record.items() if key != "deleted"}
        token_id = str(record["id"])
        return await self._write_if_absent(
            restored, lambda pipe: pipe.hdel(self._bin, token_id).zrem(self._bin_times, token_id))

    async def purge_bin(self, older_than: float, ids: Iterable[int] | None = None) -> int:
        victims: Sequence[Any]
        if ids is None:
            victims = await self.call(lambda: self.client.zrangebyscore(self._bin_times, "-inf", older_than))
        else:
            victims = [str(token_id) for token_id in ids]
        if not victims:
            return 0

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hdel(self._bin, *victims)
                pipe.zrem(self._bin_times, *victims)
                await pipe.execute()
        await self.call(run)
        await self.changed()
        return len(victims)


class _Subscription:
    """A subscription whose every gap is seen: redis-py reconnects a pub/sub connection by
    itself and subscribes again, and what was published meanwhile is lost without a word (a
    restarted Redis, a Sentinel failover). After such a reconnection `get_message` raises, so
    the cache revalidates what it holds (`TokenCache.run_subscriber`)."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub
        self._reconnected = False
        if pubsub.connection is not None:
            pubsub.connection.register_connect_callback(self._connected)  # kept as a weak reference

    async def _connected(self, connection: Any) -> None:
        self._reconnected = True

    def close(self) -> None:
        if self._pubsub.connection is not None:
            self._pubsub.connection.deregister_connect_callback(self._connected)

    async def get_message(self, **options: Any) -> Any:
        message = await self._pubsub.get_message(**options)
        if self._reconnected:
            raise redis.exceptions.ConnectionError("subscription re-established: messages may have been lost")
        return message

    async def ping(self, payload: bytes) -> None:
        """A PING on the subscription: its answer comes after every message published before it.
        Written on the connection itself: redis-py's command path (its retry wrapper, its
        observability hooks) cost more than the PING, ten times a second, for the life of the
        process. A closed connection is opened again by the write, which is a gap, as below."""
        connection = self._pubsub.connection
        if connection is None:
            raise redis.exceptions.ConnectionError("subscription closed")
        await connection.send_command("PING", payload, check_health=False)
        if self._reconnected:
            raise redis.exceptions.ConnectionError("subscription re-established: messages may have been lost")


class ScriptsFailed(StoreUnavailable):
    """`RedisStore.scripts` failed: `done` holds the indexes of the calls known to have run."""

    def __init__(self, error: BaseException, done: set[int]) -> None:
        super().__init__(f"token store: {type(error).__name__}")
        self.done = set(done)


def torn_write(error: BaseException) -> bool:
    """redis-py writing on a connection closed under it (its cluster client closes every node
    connection when it reads the slot map again): `None.writelines` (AttributeError), or uvloop's
    "unable to perform operation on <TCPTransport closed=True ...>; the handler is closed"
    (RuntimeError). A store failure, not the gateway's: nothing was sent. Other RuntimeErrors
    are not this."""
    if isinstance(error, AttributeError):
        return True
    return isinstance(error, RuntimeError) and "closed" in str(error)


def _elsewhere(error: BaseException) -> BaseException:
    """A PUBLISH's failure that another node of the cluster may not have (`PUBLISH_ELSEWHERE`, a
    torn connection), returned; any other raised (as StoreUnavailable if the store's)."""
    if isinstance(error, PUBLISH_ELSEWHERE) or torn_write(error):
        return error
    if isinstance(error, STORE_ERRORS):
        raise _unavailable(error) from error
    raise error


def _unavailable(error: BaseException) -> StoreUnavailable:
    unavailable = StoreUnavailable(f"token store: {type(error).__name__}")
    unavailable.__cause__ = error
    return unavailable


def _pairs(members: dict[str, int]) -> list[Any]:
    """TOUCH's member, time, member, time..."""
    flat: list[Any] = []
    for member, when in members.items():
        flat += (member, when)
    return flat
