"""The gateway, with every gen-2 garbage collection (and any collection over 5 ms) logged.

    GCLOG=bench/out/gc.log python bench/experiments/gclog.py --config FILE

A line per collection: wall time, generation, pause, objects collected, and (for pauses over
50 ms) how many objects the collector tracks. The gateway itself is not patched: the callback is
added to `gc.callbacks` before `gateway.cli.main` runs, so the server's own `gc.freeze` policy
is what is measured.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

LOG = open(os.environ.get("GCLOG", str(HERE.parent / "out" / "gc.log")), "a")  # noqa: SIM115 (open for the process's life)
_started: list[float] = [0.0]


def log_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause_ms = (time.perf_counter() - _started[0]) * 1000
    if info["generation"] == 2 or pause_ms > 5:
        tracked = len(gc.get_objects()) if pause_ms > 50 else -1
        LOG.write(f"{time.time():.3f} gen{info['generation']} {pause_ms:.1f}ms collected={info['collected']} "
                  f"tracked={tracked}\n")
        LOG.flush()


gc.callbacks.append(log_collection)

from gateway.cli import main  # noqa: E402 (after the callback, so startup collections are logged too)

sys.exit(main())
