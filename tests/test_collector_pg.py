"""The collector on PostgreSQL: the real app under uvicorn, storing in a real server.

The server comes from :mod:`tests.pg` (skipped when PostgreSQL cannot start, failing under
``CI=true``); each test gets a fresh schema.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from alf_analytics.cli import main
from alf_analytics.collector import Collector
from alf_analytics.collector.storage import masked_url
from alf_analytics.collector.storage.postgres import PostgresStore
from tests.pg import PostgresServer, pg_server, pg_url, reader_of_a_stopped_database
from tests.servers import free_port, reaped, sigterm
from tests.test_collector import make_alf, start_cli_collector

__all__ = ["pg_server", "pg_url"]  # fixtures, imported for pytest


@pytest.fixture
def collector(pg_url: str) -> Iterator[Collector]:
    with Collector(pg_url) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        yield http


def test_ingest_replay_and_query(collector: Collector, client: httpx.Client) -> None:
    assert isinstance(collector.store, PostgresStore)
    alf = make_alf(
        [("GET", "http://api.test/users/1", 200, 5), ("POST", "http://api.test/users", 201, 7)],
        token="token-pg",
        environment="prod",
    )
    url = collector.endpoint("1.1.0", "batch")
    headers = {"Idempotency-Key": "batch-1"}

    first = client.post(url, json=[alf], headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"errors": [], "sent": 1, "saved": 1, "refused": 0}
    assert "idempotent-replayed" not in first.headers

    again = client.post(url, json=[alf], headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert collector.count() == 2  # stored once

    other = dict(alf, serviceToken="token-other")
    reused = client.post(url, json=[other], headers=headers)
    assert reused.status_code == 422
    assert collector.count() == 2

    stored = collector.entries(service_token="token-pg", environment="prod")
    assert [(e.method, e.path, e.status, e.route) for e in stored] == [
        ("GET", "/users/1", 200, "/users/{id}"),
        ("POST", "/users", 201, "/users"),
    ]

    listed = client.get(collector.url + "/api/entries").json()["entries"]
    assert [(e["method"], e["path"], e["environment"]) for e in listed] == [
        ("POST", "/users", "prod"),
        ("GET", "/users/1", "prod"),
    ]
    stats = client.get(collector.url + "/api/stats").json()
    assert stats["count"] == 2 and stats["status_codes"] == {"200": 1, "201": 1}


def test_data_outlives_the_collector(pg_url: str, client: httpx.Client) -> None:
    alf = make_alf([("GET", "http://api.test/health", 204, 1)])
    with Collector(pg_url) as first:
        response = client.post(first.endpoint("1.1.0", "single"), json=alf)
        assert response.status_code == 200, response.text
    with Collector(pg_url) as second:
        assert [(e.path, e.status) for e in second.entries()] == [("/health", 204)]


def test_workers_share_the_cli_options_and_stop_with_exit_0(
    pg_url: str, client: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    proc, url = start_cli_collector(
        # A token holding a comma: the workers once got the tokens joined with commas.
        "--db", pg_url, "--port", str(port), "--workers", "2", "--token", "mp=token,workers",
        "--max-body-bytes", "4000", "--max-entries", "3", "--idempotency-window", "1h",
        cwd=tmp_path,
    )  # fmt: skip
    with reaped(proc):
        deadline = time.monotonic() + 60
        while True:  # the workers start after the supervisor's line
            try:
                if client.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no worker answered"
            time.sleep(0.05)
        endpoint = url + "/1.1.0/batch"
        small = make_alf([("GET", "http://api.test/w", 200, 1)], token="token,workers")
        stored = client.post(endpoint, json=[small], headers={"Idempotency-Key": "w-1"})
        assert stored.status_code == 200, stored.text
        again = client.post(endpoint, json=[small], headers={"Idempotency-Key": "w-1"})
        assert again.headers["idempotent-replayed"] == "true"
        many = make_alf([("GET", f"http://api.test/{i}", 200, 1) for i in range(4)])
        assert client.post(endpoint, json=[many]).status_code == 413  # --max-entries 3
        big = make_alf([("GET", f"http://api.test/{i}", 200, 1) for i in range(3)])
        big["har"]["log"]["entries"][0]["request"]["url"] += "?" + "x" * 5_000
        assert client.post(endpoint, json=[big]).status_code == 413  # --max-body-bytes 4000
        for other in ("token-stranger", "token", "workers"):  # no fragment of it either
            stranger = make_alf([("GET", "http://api.test/s", 200, 1)], token=other)
            for _ in range(4):  # whichever worker answers
                assert client.post(endpoint, json=[stranger]).status_code == 401, other
        stderr = sigterm(proc, timeout=60).decode(errors="replace")
        assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    with Collector(pg_url) as reading:
        assert [(e.path, e.service_token) for e in reading.entries()] == [("/w", "token,workers")]


def test_cli_never_prints_the_database_password(
    pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database the collector cannot use is named masked, as the ready line names it."""
    url = f"postgresql://postgres:Pg-Secret-1234@127.0.0.1:{pg_server.port}/no_such_database"
    assert main(["collector", "--db", url, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot use database postgresql://postgres:***@127.0.0.1" in err
    assert "Pg-Secret-1234" not in err


def test_cli_never_prints_a_password_given_in_the_url_query(
    pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """libpq also takes ``?password=`` (and ``sslpassword=``): masked as the credentials are."""
    url = (
        f"postgresql://postgres@127.0.0.1:{pg_server.port}/no_such_database"
        "?sslmode=disable&password=Pg-Query-Secret-99&sslpassword=Ssl-Secret-77"
    )
    assert main(["collector", "--db", url, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "?sslmode=disable&password=***&sslpassword=***" in err, err
    assert "Pg-Query-Secret-99" not in err and "Ssl-Secret-77" not in err


def test_masked_url_keeps_what_is_not_a_secret() -> None:
    assert masked_url("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert masked_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert masked_url("postgresql:///db?host=/run/pg&PassWord=x") == (
        "postgresql:///db?host=/run/pg&PassWord=***"
    )
    assert masked_url("postgresql://h/db?mypassword=1") == "postgresql://h/db?mypassword=1"
    assert masked_url("/var/lib/alf.sqlite3") == "/var/lib/alf.sqlite3"


def test_health_answers_503_while_the_database_is_down(pg_server: PostgresServer) -> None:
    """/health asks the store: a probe sees PostgreSQL go away (and come back is a restart)."""
    with PostgresServer() as own, Collector(own.url) as running:
        with httpx.Client(trust_env=False, timeout=60.0) as client:
            assert client.get(running.url + "/health").json() == {"status": "ok"}
            own.stop()
            down = client.get(running.url + "/health")
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "5"
            assert down.json()["status"] == "unavailable"
            assert client.head(running.url + "/health").status_code == 503


def test_query_api_answers_503_while_the_database_is_down(pg_server: PostgresServer) -> None:
    """With PostgreSQL gone, /api/... answers a JSON 503 with Retry-After, as ingest does,
    never an Internal Server Error."""
    with reader_of_a_stopped_database("/api/services") as (api, url):
        for path in ("/api/services", "/api/entries", "/api/entries/1"):
            down = api.get(url + path)
            assert down.status_code == 503, (path, down.text)
            assert down.headers["retry-after"] == "5"
            assert down.json() == {
                "errors": ["the collector cannot read its store right now; retry later"]
            }


def test_two_compactors_on_one_database_sum_each_hour_once(pg_url: str) -> None:
    """Two collectors (or workers) sharing PostgreSQL compact at once: the second waits for
    the first and finds its hours summed, instead of inserting them again (a unique
    violation that aborted its housekeeping pass)."""
    checked, other_done = threading.Event(), threading.Event()

    class _Paused:  # the first compactor's transaction, paused between its check and insert
        def __init__(self, tx: Any) -> None:
            self.tx = tx

        def __getattr__(self, name: str) -> Any:
            return getattr(self.tx, name)

        def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
            if sql.startswith("INSERT INTO agg_hour ") and not checked.is_set():
                checked.set()
                other_done.wait(3)  # the other compactor runs meanwhile (or is held back)
            self.tx.execute(sql, params)

    class _PausedStore(PostgresStore):
        @contextmanager
        def transaction(self) -> Iterator[Any]:
            with super().transaction() as tx:
                yield _Paused(tx)

    first, second = _PausedStore(pg_url), PostgresStore(pg_url)
    try:
        hour = int(time.time()) // 3600 * 60 - 3 * 60  # three hours ago, in minutes
        with first.transaction() as tx:
            for minute in (hour, hour + 1, hour + 61, hour + 119):
                tx.execute(
                    "INSERT INTO agg_minute VALUES (?, 1, 'GET', '/x', 200, 3, 2, 1.5, 10, 20)",
                    [minute],
                )
        errors: list[BaseException] = []

        def compact(store: PostgresStore) -> None:
            try:
                store.compact()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        runner = threading.Thread(target=compact, args=(first,))
        runner.start()
        assert checked.wait(10)
        compact(second)
        other_done.set()
        runner.join(30)
        assert errors == []
        assert [int(r[0]) for r in first.fetchall("SELECT minute FROM agg_hours ORDER BY 1")] == [
            hour,
            hour + 60,
        ]
        assert first.scalar("SELECT SUM(n) FROM agg_hour") == 8
        assert first.scalar("SELECT SUM(n) FROM agg_quarter") == 8
    finally:
        first.close()
        second.close()


def _stop(server: PostgresServer) -> None:
    """Stop the cluster as an administrator would (its data kept)."""
    assert server._run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop").returncode == 0


def _start(server: PostgresServer) -> None:
    options = f"-h 127.0.0.1 -p {server.port} -k {server.root} -c fsync=off"
    log = str(server.root / "server.log")
    started = server._run("pg_ctl", "-D", str(server.data), "-o", options, "-l", log, "-w", "start")
    assert started.returncode == 0, started.stderr


def _restart(server: PostgresServer) -> None:
    """Stop the cluster as an administrator would (its data kept) and start it again."""
    _stop(server)
    _start(server)


def _accepts_connections(url: str, timeout: float = 30.0) -> None:
    """Wait (like pg_isready) until PostgreSQL itself takes a connection: psycopg, directly."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "PostgreSQL did not come back"
            time.sleep(0.1)


def test_a_request_during_an_outage_is_a_quick_503_and_the_next_one_after_it_succeeds(
    pg_server: PostgresServer,
) -> None:
    """While PostgreSQL is away a request gets its JSON 503 with Retry-After in a second or
    so, not after the pool's 10 s timeout; once the server takes connections again, the very
    next request succeeds (not only after the pool's reconnection backoff, up to ~20 s)."""
    alf = make_alf([("GET", "http://api.test/outage", 200, 1)])
    with PostgresServer() as own, Collector(own.url) as running:
        url = running.endpoint("1.1.0", "single")
        with httpx.Client(trust_env=False, timeout=60.0) as client:
            assert client.post(url, json=alf).status_code == 200
            _stop(own)
            for _ in range(2):  # the pooled connection the stop closed, then an empty pool
                started = time.monotonic()
                down = client.post(url, json=alf)
                took = time.monotonic() - started
                assert down.status_code == 503, down.text
                assert down.headers["retry-after"] == "5"
                assert down.json()["errors"] == [
                    "the collector cannot store right now; retry later"
                ]
                assert took < 4.0, f"the 503 took {took:.1f} s"
            started = time.monotonic()
            assert client.get(running.url + "/health").status_code == 503
            assert time.monotonic() - started < 4.0
            _start(own)
            _accepts_connections(own.url)
            started = time.monotonic()
            back = client.post(url, json=alf)
            assert back.status_code == 200, back.text
            assert time.monotonic() - started < 4.0  # no wait for the pool's next attempt
            assert client.get(running.url + "/health").json() == {"status": "ok"}
            assert client.post(url, json=alf).status_code == 200
        assert running.count() == 3


def test_the_first_requests_after_a_database_restart_succeed(pg_server: PostgresServer) -> None:
    """Pooled connections the restart closed are discarded before use, not each answered
    with a 503 once the database is back."""
    key = "read-key-0123456789"
    with PostgresServer() as own, Collector(own.url, read_key=key) as running:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(trust_env=False, timeout=60.0, headers=headers) as client:
            # Several connections in the pool: requests at once.
            with ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda _: client.get(running.url + "/api/stats"), range(16))
                )
            assert {a.status_code for a in answers} == {200}
            assert isinstance(running.store, PostgresStore)
            assert running.store._pool.get_stats()["pool_size"] > 1
            _restart(own)
            alf = make_alf([("GET", "http://api.test/after", 200, 1)])
            for _ in range(6):
                for path in ("/health", "/api/stats"):
                    answer = client.get(running.url + path)
                    assert answer.status_code == 200, (path, answer.text)
                stored = client.post(running.endpoint("1.1.0", "single"), json=alf)
                assert stored.status_code == 200, stored.text
