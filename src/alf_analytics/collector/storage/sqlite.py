"""The embedded default: one SQLite file in WAL mode, one writer, readers beside it.

Writes go through one connection under a lock, one ``BEGIN IMMEDIATE`` transaction per
request. Reads use a connection per thread (WAL lets them run while the writer writes), or
the writer's connection for an in-memory database. The page cache is bounded per
connection, so memory does not grow with the number of stored entries.

A database written by the old collector (schema version 1: requests/alfs/entries) is
migrated on open: its entries are re-indexed into the current schema, its request log and
copies of whole ALF objects are dropped.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import orjson

from ..ingest import _entry_row, _first_error, _validators
from ..settings import CollectorError, TokenSet
from .base import (
    INT64_MAX,
    ROLLUP_TABLES,
    SCHEMA_VERSION,
    SUM_COLUMNS,
    Store,
    Transaction,
    iter_chunks,
    schema_statements,
    upsert_clause,
)

__all__ = ["SQLiteStore", "open_readonly"]

logger = logging.getLogger("alf_analytics.collector")

_CACHE_KIB: Final = 32_768  # page cache per connection
_SUFFIX: Final = {table: " WITHOUT ROWID" for table in ROLLUP_TABLES}


def _is_memory(path: str) -> bool:
    return path in ("", ":memory:") or path.startswith("file::memory:")


class _SQLiteTransaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.changes = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.changes = self.db.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.changes = self.db.executemany(sql, rows).rowcount

    def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        cursor = self.db.execute(sql, params)
        if cursor.rowcount != 1 or cursor.lastrowid is None:
            return None
        return int(cursor.lastrowid)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.db.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def reserve_ids(self, count: int) -> list[int]:
        # BEGIN IMMEDIATE holds the database's write lock: no other writer can take these.
        last = int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0])
        return list(range(last + 1, last + 1 + count))

    def bulk_insert(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
    ) -> None:
        self._many(table, columns, rows, "")

    def bulk_upsert(self, table: str, keys: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
        self._many(table, (*keys, *SUM_COLUMNS), rows, upsert_clause(table, keys))

    def _many(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]], tail: str
    ) -> None:
        # Many rows per statement: executemany would release and retake the GIL for each
        # row, and under load (another thread parsing the next request) each retake waits.
        per_statement = max(1, min(_MAX_ROWS, _max_variables(self.db) // len(columns)))
        for chunk in iter_chunks(rows, per_statement):
            sql = _multi_insert(table, columns, len(chunk)) + tail
            self.changes = self.db.execute(sql, [v for row in chunk for v in row]).rowcount


_MAX_ROWS: Final = 500


def _max_variables(db: sqlite3.Connection) -> int:
    getlimit = getattr(db, "getlimit", None)  # Python 3.11+
    return int(getlimit(getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", 9))) if getlimit else 999


@lru_cache(maxsize=256)
def _multi_insert(table: str, columns: tuple[str, ...], count: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * count)


class SQLiteStore(Store):
    """A collector database in one SQLite file (or ``:memory:``)."""

    dialect = "sqlite"

    def sum_sql(self, column: str) -> str:
        # SQLite's SUM() of integers fails on overflow ("integer overflow"); TOTAL() is a
        # float, exact up to 2^53, and MIN() saturates it as PostgreSQL's LEAST() does.
        return f"MIN(TOTAL({column}), {INT64_MAX})"

    def __init__(self, path: str = "alf.sqlite", *, tokens: TokenSet | None = None) -> None:
        super().__init__(tokens)
        self.path = path
        self.memory = _is_memory(path)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._writer = self._connect()
        try:
            self._migrate()
        except BaseException:
            self._writer.close()
            raise
        self._checkpointer: _Checkpointer | None = None
        if not self.memory:
            # Checkpoints copy the WAL into the database file; done by a thread of their own
            # (SQLite runs without the GIL), they stay off the requests' path.
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = _Checkpointer(self._connect)

    @property
    def display_name(self) -> str:
        return self.path or ":memory:"

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path,
                check_same_thread=False,
                isolation_level=None,
                uri=self.path.startswith("file:"),
            )
        except sqlite3.Error as exc:
            raise CollectorError(f"cannot open {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            if not self.memory:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise CollectorError(f"{self.path} is not an SQLite database: {exc}") from exc
        return db

    # -- schema -------------------------------------------------------------------------

    def _migrate(self) -> None:
        db = self._writer
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise CollectorError(f"{self.path} is not an SQLite database: {exc}") from exc
        if version > SCHEMA_VERSION:
            raise CollectorError(
                f"{self.path} has schema version {version}, newer than this collector's "
                f"({SCHEMA_VERSION}): upgrade alf-analytics"
            )
        if version == 1 and {"requests", "alfs", "entries"} <= tables:
            self._migrate_from_v1()
            return
        if version in (2, 3) and {"entries", "agg_minute", "agg_consumer"} <= tables:
            logger.warning(
                "migrating %s from schema version %d to %d", self.path, version, SCHEMA_VERSION
            )
            # Versions 3 and 4 only add tables and an index: the CREATE ... IF NOT EXISTS of
            # today's schema leave the older tables and their rows as they are.
            self._create_schema(db)
            return
        if tables and version != SCHEMA_VERSION:
            raise CollectorError(
                f"{self.path} is not an alf-analytics collector database "
                f"(schema version {version}, tables {sorted(tables)[:8]})"
            )
        self._create_schema(db)

    def _create_schema(self, db: sqlite3.Connection) -> None:
        statements = schema_statements(
            pk="INTEGER PRIMARY KEY",
            real="REAL",
            blob="BLOB",
            suffix=_SUFFIX,
        )
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _migrate_from_v1(self) -> None:
        """Re-index the old collector's entries into the current schema (one transaction)."""
        db = self._writer
        logger.warning("migrating %s from schema version 1 to %d", self.path, SCHEMA_VERSION)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("ALTER TABLE entries RENAME TO legacy_entries")
            for statement in schema_statements(
                pk="INTEGER PRIMARY KEY",
                real="REAL",
                blob="BLOB",
                suffix=_SUFFIX,
            ):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        from ..ingest import AlfGroup
        from .base import SaveRequest

        skipped = 0
        rows = db.execute(
            "SELECT e.alf_id, e.received_at, e.alf_version, e.service_token, e.environment, "
            "a.creator_json, e.entry_json, a.alf_json FROM legacy_entries e "
            "JOIN alfs a ON a.id = e.alf_id ORDER BY e.id"
        ).fetchall()
        groups: dict[int, tuple[AlfGroup, int]] = {}
        for alf_id, received_at, version, token, environment, creator, entry_json, alf_json in rows:
            entry = orjson.loads(entry_json)
            if version not in ("1.0.0", "1.1.0") or _first_error(_validators(version).entry, entry):
                skipped += 1
                continue
            alf_ip = orjson.loads(alf_json).get("clientIPAddress") if version == "1.0.0" else None
            row = _entry_row(entry, alf_ip if isinstance(alf_ip, str) else None)
            if isinstance(row, str):
                skipped += 1
                continue
            if alf_id not in groups:
                creator_bytes = (
                    orjson.dumps(orjson.loads(creator), option=orjson.OPT_SORT_KEYS)
                    if creator
                    else None
                )
                group = AlfGroup(0, version, token, environment, creator_bytes)
                received = _parse_received(received_at)
                groups[alf_id] = (group, received)
            groups[alf_id][0].rows.append(row)
        for group, received in groups.values():
            self.save(SaveRequest([group], received, 200, '{"migrated": true}'))
        db.execute("BEGIN IMMEDIATE")
        for table in ("legacy_entries", "alfs", "requests"):
            db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute("COMMIT")
        db.execute("VACUUM")
        logger.warning(
            "migrated %d entries (%d skipped as invalid) of %s",
            sum(len(g.rows) for g, _ in groups.values()),
            skipped,
            self.path,
        )

    # -- Store --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CollectorError("the store is closed")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._check_open()
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            tx = _SQLiteTransaction(db)
            try:
                yield tx
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _changes(self, tx: Transaction) -> int:
        assert isinstance(tx, _SQLiteTransaction)
        return tx.changes

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            db.execute("PRAGMA query_only=ON")
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._check_open()
        if self.memory:
            with self._lock:
                return [tuple(r) for r in self._writer.execute(sql, params).fetchall()]
        return [tuple(r) for r in self._reader().execute(sql, params).fetchall()]

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._writer.close()


class _Checkpointer:
    """Checkpoints the WAL every ``interval`` seconds from its own connection and thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], interval: float = 0.5) -> None:
        self._connect = connect
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alf-collector-wal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = self._connect()
        try:
            while not self._stopped.wait(self._interval):
                try:
                    # PASSIVE never blocks the writer; TRUNCATE now and then keeps the file small.
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    logger.warning("WAL checkpoint failed: %s", exc)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            logger.warning("final WAL checkpoint failed: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10)


def _parse_received(text: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(text).timestamp() * 1_000_000)
    except ValueError:
        return int(time.time() * 1_000_000)


def open_readonly(path: str) -> SQLiteStore:
    """A store on an existing file, for ``summary`` (the collector may be running)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such database file: {path}")
    return SQLiteStore(path)
