"""A real PostgreSQL server for the collector's tests (and its ingest benchmark).

:class:`PostgresServer` finds ``initdb``/``pg_ctl`` under ``/usr/lib/postgresql/*/bin``
(Debian's packages) or on ``PATH``, creates a cluster in a temporary directory and starts
it on 127.0.0.1 at a free port. PostgreSQL refuses to run as root, so as root the cluster
belongs to, and runs as, the unprivileged ``nobody``.

Fixtures (import them into a test module: ``from tests.pg import pg_server, pg_url``):

- ``pg_server``: one server per test session; skipped with the reason when no PostgreSQL
  can be started, but failing when ``CI=true`` (CI must run these tests);
- ``pg_url``: a ``postgresql://`` URL whose ``search_path`` is a fresh schema, so each
  test starts from an empty database;
- ``collector_db``: parametrized over both backends: ``:memory:`` (SQLite) and a fresh
  ``pg_url`` (PostgreSQL), for tests that must hold on either store;
- ``store_db``: the same with SQLite in a file, for tests that open the store more than
  once (a restart, a second process);
- ``store``: a :class:`~alf_analytics.collector.storage.Store` opened on ``store_db``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from alf_analytics.collector.storage import Store, open_store

from .servers import free_port

__all__ = [
    "PostgresServer",
    "PostgresUnavailable",
    "collector_db",
    "pg_server",
    "pg_url",
    "store",
    "store_db",
]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the message says why)."""


def _binaries() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
        reverse=True,
    )
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
        "apt-get install postgresql"
    )


class PostgresServer:
    """A throw-away PostgreSQL cluster (fsync off: for tests and benchmarks only)."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.root = Path(tempfile.mkdtemp(prefix="alf-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self._schemas = itertools.count(1)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "nobody", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PostgresServer:
        if self._as_root:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is missing")
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "nobody")
        done = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode:
            raise PostgresUnavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = self.root / "server.log"
        done = self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"
        )
        if done.returncode:
            text = log.read_text(errors="replace")[-800:] if log.exists() else done.stderr
            raise PostgresUnavailable(f"pg_ctl start failed: {text.strip()}")
        return self

    @property
    def url(self) -> str:
        """The server's ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def fresh_url(self) -> str:
        """A URL whose search_path is a new, empty schema."""
        import psycopg

        name = f"t{next(self._schemas)}_{os.getpid()}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return f"{self.url}?options={quote(f'-csearch_path={name}')}"

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (skipped when none can start, except in CI)."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty schema on the session's server."""
    return pg_server.fresh_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def collector_db(request: pytest.FixtureRequest) -> str:
    """The ``db`` of a collector, once per backend: in-memory SQLite, then a fresh schema on
    the session's PostgreSQL (that one skipped or failing as ``pg_server`` says)."""
    return _backend(request, ":memory:")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like ``collector_db``, but SQLite in a file, so that the store can be opened again."""
    return _backend(request, str(tmp_path / "store.sqlite"))


@pytest.fixture
def store(store_db: str) -> Iterator[Store]:
    """The store at ``store_db``, closed after the test."""
    opened = open_store(store_db)
    try:
        yield opened
    finally:
        opened.close()


def _backend(request: pytest.FixtureRequest, sqlite: str) -> str:
    if request.param == "sqlite":
        return sqlite
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.fresh_url()


@contextmanager
def reader_of_a_stopped_database(
    first_path: str, read_key: str = "read-key-0123456789"
) -> Iterator[tuple[httpx.Client, str]]:
    """A collector on a PostgreSQL of its own, read once (``first_path`` answers 200), then
    with that database stopped: yields a client holding the read key, and the collector's URL."""
    from alf_analytics.collector import Collector

    with PostgresServer() as own, Collector(own.url, read_key=read_key) as running:
        headers = {"Authorization": f"Bearer {read_key}"}
        with httpx.Client(trust_env=False, timeout=60.0, headers=headers) as client:
            assert client.get(running.url + first_path).status_code == 200
            own.stop()
            yield client, running.url
