"""Per-request and event log lines, written by one background writer through a bounded queue."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any, Final, Protocol

import orjson
from orjson import dumps  # bound: compiled, `orjson.dumps` is a lookup on the module per record

from gateway.aio import wait_event
from gateway.config import LogSettings

log = logging.getLogger("gateway.writers.logs")
# Records serialized and handed to the sinks per step; the writer yields to requests in between,
# so a second's worth of lines (tens of thousands) never holds the event loop for long.
SLICE = 256
APPEND_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE  # a native constant, compiled
APP_HEADER_LIMIT = 64  # characters of x-flespi-app kept in a log record


class RequestIds:
    """Request ids: a random per-process prefix and a counter, unique across processes (a uuid4 per
    request cost ~3 %)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = 0

    def next(self) -> str:
        self._count += 1
        # Compiled, %-formatting costs a third less than the f-string with a format spec.
        return self._prefix + "%016x" % self._count  # noqa: UP031


def request_record(now: float, token_id: int | None, cid: int | None, host: str, app: str, method: str, uri: str,
                   status: int, duration: float, size: int, request_id: str) -> dict[str, Any]:
    """The log record of one request (event 1000), whichever path served it; `token_id` and `cid`
    are None for a request refused before its token was known."""
    return {
        "timestamp": now, "event_code": 1000, "token_id": token_id, "cid": cid, "host": host,
        "app": app[:APP_HEADER_LIMIT], "method": method, "uri": uri, "status": status,
        # To the microsecond, as round(duration, 6) does, without its decimal conversion.
        "duration": math.floor(duration * 1e6 + 0.5) / 1e6, "size": size, "request_id": request_id,
    }


class Sink(Protocol):
    """Where log lines go. `add` takes one slice (records and the same as JSON lines, serialized once
    for every sink) and must be quick; `flush` ends the batch, once per writer interval."""

    def add(self, records: list[dict[str, Any]], lines: list[bytes]) -> None: ...

    async def flush(self) -> None: ...


class FileSink:
    """Append JSON lines to a file (or stdout for "-"); one write call per batch."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = sys.stdout.fileno() if path == "-" else _open_log(path)

    def add(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        view = memoryview(b"".join(lines))
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    async def flush(self) -> None:
        return None

    def reopen(self) -> None:
        """Open the path anew (SIGUSR1, after logrotate moved the file); if it cannot be opened,
        lines keep going to the file open so far."""
        if self.path == "-":
            return
        try:
            fd = _open_log(self.path)
        except OSError as exc:
            log.error("log.path: cannot reopen %r (%s); still writing to the file open before", self.path,
                      exc.strerror)
            return
        os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        if self.path != "-":
            os.close(self._fd)


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


class LogWriter:
    """`emit` never blocks or raises: past `queue_size` pending records it counts drops instead."""

    def __init__(self, settings: LogSettings, sinks: Sequence[Sink]) -> None:
        self._settings = settings
        # Read for every record: native ints, not attributes of the (interpreted) settings object.
        self._queue_size = settings.queue_size
        # Write before the queue gets near full, but otherwise once per interval: under steady
        # load each flush is one large batch, not a stream of small ones.
        self._early_flush = max(1, settings.queue_size // 4)
        self._sinks = list(sinks)
        self._queue: list[dict[str, Any]] = []
        self._wakeup = asyncio.Event()
        self.dropped = 0
        self.written = 0

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def replace_sink(self, old: Sink | None, new: Sink | None) -> None:
        """Swap one sink for another (a reload's `log.path`), keeping its place; None: none. Done
        between two slices: `_write_batch` hands each slice to the sinks in one go."""
        if old is not None and old in self._sinks:
            place = self._sinks.index(old)
            if new is None:
                del self._sinks[place]
            else:
                self._sinks[place] = new
        elif new is not None:
            self._sinks.insert(0, new)

    def configure(self, settings: LogSettings) -> None:
        """A reload's queue bound and flush interval, from the next record and the next wait on."""
        self._settings = settings
        self._queue_size = settings.queue_size
        self._early_flush = max(1, settings.queue_size // 4)

    def emit(self, record: dict[str, Any]) -> None:
        if len(self._queue) >= self._queue_size:
            self.dropped += 1
            return
        self._queue.append(record)
        if len(self._queue) == self._early_flush:
            self._wakeup.set()

    async def run(self) -> None:
        while True:
            await wait_event(self._wakeup, self._settings.flush_interval)
            self._wakeup.clear()
            await self._write_batch()

    async def flush(self) -> None:
        """Write everything queued (at shutdown)."""
        while self._queue:
            await self._write_batch()

    async def _write_batch(self) -> None:
        queued, self._queue = self._queue, []
        if not queued:
            return
        # Slices are taken off the end of the reversed list so that each slice is also freed in
        # its own step: deallocating a second's worth of records at once took milliseconds too.
        queued.reverse()
        while queued:
            batch = queued[-SLICE:]
            del queued[-SLICE:]
            batch.reverse()
            # Exact-size copies: orjson's result keeps its 4 KiB write buffer, and a sink may hold
            # lines for a while (the Redis sink retains them while Redis is away).
            lines = [memoryview(dumps(record, option=APPEND_NEWLINE)).tobytes() for record in batch]
            for sink in self._sinks:
                try:
                    sink.add(batch, lines)
                except Exception:
                    log.exception("log sink failed; %d records not written to it", len(batch))
            self.written += len(batch)
            del batch, lines
            await asyncio.sleep(0)
        for sink in self._sinks:
            try:
                await sink.flush()
            except Exception:
                log.exception("log sink failed to flush")
