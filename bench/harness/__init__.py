"""What the bench scripts share: the processes they start on loopback and how they measure them.

`procs` (processes, ports, /proc readings), `tools` (wrk, nginx, redis-server; machine facts),
`client` (blocking HTTP to the servers started), `servers` (redis-server, the upstream, nginx
proxy_pass, the naive proxy, gateways), `session` (the Redis and upstream every measurement
shares), `wrk` (running and parsing wrk), `tokens` (tokens written straight into Redis), one
module per measurement (`throughput`, `misses`, `memory`, `revocation`, `checkcost`, `profile`)
and `report` (the table, the targets and RESULTS.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
# The scripts run with any Python that has the gateway's dependencies: the checkout's `gateway`
# package must be importable without installing it.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
MASTER_KEY = "BenchMaster" + "0123456789" * 5 + "xyz"  # 64 characters [A-Za-z0-9]
PREFIX = "{gw}:"
