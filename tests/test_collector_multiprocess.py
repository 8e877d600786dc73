"""Two collector processes on one PostgreSQL, one of them killed mid-stream: no entry is lost
and none is stored twice.

Real parts only: two ``alf-analytics collector`` processes (the CLI as documented) on one
real PostgreSQL (:mod:`tests.pg`), two real :class:`~alf_analytics.AnalyticsWSGIMiddleware`
agents in threads of this process, each pointed at one collector, sending requests with
unique paths. Collector 1 is killed with SIGKILL while its agent has batches in flight and
more to send, and restarted on the same port; its agent retries (same ``Idempotency-Key``
per batch) until everything is answered. Every wait is on a condition, with generous
deadlines; nothing depends on how fast this machine is.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import psycopg
import pytest

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware
from tests.pg import pg_server, pg_url
from tests.servers import free_port, reaped
from tests.test_collector import start_cli_collector

__all__ = ["pg_server", "pg_url"]  # fixtures, imported for pytest

TOKEN = "multi-process-token-0123456789"
READ_KEY = "multi-process-read-key-9876543210"
PER_PHASE = 120  # requests per agent in each of the three phases
DEADLINE = 60.0  # seconds any one condition may take before the test fails


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


def call(middleware: AnalyticsWSGIMiddleware, path: str) -> None:
    """One in-process WSGI request through the agent."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    environ["wsgi.input"] = io.BytesIO(b"")
    result = middleware(environ, start_response)
    try:
        b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def agent(url: str) -> AnalyticsWSGIMiddleware:
    return AnalyticsWSGIMiddleware(
        app,
        service_token=TOKEN,
        collector_url=url,
        batch_size=5,
        delay=0.02,
        max_inflight=2,
        retries=1_000,  # backoff doubles from 0.05 s, capped at 30 s: far longer than needed
        retry_backoff=0.05,
        timeout=10.0,
    )


def stored_paths(db: str) -> dict[str, int]:
    """How often each path is stored (counted in the database itself)."""
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT path, COUNT(*) FROM entries GROUP BY path").fetchall()
    return {str(path): int(count) for path, count in rows}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Sender(threading.Thread):
    """Sends the requests of one agent, a phase at a time (``go(phase)`` releases it)."""

    def __init__(self, name: str, middleware: AnalyticsWSGIMiddleware) -> None:
        super().__init__(name=f"sender-{name}", daemon=True)
        self.prefix = f"/{name}"
        self.middleware = middleware
        self.released = threading.Semaphore(0)
        self.done = [threading.Event() for _ in range(3)]
        self.error: BaseException | None = None

    def paths(self, phase: int) -> list[str]:
        return [f"{self.prefix}/p{phase}/r{i}" for i in range(PER_PHASE)]

    def go(self) -> None:
        self.released.release()

    def run(self) -> None:
        try:
            for phase in range(3):
                assert self.released.acquire(timeout=DEADLINE)
                for path in self.paths(phase):
                    call(self.middleware, path)
                self.done[phase].set()
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """The collector processes a test starts, killed on the way out whatever happened."""
    started: list[Any] = []
    yield started
    alf_analytics.close(timeout=30)  # the agents first: their connections close with them
    for proc in started:
        with reaped(proc):
            if proc.poll() is None:
                proc.terminate()
            stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
            if stderr:
                print(f"collector {proc.pid} (exit {proc.returncode}) wrote:\n{stderr}")


@pytest.mark.timeout(600)
def test_two_collectors_one_killed_and_restarted_store_every_entry_once(
    pg_url: str, tmp_path: Path, processes: list[Any]
) -> None:
    ports = [free_port(), free_port()]

    def start(port: int) -> tuple[Any, str]:
        proc, url = start_cli_collector(
            "--port", str(port), "--db", pg_url, "--token", f"mp={TOKEN}",
            "--read-key", READ_KEY, cwd=tmp_path,
        )  # fmt: skip
        processes.append(proc)
        return proc, url

    (first, url1), (_, url2) = start(ports[0]), start(ports[1])
    assert url1.endswith(f":{ports[0]}") and url2.endswith(f":{ports[1]}")
    senders = [Sender("a1", agent(url1)), Sender("a2", agent(url2))]
    for sender in senders:
        sender.start()
        sender.go()

    # Phase 0 flows through both collectors; collector 1 dies once part of it is stored,
    # with the rest of its agent's batches queued or in flight.
    a1 = senders[0].prefix
    wait_until(
        lambda: sum(1 for p in stored_paths(pg_url) if p.startswith(a1)) >= PER_PHASE // 4,
        "collector 1 to store a quarter of phase 0",
    )
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=DEADLINE) == -signal.SIGKILL
    # Phase 1 is sent while collector 1 is down: its agent queues and retries.
    for sender in senders:
        sender.go()
    for sender in senders:
        assert sender.done[1].wait(DEADLINE), sender.error
    start(ports[0])  # the same port: the agent's URL is unchanged
    for sender in senders:
        sender.go()
    for sender in senders:
        sender.join(DEADLINE)
        assert not sender.is_alive() and sender.error is None, sender.error

    assert alf_analytics.flush(timeout=DEADLINE), alf_analytics.stats()
    stats = alf_analytics.stats()
    expected = {path for sender in senders for phase in range(3) for path in sender.paths(phase)}
    assert stats["captured"] == stats["sent"] == len(expected), stats
    assert stats["dropped_total"] == 0 and stats["unknown"] == 0, stats
    assert stats["retried"] > 0, stats  # collector 1 really was away

    counts = stored_paths(pg_url)
    assert set(counts) == expected
    twice = {path: n for path, n in counts.items() if n != 1}
    assert twice == {}, f"stored more than once: {sorted(twice.items())[:10]}"

    # Either collector's query API sees the one database, every entry once.
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    with httpx.Client(trust_env=False, timeout=30.0, headers=headers) as http:
        for url in (url1, url2):
            stats_answer = http.get(f"{url}/api/stats", params={"service": "mp"})
            assert stats_answer.status_code == 200, stats_answer.text
            assert stats_answer.json()["count"] == len(expected)
        listed: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            page = http.get(f"{url2}/api/entries", params=params).json()
            listed += [row["path"] for row in page["entries"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert sorted(listed) == sorted(expected)
