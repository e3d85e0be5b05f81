"""What every measurement of one bench run shares: the work directory, the processes started,
the bench Redis and the upstream; stopped and removed at the end, on error and on Ctrl-C."""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from . import HOST
from .procs import Processes
from .servers import start_aiohttp_upstream, start_redis, start_upstream
from .tools import Tools
from .wrk import Runner


class Session:
    def __init__(self, tools: Tools, keep: bool = False, prefix: str = "gw-bench-") -> None:
        self.tools = tools
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs = Processes(self.workdir)
        self.began = time.monotonic()
        self.redis_port = 0
        self.redis_url = ""
        self.upstream = ""
        self.upstream_kind = ""
        self.upstream_process: subprocess.Popen[bytes] | None = None
        self._runner: Runner | None = None

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {message}", flush=True)

    def start(self, aiohttp_upstream: bool = False) -> None:
        """The bench's own redis-server and the upstream (the fast one, or the aiohttp one that
        speaks WebSocket), on free ports."""
        self.say(f"work directory {self.workdir}")
        self.redis_port, _ = start_redis(self.procs, self.tools["redis-server"] or "redis-server")
        self.redis_url = f"redis://{HOST}:{self.redis_port}/0"
        self.upstream, self.upstream_process, self.upstream_kind = (
            start_aiohttp_upstream(self.procs) if aiohttp_upstream else start_upstream(self.procs, self.tools))
        self.say(f"redis-server on {self.redis_port}; upstream {self.upstream} ({self.upstream_kind})")

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(self.procs, self.tools["wrk"] or "wrk", self.redis_port)
        return self._runner

    def close(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        try:
            self.procs.stop_all()
            if self.keep:
                print(f"work directory kept: {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does, through the same cleanup."""
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


def run_async(coroutine: Any) -> Any:
    """On uvloop when installed, as the gateway runs."""
    try:
        import uvloop
        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)
