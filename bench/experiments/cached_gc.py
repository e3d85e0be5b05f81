"""Hot-traffic latency of one gateway worker after N distinct tokens were cached, with GC pauses logged.

    python bench/experiments/cached_gc.py 100000

N tokens are written into the bench Redis and each used once through the gateway (run by
gclog.py); then two 10 s runs of one key. Every gen-2 collection, and any over 5 ms, is in
bench/out/gc-cached.log: with the server's periodic gc.freeze the full collections should stay
short however many tokens are cached.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness.client import cached_tokens, create_token  # noqa: E402
from harness.procs import rss_mb  # noqa: E402
from harness.servers import start_gateway  # noqa: E402
from harness.session import Session, run_async  # noqa: E402
from harness.tokens import fill_tokens, random_keys  # noqa: E402
from harness.tools import ensure_tools  # noqa: E402


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    out = HERE.parent / "out"
    out.mkdir(exist_ok=True)
    gc_log = out / "gc-cached.log"
    gc_log.unlink(missing_ok=True)
    session = Session(ensure_tools(), prefix="gw-exp-")
    try:
        session.start()
        keys = random_keys(count)
        run_async(fill_tokens(session.redis_url, keys))
        key_file = session.workdir / "keys.txt"
        key_file.write_text("\n".join(keys) + "\n")
        os.environ["GCLOG"] = str(gc_log)  # inherited by the gateway started next
        gateway = start_gateway(session.procs, "gateway-gclog", session.upstream, session.redis_url, 1,
                                argv=[sys.executable, str(HERE / "gclog.py")])
        key = create_token(gateway.url)["key"]
        filling = session.runner.wrk_run(gateway.url, 10, script_args=[str(key_file), "seq", str(count)],
                                         stop_when=lambda: cached_tokens(gateway.url) >= count, max_seconds=240)
        print(f"fill {filling.rps:.0f} req/s; cached {cached_tokens(gateway.url)}; "
              f"RSS {rss_mb(gateway.process.pid):.1f} MB", flush=True)
        with gc_log.open("a") as log:
            log.write("---- hot runs\n")
        for _ in range(2):
            hot = session.runner.wrk_run(gateway.url, 10, key=key)
            print(f"hot {hot.rps:.0f} req/s  p50 {hot.p50_ms:.2f} ms  p99 {hot.p99_ms:.2f} ms", flush=True)
        print(gc_log.read_text()[-3000:])
    finally:
        session.close()


if __name__ == "__main__":
    main()
