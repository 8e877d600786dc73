"""Processes and lifecycle: fork, pre-forking servers, shutdown, threads, interpreter exit.

Real processes throughout: ``os.fork()``, gunicorn and uvicorn started as subprocesses that
serve :mod:`tests.lifecycle_apps`, and the ``collector`` fixture receiving over loopback.
Every request carries a unique id in its query string, so entries are counted per request
(PITFALLS #4, #27-#34, #36-#39, #52).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from werkzeug.serving import make_server
from werkzeug.test import Client

import alf_analytics
from alf_analytics import _worker
from alf_analytics._config import Config
from alf_analytics.collector import Collector

from .conftest import received_entries
from .lifecycle_apps import build_flask
from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
BIN = Path(sys.executable).parent
TOKEN = "lifecycle-token"
#: The bound configured for shutdown tests, and what a process may add to it to exit.
SHUTDOWN_TIMEOUT = 2.0
EXIT_MARGIN = 3.0
#: Transport timeout in the dead-collector tests: an unbounded shutdown would wait this long.
SLOW_TRANSPORT_TIMEOUT = 30.0
READY_TIMEOUT = 30.0


# -- helpers ------------------------------------------------------------------------------------


@contextmanager
def black_hole() -> Iterator[str]:
    """A collector URL whose socket accepts connections (in the kernel) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def refused() -> Iterator[str]:
    """A collector URL on a port nobody listens on."""
    yield f"http://127.0.0.1:{free_port()}"


@dataclass(frozen=True)
class Got:
    """What the client received for one request."""

    status: int
    body: bytes
    pid: str


def request_id(entry: dict[str, Any]) -> str:
    return next(p["value"] for p in entry["request"]["queryString"] if p["name"] == "id")


def header(entry: dict[str, Any], name: str) -> str | None:
    for item in entry["response"]["headers"]:
        if item["name"].lower() == name:
            return str(item["value"])
    return None


def duplicates(entries: list[dict[str, Any]]) -> dict[str, int]:
    return {rid: n for rid, n in Counter(map(request_id, entries)).items() if n != 1}


def mismatches(entries: list[dict[str, Any]], got: dict[str, Got]) -> list[str]:
    """Every way the entries differ from one exact, correct entry per request."""
    problems = [f"{rid} has {n} entries" for rid, n in duplicates(entries).items()]
    ids = {request_id(entry) for entry in entries}
    problems += [f"{rid} has no entry" for rid in sorted(set(got) - ids)]
    problems += [f"{rid} was never requested" for rid in sorted(ids - set(got))]
    for entry in entries:
        rid = request_id(entry)
        if rid not in got:
            continue
        seen, response = got[rid], entry["response"]
        content = response.get("content")
        recorded = (
            response["status"],
            response["bodySize"],
            header(entry, "x-pid"),
            base64.b64decode(content["text"]) if content else b"",
        )
        if recorded != (seen.status, len(seen.body), seen.pid, seen.body):
            problems.append(
                f"{rid}: entry has (status, size, pid) {recorded[:3]}, the client got "
                f"{(seen.status, len(seen.body), seen.pid)}; same body: {recorded[3] == seen.body}"
            )
    return problems


def echo_body(rid: str) -> bytes:
    return f"request-{rid};".encode() * (1 + sum(map(ord, rid)) % 7)


def drive(url: str, ids: list[str], concurrency: int, keepalive: bool = True) -> dict[str, Got]:
    """POST ``/echo?id=...`` for every id from ``concurrency`` threads, one client each.

    Without ``keepalive`` every request opens its own connection, so a multi-process server
    spreads them over its workers instead of keeping each client on the worker it met first.
    """
    chunks = [ids[i::concurrency] for i in range(concurrency)]
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)

    def run(chunk: list[str]) -> dict[str, Got]:
        out = {}
        with httpx.Client(timeout=60, limits=limits) as client:
            for rid in chunk:
                r = client.post(f"{url}/echo", params={"id": rid}, content=echo_body(rid))
                out[rid] = Got(r.status_code, r.content, r.headers["x-pid"])
        return out

    got: dict[str, Got] = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for part in pool.map(run, chunks):
            got.update(part)
    return got


async def drive_concurrently(url: str, ids: list[str]) -> dict[str, Got]:
    """All requests at once, one connection each."""
    limits = httpx.Limits(max_connections=len(ids), max_keepalive_connections=len(ids))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(rid: str) -> tuple[str, Got]:
            r = await client.post(f"{url}/echo", params={"id": rid}, content=echo_body(rid))
            return rid, Got(r.status_code, r.content, r.headers["x-pid"])

        return dict(await asyncio.gather(*(one(rid) for rid in ids)))


class ThreadSampler:
    """Samples a process's OS thread count in the background; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.num_threads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.num_threads())

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stats(self) -> dict[str, Any]:
        """``/_alf_stats`` of whichever process answers (there is one in single-worker tests)."""
        document: dict[str, Any] = httpx.get(f"{self.url}/_alf_stats", timeout=10).json()
        return document

    def terminate(self, timeout: float = 60.0) -> float:
        """SIGTERM to the server's main process; seconds until it exited."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server did not exit {timeout}s after SIGTERM:\n{self.output()}")
        return time.monotonic() - start


GUNICORN_FLASK = "gunicorn"
UVICORN_STARLETTE = "uvicorn"


def server_command(kind: str, port: int, workers: int, extra: tuple[str, ...]) -> list[str]:
    if kind == GUNICORN_FLASK:
        return [
            str(BIN / "gunicorn"),
            "--preload",
            f"--workers={workers}",
            f"--bind=127.0.0.1:{port}",
            f"--pythonpath={TESTS}",
            "--graceful-timeout=60",
            "--log-level=warning",
            *extra,
            "lifecycle_apps:flask_app",
        ]
    return [
        str(BIN / "uvicorn"),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--app-dir={TESTS}",
        f"--workers={workers}",
        "--log-level=warning",
        *extra,
        "lifecycle_apps:starlette_app",
    ]


@contextmanager
def serving(
    kind: str,
    tmp_path: Path,
    collector_url: str,
    options: dict[str, Any],
    *,
    workers: int = 1,
    extra: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Run the echo app under a real server; every process of it is killed on the way out."""
    port = free_port()
    log = tmp_path / f"{kind}.log"
    env = {
        **os.environ,
        "ALF_COLLECTOR_URL": collector_url,
        "ALF_SERVICE_TOKEN": TOKEN,
        "ALF_TEST_OPTIONS": json.dumps(options),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(kind, port, workers, extra),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        seen: set[int] = set()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{kind} exited with {proc.returncode}:\n{server.output()}")
            try:
                # A fresh connection each time: the kernel hands it to any idle worker, so
                # every worker process has answered once they are all up.
                answered = httpx.get(f"{server.url}/_alf_stats", timeout=2)
                if answered.status_code == 200:
                    seen.add(answered.json()["pid"])
                    if len(seen) >= workers:
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{kind} not ready after {READY_TIMEOUT}s ({len(seen)} of {workers}"
                    f" workers answered):\n{server.output()}"
                )
            time.sleep(0.05)
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_script(code: str, env: dict[str, str], timeout: float = 30.0) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its last stdout line is a JSON report."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"script still running after {timeout}s (deadlock?):\n{exc.stderr}")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


# The WSGI app and request helper the scripts below share: a direct WSGI call per request.
SCRIPT_PRELUDE = """
import io, json, os, sys, threading
from wsgiref.util import setup_testing_defaults

def echo(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"echo:" + body]

def call(app, rid, body=b""):
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "id=" + rid,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(environ)
    statuses = []
    result = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        b"".join(result)
    finally:
        result.close()
    return statuses[0]
"""


# -- fork ---------------------------------------------------------------------------------------


# Python 3.12+ warns about fork() in a process with threads; forking one is the point here.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_sends_its_entries_and_never_the_parents(collector: Collector) -> None:
    """Built in the parent, served in a forked child: each entry arrives once, from its process."""
    app = build_flask(
        collector_url=collector.url,
        service_token=TOKEN,
        log_body=True,
        delay=60.0,
        batch_size=1000,
    )
    parent = Client(app)
    before = [f"parent-before-{i}" for i in range(10)]
    for rid in before:
        assert parent.post("/echo", query_string={"id": rid}, buffered=True).status_code > 0
    # Queued in the parent (the delay keeps them there), with its worker thread running.
    assert collector.count() == 0
    assert alf_analytics.stats()["queued"] == len(before)

    # The listening socket exists before the fork, as in a pre-forking server.
    server = make_server("127.0.0.1", 0, app)
    server.timeout = 10
    url = f"http://127.0.0.1:{server.server_port}"
    child_ids = [f"child-{i}" for i in range(20)]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 1
        try:
            for _ in child_ids:
                server.handle_request()
            status = 0 if alf_analytics.flush(10.0) else 2
        finally:
            os._exit(status)
    server.server_close()
    waited = (0, 0)
    try:
        got = drive(url, child_ids, concurrency=1)
        after = [f"parent-after-{i}" for i in range(10)]
        for rid in after:
            parent.post("/echo", query_string={"id": rid}, buffered=True)
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if waited[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert waited[0] == pid, "the child did not finish within 30 s"
    assert os.waitstatus_to_exitcode(waited[1]) == 0

    # The child flushed before exiting: what arrived so far is exactly the child's entries.
    assert collector.wait_for_entries(len(child_ids))
    assert sorted(request_id(e.entry) for e in collector.entries()) == sorted(child_ids)
    entries = received_entries(collector, len(child_ids) + len(before) + len(after))
    assert duplicates(entries) == {}
    origin = {request_id(e): header(e, "x-pid") for e in entries}
    assert origin == {
        **dict.fromkeys(before + after, str(os.getpid())),
        **dict.fromkeys(child_ids, str(pid)),
    }
    assert {rid: g.pid for rid, g in got.items()} == dict.fromkeys(child_ids, str(pid))


# -- pre-forking and multi-process servers ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "workers"),
    [
        pytest.param(GUNICORN_FLASK, 3, id="gunicorn-preload-3-sync-workers-flask"),
        pytest.param(UVICORN_STARLETTE, 2, id="uvicorn-2-workers-starlette"),
    ],
)
def test_every_worker_process_sends_its_entries_exactly_once(
    collector: Collector, tmp_path: Path, kind: str, workers: int
) -> None:
    """N requests over HTTP to several workers, then SIGTERM: every entry arrives exactly once."""
    ids = [f"{kind}-{i}" for i in range(240)]
    with serving(kind, tmp_path, collector.url, {"log_body": True}, workers=workers) as server:
        got = drive(server.url, ids, concurrency=16, keepalive=False)
        server.terminate()
    entries = received_entries(collector, len(ids))
    assert mismatches(entries, got) == []
    pids = {g.pid for g in got.values()}
    assert len(pids) == workers, f"requests reached only {sorted(pids)}"
    assert {header(e, "x-pid") for e in entries} == pids


# -- shutdown -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", [GUNICORN_FLASK, UVICORN_STARLETTE])
def test_sigterm_flushes_queued_entries(collector: Collector, tmp_path: Path, kind: str) -> None:
    """Entries still queued when the server gets SIGTERM are all sent before it exits."""
    ids = [f"queued-{i}" for i in range(50)]
    bound = 10.0
    options = {"log_body": True, "delay": 60.0, "batch_size": 1000, "shutdown_timeout": bound}
    with serving(kind, tmp_path, collector.url, options) as server:
        got = drive(server.url, ids, concurrency=4)
        assert server.stats()["stats"]["queued"] == len(ids)
        assert collector.count() == 0
        elapsed = server.terminate()
    assert elapsed < bound + EXIT_MARGIN
    entries = received_entries(collector, len(ids))
    assert mismatches(entries, got) == []


@pytest.mark.slow
@pytest.mark.parametrize("dead_collector", [black_hole, refused], ids=["black-hole", "refused"])
@pytest.mark.parametrize("kind", [GUNICORN_FLASK, UVICORN_STARLETTE])
def test_sigterm_with_a_dead_collector_exits_within_the_shutdown_bound(
    tmp_path: Path, kind: str, dead_collector: Callable[[], Any]
) -> None:
    """With a black-holed or refused collector, shutdown ends within shutdown_timeout + margin."""
    options = {
        "delay": 60.0,
        "batch_size": 1000,
        "shutdown_timeout": SHUTDOWN_TIMEOUT,
        "timeout": SLOW_TRANSPORT_TIMEOUT,
        "retry_backoff": 0.5,
    }
    with dead_collector() as url, serving(kind, tmp_path, url, options) as server:
        got = drive(server.url, [f"stuck-{i}" for i in range(20)], concurrency=4)
        assert len(got) == 20
        assert server.stats()["stats"]["queued"] == 20
        elapsed = server.terminate(timeout=SLOW_TRANSPORT_TIMEOUT)
        output = server.output()
    assert elapsed < SHUTDOWN_TIMEOUT + EXIT_MARGIN, output
    assert "Traceback" not in output


# -- flush and close from many threads ----------------------------------------------------------


def race_flush_and_close(rounds: int, action: Callable[[], None] | None = None) -> list[str]:
    """16 threads call flush() and close() in lockstep rounds; ``action`` runs before each."""
    worker = next(iter(_worker._workers.values()))
    calls: list[tuple[str, Callable[[], bool]]] = [
        ("alf_analytics.flush", lambda: alf_analytics.flush(10.0)),
        ("alf_analytics.close", lambda: alf_analytics.close(10.0)),
        ("Worker.flush", lambda: worker.flush(10.0)),
        ("Worker.close", lambda: worker.close(10.0)),
    ]
    failures: list[str] = []
    barrier = threading.Barrier(16, action=action)

    def control(index: int) -> None:
        for round_ in range(rounds):
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            name, call = calls[(index + round_) % len(calls)]
            try:
                result: object = call()
            except Exception as exc:  # reported by the assertion of the caller
                result = exc
            if result is not True:
                failures.append(f"round {round_}: {name} in thread {index} -> {result!r}")
                barrier.abort()
                return

    threads = [threading.Thread(target=control, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return failures


def test_flush_and_close_are_idempotent_and_thread_safe(collector: Collector) -> None:
    """16 threads flush and close while requests flow: every call succeeds, no entry is lost."""
    app = build_flask(collector_url=collector.url, service_token=TOKEN, log_body=True)
    got: dict[str, Got] = {}

    def request(rid: str) -> None:
        response = Client(app).post(
            "/echo", query_string={"id": rid}, data=echo_body(rid), buffered=True
        )
        got[rid] = Got(response.status_code, response.get_data(), response.headers["X-Pid"])

    def requests(index: int) -> None:
        for i in range(100):
            request(f"t{index}-{i}")

    # While requests flow from 4 threads...
    flowing = [threading.Thread(target=requests, args=(i,)) for i in range(4)]
    for thread in flowing:
        thread.start()
    assert race_flush_and_close(25) == []
    for thread in flowing:
        thread.join(60)
    # ...and with one entry queued before each round and nothing after it to wake the worker.
    assert race_flush_and_close(20, action=lambda: request(f"round-{len(got)}")) == []

    # Idempotent: more closes and flushes in a row, then the worker restarts for new entries.
    assert [alf_analytics.close(5.0), alf_analytics.close(5.0), alf_analytics.flush(5.0)] == [
        True,
        True,
        True,
    ]
    request("after-close")
    entries = received_entries(collector, len(got))
    assert len(got) == 4 * 100 + 20 + 1
    assert mismatches(entries, got) == []
    # One thread for this collector (threads of earlier tests' collectors may still be ending).
    name = f"alf-analytics-worker:{collector.url}"
    assert len([t for t in threading.enumerate() if t.name == name]) <= 1


# -- interpreter exit ---------------------------------------------------------------------------

ATEXIT_SCRIPT = (
    SCRIPT_PRELUDE
    + """
import atexit
statuses = {}

def report():  # registered first: runs last
    import alf_analytics
    print(json.dumps({"statuses": statuses, "stats": alf_analytics.stats()}), flush=True)

def late():  # registered before the agent's handler: runs after it
    statuses["late"] = call(app, "late")

atexit.register(report)
atexit.register(late)

import alf_analytics  # registers the agent's exit handler
from alf_analytics import AnalyticsWSGIMiddleware

app = AnalyticsWSGIMiddleware(
    echo, collector_url=os.environ["ALF_TEST_URL"], service_token="t", delay=60.0
)

def early():  # registered after the agent's handler: runs before it
    statuses["early"] = call(app, "early")

atexit.register(early)
statuses["main"] = call(app, "main")
"""
)


def test_entries_from_atexit_handlers_are_sent_or_counted(collector: Collector) -> None:
    """An entry from an atexit handler that runs before ours is sent; after ours it is counted."""
    report = run_script(ATEXIT_SCRIPT, {"ALF_TEST_URL": collector.url})
    assert report["statuses"] == {"main": "200 OK", "early": "200 OK", "late": "200 OK"}
    stats = report["stats"]
    assert (stats["captured"], stats["sent"], stats["dropped"]["shutdown"]) == (3, 2, 1)
    assert (stats["dropped_total"], stats["queued"]) == (1, 0)
    entries = received_entries(collector, 2)
    assert sorted(map(request_id, entries)) == ["early", "main"]


# -- threads ------------------------------------------------------------------------------------

#: Threads a server process may have besides its request threads: main, our worker, its
#: sender threads (one per POST in flight, up to ``max_inflight``: CI saw five when the
#: collector was slow), and spare.
THREAD_ALLOWANCE = 4 + Config.max_inflight


@pytest.mark.slow
def test_gevent_worker_patched_after_the_app_was_loaded_serves_and_delivers(
    collector: Collector, tmp_path: Path
) -> None:
    """gunicorn --preload -k gevent: the app (and so alf_analytics) is imported before gevent
    patches the worker. Every request after the first used to hang, the worker greenlet
    blocked in a C queue that froze the process (PITFALLS #29)."""
    ids = [f"gevent-{i}" for i in range(60)]
    with serving(
        GUNICORN_FLASK, tmp_path, collector.url, {"log_body": True},
        extra=("--worker-class=gevent", "--timeout=20"),
    ) as server:  # fmt: skip
        got = drive(server.url, ids, concurrency=4)
        server.terminate()
    entries = received_entries(collector, len(ids), timeout=30)
    assert mismatches(entries, got) == []


@pytest.mark.slow
def test_threaded_wsgi_server_records_each_request_exactly_once(
    collector: Collector, tmp_path: Path
) -> None:
    """gunicorn gthread with 64 threads, 2,000 requests from 64 clients: one correct entry each."""
    ids = [f"gthread-{i}" for i in range(2000)]
    options = {"log_body": True}
    extra = ("--worker-class=gthread", "--threads=64")
    with serving(GUNICORN_FLASK, tmp_path, collector.url, options, extra=extra) as server:
        pid = int(server.stats()["pid"])
        with ThreadSampler(pid) as sampler:
            got = drive(server.url, ids, concurrency=64)
        threads_after = psutil.Process(pid).num_threads()
        server.terminate()
    entries = received_entries(collector, len(ids), timeout=30)
    assert mismatches(entries, got) == []
    # A thread or timer per request (PITFALLS #4) would show up beyond the pool of 64.
    assert sampler.peak <= 64 + THREAD_ALLOWANCE
    assert threads_after <= 64 + THREAD_ALLOWANCE


@pytest.mark.slow
def test_asgi_server_records_1000_concurrent_requests_exactly_once(
    collector: Collector, tmp_path: Path
) -> None:
    """uvicorn with 1,000 concurrent requests: one correct entry each, no thread per request."""
    ids = [f"concurrent-{i}" for i in range(1000)]
    with serving(UVICORN_STARLETTE, tmp_path, collector.url, {"log_body": True}) as server:
        got = asyncio.run(drive_concurrently(server.url, ids[:10]))  # starts our worker thread
        pid = int(server.stats()["pid"])
        baseline = psutil.Process(pid).num_threads()
        with ThreadSampler(pid) as sampler:
            got.update(asyncio.run(drive_concurrently(server.url, ids[10:])))
        server.terminate()
    entries = received_entries(collector, len(ids), timeout=30)
    assert mismatches(entries, got) == []
    # The event loop serves them all: a thread or timer per request would add threads. Ours
    # are the worker and its senders, started as POSTs overlap, at most max_inflight of them.
    assert sampler.peak <= baseline + 1 + Config.max_inflight


# -- re-entrancy: logging handlers and garbage collection (PITFALLS #33) ------------------------

LOGGING_SCRIPT = (
    SCRIPT_PRELUDE
    + """
import faulthandler, logging
faulthandler.dump_traceback_later(20, exit=True)
import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware

app = AnalyticsWSGIMiddleware(
    echo, collector_url=os.environ["ALF_TEST_URL"], service_token="t",
    max_batch_bytes=4096, delay=0.01,
)
made = []

class RequestingHandler(logging.Handler):
    # A handler that itself sends a request through the middleware, on the logging thread.
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.local = threading.local()

    def emit(self, record):
        if getattr(self.local, "busy", False):
            return
        self.local.busy = True
        try:
            rid = f"from-log-{len(made)}"
            call(app, rid)
            made.append([rid, threading.current_thread().name])
        finally:
            self.local.busy = False

agent_logger = logging.getLogger("alf_analytics")
agent_logger.setLevel(logging.DEBUG)
agent_logger.addHandler(RequestingHandler())
agent_logger.propagate = False
for i in range(40):
    # Every fourth entry is too large for a batch: the worker thread logs a warning about it.
    call(app, f"main-{i}" + ("&pad=" + "x" * 8000 if i % 4 == 0 else ""), b"x" * 10)
    alf_analytics.flush(5.0)
ok = alf_analytics.flush(5.0)
print(json.dumps({"flushed": ok, "made": made, "stats": alf_analytics.stats()}))
"""
)


def test_logging_handler_that_makes_requests_does_not_deadlock(collector: Collector) -> None:
    """A handler that sends a request through the middleware while the worker logs: no deadlock."""
    report = run_script(LOGGING_SCRIPT, {"ALF_TEST_URL": collector.url})
    assert report["flushed"] is True
    from_worker = [rid for rid, thread in report["made"] if thread.startswith("alf-analytics")]
    assert from_worker, f"the worker thread never logged: {report}"
    stats = report["stats"]
    sent_ids = [f"main-{i}" for i in range(40) if i % 4] + [rid for rid, _ in report["made"]]
    assert stats["dropped"]["too_large"] == 10
    assert stats["sent"] == len(sent_ids)
    entries = received_entries(collector, len(sent_ids))
    assert sorted(map(request_id, entries)) == sorted(sent_ids)


GC_SCRIPT = (
    SCRIPT_PRELUDE
    + """
import faulthandler, gc
faulthandler.dump_traceback_later(10, exit=True)
import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware

app = AnalyticsWSGIMiddleware(
    echo, collector_url=os.environ["ALF_TEST_URL"], service_token="t", delay=0.01
)
made = []

class Garbage:
    # Cyclic garbage whose finalizer sends a request through the middleware and leaves more
    # garbage behind, so that collections keep finding such finalizers to run.
    def __init__(self, depth):
        self.depth = depth
        self.cycle = self

    def __del__(self):
        if self.depth:
            Garbage(self.depth - 1)
        rid = f"gc-{len(made)}"
        made.append(rid)
        call(app, rid)

gc.set_threshold(1, 1, 1)
for i in range(20):
    alf_analytics.close(5.0)  # the next request starts the worker thread again
    Garbage(10)
    call(app, f"main-{i}")
gc.set_threshold(700, 10, 10)
gc.collect()
ok = alf_analytics.close(5.0)
print(json.dumps({"closed": ok, "made": made, "stats": alf_analytics.stats()}))
"""
)


def test_finalizers_that_make_requests_during_gc_do_not_deadlock(collector: Collector) -> None:
    """Finalizers that make requests, run by collections while requests flow: no deadlock."""
    report = run_script(GC_SCRIPT, {"ALF_TEST_URL": collector.url})
    assert report["closed"] is True
    expected = [f"main-{i}" for i in range(20)] + report["made"]
    assert len(report["made"]) == 20 * 11
    assert report["stats"]["sent"] == len(expected)
    entries = received_entries(collector, len(expected))
    assert sorted(map(request_id, entries)) == sorted(expected)


GC_IN_AGENT_SCRIPT = (
    SCRIPT_PRELUDE
    + """
import faulthandler, gc
faulthandler.dump_traceback_later(6, exit=True)
import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware, _worker

app = AnalyticsWSGIMiddleware(
    echo, collector_url=os.environ["ALF_TEST_URL"], service_token="t", delay=0.01
)
made = []
starts = []

def finalizer(phase, info):
    # What a __del__ that makes a request does when the allocation that triggers the
    # collection running it happens while the agent starts its worker thread (which
    # allocates, so it happens by chance in real life; here it is made certain). The first
    # collection of each start is skipped: it comes before the start is under way.
    if phase != "start" or len(made) >= 100:
        return
    try:
        frame = sys._getframe(1)
    except ValueError:  # a collection with no Python frame above it (seen on 3.10)
        return
    while frame is not None and frame.f_code is not _worker.Worker._start.__code__:
        frame = frame.f_back
    if frame is None:
        return
    if not starts or starts[-1] is not frame:
        starts.append(frame)
        return
    rid = f"gc-{len(made)}"
    made.append(rid)
    call(app, rid)

gc.callbacks.append(finalizer)
gc.set_threshold(1, 1, 1)
for i in range(10):
    alf_analytics.close(5.0)  # the next request starts the worker thread again
    call(app, f"main-{i}")
gc.callbacks.remove(finalizer)
gc.set_threshold(700, 10, 10)
starts.clear()
ok = alf_analytics.close(5.0)
print(json.dumps({"closed": ok, "made": made, "stats": alf_analytics.stats()}))
"""
)


def test_finalizer_request_while_the_worker_starts_does_not_deadlock(
    collector: Collector,
) -> None:
    """A collection during the worker thread's start runs a finalizer making a request."""
    report = run_script(GC_IN_AGENT_SCRIPT, {"ALF_TEST_URL": collector.url})
    assert report["closed"] is True
    expected = [f"main-{i}" for i in range(10)] + report["made"]
    assert len(report["made"]) >= 10
    assert report["stats"]["sent"] == len(expected)
    entries = received_entries(collector, len(expected))
    assert sorted(map(request_id, entries)) == sorted(expected)
