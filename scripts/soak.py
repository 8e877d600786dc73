"""Soak: each framework under its real server, at full load, against a collector that fails.

Usage::

    .venv/bin/python scripts/soak.py --minutes 10 --framework flask|starlette|django|all

For each framework this starts the reference collector (``alf-analytics collector``, SQLite
in a temporary directory) behind a small proxy that answers one request in ten with 503, runs
the echo app of ``tests/lifecycle_apps.py`` under its real server (Flask: gunicorn
``--preload`` sync workers; Starlette: uvicorn ``--workers``; Django: gunicorn), drives it as
fast as this machine allows (``wrk`` when installed, otherwise a multi-process httpx loop)
with a unique id in every request, samples the server processes' RSS every second, then
sends SIGTERM and reports:

- requests served (the load generator's count, and the per-worker ``captured`` counters);
- entries captured / sent / dropped (by reason) / still queued, from ``/_alf_stats`` of every
  worker before shutdown and from the statistics each worker writes when it exits;
- entries stored by the collector, distinct request ids, and duplicates;
- entries lost at exit: still queued or in flight when the shutdown bound ran out;
- peak RSS (all server processes together, and the largest one), and the RSS slope over the
  second half of the run, with a verdict on whether it was flat.

Exit status 0 when, for every framework, every entry was sent or counted as dropped (none
lost at exit), no worker was restarted, the collector stored exactly the sent entries with no
duplicates, and RSS was flat over the second half.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
BIN = Path(sys.executable).parent
FRAMEWORKS = ("flask", "starlette", "django")
MIB = 1024 * 1024
STATS_PATH = "/_alf_stats"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the flaky proxy in front of the collector --------------------------------------------------


class FlakyProxy(ThreadingHTTPServer):
    """Forwards POSTs to the collector, except every ``every``-th one, answered 503."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, upstream: str, every: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.every = every
        self.lock = threading.Lock()
        self.received = 0
        self.failed = 0
        self.upstream_errors = 0
        self.local = threading.local()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Agents drop their keep-alive connections when their process exits: not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server
        with proxy.lock:
            proxy.received += 1
            fail = proxy.received % proxy.every == 0
            if fail:
                proxy.failed += 1
        if fail:
            self._answer(503, b'{"errors": ["injected by the soak proxy"]}')
            return
        status, data = self._forward(body)
        self._answer(status, data)

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        proxy = self.server
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() in ("content-type", "content-encoding", "user-agent")
        }
        for attempt in (1, 2):
            conn = getattr(proxy.local, "conn", None)
            if conn is None:
                conn = proxy.local.conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request("POST", self.path, body, headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                proxy.local.conn = None
                if attempt == 2:
                    with proxy.lock:
                        proxy.upstream_errors += 1
        return 502, b'{"errors": ["the soak proxy could not reach the collector"]}'

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# -- processes ----------------------------------------------------------------------------------


@contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """A subprocess in its own process group, killed with its children on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_for(predicate: Any, timeout: float, what: str, proc: Any, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: exited with {proc.returncode}\n{tail(log)}")
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready after {timeout}s\n{tail(log)}")
        time.sleep(0.1)


def tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def server_command(framework: str, port: int, workers: int) -> tuple[list[str], str]:
    gunicorn = [
        str(BIN / "gunicorn"),
        f"--workers={workers}",
        f"--bind=127.0.0.1:{port}",
        f"--pythonpath={TESTS}",
        "--backlog=4096",
        "--graceful-timeout=60",
        "--log-level=warning",
    ]
    if framework == "flask":
        cmd = [*gunicorn, "--preload", "lifecycle_apps:flask_app"]
        return cmd, f"gunicorn --preload, {workers} sync workers"
    if framework == "django":
        cmd = [*gunicorn, "--preload", "lifecycle_apps:make_django_app()"]
        return cmd, f"gunicorn --preload, {workers} sync workers"
    cmd = [
        str(BIN / "uvicorn"),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--app-dir={TESTS}",
        f"--workers={workers}",
        "--backlog=4096",
        "--log-level=info",  # worker restarts ("Child process ... died") are logged at info
        "--no-access-log",
        "lifecycle_apps:starlette_app",
    ]
    return cmd, f"uvicorn, {workers} workers"


# -- RSS sampling -------------------------------------------------------------------------------


class RSSSampler:
    """Every second: the RSS of the server's main process and all its descendants."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            per: dict[int, int] = {}
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in processes:
                try:
                    per[proc.pid] = proc.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.monotonic() - self._t0, per))

    def start(self) -> RSSSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        totals = [(t, sum(per.values())) for t, per in self.samples]
        if len(totals) < 4:
            return {"samples": len(totals)}
        peak_total = max(total for _, total in totals)
        peak_process = max(max(per.values(), default=0) for _, per in self.samples)
        half = totals[len(totals) // 2 :]
        slope = _slope(half)  # bytes per second
        span = half[-1][0] - half[0][0]
        mean = sum(v for _, v in half) / len(half)
        growth = slope * span
        # Flat: the fitted growth over the second half stays under 2 MiB or 2 % of the RSS.
        flat = growth <= max(2 * MIB, 0.02 * mean)
        return {
            "samples": len(totals),
            "peak_total_mib": round(peak_total / MIB, 1),
            "peak_process_mib": round(peak_process / MIB, 1),
            "first_mib": round(totals[0][1] / MIB, 1),
            "last_mib": round(totals[-1][1] / MIB, 1),
            "second_half_slope_mib_per_min": round(slope * 60 / MIB, 3),
            "second_half_growth_mib": round(growth / MIB, 2),
            "flat": flat,
        }


def _slope(points: list[tuple[float, int]]) -> float:
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


# -- load generation ----------------------------------------------------------------------------

WRK_SCRIPT = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  return wrk.format("GET", "/echo?id=w" .. tid .. "-" .. counter)
end
"""


def run_wrk(
    url: str, seconds: int, connections: int, threads: int, workdir: Path
) -> dict[str, Any]:
    script = workdir / "ids.lua"
    script.write_text(WRK_SCRIPT)
    cmd = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        "--timeout=30s",
        f"--script={script}",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = {"generator": f"wrk -t{threads} -c{connections}", "raw": out}
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            result["requests"] = int(words[0])
        elif line.startswith("Requests/sec:"):
            result["rate"] = float(words[1])
        elif line.strip().startswith("Non-2xx"):
            result["non_2xx"] = int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            result["socket_errors"] = line.split(":", 1)[1].strip()
    return result


def _loop_process(url: str, seconds: float, tasks: int, index: int, results: Any) -> None:
    async def main() -> int:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=tasks)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:

            async def loop(task: int) -> int:
                done = 0
                while time.monotonic() < deadline:
                    try:
                        await client.get(f"{url}/echo", params={"id": f"p{index}-{task}-{done}"})
                    except httpx.HTTPError:
                        pass
                    done += 1
                return done

            return sum(await asyncio.gather(*(loop(t) for t in range(tasks))))

    results.put(asyncio.run(main()))


def run_httpx_loop(url: str, seconds: int, connections: int) -> dict[str, Any]:
    processes = max(1, os.cpu_count() or 1)
    tasks = max(1, connections // processes)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_loop_process, args=(url, seconds, tasks, i, results))
        for i in range(processes)
    ]
    start = time.monotonic()
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=seconds + 120) for _ in workers)
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - start
    return {
        "generator": f"httpx loop, {processes} processes x {tasks} tasks",
        "requests": total,
        "rate": round(total / elapsed, 1),
    }


# -- one framework ------------------------------------------------------------------------------


@dataclass
class Result:
    framework: str
    server: str
    minutes: float
    load: dict[str, Any] = field(default_factory=dict)
    live: dict[int, dict[str, Any]] = field(default_factory=dict)
    final: dict[int, dict[str, Any]] = field(default_factory=dict)
    collector: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    shutdown_seconds: float = 0.0
    restarts: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    ok: bool = False


def worker_stats(url: str, workers: int, timeout: float = 15.0) -> dict[int, dict[str, Any]]:
    """``/_alf_stats`` of every worker: ask on fresh connections until each pid has answered."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        try:
            document = httpx.get(f"{url}{STATS_PATH}", timeout=10).json()
        except httpx.HTTPError:
            continue
        seen[int(document["pid"])] = {**document["stats"], "served": document["served"]}
    return seen


def collector_ids(db: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    with sqlite3.connect(db) as conn:
        for (url,) in conn.execute("SELECT url FROM entries"):
            values = parse_qs(urlsplit(url or "").query).get("id")
            ids[values[0] if values else ""] += 1
    return ids


def settle(db: Path, quiet: float = 3.0, timeout: float = 120.0) -> int:
    """Wait until the collector's entry count stops changing; returns it."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            count = int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.5)
    return last


def soak(framework: str, args: argparse.Namespace, workdir: Path) -> Result:
    seconds = max(1, round(args.minutes * 60))
    stats_dir = workdir / "stats"
    stats_dir.mkdir()
    db = workdir / "collector.sqlite"
    collector_cmd = [str(BIN / "alf-analytics"), "collector", "--port=0", f"--db={db}"]
    if not args.validate:
        collector_cmd.append("--no-validate")
    collector_log = workdir / "collector.log"
    with process(collector_cmd, collector_log) as collector:
        collector_url = wait_for(
            lambda: next(
                (
                    line.split(" on ", 1)[1].split()[0]
                    for line in collector_log.read_text().splitlines()
                    if "listening on" in line
                ),
                None,
            ),
            30,
            "collector",
            collector,
            collector_log,
        )
        proxy = FlakyProxy(collector_url, args.fail_every)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        port = free_port()
        cmd, description = server_command(framework, port, args.workers)
        result = Result(framework, description, args.minutes)
        env = {
            **os.environ,
            "ALF_COLLECTOR_URL": proxy.url,
            "ALF_SERVICE_TOKEN": f"soak-{framework}",
            "ALF_TEST_OPTIONS": json.dumps({"log_body": True}),
            "ALF_TEST_STATS_DIR": str(stats_dir),
        }
        url = f"http://127.0.0.1:{port}"
        server_log = workdir / "server.log"
        try:
            with process(cmd, server_log, env) as server:
                wait_for(
                    lambda: httpx.get(f"{url}{STATS_PATH}", timeout=5).status_code == 200,
                    60,
                    framework,
                    server,
                    server_log,
                )
                sampler = RSSSampler(server.pid).start()
                print(f"[{framework}] {description}: loading for {seconds}s", flush=True)
                if shutil.which("wrk") and not args.httpx:
                    result.load = run_wrk(url, seconds, args.connections, args.threads, workdir)
                else:
                    result.load = run_httpx_loop(url, seconds, args.connections)
                sampler.stop()
                result.rss = sampler.summary()
                result.live = worker_stats(url, args.workers)
                start = time.monotonic()
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(120)
                except subprocess.TimeoutExpired:
                    print(f"[{framework}] server still running 120 s after SIGTERM", flush=True)
                result.shutdown_seconds = round(time.monotonic() - start, 2)
            result.restarts = [
                line.strip()
                for line in tail(server_log, 1_000_000).splitlines()
                if "died" in line or "WORKER TIMEOUT" in line or "was killed" in line
            ]
        finally:
            stored = settle(db)
            proxy.shutdown()
            proxy.server_close()
        result.proxy = {
            "requests": proxy.received,
            "injected_503": proxy.failed,
            "upstream_errors": proxy.upstream_errors,
        }
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(30)
        except subprocess.TimeoutExpired:
            pass
    ids = collector_ids(db)
    dups = {rid: n for rid, n in ids.items() if n > 1}
    result.collector = {
        "stored": stored,
        "distinct_ids": len(ids),
        "duplicates": sum(n - 1 for n in dups.values()),
        "duplicate_examples": dict(list(dups.items())[:5]),
    }
    for path in stats_dir.glob("*.json"):
        document = json.loads(path.read_text())
        if document["served"]:
            result.final[int(document["pid"])] = {**document["stats"], "served": document["served"]}
    result.totals = _totals(result)
    result.ok = (
        result.totals["lost_at_exit"] == 0
        and not result.restarts
        and result.collector["duplicates"] == 0
        and result.collector["stored"] == result.totals["sent"]
        and bool(result.rss.get("flat"))
        and len(result.final) == args.workers
    )
    return result


def _totals(result: Result) -> dict[str, Any]:
    source = result.final or result.live
    drops: Counter[str] = Counter()
    for stats in source.values():
        drops.update({k: v for k, v in stats["dropped"].items() if v})
    served = sum(s["served"] for s in source.values())
    sent = sum(s["sent"] for s in source.values())
    dropped = sum(s["dropped_total"] for s in source.values())
    return {
        "from": "exit statistics" if result.final else "live /_alf_stats",
        "served": served,
        "captured": sum(s["captured"] for s in source.values()),
        "sent": sent,
        "dropped": dropped,
        "dropped_by_reason": dict(drops),
        "queued": sum(s["queued"] for s in source.values()),
        "retried": sum(s["retried"] for s in source.values()),
        # Requests the app answered whose entry was neither sent nor counted as dropped when
        # the process exited: still queued or in flight when the shutdown bound ran out.
        "lost_at_exit": served - sent - dropped,
        "live_served": sum(s["served"] for s in result.live.values()),
        "live_sent": sum(s["sent"] for s in result.live.values()),
        "live_dropped": sum(s["dropped_total"] for s in result.live.values()),
        "live_queued": sum(s["queued"] for s in result.live.values()),
    }


def report(result: Result) -> str:
    load, totals, rss, coll = result.load, result.totals, result.rss, result.collector
    lines = [
        f"== {result.framework} ({result.server}), {result.minutes:g} min, {load.get('generator')}",
        f"requests served   {load.get('requests')} ({load.get('rate')}/s; "
        f"non-2xx by design: {load.get('non_2xx', 'n/a')}; "
        f"socket errors: {load.get('socket_errors', 'none')})",
        f"entries           {totals['served']} requests answered by the app: sent "
        f"{totals['sent']}, dropped {totals['dropped']} {totals['dropped_by_reason'] or ''}, "
        f"lost at exit {totals['lost_at_exit']} (retried {totals['retried']}; "
        f"{totals['from']} of {len(result.final)} workers)",
        f"                  lost at exit = still queued ({totals['queued']} reported) or in "
        "flight when the shutdown bound ran out, not counted as dropped",
        f"worker restarts   {len(result.restarts)} {result.restarts[:3] or ''}",
        f"before SIGTERM    served {totals['live_served']}, sent {totals['live_sent']}, "
        f"dropped {totals['live_dropped']}, queued {totals['live_queued']} "
        f"(/_alf_stats of {len(result.live)} workers)",
        f"collector         stored {coll['stored']}  distinct ids {coll['distinct_ids']}  "
        f"duplicates {coll['duplicates']}  (proxy: {result.proxy['requests']} batches, "
        f"{result.proxy['injected_503']} answered 503, "
        f"{result.proxy['upstream_errors']} upstream errors)",
        f"RSS               peak {rss.get('peak_total_mib')} MiB for all server processes "
        f"(largest {rss.get('peak_process_mib')} MiB); {rss.get('first_mib')} -> "
        f"{rss.get('last_mib')} MiB; second half slope "
        f"{rss.get('second_half_slope_mib_per_min')} MiB/min "
        f"(+{rss.get('second_half_growth_mib')} MiB): {'flat' if rss.get('flat') else 'GROWING'}",
        f"shutdown          {result.shutdown_seconds} s from SIGTERM to exit",
        f"verdict           {'OK' if result.ok else 'CHECK'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--framework", choices=[*FRAMEWORKS, "all"], default="all")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--fail-every", type=int, default=10, help="the proxy fails 1 in N")
    parser.add_argument("--validate", action="store_true", help="collector schema checks")
    parser.add_argument("--httpx", action="store_true", help="use the httpx loop, not wrk")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)

    frameworks = FRAMEWORKS if args.framework == "all" else (args.framework,)
    results = []
    for framework in frameworks:
        workdir = Path(tempfile.mkdtemp(prefix=f"alf-soak-{framework}-"))
        try:
            result = soak(framework, args, workdir)
        finally:
            if args.keep:
                print(f"[{framework}] files kept in {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        print(report(result), flush=True)
        results.append(result)
    if args.json:
        documents = [{**vars(r), "load": _load(r)} for r in results]
        args.json.write_text(json.dumps(documents, indent=2, default=str))
    return 0 if all(r.ok for r in results) else 1


def _load(result: Result) -> dict[str, Any]:
    return {k: v for k, v in result.load.items() if k != "raw"}


if __name__ == "__main__":
    sys.exit(main())
