"""The collector's ingest rate and dashboard time over a million entries (issues 9, 10).

Ingest: ``alf-analytics collector`` in its own process(es), 4 clients over loopback each
posting gzip batches of 100 typical entries (what the agent sends: ~10 request and ~6
response headers, a query string, no bodies; a batch's entries within 2 s, as the agent
sends a batch at 100 entries or 2 s; each POST with its own Idempotency-Key), validation
always on. The bodies are built and compressed before the clock starts. Entries/s =
entries stored (read back from ``/api/stats``) over the wall time of the posting.
SQLite: one collector process. PostgreSQL: a throw-away server (tests/pg.py) and two
collector processes, two clients on each.

Query: a million entries over the last 24 hours are written straight into an SQLite store
(the collector's own write path, rollups included, then the past hours summed as the
collector's housekeeping does), then a collector serves it and each dashboard view (the
overview and the request log at 1h, 6h, 24h and 7d, the log filtered, one request in
detail) and the API queries behind them are timed over HTTP, each the median of 5.

Run it with the project's interpreter: ``.venv/bin/python benchmarks/ingest.py [--quick]
[--seconds 10] [--skip-postgres] [--skip-query] [--skip-ingest] [--entries 1000000]
[--db FILE]``; the PostgreSQL part imports tests/pg.py, which needs pytest (in .venv, not
in benchmarks/.venv; under benchmarks/.venv/bin/python the PostgreSQL part is skipped with
a note). The collector processes run under benchmarks/.venv/bin/python when it exists
(uvicorn with uvloop and httptools, as deployed), else under this interpreter. The last
line of output is the JSON that ``benchmarks/run.py`` reads.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # tests/pg.py
BEFORE = "~2,200 entries/s (http.server + jsonschema, validation on)"
TARGET_INGEST = 20_000
# Measured before the hourly rollups (schema 2), the same 1M entries over 24 h.
BEFORE_QUERY = {"overview 1h": "84 ms", "overview 6h": "860 ms", "overview 24h": "3,700 ms"}
READ_KEY = "bench-read-key"
TOKEN = "bench-service-token"

ROUTES = [
    ("GET", "/api/items/{}"),
    ("GET", "/api/items"),
    ("POST", "/api/items"),
    ("GET", "/api/users/{}"),
    ("PUT", "/api/users/{}"),
    ("GET", "/api/orders/{}/lines"),
    ("DELETE", "/api/items/{}"),
    ("GET", "/health"),
    ("GET", "/api/search"),
    ("PATCH", "/api/orders/{}"),
]
STATUSES = [200] * 80 + [201] * 5 + [204] * 3 + [304] * 2 + [400] * 3 + [404] * 4 + [500] * 3


def typical_entry(rng: random.Random, started: datetime) -> dict[str, Any]:
    method, template = rng.choice(ROUTES)
    path = template.format(rng.randint(1, 100_000))
    status = rng.choice(STATUSES)
    wait = round(rng.lognormvariate(3.0, 0.8), 3)
    query = [{"name": "page", "value": str(rng.randint(1, 9))}] if method == "GET" else []
    url = f"https://api.example.com{path}" + (f"?page={query[0]['value']}" if query else "")
    request_headers = [
        ("host", "api.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("authorization", "Bearer [REDACTED]"),
        ("x-request-id", uuid.UUID(int=rng.getrandbits(128)).hex),
        ("x-forwarded-for", f"203.0.113.{rng.randint(1, 254)}"),
        ("connection", "keep-alive"),
        ("x-alf-consumer", f"customer-{rng.randint(1, 50)}"),
    ]
    response_headers = [
        ("content-type", "application/json"),
        ("content-length", str(rng.randint(20, 4000))),
        ("date", started.strftime("%a, %d %b %Y %H:%M:%S GMT")),
        ("server", "uvicorn"),
        ("cache-control", "no-store"),
        ("x-request-id", request_headers[6][1]),
    ]
    return {
        "startedDateTime": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "serverIPAddress": "10.0.0.5",
        "clientIPAddress": f"203.0.113.{rng.randint(1, 254)}",
        "time": round(wait + 0.2, 3),
        "request": {
            "method": method,
            "url": url,
            "httpVersion": "HTTP/1.1",
            "queryString": query,
            "headers": [{"name": n, "value": v} for n, v in request_headers],
            "headersSize": 420,
            "bodyCaptured": False,
            "bodySize": 0 if method in ("GET", "DELETE") else rng.randint(10, 2000),
        },
        "response": {
            "status": status,
            "statusText": "OK",
            "httpVersion": "HTTP/1.1",
            "headers": [{"name": n, "value": v} for n, v in response_headers],
            "headersSize": 180,
            "bodyCaptured": False,
            "bodySize": int(response_headers[1][1]),
        },
        "timings": {"send": 0.1, "wait": wait, "receive": 0.1},
    }


def batch_body(rng: random.Random, end: datetime, size: int = 100) -> bytes:
    """One gzip batch as the agent sends it: ``size`` entries of the 2 s before ``end``.

    The agent posts a batch when it holds 100 entries or 2 s after its first one, so a
    batch's entries are close together in time and in the order they finished.
    """
    offsets = sorted(rng.random() * 2.0 for _ in range(size))
    entries = [typical_entry(rng, end - timedelta(seconds=2.0 - o)) for o in offsets]
    alf = {
        "version": "1.1.0",
        "serviceToken": TOKEN,
        "environment": "bench",
        "har": {
            "log": {"creator": {"name": "alf-analytics", "version": "bench"}, "entries": entries}
        },
    }
    return gzip.compress(json.dumps([alf]).encode(), 6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BENCH_PYTHON = HERE / ".venv" / "bin" / "python"
COLLECTOR_PYTHON = str(BENCH_PYTHON) if BENCH_PYTHON.exists() else sys.executable
"""The collectors run where uvicorn has uvloop and httptools (as ``uvicorn[standard]`` and
most deployments have them): benchmarks/.venv. Without them (h11's pure-Python parser) the
collector ingests about a third less."""


def start_collector(db: str, port: int, log: Any) -> subprocess.Popen[bytes]:
    command = [
        COLLECTOR_PYTHON, "-m", "alf_analytics.cli", "collector", "--host", "127.0.0.1",
        "--port", str(port), "--db", db, "--token", TOKEN, "--read-key", READ_KEY,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"collector exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("collector did not start listening")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _timed_get(port: int, path: str) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one GET with the read key as a bearer token."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request("GET", path, headers={"Authorization": f"Bearer {READ_KEY}"})
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    connection.close()
    return response.status, data, elapsed


def get_json(port: int, path: str) -> tuple[Any, float]:
    status, data, elapsed = _timed_get(port, path)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {data[:200]!r}")
    return json.loads(data), elapsed


def post_for(port: int, bodies: list[bytes], seconds: float, counts: list[int], index: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    deadline = time.monotonic() + seconds
    sent = 0
    i = index
    while time.monotonic() < deadline:
        body = bodies[i % len(bodies)]
        i += 1
        connection.request(
            "POST",
            "/1.1.0/batch",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Idempotency-Key": uuid.uuid4().hex,
            },
        )
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"POST answered {response.status}")
        sent += 100
    connection.close()
    counts[index] = sent


def measure_ingest(ports: list[int], clients: int, seconds: float) -> tuple[float, int]:
    rng = random.Random(9)
    now = datetime.now(timezone.utc)
    # Built (and compressed) before the clock starts: the clients cost the collector's CPU
    # only what sending costs. 40 batches over the last 80 s, posted round-robin.
    bodies = [batch_body(rng, now - timedelta(seconds=80 - 2 * i)) for i in range(40)]
    counts = [0] * clients
    threads = [
        threading.Thread(target=post_for, args=(ports[i % len(ports)], bodies, seconds, counts, i))
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    stored = sum(get_json(port, "/api/stats?interval=3600")[0]["count"] for port in ports[:1])
    if stored != sum(counts):
        raise RuntimeError(f"posted {sum(counts)} entries, the store holds {stored}")
    return stored / elapsed, stored


def fill(db: str, entries: int) -> float:
    """Write ``entries`` entries over the last 24 hours straight into the store."""
    from alf_analytics.collector.ingest import prepare
    from alf_analytics.collector.settings import Limits, TokenSet
    from alf_analytics.collector.storage import SaveRequest, open_store

    store = open_store(db)
    rng = random.Random(10)
    now = datetime.now(timezone.utc)
    limits = Limits(max_entries=10_000)
    # A pool of typical entries, each used with new start times (building them costs more
    # than storing them).
    pool = [typical_entry(rng, now) for _ in range(5_000)]
    started = time.perf_counter()
    done = 0
    while done < entries:
        size = min(1000, entries - done)
        batch = []
        for _ in range(size):
            entry = dict(rng.choice(pool))
            moment = now - timedelta(seconds=rng.random() * 86_400)
            entry["startedDateTime"] = moment.isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            )
            batch.append(entry)
        body = json.dumps(
            {
                "version": "1.1.0",
                "serviceToken": TOKEN,
                "environment": "bench",
                "har": {"log": {"creator": {"name": "bench", "version": "1"}, "entries": batch}},
            }
        ).encode()
        prepared = prepare(body, version="1.1.0", kind="single", tokens=TokenSet(), limits=limits)
        store.save(SaveRequest(prepared.groups, int(time.time() * 1e6), 200, "{}"))
        done += size
    # What the collector's housekeeping does as it starts: past hours summed.
    while store.compact(max_hours=1000):
        pass
    store.close()
    return time.perf_counter() - started


RANGES = ("1h", "6h", "24h", "7d")


def get_page(port: int, path: str) -> float:
    """Seconds for one dashboard page (HTML, the read key as a bearer token)."""
    status, data, elapsed = _timed_get(port, path)
    if status != 200 or b"<html" not in data[:400].lower():
        raise RuntimeError(f"GET {path}: {status} {data[:200]!r}")
    return elapsed


def measure_queries(db: str, log: Any, runs: int = 5) -> dict[str, float]:
    """Median ms of each dashboard view per range, then of the API queries behind them."""
    port = free_port()
    process = start_collector(db, port, log)
    since = f"{time.time() - 86_400:.0f}"  # epoch seconds: nothing to escape
    pages: dict[str, str] = {}
    for name in RANGES:
        pages[f"overview {name}"] = f"/?range={name}"
    for name in RANGES:
        pages[f"log {name}"] = f"/requests?range={name}"
    pages["log 24h, 5xx"] = "/requests?range=24h&status=5xx"
    pages["log 24h, one route"] = "/requests?range=24h&route=/api/orders/%7Bid%7D"
    paths = {
        "api stats 24h": f"/api/stats?interval=600&since={since}",
        "api endpoints 24h": f"/api/endpoints?since={since}",
        "api services": "/api/services",
        "api consumers 24h": f"/api/consumers?since={since}",
        "api entries": "/api/entries?limit=50",
        "api entries, 5xx": "/api/entries?limit=50&status=5xx",
        "api slowest 24h": f"/api/entries?limit=10&sort=slowest&since={since}",
    }
    timings: dict[str, float] = {}
    try:
        newest = get_json(port, "/api/entries?limit=1")[0]["entries"][0]["id"]
        middle = get_json(port, f"/api/entries?limit=1&until={since}")[0]["entries"]
        pages["detail"] = f"/requests/{newest}"
        if middle:
            pages["detail, a day old"] = f"/requests/{middle[0]['id']}"
        get_page(port, "/?range=1h")  # warm: templates compiled, caches filled
        for name, path in pages.items():
            samples = [get_page(port, path) for _ in range(runs)]
            timings[name] = statistics.median(samples) * 1000
        for name, path in paths.items():
            samples = [get_json(port, path)[1] for _ in range(runs)]
            timings[name] = statistics.median(samples) * 1000
    finally:
        stop(process)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 s per ingest run, 200k entries")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-query", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true", help="the query part only")
    parser.add_argument("--db", help="query an existing store instead of filling a new one")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    entries = 200_000 if args.quick else args.entries
    command = shlex.join([_shown_python(), "benchmarks/ingest.py", *sys.argv[1:]])
    figures: list[dict[str, Any]] = []
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="alf-ingest-"))
    log = open(workdir / "collector.log", "ab")

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        if not args.skip_ingest:
            ingest_sqlite(args, seconds, workdir, log, command, figures, say)
        if not args.skip_ingest and not args.skip_postgres:
            ingest_postgres(args, seconds, log, command, figures, notes, say)
        if not args.skip_query:
            query_figures(args, entries, workdir, log, command, figures, notes, say)
        status = "ok"
        reason = None
    except Exception as exc:  # report what was measured, and why the rest was not
        status = "error"
        reason = f"{type(exc).__name__}: {exc}"
        say(f"error: {reason} (collector log: {workdir / 'collector.log'})")
    finally:
        log.close()
    print(
        json.dumps(
            {
                "status": status,
                "reason": reason,
                "figures": figures,
                "notes": notes,
                "command": command,
            }
        )  # fmt: skip
    )
    return 0 if status == "ok" else 1


def _shown_python() -> str:
    """The interpreter as a path relative to the checkout when it is inside it."""
    try:
        return str(Path(sys.executable).relative_to(ROOT))
    except ValueError:
        return sys.executable


Say = Callable[[str], None]


def ingest_sqlite(
    args: argparse.Namespace,
    seconds: float,
    workdir: Path,
    log: Any,
    command: str,
    figures: list[dict[str, Any]],
    say: Say,
) -> None:
    port = free_port()
    process = start_collector(str(workdir / "ingest.sqlite"), port, log)
    try:
        rate, stored = measure_ingest([port], args.clients, seconds)
    finally:
        stop(process)
    say(f"SQLite, 1 process, {args.clients} clients: {rate:,.0f} entries/s ({stored} stored)")
    figures.append(
        {
            "name": "ingest into SQLite, one process, validation on",
            "before": BEFORE,
            "value": round(rate),
            "unit": "entries/s",
            "target": f">= {TARGET_INGEST:,} entries/s",
            "met": rate >= TARGET_INGEST,
            "command": command,
        }
    )


def ingest_postgres(
    args: argparse.Namespace,
    seconds: float,
    log: Any,
    command: str,
    figures: list[dict[str, Any]],
    notes: list[str],
    say: Say,
) -> None:
    try:
        from tests.pg import PostgresServer, PostgresUnavailable
    except ImportError as exc:
        notes.append(
            f"PostgreSQL part skipped: {exc} (tests/pg.py needs pytest: run this "
            "script with .venv/bin/python)"
        )
        say(notes[-1])
        return
    try:
        with PostgresServer() as pg:
            url = pg.fresh_url()
            ports = [free_port(), free_port()]
            processes = [start_collector(url, p, log) for p in ports]
            try:
                rate, stored = measure_ingest(ports, args.clients, seconds)
            finally:
                for p in processes:
                    stop(p)
    except PostgresUnavailable as exc:
        notes.append(f"PostgreSQL part skipped: {exc}")
        say(notes[-1])
        return
    say(f"PostgreSQL, 2 processes: {rate:,.0f} entries/s ({stored} stored)")
    figures.append(
        {
            "name": "ingest into PostgreSQL, two processes, validation on",
            "before": "no PostgreSQL backend",
            "value": round(rate),
            "unit": "entries/s",
            "target": f">= {TARGET_INGEST:,} entries/s",
            "met": rate >= TARGET_INGEST,
            "command": command,
        }
    )


def query_figures(
    args: argparse.Namespace,
    entries: int,
    workdir: Path,
    log: Any,
    command: str,
    figures: list[dict[str, Any]],
    notes: list[str],
    say: Say,
) -> None:
    if args.db:
        db = args.db
        say(f"querying {db}")
    else:
        db = str(workdir / "query.sqlite")
        took = fill(db, entries)
        say(f"filled {entries:,} entries in {took:.1f} s ({entries / took:,.0f}/s in-process)")
    timings = measure_queries(db, log)
    for name, ms in timings.items():
        say(f"  {name}: {ms:.1f} ms")
        figures.append(
            {
                "name": f"dashboard {name} over {entries:,} entries (median of 5)",
                "before": BEFORE_QUERY.get(name, "not measured"),
                "value": round(ms, 1),
                "unit": "ms",
                "target": "< 1000 ms",
                "met": ms < 1000,
                "command": command,
            }
        )
    worst = max(timings, key=timings.__getitem__)
    say(f"slowest view: {worst} {timings[worst]:.0f} ms")
    notes.append(
        "view medians of 5 (ms): " + ", ".join(f"{n} {ms:.0f}" for n, ms in timings.items())
    )


if __name__ == "__main__":
    raise SystemExit(main())
