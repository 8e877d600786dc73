"""The storage interface, the schema both backends share, and the one write path.

Tables (the same in SQLite and PostgreSQL, column types aside):

- ``streams``: one row per (service token, environment) seen, with the token's id and name;
- ``creators``: the distinct ``har.log.creator`` objects;
- ``ingests``: one row per stored request: its idempotency key (hashed), the digest of its
  body and its answer, so that a repeat is answered the same without storing twice;
- ``entries``: one row per stored entry with its indexed columns, and ``entry_data`` the
  entry itself (its JSON compressed with zstd), apart so that scans of entries stay narrow;
- ``dictionaries``: the zstd dictionaries entries are compressed with, trained on the
  store's own entries (see :mod:`.codec`);
- ``agg_minute`` and ``agg_consumer``: per-minute rollups maintained in the same transaction
  as the entries (counts, latency histogram buckets, bytes), so aggregates over millions of
  entries read thousands of rows.

Times are integers: microseconds since the epoch (``started``, ``received``) and minutes
since the epoch (rollups). SQL is written once with ``?`` placeholders; each backend runs it.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Protocol

from ..ingest import AlfGroup
from ..settings import TokenSet
from .codec import EntryCodec

__all__ = [
    "SCHEMA_VERSION",
    "SaveRequest",
    "SaveResult",
    "Store",
    "Transaction",
    "schema_statements",
]

SCHEMA_VERSION: Final = 4
"""Version 1 was the old ``http.server`` collector's (requests/alfs/entries tables); 2 had
the per-minute rollups only; 3 adds the hourly and quarter-hourly ones (``agg_hour``,
``agg_consumer_hour``, ``agg_quarter``, ``agg_consumer_quarter``, filled by ``compact``); 4
adds ``dictionaries`` (entries compressed with one: a collector of version 3 could not read
them, so it refuses the store)."""

_TABLES: Final = {
    "streams": [
        "id {pk}",
        "stream_key TEXT NOT NULL UNIQUE",
        "token TEXT NOT NULL",
        "token_id TEXT NOT NULL",
        "name TEXT",
        "environment TEXT",
    ],
    "creators": ["id {pk}", "creator TEXT NOT NULL UNIQUE"],
    "ingests": [
        "id {pk}",
        "received BIGINT NOT NULL",
        "key_hash TEXT UNIQUE",
        "digest TEXT",
        "status INTEGER NOT NULL",
        "answer TEXT NOT NULL",
    ],
    "entries": [
        "id {pk}",
        "stream_id BIGINT NOT NULL",
        "ingest_id BIGINT NOT NULL",
        "alf_index INTEGER NOT NULL",
        "alf_version TEXT NOT NULL",
        "creator_id BIGINT",
        "received BIGINT NOT NULL",
        "started BIGINT NOT NULL",
        "method TEXT NOT NULL",
        "host TEXT NOT NULL",
        "path TEXT NOT NULL",
        "route TEXT NOT NULL",
        "status INTEGER NOT NULL",
        "time_ms {real} NOT NULL",
        "bucket INTEGER NOT NULL",
        "request_bytes BIGINT NOT NULL",
        "response_bytes BIGINT NOT NULL",
        "client_ip TEXT",
        "consumer TEXT",
    ],
    # Apart from the indexed columns, so that scans of entries stay narrow.
    "entry_data": ["id BIGINT PRIMARY KEY", "entry {blob} NOT NULL"],
    "dictionaries": ["id BIGINT PRIMARY KEY", "created BIGINT NOT NULL", "data {blob} NOT NULL"],
    "agg_minute": [
        "minute BIGINT NOT NULL",
        "stream_id BIGINT NOT NULL",
        "method TEXT NOT NULL",
        "route TEXT NOT NULL",
        "status INTEGER NOT NULL",
        "bucket INTEGER NOT NULL",
        "n BIGINT NOT NULL",
        "time_sum {real} NOT NULL",
        "bytes_in BIGINT NOT NULL",
        "bytes_out BIGINT NOT NULL",
        "PRIMARY KEY (minute, stream_id, method, route, status, bucket)",
    ],
    "agg_consumer": [
        "minute BIGINT NOT NULL",
        "stream_id BIGINT NOT NULL",
        "consumer TEXT NOT NULL",
        "status INTEGER NOT NULL",
        "bucket INTEGER NOT NULL",
        "n BIGINT NOT NULL",
        "time_sum {real} NOT NULL",
        "bytes_in BIGINT NOT NULL",
        "bytes_out BIGINT NOT NULL",
        "PRIMARY KEY (minute, stream_id, consumer, status, bucket)",
    ],
}
# The hourly rollups: the same columns, ``minute`` being the first minute of the hour.
_TABLES["agg_hour"] = _TABLES["agg_minute"]
_TABLES["agg_consumer_hour"] = _TABLES["agg_consumer"]
# And per quarter hour (what a day's chart, in 15-minute points, reads).
_TABLES["agg_quarter"] = _TABLES["agg_minute"]
_TABLES["agg_consumer_quarter"] = _TABLES["agg_consumer"]
_TABLES["agg_hours"] = ["minute BIGINT PRIMARY KEY", "compacted BIGINT NOT NULL"]
ROLLUP_TABLES: Final = (
    "agg_minute", "agg_consumer", "agg_hour", "agg_consumer_hour", "agg_quarter",
    "agg_consumer_quarter",
)  # fmt: skip
TIERS: Final = {
    60: {"agg_minute": "agg_hour", "agg_consumer": "agg_consumer_hour"},
    15: {"agg_minute": "agg_quarter", "agg_consumer": "agg_consumer_quarter"},
}
"""Minutes per row -> the summed table of each per-minute rollup (rows from compact())."""
"""Per minute, then per hour (``minute`` is the first minute of the hour there)."""
# Two indexes on entries (random-order ones cost more at ingest than they save in queries:
# aggregates read the rollups; listings walk `started` newest first and filter as they go).
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS entries_started ON entries (started)",
    # The slowest requests: the rollups' histogram gives the latency bucket above which the
    # top N lie, this index finds those few entries. Cheap at ingest: within a bucket new
    # ids go last, so a request's inserts land on the last page of ~40 buckets.
    "CREATE INDEX IF NOT EXISTS entries_bucket ON entries (bucket)",
    "CREATE INDEX IF NOT EXISTS ingests_received ON ingests (received)",
)
TABLE_NAMES: Final = tuple(_TABLES)


def schema_statements(*, pk: str, real: str, blob: str, suffix: dict[str, str]) -> list[str]:
    """The CREATE statements of the current schema for one dialect."""
    statements = []
    for table, columns in _TABLES.items():
        body = ", ".join(c.format(pk=pk, real=real, blob=blob) for c in columns)
        statements.append(f"CREATE TABLE IF NOT EXISTS {table} ({body}){suffix.get(table, '')}")
    statements.extend(_INDEXES)
    return statements


ENTRY_COLUMNS: Final = (
    "id", "stream_id", "ingest_id", "alf_index", "alf_version", "creator_id", "received",
    "started", "method", "host", "path", "route", "status", "time_ms", "bucket",
    "request_bytes", "response_bytes", "client_ip", "consumer",
)  # fmt: skip
ROLLUPS: Final = {
    "agg_minute": ("minute", "stream_id", "method", "route", "status", "bucket"),
    "agg_consumer": ("minute", "stream_id", "consumer", "status", "bucket"),
    "agg_hour": ("minute", "stream_id", "method", "route", "status", "bucket"),
    "agg_consumer_hour": ("minute", "stream_id", "consumer", "status", "bucket"),
    "agg_quarter": ("minute", "stream_id", "method", "route", "status", "bucket"),
    "agg_consumer_quarter": ("minute", "stream_id", "consumer", "status", "bucket"),
}
"""Each rollup table's key columns; every one also sums ``SUM_COLUMNS``."""
SUM_COLUMNS: Final = ("n", "time_sum", "bytes_in", "bytes_out")
COLUMN_TYPES: Final = {
    "minute": "bigint", "stream_id": "bigint", "method": "text", "route": "text",
    "consumer": "text", "status": "integer", "bucket": "integer", "n": "bigint",
    "time_sum": "double precision", "bytes_in": "bigint", "bytes_out": "bigint",
}  # fmt: skip
"""PostgreSQL types of the rollup columns (for its array-based upsert)."""

INT64_MAX: Final = 2**63 - 1
"""Where the byte sums of the rollups saturate (BIGINT): a sum never overflows into an error."""
SATURATED: Final = ("bytes_in", "bytes_out")
"""The sums that can reach INT64_MAX (each entry adds up to 2^53; ``n`` adds 1, ``time_sum``
is a float)."""


def added(table: str, column: str) -> str:
    """The SQL of an upsert's new ``column``: the sum, saturated at INT64_MAX for bytes
    (without computing a sum that overflows: both backends, BIGINT only)."""
    if column not in SATURATED:
        return f"{table}.{column} + excluded.{column}"
    return (
        f"CASE WHEN {table}.{column} > {INT64_MAX} - excluded.{column} THEN {INT64_MAX} "
        f"ELSE {table}.{column} + excluded.{column} END"
    )


@lru_cache(maxsize=64)
def upsert_clause(table: str, keys: tuple[str, ...]) -> str:
    """What makes an INSERT of rollup rows (keys, then sums) add into existing rows."""
    sums = ", ".join(f"{c} = {added(table, c)}" for c in SUM_COLUMNS)
    return f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}"


_MINUTE_US: Final = 60_000_000
COMPACT_AFTER_MINUTES: Final = 5
"""How long after an hour's end its minutes are summed into an hourly row."""


@dataclass
class _SaveWork:
    """What a save writes, computed before its transaction (group indexes for stream ids)."""

    columns: list[list[tuple[Any, ...]]]  # per group: entry columns from ``started`` on
    blobs: list[bytes]  # the compressed entries, in order
    rollups: dict[str, dict[tuple[Any, ...], list[float]]]

    @classmethod
    def build(cls, request: SaveRequest, codec: EntryCodec) -> _SaveWork:
        columns: list[list[tuple[Any, ...]]] = []
        blobs: list[bytes] = []
        minutes: dict[tuple[Any, ...], list[float]] = {}
        consumers: dict[tuple[Any, ...], list[float]] = {}
        for index, group in enumerate(request.groups):
            rows: list[tuple[Any, ...]] = []
            for r in group.rows:
                rows.append(
                    (r.started, r.method, r.host, r.path, r.route, r.status, r.time_ms,
                     r.bucket, r.request_bytes, r.response_bytes, r.client_ip, r.consumer)
                )  # fmt: skip
                blobs.append(r.entry)
                minute = r.started // _MINUTE_US
                key: tuple[Any, ...] = (minute, index, r.method, r.route, r.status, r.bucket)
                _add(minutes, key, r.time_ms, r.request_bytes, r.response_bytes)
                if r.consumer is not None:
                    key = (minute, index, r.consumer, r.status, r.bucket)
                    _add(consumers, key, r.time_ms, r.request_bytes, r.response_bytes)
            columns.append(rows)
        blobs = codec.compress(blobs)
        rollups = {"agg_minute": minutes}
        if consumers:
            rollups["agg_consumer"] = consumers
        return cls(columns, blobs, rollups)


def _rollup_rows(
    sums: dict[tuple[Any, ...], list[float]], streams: list[int]
) -> list[tuple[Any, ...]]:
    """Rows to upsert: group indexes replaced by stream ids, keys met twice added, sorted.

    Sorted: concurrent writers (PostgreSQL) lock rollup rows in one order (no deadlock).
    """
    if len(streams) == 1:
        stream = streams[0]
        rows = [(k[0], stream, *k[2:], *_ints(v)) for k, v in sums.items()]
    else:  # two ALF objects of one stream: one row per key
        merged = _merged({}, sums, streams)
        rows = [(*key, *_ints(value)) for key, value in merged.items()]
    rows.sort()
    return rows


def _compacted(tx: Transaction, hours: set[int]) -> set[int]:
    """Which of ``hours`` (first minutes) are already summed into the hourly rollups."""
    found = set()
    for hour in sorted(hours):  # one or two: a batch spans seconds
        if tx.fetchone("SELECT 1 FROM agg_hours WHERE minute = ?", [hour]) is not None:
            found.add(hour)
    return found


def _by_hour(
    minutes: dict[tuple[Any, ...], list[float]], size: int = 60
) -> dict[tuple[Any, ...], list[float]]:
    """Per-minute sums added up per ``size`` minutes (an hour, a quarter)."""
    return _rekeyed({}, minutes, lambda key: (key[0] - key[0] % size, *key[1:]))


@dataclass(frozen=True)
class SaveRequest:
    """Everything one request stores, in one transaction."""

    groups: Sequence[AlfGroup]
    received: int  # microseconds since the epoch
    status: int
    answer: str  # the JSON answer, replayed for a repeated idempotency key
    key_hash: str | None = None
    digest: str | None = None
    remembered_since: int | None = None  # µs: an answer to the key received before is forgotten


@dataclass(frozen=True)
class SaveResult:
    """``replayed`` is set when the key was seen: nothing was stored, the answer is the first."""

    status: int
    answer: str
    digest: str | None = None
    replayed: bool = False


def hash_key(key: str) -> str:
    """How an ``Idempotency-Key`` is stored (never as sent)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def stream_key(token: str, environment: str | None) -> str:
    marker = "-" if environment is None else "=" + environment
    return hashlib.sha256(f"{token}\n{marker}".encode("utf-8", "surrogatepass")).hexdigest()


class Transaction(Protocol):
    """What the shared write path needs from a backend's open transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def insert_returning_id(self, sql: str, params: Sequence[Any]) -> int | None:
        """Run an INSERT ... ON CONFLICT DO NOTHING; the new row's id, None on conflict."""

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...

    def reserve_ids(self, count: int) -> list[int]:
        """``count`` new, increasing entry ids (unique across processes)."""

    def bulk_insert(
        self, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Insert ``rows`` (values in ``columns`` order)."""

    def bulk_upsert(self, table: str, keys: tuple[str, ...], rows: Sequence[Sequence[Any]]) -> None:
        """Add rollup ``rows`` (keys, then ``SUM_COLUMNS``; no key twice) into ``table``."""


class Store(ABC):
    """One collector database. Thread-safe; each method is one short transaction.

    ``tokens`` gives the names of named service tokens (stored with their streams).
    """

    dialect: str = ""

    def sum_sql(self, column: str) -> str:
        """``SUM(column)`` of byte counts, saturated at INT64_MAX (PostgreSQL sums BIGINT as
        NUMERIC, which does not overflow)."""
        return f"LEAST(COALESCE(SUM({column}), 0), {INT64_MAX})"

    def __init__(self, tokens: TokenSet | None = None) -> None:
        self.tokens = tokens if tokens is not None else TokenSet()
        self._ids_lock = threading.Lock()
        self._stream_ids: dict[str, int] = {}
        self._creator_ids: dict[bytes, int] = {}
        self.codec = EntryCodec(self._dictionary, self._add_dictionary, self._newest_dictionary)

    # -- backend hooks ------------------------------------------------------------------

    @property
    @abstractmethod
    def display_name(self) -> str:
        """The database as it may be printed (no password)."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction, committed when the block ends without an exception."""

    @abstractmethod
    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.fetchall(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.fetchone(sql, params)
        return row[0] if row else None

    # -- entries and their compression dictionaries ---------------------------------------

    def decode_entry(self, blob: bytes | memoryview) -> dict[str, Any]:
        """The entry stored as ``blob`` in ``entry_data``."""
        return self.codec.decode(blob)

    def _dictionary(self, dict_id: int) -> bytes | None:
        data = self.scalar("SELECT data FROM dictionaries WHERE id = ?", [dict_id])
        return bytes(data) if data is not None else None

    def _newest_dictionary(self) -> tuple[int, int, bytes] | None:
        row = self.fetchone(
            "SELECT id, created, data FROM dictionaries ORDER BY created DESC, id DESC LIMIT 1"
        )
        return (int(row[0]), int(row[1]), bytes(row[2])) if row is not None else None

    def _add_dictionary(self, dict_id: int, created: int, data: bytes) -> bytes:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO dictionaries (id, created, data) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [dict_id, created, data],
            )
            row = tx.fetchone("SELECT data FROM dictionaries WHERE id = ?", [dict_id])
        assert row is not None
        return bytes(row[0])

    # -- writing ------------------------------------------------------------------------

    def find_answer(self, key_hash: str, *, since: int | None = None) -> SaveResult | None:
        """The answer stored for an idempotency key, if it is still remembered: received at
        ``since`` (µs) or later when given, so that a key older than the window is unknown
        however long ago the housekeeping last forgot keys (:meth:`forget_keys`)."""
        if since is None:
            row = self.fetchone(
                "SELECT status, answer, digest FROM ingests WHERE key_hash = ?", [key_hash]
            )
        else:
            row = self.fetchone(
                "SELECT status, answer, digest FROM ingests WHERE key_hash = ? AND received >= ?",
                [key_hash, since],
            )
        if row is None:
            return None
        return SaveResult(int(row[0]), str(row[1]), row[2], replayed=True)

    def save(self, request: SaveRequest) -> SaveResult:
        """Store the groups' entries and rollups and the request's answer, atomically.

        Everything that needs no id (compression, column tuples, rollup sums) is done before
        the write transaction starts, so that the one writer holds the lock only to write.
        """
        work = _SaveWork.build(request, self.codec)
        new_streams: dict[str, int] = {}
        new_creators: dict[bytes, int] = {}
        with self.transaction() as tx:
            if request.key_hash is not None and request.remembered_since is not None:
                # A key older than the window is forgotten here, in this transaction, rather
                # than replayed until the housekeeping deletes it.
                tx.execute(
                    "DELETE FROM ingests WHERE key_hash = ? AND received < ?",
                    [request.key_hash, request.remembered_since],
                )
            ingest_id = tx.insert_returning_id(
                "INSERT INTO ingests (received, key_hash, digest, status, answer) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    request.received,
                    request.key_hash,
                    request.digest,
                    request.status,
                    request.answer,
                ],
            )
            if ingest_id is None:
                row = tx.fetchone(
                    "SELECT status, answer, digest FROM ingests WHERE key_hash = ?",
                    [request.key_hash],
                )
                if row is None:  # pragma: no cover - the conflicting row was purged meanwhile
                    raise RuntimeError("idempotency key conflict without a stored answer")
                return SaveResult(int(row[0]), str(row[1]), row[2], replayed=True)
            streams = [
                self._stream_id(tx, group.token, group.environment, new_streams)
                for group in request.groups
            ]
            creators = [
                self._creator_id(tx, group.creator, new_creators) for group in request.groups
            ]
            ids = tx.reserve_ids(len(work.blobs))
            entry_rows: list[tuple[Any, ...]] = []
            position = 0
            for index, group in enumerate(request.groups):
                head = (streams[index], ingest_id, group.index, group.version, creators[index])
                for columns in work.columns[index]:
                    entry_rows.append((ids[position], *head, request.received, *columns))
                    position += 1
            tx.bulk_insert("entries", ENTRY_COLUMNS, entry_rows)
            tx.bulk_insert("entry_data", ("id", "entry"), list(zip(ids, work.blobs, strict=True)))
            # The minute rollups first: on PostgreSQL this takes the lock that compact()
            # waits for, so the check of compacted hours below cannot miss a compaction.
            for table, sums in work.rollups.items():
                tx.bulk_upsert(table, ROLLUPS[table], _rollup_rows(sums, streams))
            hours = {key[0] - key[0] % 60 for key in work.rollups["agg_minute"]}
            compacted = _compacted(tx, hours)
            if compacted:  # late entries for an hour already summed: add them there too
                for table, sums in work.rollups.items():
                    late_minutes = {k: v for k, v in sums.items() if k[0] - k[0] % 60 in compacted}
                    for size, tables in TIERS.items():
                        late = _by_hour(late_minutes, size)
                        tx.bulk_upsert(tables[table], ROLLUPS[table], _rollup_rows(late, streams))
        with self._ids_lock:
            self._stream_ids.update(new_streams)
            self._creator_ids.update(new_creators)
        return SaveResult(request.status, request.answer, request.digest)

    def _stream_id(
        self, tx: Transaction, token: str, environment: str | None, new: dict[str, int]
    ) -> int:
        key = stream_key(token, environment)
        known = self._stream_ids.get(key) or new.get(key)
        if known is not None:
            return known
        configured = self.tokens.lookup(token)
        stream_id = tx.insert_returning_id(
            "INSERT INTO streams (stream_key, token, token_id, name, environment) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [key, token, configured.id, configured.name, environment],
        )
        if stream_id is None:
            row = tx.fetchone("SELECT id FROM streams WHERE stream_key = ?", [key])
            assert row is not None
            stream_id = int(row[0])
        new[key] = stream_id
        return stream_id

    def _creator_id(
        self, tx: Transaction, creator: bytes | None, new: dict[bytes, int]
    ) -> int | None:
        if creator is None:
            return None
        known = self._creator_ids.get(creator) or new.get(creator)
        if known is not None:
            return known
        text = creator.decode("utf-8")
        creator_id = tx.insert_returning_id(
            "INSERT INTO creators (creator) VALUES (?) ON CONFLICT DO NOTHING", [text]
        )
        if creator_id is None:
            row = tx.fetchone("SELECT id FROM creators WHERE creator = ?", [text])
            assert row is not None
            creator_id = int(row[0])
        if len(self._creator_ids) < 10_000:
            new[creator] = creator_id
        return creator_id

    # -- housekeeping -------------------------------------------------------------------

    def _lock_for_compaction(self, tx: Transaction) -> None:
        """Make writers of the minute rollups wait until this transaction ends (PostgreSQL)."""
        del tx  # SQLite: its one writer at a time is enough

    def compact(self, now: int | None = None, *, max_hours: int = 48) -> int:
        """Sum whole past hours of the minute rollups into the hourly ones.

        An hour is summed once, ``COMPACT_AFTER_MINUTES`` after its end, and marked in
        ``agg_hours``; entries of a marked hour that arrive later are added to both (see
        :meth:`save`), so the hourly rows always equal the sum of their minutes. Queries
        read a marked hour's row instead of its 60 minutes. Each hour is one short
        transaction; returns how many hours were summed (at most ``max_hours``).
        """
        now_minute = (now if now is not None else int(time.time() * 1_000_000)) // _MINUTE_US
        end = now_minute - COMPACT_AFTER_MINUTES  # hours ending at or before this
        done = 0
        while done < max_hours:
            last = self.scalar("SELECT MAX(minute) FROM agg_hours")
            low = int(last) + 60 if last is not None else None
            first = self.scalar(
                "SELECT MIN(minute) FROM agg_minute"
                + (" WHERE minute >= ?" if low is not None else ""),
                [low] if low is not None else [],
            )
            if first is None:
                return done
            hour = int(first) - int(first) % 60
            if hour + 60 > end:
                return done
            with self.transaction() as tx:
                self._lock_for_compaction(tx)
                if tx.fetchone("SELECT 1 FROM agg_hours WHERE minute = ?", [hour]) is None:
                    for size, tables in TIERS.items():
                        for minute_table, summed_table in tables.items():
                            keys = ROLLUPS[minute_table]
                            rest = ", ".join(keys[1:])
                            sums = ", ".join(
                                self.sum_sql(c) if c in SATURATED else f"SUM({c})"
                                for c in SUM_COLUMNS
                            )
                            period = f"(minute - minute % {size})"
                            tx.execute(
                                f"INSERT INTO {summed_table} "
                                f"({', '.join((*keys, *SUM_COLUMNS))}) "
                                f"SELECT {period}, {rest}, {sums} FROM {minute_table} "
                                f"WHERE minute >= ? AND minute < ? GROUP BY {period}, {rest}",
                                [hour, hour + 60],
                            )
                    tx.execute(
                        "INSERT INTO agg_hours (minute, compacted) VALUES (?, ?)",
                        [hour, int(time.time() * 1_000_000)],
                    )
            done += 1
        return done

    def purge(self, before: int, *, chunk: int = 5_000) -> int:
        """Delete up to ``chunk`` entries of the whole hours before ``before`` (µs), and
        their rollups.

        ``before`` is rounded down to its hour: the entries and the rollup rows (per minute,
        quarter and hour) before that boundary go, everything after it stays, so that every
        aggregate equals what the remaining entries give (a rollup row never outlives, nor
        precedes, the entries it counts). An entry may thus outlive ``before`` by up to an
        hour. Returns how many rows were deleted; call again until it returns 0. Each call is
        one short transaction, so ingest is never held for long.
        """
        minute = before // _MINUTE_US
        cutoff = minute - minute % 60  # the first minute of the hour holding ``before``
        boundary = cutoff * _MINUTE_US
        ids = [
            int(row[0])
            for row in self.fetchall(
                "SELECT id FROM entries WHERE started < ? ORDER BY started LIMIT ?",
                [boundary, chunk],
            )
        ]
        with self.transaction() as tx:
            deleted = 0
            if ids:
                listed = ", ".join(map(str, ids))
                tx.execute(f"DELETE FROM entry_data WHERE id IN ({listed})")
                tx.execute(f"DELETE FROM entries WHERE id IN ({listed})")
                deleted = self._changes(tx)
            for table in (*ROLLUP_TABLES, "agg_hours"):
                hourly = table.endswith(("_hour", "_hours", "_quarter"))
                step = 24 * 60 if hourly else 60
                row = tx.fetchone(f"SELECT MIN(minute) FROM {table}")
                oldest = row[0] if row else None
                if oldest is not None and oldest < cutoff:
                    # An hour of minute rows (a day of hourly ones) per call: bounded.
                    tx.execute(
                        f"DELETE FROM {table} WHERE minute < ?", [min(cutoff, oldest + step)]
                    )
                    deleted += self._changes(tx)
        return deleted

    def forget_keys(self, before: int, *, chunk: int = 5_000) -> int:
        """Forget idempotency keys (and answers) of requests received before ``before`` (µs)."""
        with self.transaction() as tx:
            tx.execute(
                "DELETE FROM ingests WHERE id IN "
                "(SELECT id FROM ingests WHERE received < ? ORDER BY received LIMIT ?)",
                [before, chunk],
            )
            return self._changes(tx)

    @abstractmethod
    def _changes(self, tx: Transaction) -> int:
        """Rows changed by the last statement of ``tx``."""

    def clear(self) -> None:
        """Delete everything stored (the schema and the compression dictionaries stay)."""
        with self.transaction() as tx:
            for table in reversed(TABLE_NAMES):
                if table != "dictionaries":  # what entries written meanwhile are compressed with
                    tx.execute(f"DELETE FROM {table}")
        with self._ids_lock:
            self._stream_ids.clear()
            self._creator_ids.clear()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display_name}>"


def _add(
    into: dict[tuple[Any, ...], list[float]],
    key: tuple[Any, ...],
    time_ms: float,
    bytes_in: int,
    bytes_out: int,
) -> None:
    item = into.get(key)
    if item is None:
        into[key] = [1, time_ms, bytes_in, bytes_out]
    else:
        item[0] += 1
        item[1] += time_ms
        item[2] += bytes_in
        item[3] += bytes_out


def _merged(
    into: dict[tuple[Any, ...], list[float]],
    sums: dict[tuple[Any, ...], list[float]],
    streams: list[int],
) -> dict[tuple[Any, ...], list[float]]:
    """``sums`` keyed by stream id instead of group index (keys that meet are added)."""
    return _rekeyed(into, sums, lambda key: (key[0], streams[key[1]], *key[2:]))


def _rekeyed(
    into: dict[tuple[Any, ...], list[float]],
    sums: dict[tuple[Any, ...], list[float]],
    key_of: Callable[[tuple[Any, ...]], tuple[Any, ...]],
) -> dict[tuple[Any, ...], list[float]]:
    """``sums`` added into ``into`` under ``key_of(key)``: keys that meet there are summed."""
    for key, value in sums.items():
        final = key_of(key)
        item = into.get(final)
        if item is None:
            into[final] = list(value)
        else:
            for i in range(4):
                item[i] += value[i]
    return into


def _ints(values: list[float]) -> tuple[int, float, int, int]:
    bytes_in, bytes_out = min(int(values[2]), INT64_MAX), min(int(values[3]), INT64_MAX)
    return int(values[0]), float(values[1]), bytes_in, bytes_out


def masked_url(url: str) -> str:
    """A database URL without its password: the one in its credentials, and the libpq
    ``password`` / ``sslpassword`` parameters of its query (``?password=...``)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    base, question, query = rest.partition("?")
    credentials, at, host = base.rpartition("@")
    user, colon, password = credentials.partition(":")
    if at and password:
        base = f"{user}:***@{host}"
    if question:
        query = _SECRET_PARAMETER.sub(r"\1***", query)
    return f"{scheme}://{base}{question}{query}"


#: A libpq parameter holding a secret, in a URL's query (its value up to ``&`` or ``#``).
_SECRET_PARAMETER = re.compile(r"(?i)((?:^|&)(?:ssl)?password=)[^&#]*")


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
