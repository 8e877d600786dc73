"""Through a real server: requests per second, bare vs wrapped, under a loopback load.

uvicorn serves the Starlette app (one worker, httptools + uvloop when installed) and
gunicorn the Flask app (one sync worker); each variant gets a fresh server process whose
app module (``server_app.py``) wraps the app and points the middleware at the sink.  The
load generator is ``wrk`` (one thread, a few keep-alive connections), or the bundled
``loadgen.py`` when wrk is missing.  On a 2-core machine one core runs the server and one
the load generator, so the background sending shares the server's core and GIL, as it
would in production.

Besides requests/s we record what reached the sink: within a short grace period after the
load, and after the server was stopped (SIGTERM, so exit-time flushes run), because a
middleware that looks cheap while silently delaying or dropping its data is not cheap.
For our variant the serving process also writes ``alf_analytics.stats()`` at exit
(``server_app.py``), so entries dropped as ``queue_full`` are counted by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from common import GET_PATH, QUERY_STRING, SinkClient, request_headers
from sink import running_sink

HERE = os.path.dirname(os.path.abspath(__file__))
URL_PATH = f"{GET_PATH}?{QUERY_STRING}"


@dataclass
class LoadResult:
    requests: int
    rps: float
    errors: int
    non2xx: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_generator() -> str:
    return "wrk" if shutil.which("wrk") else "loadgen.py"


def has_module(python: str, name: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {name}"], capture_output=True)
    return probe.returncode == 0


def server_command(python: str, framework: str, port: int) -> list[str]:
    if framework == "starlette":
        cmd = [python, "-m", "uvicorn", "server_app:app", "--app-dir", HERE]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        cmd += ["--no-access-log", "--lifespan", "on"]
        if has_module(python, "httptools"):
            cmd += ["--http", "httptools"]
        if has_module(python, "uvloop"):
            cmd += ["--loop", "uvloop"]
        return cmd
    return [
        python, "-m", "gunicorn", "server_app:app", "--chdir", HERE,
        "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
    ]  # fmt: skip


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}{URL_PATH}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def run_load(port: int, duration: float, connections: int) -> LoadResult:
    headers = [f"{k}: {v}" for k, v in request_headers("get") if k not in ("connection", "host")]
    if shutil.which("wrk"):
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
        for h in headers:
            cmd += ["-H", h]
        cmd.append(f"http://127.0.0.1:{port}{URL_PATH}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
        return parse_wrk(out)
    headers.insert(0, "host: api.example.test")  # wrk adds its own; loadgen.py does not
    cmd = [sys.executable, os.path.join(HERE, "loadgen.py"), "--port", str(port)]
    cmd += ["--path", URL_PATH, "--connections", str(connections), "--duration", str(duration)]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    d = json.loads(out.strip().splitlines()[-1])
    return LoadResult(int(d["requests"]), float(d["rps"]), int(d["errors"]), int(d["non2xx"]))


def parse_wrk(out: str) -> LoadResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"cannot parse wrk output: {out[:200]!r}")
    errors = 0
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return LoadResult(
        int(total.group(1)), float(rps.group(1)), errors, int(non2xx.group(1)) if non2xx else 0
    )


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    python: str,
    framework: str,
    variant: str,
    sink_url: str,
    duration: float,
    warmup: float,
    connections: int,
    log_path: str,
) -> dict[str, Any]:
    """Start a server for ``variant``, load it, stop it; requests/s and deliveries."""
    port = free_port()
    stats_file = os.path.join(os.path.dirname(log_path), f"server-stats-{os.getpid()}-{port}.json")
    env = dict(
        os.environ,
        BENCH_FRAMEWORK=framework,
        BENCH_VARIANT=variant,
        BENCH_SINK=sink_url,
        BENCH_STATS_FILE=stats_file,
    )
    sink = SinkClient(sink_url)
    base = sink.totals()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            server_command(python, framework, port), env=env, stdout=log, stderr=log, cwd=HERE
        )
        try:
            wait_ready(port, proc)
            warm = run_load(port, warmup, connections)
            res = run_load(port, duration, connections)
            served = warm.requests + res.requests + 1  # + the readiness probe
            after_load = sink.wait_quiet(0.5, 3.0)
        except Exception as exc:
            stop(proc, 5)
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        stop(proc, 20)
    after_exit = sink.wait_quiet(0.5, 5.0)
    ours_stats: dict[str, Any] | None = None
    if os.path.exists(stats_file):
        with open(stats_file) as f:
            ours_stats = json.load(f)
        os.unlink(stats_file)
    if res.errors or res.non2xx:
        status = f"{res.errors} socket errors, {res.non2xx} non-2xx"
    else:
        status = "ok"
    return {
        "status": "ok",
        "warning": None if status == "ok" else status,
        "variant": variant,
        "framework": framework,
        "rps": res.rps,
        "served": served,
        "delivered_after_load": after_load[2] - base[2],
        "delivered_after_exit": after_exit[2] - base[2],
        "sink_requests": after_exit[0] - base[0],
        "sink_bytes": after_exit[1] - base[1],
        "ours_stats": ours_stats,
    }


def main() -> None:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--framework", choices=["starlette", "flask"], required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--sink", help="the sink's URL (default: start one for this run)")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=8)
    a = p.parse_args()
    log = os.path.join(tempfile.gettempdir(), f"bench-server-{os.getpid()}.log")
    with running_sink(a.sink) as url:
        result = measure(
            sys.executable, a.framework, a.variant, url, a.duration, a.warmup, a.connections, log
        )
    result.update(variant=a.variant, framework=a.framework)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
