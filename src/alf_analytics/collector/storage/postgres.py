"""PostgreSQL storage (psycopg 3 with a connection pool), for several collector processes.

Any number of collector processes, on any number of hosts, can write to one database:
each request is one transaction; the idempotency key's unique index makes a repeat that
races its original wait for it and then answer the original outcome, so an entry is
stored once however often the agent retries; rollup rows are upserted in a fixed order so
concurrent writers never deadlock. The schema is created (or checked) on open under an
advisory lock, so processes starting together do not race.
"""

from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..settings import CollectorError, TokenSet
from .base import (
    COLUMN_TYPES,
    SCHEMA_VERSION,
    SUM_COLUMNS,
    Store,
    Transaction,
    added,
    masked_url,
    schema_statements,
)

__all__ = ["PostgresStore"]

_MIGRATION_LOCK: Final = 0x414C4601  # pg_advisory_xact_lock key ("ALF" 1)

# How a request gets a connection while PostgreSQL is away or just back. The pool's own
# reconnection retries behind an exponential backoff (1 s, 2 s, 4 s, ...): a request that only
# waited for it would wait its whole timeout during an outage, and up to the next scheduled
# attempt once the server is back. So a request waits _FIRST_WAIT for a pooled connection;
# when none came although not every connection is in use (the pool has none it can give), it
# connects directly, once: the server that is back answers this request, one that is gone
# fails it at once (a JSON 503). The pool gives up reconnecting after _RECONNECT_TIMEOUT and
# connects again as soon as a request asks, with no backoff left to wait for.
_FIRST_WAIT: Final = 1.0
_CONNECT_TIMEOUT: Final = 3  # libpq's connect_timeout (whole seconds) of that direct attempt
_RECONNECT_TIMEOUT: Final = 2.0


def _check_pooled(conn: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it is about to hand out: one the server closed while
    it sat idle in the pool (a restart, a terminated backend) fails it, so the pool discards
    it and gives a working one instead of failing the request that would have got it.

    An idle connection has nothing to read: only a readable socket (the server's farewell,
    an end of file) is asked with a round trip; a healthy one costs none."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the pooled connection is closed")
    with selectors.DefaultSelector() as selector:
        selector.register(conn.fileno(), selectors.EVENT_READ)
        readable = bool(selector.select(0))
    if readable:
        ConnectionPool.check_connection(conn)


@lru_cache(maxsize=512)
def _sql(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (literal ``%`` escaped)."""
    return sql.replace("%", "%%").replace("?", "%s")


@lru_cache(maxsize=16)
def _upsert(table: str, keys: tuple[str, ...]) -> str:
    """One statement for all of a request's rollup rows: arrays unnested into rows."""
    columns = (*keys, *SUM_COLUMNS)
    arrays = ", ".join(f"%s::{COLUMN_TYPES[c]}[]" for c in columns)
    sums = ", ".join(f"{c} = {added(table, c)}" for c in SUM_COLUMNS)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}"
    )


class _PostgresTransaction:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor
        self.changes = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.cursor.execute(_sql(sql), params)
        self.changes = self.cursor.rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(_sql(sql), rows)
            self.changes = self.cursor.rowcount

    def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        self.cursor.execute(_sql(sql + " RETURNING id"), params)
        row = self.cursor.fetchone()
        return int(row[0]) if row is not None else None

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self.cursor.execute(_sql(sql), params)
        row = self.cursor.fetchone()
        return tuple(row) if row is not None else None

    def reserve_ids(self, count: int) -> list[int]:
        self.cursor.execute(
            "SELECT nextval(pg_get_serial_sequence('entries', 'id')) FROM generate_series(1, %s)",
            [count],
        )
        return sorted(int(row[0]) for row in self.cursor.fetchall())

    def bulk_insert(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
    ) -> None:
        if not rows:
            return
        # COPY: one round trip and no per-row statement for the server to run.
        with self.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def bulk_upsert(self, table: str, keys: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        self.cursor.execute(
            _upsert(table, keys), [list(column) for column in zip(*rows, strict=True)]
        )


class PostgresStore(Store):
    """A collector database in PostgreSQL (``postgresql://user:pass@host:port/db``)."""

    dialect = "postgres"

    def __init__(
        self, url: str, *, tokens: TokenSet | None = None, pool_size: int = 4, timeout: float = 10.0
    ) -> None:
        super().__init__(tokens)
        self.url = url
        self._timeout = timeout
        self._max_size = max(1, pool_size)
        self._in_use = 0  # pooled connections handed out by _connection
        self._in_use_lock = threading.Lock()
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=self._max_size,
            kwargs={"autocommit": True},
            check=_check_pooled,
            timeout=timeout,
            reconnect_timeout=_RECONNECT_TIMEOUT,
            open=False,
            name="alf-collector",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise CollectorError(f"cannot connect to {self.display_name}: {exc}") from exc
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @property
    def display_name(self) -> str:
        return masked_url(self.url)

    def _all_in_use(self) -> bool:
        with self._in_use_lock:
            return self._in_use >= self._max_size

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one request (see ``_FIRST_WAIT``): pooled, else a direct one."""
        deadline = time.monotonic() + self._timeout
        busy = self._all_in_use()
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._pool.getconn(timeout=self._timeout if busy else _FIRST_WAIT)
        except PoolTimeout:
            if self._all_in_use():
                # Every connection is in use: wait for one, as long as the pool's timeout.
                conn = self._pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
        if conn is None:
            # The pool has no connection to give: does the server answer at all?
            with psycopg.connect(
                self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT
            ) as direct:
                yield direct
            return
        with self._in_use_lock:
            self._in_use += 1
        try:
            with conn:
                yield conn
        finally:
            with self._in_use_lock:
                self._in_use -= 1
            self._pool.putconn(conn)

    def _migrate(self) -> None:
        statements = schema_statements(
            pk="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            real="DOUBLE PRECISION",
            blob="BYTEA",
            suffix={},
        )
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
            conn.execute("CREATE TABLE IF NOT EXISTS alf_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM alf_schema").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise CollectorError(
                    f"{self.display_name} has schema version {version}, newer than this "
                    f"collector's ({SCHEMA_VERSION}): upgrade alf-analytics"
                )
            if version == SCHEMA_VERSION:
                return
            for statement in statements:
                conn.execute(statement)
            conn.execute("DELETE FROM alf_schema")
            conn.execute("INSERT INTO alf_schema (version) VALUES (%s)", [SCHEMA_VERSION])

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield _PostgresTransaction(cursor)

    def _lock_for_compaction(self, tx: Transaction) -> None:
        # SHARE ROW EXCLUSIVE conflicts with the ROW EXCLUSIVE lock of every writer of these
        # tables (wait for those in flight, hold new ones back until the hour's sums are
        # committed) and with itself: a second compactor (another collector or worker on
        # this database) waits, then finds the hour marked, instead of summing it twice.
        tx.execute("LOCK TABLE agg_minute, agg_consumer IN SHARE ROW EXCLUSIVE MODE")

    def _changes(self, tx: Transaction) -> int:
        assert isinstance(tx, _PostgresTransaction)
        return tx.changes

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return [tuple(row) for row in conn.execute(_sql(sql), params).fetchall()]

    def close(self) -> None:
        self._pool.close()
