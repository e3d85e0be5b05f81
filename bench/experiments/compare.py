"""Throughput of gateway variants and framework floors, side by side (a measurement aid, not a test).

    python bench/experiments/compare.py "base;oneshot;rawproxy;bare-forward;bare-rawclient;bare-hello" [SECS] [ROUNDS]

Each `;`-separated name is a process: `bare-<mode>` runs floors.py in that mode, anything else is
the gateway run through variant.py with VARIANT=<name> (comma-separated patches, see variant.py).
PROFILE=<name> also samples that one with py-spy (collapsed stacks in bench/out/).
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

variants = sys.argv[1].split(";")   # e.g. "base;oneshot;oneshot,reqid;bare-hello;bare-forward"
secs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
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
    runner = run.Runner(procs, tools["wrk"], rport)
    started = {}
    for i, v in enumerate(variants):
        port = run.free_port()
        if v.startswith("bare-"):
            p = procs.start(f"v{i}", [sys.executable, str(HERE / "floors.py"), v[5:], str(port), up])
        else:
            cfg = work / f"v{i}.yaml"
            extra = {}
            if "logoff" in v: extra = {"log": {"path": "off"}}
            cfg.write_text(json.dumps({"listen": {"host": "127.0.0.1", "port": port}, "upstream": up,
                                       "redis": {"url": rurl}, "bootstrap_master_token": run.MASTER_KEY,
                                       "log": {"path": str(work / f"v{i}.log")}, **extra}))
            env = {**os.environ, "VARIANT": v}
            out = open(work / f"v{i}.out", "ab")
            p = subprocess.Popen([sys.executable, str(HERE / "variant.py"), "--config", str(cfg), "--log-level", "WARNING"],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            procs.running.append((f"v{i}", p))
        run.wait_for_port(port, p)
        time.sleep(0.5)
        st, body = run.http("GET", f"http://127.0.0.1:{port}/bench/ping", key)
        assert st == 200, (v, st, body)
        started[v] = (f"http://127.0.0.1:{port}", p)
    res = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            url, p = started[v]
            runner.wrk_run(url, 1, key=key)
            spy = None
            if os.environ.get("PROFILE") == v and r == 0:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(p.pid), "--format", "raw",
                                        "--rate", "250", "--duration", str(secs), "--nonblocking", "--output",
                                        str(OUT / f"prof-{v}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
            w = runner.wrk_run(url, secs, key=key, pids=[p.pid])
            if spy: spy.wait(30)
            cpu_us = 1e6 * w.cpu_percent / 100 * w.seconds / w.requests
            res[v].append((w.rps, w.p50_ms, w.p99_ms, cpu_us, w.others_percent))
            print(f"{v:28} {w.rps:9.0f} rps p50 {w.p50_ms:6.2f} p99 {w.p99_ms:6.2f} cpu/req {cpu_us:5.0f}us cpu {w.cpu_percent:4.0f}% others {w.others_percent:3.0f}% err {w.errors}", flush=True)
    print("best:")
    for v in variants:
        b = max(res[v])
        print(f"{v:28} {b[0]:9.0f} rps  cpu/req {min(x[3] for x in res[v]):5.0f}us")
finally:
    procs.stop_all()
