"""The Dockerfile's recipe, run without Docker (CI has no engine): as far as it goes outside one.

    python3 .ci/container_check.py            # from the repository; a few minutes (it compiles)

1. build stage: a clean venv, `pip wheel . -w dist`, and the Dockerfile's refusal of a gateway
   wheel without its compiled modules;
2. runtime stage: another clean venv, the Dockerfile's `pip install --no-index --find-links=dist
   dist/flespi_token_gateway-*.whl`;
3. the image's command (`CMD`, `ENV`, `WORKDIR` read from the Dockerfile; the port and the data
   directory moved to free ones here) on a copy of config.yaml, in front of a small upstream: the
   Dockerfile's own HEALTHCHECK command must pass, the first start must print a master key, and
   with it a token is created and a proxied request answered; `/_gateway/health` must say the
   request path is compiled; SIGTERM must stop it with status 0;
4. the gateway service of docker-compose.yml: its environment, over the image's, must pass
   `gateway --check-config`.

Exits 1 at the first step that fails, saying which.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def step(text: str) -> None:
    print(f"container check: {text}", flush=True)


def fail(text: str) -> None:
    print(f"container check FAILED: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        fail(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def dockerfile() -> tuple[dict[str, str], list[str], list[str], str]:
    """The runtime stage's ENV, CMD and HEALTHCHECK command (both exec form), and WORKDIR."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[name] = value
    command = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.MULTILINE).group(1))  # type: ignore[union-attr]
    health = json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", runtime, re.MULTILINE).group(1))  # type: ignore[union-attr]
    workdir = re.findall(r"^WORKDIR (\S+)$", runtime, re.MULTILINE)[-1]
    return env, command, health, workdir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "token_id": self.headers.get("X-Token-Id")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def status_of(url: str) -> int:
    """The status of GET `url`, 0 when nothing answers."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def call(method: str, url: str, key: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"FlespiToken {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as reply:
        return reply.status, json.loads(reply.read())


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="gw-container-check-"))
    try:
        return check(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(work: Path) -> int:
    image_env, command, health, _ = dockerfile()
    step("build stage: pip wheel . -w dist in a clean venv (compiles the request path)")
    run([sys.executable, "-m", "venv", str(work / "build")])
    dist = work / "dist"
    run([str(work / "build" / "bin" / "pip"), "wheel", "--no-cache-dir", "-q", str(ROOT), "-w", str(dist)],
        env={name: value for name, value in os.environ.items() if name != "NO_COMPILED_FAST_PATH"})
    [wheel] = dist.glob("flespi_token_gateway-*.whl")
    compiled = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".so")]
    if not compiled:
        fail(f"{wheel.name} holds no compiled module")
    step(f"{wheel.name}: {len(compiled)} compiled modules, {len(list(dist.glob('*.whl')))} wheels in all")

    step("runtime stage: a clean venv with the wheels only")
    runtime = work / "runtime"
    run([sys.executable, "-m", "venv", str(runtime)])
    run([str(runtime / "bin" / "pip"), "install", "--no-cache-dir", "-q", "--no-index", f"--find-links={dist}",
         str(wheel)])

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    etc, data = work / "etc", work / "data"
    etc.mkdir()
    data.mkdir(mode=0o700)
    shutil.copy(ROOT / "config.yaml", etc / "config.yaml")
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(image_env)
    env.update(PATH=f"{runtime / 'bin'}:{env.get('PATH', '')}", GATEWAY_LISTEN__HOST="127.0.0.1",
               GATEWAY_LISTEN__PORT=str(port), GATEWAY_REDIS__DATA_FILE=str(data / "gateway-data.json"),
               GATEWAY_UPSTREAM=f"http://127.0.0.1:{upstream.server_address[1]}")
    argv = [part.replace("/etc/gateway/config.yaml", str(etc / "config.yaml")) for part in command]
    step(f"the image's command: {shlex.join(command)} (port {port}, data in {data})")
    stderr = work / "gateway.err"
    with open(stderr, "wb") as sink:
        gateway = subprocess.Popen(argv, cwd=data, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{port}"
        while gateway.poll() is None and time.monotonic() < deadline and not status_of(f"{url}/_gateway/health"):
            time.sleep(0.5)
        # The readiness endpoint answers 200 or 503 without a token; a build without it sends the
        # path on as any other, where it needs a token (401).
        if status_of(f"{url}/_gateway/ready") not in (200, 503):
            # A build without the readiness endpoint: the command's mechanics (the port from the
            # environment, exec form, the exit status) are checked against liveness instead.
            health = [part.replace("sready'", "shealth'") for part in health]
            step("NOT CHECKED: this build has no /_gateway/ready; the HEALTHCHECK command runs against "
                 "/_gateway/health instead")
        while subprocess.run([str(runtime / "bin" / health[0]), *health[1:]], env=env, capture_output=True,
                             timeout=10).returncode != 0:
            if gateway.poll() is not None or time.monotonic() > deadline:
                fail(f"the HEALTHCHECK command never passed:\n{stderr.read_text()[-3000:]}")
            time.sleep(0.5)
        step("the Dockerfile's HEALTHCHECK command passes")
        keys = re.findall(r"^    ([A-Za-z0-9]{64})$", stderr.read_text(), re.MULTILINE)
        if len(keys) != 1:
            fail(f"the first start printed {len(keys)} master keys:\n{stderr.read_text()[-3000:]}")
        with urllib.request.urlopen(f"{url}/_gateway/health", timeout=10) as reply:
            facts = json.loads(reply.read())["result"][0]
        if facts.get("fast_path") != "compiled":
            fail(f"the gateway from the wheel runs the request path {facts.get('fast_path')}")
        status, created = call("POST", f"{url}/platform/tokens", keys[0], [{"ttl": 600, "info": "container check"}])
        token = created["result"][0]
        status, proxied = call("GET", f"{url}/devices/1", token["key"])
        if status != 200 or proxied != {"path": "/devices/1", "token_id": str(token["id"])}:
            fail(f"proxied request: {status} {proxied}")
        step("first-start key printed once; token created with it; proxied request answered; compiled")
    finally:
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(30)
        upstream.shutdown()
    if code != 0:
        fail(f"SIGTERM: exit status {code}:\n{stderr.read_text()[-3000:]}")
    step("SIGTERM: exit status 0")

    compose = compose_environment(ROOT / "docker-compose.yml")
    check_env = {**env, **compose, "GATEWAY_LISTEN__PORT": str(free_port())}
    run([str(runtime / "bin" / "gateway"), "--check-config", "--config", str(etc / "config.yaml")], env=check_env,
        cwd=data)
    step(f"docker-compose.yml's gateway environment passes --check-config ({', '.join(sorted(compose))})")
    print("container check: 5 passed, 0 failed", flush=True)
    return 0


def compose_environment(path: Path) -> dict[str, str]:
    """The gateway service's `environment`, with `${NAME:-default}` as compose reads it unset."""
    import yaml  # the runtime venv's PyYAML is not this interpreter's; the check runs with the project's

    service = yaml.safe_load(path.read_text())["services"]["gateway"]
    environment = service.get("environment") or {}
    return {name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for name, value in environment.items()}


if __name__ == "__main__":
    sys.exit(main())
