"""Hot-traffic latency of one gateway worker after N distinct tokens were cached, with GC pauses logged.

    python bench/experiments/cached_gc.py gcstats 100000
    python bench/experiments/cached_gc.py gcstats,gcfreeze 100000

Every gen-2 collection (and any collection over 5 ms) is written to bench/out/gc-<variant>.log.
"""
import os, sys, time, json, subprocess
from pathlib import Path
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE.parent / "out"
OUT.mkdir(exist_ok=True)
sys.path.insert(0, str(HERE.parent))
import run
from pathlib import Path
import tempfile
variant = sys.argv[1]; n = int(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="gw-exp-"))
procs = run.Processes(work)
try:
    tools = {"nginx": run.find_binary("nginx"), "wrk": run.find_binary("wrk"), "redis-server": run.find_binary("redis-server")}
    rport, _ = run.start_redis(procs, tools["redis-server"])
    rurl = f"redis://127.0.0.1:{rport}/0"
    up, _, _ = run.start_upstream(procs, tools)
    g = run.start_gateway(procs, "gw-base", up, rurl, 1)
    key = run.create_token(g.url)["key"]
    procs.stop(g.process)
    keys = run.random_keys(n); run.run_async(run.fill_tokens(rurl, keys))
    kf = work / "keys.txt"; kf.write_text("\n".join(keys) + "\n")
    runner = run.Runner(procs, tools["wrk"], rport)
    port = run.free_port()
    cfg = work / "v.yaml"
    cfg.write_text(json.dumps({"listen": {"host": "127.0.0.1", "port": port}, "upstream": up, "redis": {"url": rurl},
                               "bootstrap_master_token": run.MASTER_KEY, "log": {"path": str(work / "v.log")}}))
    gclog = str(OUT / f"gc-{variant}.log")
    if os.path.exists(gclog): os.remove(gclog)
    p = subprocess.Popen([sys.executable, str(HERE / "variant.py"), "--config", str(cfg), "--log-level", "WARNING"],
                         cwd=ROOT, env={**os.environ, "VARIANT": variant, "GCLOG": gclog},
                         start_new_session=True, stdout=open(work / "v.out", "ab"), stderr=subprocess.STDOUT)
    procs.running.append(("v", p))
    run.wait_for_port(port, p); time.sleep(0.5)
    url = f"http://127.0.0.1:{port}"
    w = runner.wrk_run(url, 10, script_args=[str(kf), "seq", str(n)], stop_when=lambda: run.cached_tokens(url) >= n, max_seconds=240)
    print("fill", w.rps, "cached", run.cached_tokens(url), "rss", run.rss_mb(p.pid), flush=True)
    with open(gclog, "a") as f: f.write("---- hot run\n")
    for i in range(2):
        h = runner.wrk_run(url, 10, key=key)
        print(f"hot {h.rps:.0f} p50 {h.p50_ms:.2f} p99 {h.p99_ms:.2f}", flush=True)
    print(open(gclog).read()[-3000:])
finally:
    procs.stop_all()
