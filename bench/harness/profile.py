"""--profile: py-spy samples gateway 1 worker during one more load run; collapsed stacks kept."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import BENCH
from .servers import GatewayProcess
from .session import Session


def profile_gateway(session: Session, gateway: GatewayProcess, key: str, duration: int) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        return "profile: py-spy not installed (pip install py-spy)"
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / "gateway-1.collapsed.txt"
    spy_process = session.procs.start("py-spy", [spy, "record", "--pid", str(gateway.process.pid), "--format", "raw",
                                                 "--rate", "200", "--duration", str(duration + 1), "--nonblocking",
                                                 "--output", str(target)])
    time.sleep(0.5)
    result = session.runner.wrk_run(gateway.url, duration, key=key)
    try:
        spy_process.wait(duration + 30)
    except subprocess.TimeoutExpired:
        pass
    session.procs.stop(spy_process)
    if not target.exists():
        return f"profile: py-spy wrote nothing (see {session.workdir}/py-spy.out)"
    return f"profile: {result.rps:,.0f} req/s under py-spy; top frames by self time:\n" + top_frames(target)


def top_frames(collapsed: Path, count: int = 15) -> str:
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(samples)
        total += int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"  {100 * n / total:5.1f}%  {frame}" for frame, n in ranked)
