"""The embedded store: an in-process Redis (fakeredis) kept on disk as a snapshot and a journal.

The gateway talks to it through redis-py as to any Redis, so nothing above the store knows. Under
it, every command that writes is recorded as the server runs it, Redis's own append-only file in
small: one journal frame per command the gateway sends (a transaction or a Lua script is one
frame holding the writes it made), appended to the active journal segment and made durable
(`fdatasync`) before an API change is answered. A change therefore costs what it changes. Now
and then a child process folds the closed segments into a new snapshot, and at start the snapshot
is loaded and the segments after it replayed, each command at the time it first ran.

The files, all beside `data_file`, mode 0600:

- `<data_file>`                the snapshot: every key, with the number of the last segment in it
- `<data_file>.journal.<N>`    journal segments; N grows by one at each start and compaction
- `<data_file>.lock`           held (flock) by the one gateway serving from these files
- `<data_file>.compact.lock`   held by the compaction child while it writes the next snapshot

Why a journal of commands rather than an embedded database: the data are Redis structures
(hashes of 100,000 fields, capped lists, sorted sets) changed by Redis commands and Lua scripts.
A journal replays them through the same fakeredis, with no second model of the data to keep in
step; a database would need tables for five Redis types and a translation of every command the
gateway sends.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import redis
from fakeredis import _msgs as fake_messages
from fakeredis._clients._async import FakeAsyncRedisConnection, FakeReader, FakeWriter
from fakeredis._helpers import SimpleError
from fakeredis._socket import AsyncFakeSocket, FakeSocket
from fakeredis.model._command_info import get_all_commands_info

from gateway.config import ConfigError
from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway.store.embedded")

SNAPSHOT_FORMAT = 2  # 1: {key: [kind, value]} as earlier builds wrote it, still read
# Compaction starts once the journal holds this much, or half the snapshot's size if that is more:
# each compaction rewrites the snapshot, so it runs after a journal growth of the same order, and a
# start never replays more than that.
COMPACT_AFTER_BYTES = 16 * 1024 * 1024
COMPACT_AFTER_SEGMENTS = 8  # each start leaves one behind
SYNC_INTERVAL = 1.0  # seconds: background writes (accessed, logs, usage) reach the disk this often
COMPACT_BUSY = 3  # the compaction child's exit status when another one holds the files
FILE_MODE = 0o600
DUMP_CHUNK = 1000  # members per command when a snapshot is loaded

# Redis's own flag: the commands that change data (fakeredis ships Redis's command table).
WRITE_COMMANDS = frozenset(name.decode() for name, info in get_all_commands_info().items() if b"write" in info[2])


@dataclass(frozen=True, slots=True)
class DataFiles:
    snapshot: Path

    @property
    def lock(self) -> Path:
        return self.snapshot.with_name(self.snapshot.name + ".lock")

    @property
    def compact_lock(self) -> Path:
        return self.snapshot.with_name(self.snapshot.name + ".compact.lock")

    def segment(self, number: int) -> Path:
        return self.snapshot.with_name(f"{self.snapshot.name}.journal.{number}")

    def segments(self) -> list[int]:
        """The numbers of the journal segments on disk, oldest first."""
        prefix = self.snapshot.name + ".journal."
        numbers = []
        for entry in self.snapshot.parent.iterdir():
            tail = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and tail.isdigit():
                numbers.append(int(tail))
        return sorted(numbers)


# -- files -------------------------------------------------------------------------------------------

def sync_directory(directory: Path) -> None:
    """A rename or a new file survives a crash only once its directory is on disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary file beside `path` (0600), fsync, rename over `path`, fsync of the directory."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through O_CREAT
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    sync_directory(path.parent)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_segment(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    sync_directory(path.parent)
    return fd


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path`, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    return fd


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().strip())
        return f" (pid {pid})"
    return ""


def in_use(data_file: str) -> ConfigError:
    files = DataFiles(Path(data_file))
    return ConfigError("redis.data_file", f"{data_file!r} is in use by another gateway{_holder(files.lock)}; "
                                          "one embedded store serves one process")


def lock_data_file(data_file: str) -> int:
    """Take the data file for this process (flock on `<data_file>.lock`, which names our pid).

    The lock is on a file of its own: the snapshot is replaced by rename, and a lock held on the
    replaced file would no longer guard the new one. The kernel drops it when the process ends,
    however it ends."""
    files = DataFiles(Path(data_file))
    try:
        fd = _try_lock(files.lock)
    except OSError as exc:
        raise ConfigError("redis.data_file", f"cannot lock {str(files.lock)!r} ({exc.strerror})") from exc
    if fd is None:
        raise in_use(data_file)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_files(data_file: str) -> None:
    """For `--check-config`, what would stop a start: a running gateway holding the files, or a
    damaged journal segment other than the newest (whose torn end a start cuts off)."""
    files = DataFiles(Path(data_file))
    if files.lock.exists():
        try:
            fd = _try_lock(files.lock)
        except OSError as exc:
            raise ConfigError("redis.data_file", f"cannot lock {str(files.lock)!r} ({exc.strerror})") from exc
        if fd is None:
            raise in_use(data_file)
        os.close(fd)
    if not files.snapshot.parent.is_dir():
        return
    for number in files.segments()[:-1]:
        path = files.segment(number)
        try:
            for _ in frames(path.read_bytes()):
                pass
        except DamagedJournal as damage:
            raise ConfigError("redis.data_file", f"journal {str(path)!r} is {damage}") from damage
        except OSError as exc:
            raise ConfigError("redis.data_file", f"journal {str(path)!r} cannot be read ({exc.strerror})") from exc


# -- running commands on the server directly ---------------------------------------------------------

class Direct:
    """Commands run on the fake server itself, with no client or protocol in between, each at the
    time given (fakeredis reads the clock from the database, so a replayed `SET ... EX` expires when
    the original did). For loading, replaying and dumping: ten times cheaper than a client call."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.server = server
        self.socket = FakeSocket(server, 0, client_class=redis.Redis)  # a plain socket: journals nothing
        self.failed = 0
        self._commands: dict[str, tuple[Any, Any]] = {}

    def run(self, when: float, name: str, args: Sequence[bytes]) -> Any:
        found = self._commands.get(name)
        if found is None:
            found = self._commands[name] = self.socket._name_to_func(name)
        func, signature = found
        with self.server.lock:
            self.server.dbs[0].time = when
            result = self.socket._run_command(func, signature, list(args), False)
        if isinstance(result, SimpleError):
            self.failed += 1
        return result


def _text(value: bytes) -> str:
    return value.decode("latin-1")  # any bytes, one character each; JSON carries them as text


def _bytes(value: str) -> bytes:
    return value.encode("latin-1")


def dump(direct: Direct) -> list[list[Any]]:
    """Every live key as `[key, kind, value, expire-at-ms or None]`."""
    now = time.time()
    keys: list[list[Any]] = []
    for key in direct.run(now, "keys", [b"*"]):
        kind = direct.run(now, "type", [key]).value.decode()
        if kind == "string":
            value: Any = _text(direct.run(now, "get", [key]))
        elif kind == "hash":
            flat = direct.run(now, "hgetall", [key])
            value = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        elif kind == "zset":
            value = [_text(item) for item in direct.run(now, "zrange", [key, b"0", b"-1", b"withscores"])]
        elif kind == "set":
            value = sorted(_text(member) for member in direct.run(now, "smembers", [key]))
        elif kind == "list":
            value = [_text(item) for item in direct.run(now, "lrange", [key, b"0", b"-1"])]
        else:
            raise ValueError(f"embedded store: cannot save a {kind} ({_text(key)!r})")
        expires = int(direct.run(now, "pexpiretime", [key]))
        keys.append([_text(key), kind, value, expires if expires >= 0 else None])
    return keys


def _chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def restore(direct: Direct, key: str, kind: str, value: Any, expires: int | None, now: float) -> None:
    name, raw = _bytes(key), []
    if kind == "string":
        direct.run(now, "set", [name, _bytes(value)])
    elif kind == "hash":
        raw = [_bytes(part) for field, item in value.items() for part in (field, item)]
        command = "hset"
    elif kind == "zset":
        # Format 2 keeps ZRANGE's flat member, score list; format 1 kept [member, score] pairs.
        pairs = [(str(score), member) for member, score in value] if value and isinstance(value[0], list) else \
            [(value[i + 1], value[i]) for i in range(0, len(value), 2)]
        raw = [_bytes(part) for pair in pairs for part in pair]
        command = "zadd"
    elif kind in ("set", "list"):
        raw = [_bytes(member) for member in value]
        command = "sadd" if kind == "set" else "rpush"
    else:
        raise ValueError(f"embedded store: unknown kind {kind!r} for {key!r}")
    step = 2 * DUMP_CHUNK if kind in ("hash", "zset") else DUMP_CHUNK
    for chunk in _chunks(raw, step):
        direct.run(now, command, [name, *chunk])
    if expires is not None:
        direct.run(now, "pexpireat", [name, str(expires).encode()])


def read_snapshot(path: Path) -> tuple[int, list[list[Any]]]:
    """(the last journal segment folded in, the keys) of a snapshot file; (0, []) when there is none."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return 0, []
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("embedded_store") == SNAPSHOT_FORMAT:
        return int(data["journal"]), list(data["keys"])
    return 0, [[key, kind, value, None] for key, (kind, value) in data.items()]


def load_snapshot(direct: Direct, path: Path) -> tuple[int, int]:
    """Load the snapshot into the server: (the last segment it holds, how many keys)."""
    folded, keys = read_snapshot(path)
    now = time.time()
    for key, kind, value, expires in keys:
        restore(direct, key, kind, value, expires, now)
    return folded, len(keys)


def write_snapshot(direct: Direct, path: Path, folded: int) -> int:
    """The server's keys as the snapshot holding segments up to `folded`; its size in bytes."""
    data = orjson.dumps({"embedded_store": SNAPSHOT_FORMAT, "journal": folded, "keys": dump(direct)})
    write_atomically(path, data)
    return len(data)


# -- the journal -------------------------------------------------------------------------------------

def frame(when: float, commands: list[tuple[str, list[bytes]]]) -> bytes:
    """`<crc32 of the payload, 8 hex digits> <payload>\\n`, the payload `[time, [[name, arg...]...]]`
    (JSON escapes every newline, so a frame is one line; the checksum finds a torn last one)."""
    payload = orjson.dumps([when, [[name, *map(_text, args)] for name, args in commands]])
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


class DamagedJournal(Exception):
    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(f"damaged at byte {offset}: {problem}")
        self.offset = offset


def frames(data: bytes) -> Iterator[tuple[int, float, list[list[str]]]]:
    """(offset, time, commands) of each frame; DamagedJournal at the first that does not check."""
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            raise DamagedJournal(offset, "a frame without its end")
        line = data[offset:end]
        checksum, _, payload = line.partition(b" ")
        try:
            valid = len(checksum) == 8 and int(checksum, 16) == zlib.crc32(payload)
            when, commands = orjson.loads(payload) if valid else (0.0, [])
        except (ValueError, orjson.JSONDecodeError):
            valid = False
        if not valid:
            raise DamagedJournal(offset, "a frame whose checksum does not match")
        yield offset, float(when), commands
        offset = end + 1


def replay(direct: Direct, path: Path, *, newest: bool) -> int:
    """Run a segment's frames on the server; how many. The newest segment may end in a frame torn by
    a crash (never acknowledged: the API answers after the frame is on disk), which is cut off;
    anywhere else a bad frame is damage, and the start stops rather than lose what follows it."""
    data = path.read_bytes()
    count = 0
    try:
        for _, when, commands in frames(data):
            for name, *args in commands:
                direct.run(when, name, [_bytes(arg) for arg in args])
            count += 1
    except DamagedJournal as damage:
        if not newest:
            raise ConfigError("redis.data_file", f"journal {str(path)!r} is {damage}; move it aside to start "
                              "without the changes from there on") from damage
        log.warning("embedded store: %s ends in a torn write at byte %d (a change never acknowledged); cut off",
                    path, damage.offset)
        with open(path, "r+b") as handle:
            handle.truncate(damage.offset)
            os.fsync(handle.fileno())
    return count


class Journal:
    """The active segment: frames are appended in memory as commands run, and `sync()` writes and
    fdatasyncs them in a thread. Callers that sync while a write is under way wait for it and are
    then usually covered by it (group commit: many API calls, one fsync)."""

    def __init__(self, files: DataFiles, segment: int) -> None:
        self.files = files
        self.segment = segment
        self._fd = create_segment(files.segment(segment))
        self._pending: list[bytes] = []
        self._appended = 0  # frames appended since the start
        self._durable = 0  # of those, on disk
        self.size = 0  # bytes written to the active segment
        self._lock = asyncio.Lock()
        self._broken: OSError | None = None

    def append(self, when: float, commands: list[tuple[str, list[bytes]]]) -> None:
        self._pending.append(frame(when, commands))
        self._appended += 1

    @property
    def pending(self) -> bool:
        return self._durable < self._appended

    async def sync(self) -> None:
        """Return once every frame appended before the call is on disk."""
        target = self._appended
        if self._durable >= target:
            return
        async with self._lock:
            if self._durable < target:
                await self._flush()

    async def _flush(self) -> None:
        if self._broken is not None:
            raise StoreUnavailable(f"embedded store journal cannot be written ({self._broken.strerror})")
        upto, chunk = self._appended, b"".join(self._pending)
        self._pending = []
        try:
            await asyncio.to_thread(_append_durably, self._fd, chunk)
        except OSError as exc:
            # What is in memory may no longer match the disk: no change is acknowledged any more.
            self._broken = exc
            log.error("embedded store: journal %s cannot be written (%s); changes are refused until a restart",
                      self.files.segment(self.segment), exc.strerror)
            raise StoreUnavailable(f"embedded store journal cannot be written ({exc.strerror})") from exc
        self.size += len(chunk)
        self._durable = upto

    async def rotate(self) -> int:
        """Finish the active segment (everything in it on disk) and start the next; the finished one's number."""
        async with self._lock:
            await self._flush()
            finished = self.segment
            fd = await asyncio.to_thread(create_segment, self.files.segment(finished + 1))
            os.close(self._fd)
            self._fd, self.segment, self.size = fd, finished + 1, 0
            return finished

    async def close(self) -> None:
        try:
            await self.sync()
        finally:
            os.close(self._fd)


def _append_durably(fd: int, data: bytes) -> None:
    if data:
        write_all(fd, data)
    os.fdatasync(fd)


# -- the server and its journaling sockets ----------------------------------------------------------

class JournaledServer(fakeredis.FakeServer):
    def __init__(self) -> None:
        super().__init__()
        self.journal: Journal | None = None  # set once loading and replay are over


class JournalingSocket(AsyncFakeSocket):
    """Records the writes each command makes, as the server runs them: a plain command, the commands
    of an EXEC, or those a Lua script calls (its effects, not the script: replay needs no script)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._effects: list[tuple[str, list[bytes]]] | None = None

    def _journal(self) -> Journal | None:
        server = self._server
        return server.journal if isinstance(server, JournaledServer) else None

    def _process_command(self, fields: list[bytes]) -> None:
        effects: list[tuple[str, list[bytes]]] = []
        self._effects = effects
        try:
            super()._process_command(fields)
        finally:
            self._effects = None
        journal = self._journal()
        if effects and journal is not None:
            journal.append(self._db.time, effects)

    def _run_command(self, func: Any, sig: Any, args: list[Any], from_script: bool) -> Any:
        result = super()._run_command(func, sig, args, from_script)
        if sig.name in WRITE_COMMANDS:
            # Failed writes too: replayed, they fail the same way and change the same nothing.
            command = (sig.name, list(args))
            if self._effects is not None:
                self._effects.append(command)
            elif (journal := self._journal()) is not None:
                journal.append(self._db.time, [command])
        return result


class JournalingConnection(FakeAsyncRedisConnection):
    async def _connect(self) -> None:  # fakeredis's own, with the journaling socket
        if self._server is None or not self._server.connected:
            raise self._connection_error_class(fake_messages.CONNECTION_ERROR_MSG)
        self._sock = JournalingSocket(self._server, self.db, client_class=self._client_class,
                                      lua_modules=self._lua_modules, client_info=self._client_info)
        self._reader = FakeReader(self._sock)
        self._writer = FakeWriter(self._sock)


# -- the store ---------------------------------------------------------------------------------------

class EmbeddedStore:
    """The data files of one gateway: loaded at `open_embedded`, kept by `run()`, closed by `close()`."""

    def __init__(self, files: DataFiles, lock_fd: int, server: JournaledServer, journal: Journal,
                 snapshot_size: int) -> None:
        self.files = files
        self._lock_fd = lock_fd
        self.server = server
        self.journal = journal
        self.snapshot_size = snapshot_size
        self.client = fakeredis.FakeAsyncRedis(server=server, connection_class=JournalingConnection)
        self.compactions = 0
        self._compaction: asyncio.Task[bool] | None = None
        self._closed = False

    async def sync(self) -> None:
        """What the API awaits before it answers a change."""
        await self.journal.sync()

    def journal_size(self) -> int:
        closed = sum(_size(self.files.segment(number)) for number in self.files.segments()
                     if number != self.journal.segment)
        return closed + self.journal.size

    def should_compact(self) -> bool:
        closed = [number for number in self.files.segments() if number != self.journal.segment]
        if not closed and self.journal.size == 0:
            return False
        return (self.journal_size() >= max(COMPACT_AFTER_BYTES, self.snapshot_size // 2)
                or len(closed) >= COMPACT_AFTER_SEGMENTS)

    async def run(self) -> None:
        """Background writes reach the disk every SYNC_INTERVAL; a compaction starts beside them when
        the journal has grown (it may take a while: the syncs go on meanwhile)."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self.journal.sync()
            except StoreUnavailable:
                continue  # logged once where it happened; every change is refused meanwhile
            except Exception:
                log.exception("embedded store: background sync failed")
                continue
            if (self._compaction is None or self._compaction.done()) and self.should_compact():
                self._compaction = asyncio.ensure_future(self._compact_quietly())

    async def _compact_quietly(self) -> bool:
        try:
            return await self.compact()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("embedded store: compaction failed")
            return False

    async def compact(self) -> bool:
        """Fold the finished segments into a new snapshot, in a child process (the event loop goes on
        serving); then delete them. Whether it did."""
        finished = await self.journal.rotate()
        started = time.monotonic()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.store.embedded", str(self.files.snapshot), str(finished),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, errors = await child.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()  # the snapshot is replaced by rename or not at all
            await child.wait()
            raise
        if child.returncode == COMPACT_BUSY:
            return False
        if child.returncode != 0:
            log.warning("embedded store: compaction failed (status %s): %s", child.returncode,
                        errors.decode(errors="replace").strip().splitlines()[-1:] or "")
            return False
        await asyncio.to_thread(self._drop_segments, finished)
        self.snapshot_size = _size(self.files.snapshot)
        self.compactions += 1
        log.info("embedded store: journal up to segment %d folded into %s (%d bytes) in %.1f s", finished,
                 self.files.snapshot, self.snapshot_size, time.monotonic() - started)
        return True

    def _drop_segments(self, upto: int) -> None:
        for number in self.files.segments():
            if number <= upto:
                self.files.segment(number).unlink(missing_ok=True)
        sync_directory(self.files.snapshot.parent)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._compaction is not None and not self._compaction.done():
            self._compaction.cancel()  # the child is killed; the snapshot is replaced whole or not at all
            with contextlib.suppress(asyncio.CancelledError):
                await self._compaction
        try:
            await self.journal.close()
        finally:
            await self.client.aclose()
            os.close(self._lock_fd)  # the lock goes with it


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def open_embedded(data_file: str) -> EmbeddedStore:
    """Lock the files, load the snapshot, replay the journal after it, start a new segment.

    Runs before the gateway serves, on the event loop: nothing waits for it yet."""
    files = DataFiles(Path(data_file))
    lock_fd = lock_data_file(data_file)
    try:
        started = time.monotonic()
        server = JournaledServer()
        direct = Direct(server)
        if files.snapshot.exists():
            os.chmod(files.snapshot, FILE_MODE)  # earlier builds left it world-readable
        try:
            folded, keys = load_snapshot(direct, files.snapshot)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise ConfigError("redis.data_file", f"{data_file!r} is not a snapshot of the embedded store ({exc})") \
                from exc
        segments = [number for number in files.segments() if number > folded]
        for number in files.segments():
            if number <= folded:  # folded in by a compaction whose clean-up did not happen
                files.segment(number).unlink()
        replayed = 0
        for number in segments:
            replayed += replay(direct, files.segment(number), newest=number == segments[-1])
        for number in segments[:-1]:
            if _size(files.segment(number)) == 0:  # a start or compaction that wrote nothing there
                files.segment(number).unlink()
        if direct.failed:
            log.warning("embedded store: %d replayed commands failed (as they did when they first ran)", direct.failed)
        server.journal = journal = Journal(files, (segments[-1] if segments else folded) + 1)
        log.info("embedded store: %d keys from %s and %d changes from %d journal segments in %.1f s", keys,
                 data_file, replayed, len(segments), time.monotonic() - started)
        return EmbeddedStore(files, lock_fd, server, journal, _size(files.snapshot))
    except BaseException:
        os.close(lock_fd)
        raise


def compact(data_file: str, upto: int) -> int:
    """The compaction child: snapshot + segments up to `upto` -> a new snapshot. Exit status."""
    files = DataFiles(Path(data_file))
    lock = _try_lock(files.compact_lock)
    if lock is None:
        return COMPACT_BUSY
    try:
        direct = Direct(fakeredis.FakeServer())
        folded, _ = load_snapshot(direct, files.snapshot)
        if folded >= upto:
            return 0
        for number in files.segments():
            if folded < number <= upto:
                replay(direct, files.segment(number), newest=False)
        write_snapshot(direct, files.snapshot, upto)
        return 0
    finally:
        os.close(lock)


if __name__ == "__main__":
    with contextlib.suppress(OSError):
        os.nice(10)  # the gateway's own work comes first
    sys.exit(compact(sys.argv[1], int(sys.argv[2])))
