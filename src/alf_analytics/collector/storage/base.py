"""The storage interface, the schema both backends share, and the one write path.

Tables (the same in SQLite and PostgreSQL, column types aside):

- ``streams``: one row per (service token, environment) seen, with the token's id and name;
- ``creators``: the distinct ``har.log.creator`` objects;
- ``ingests``: one row per stored request: its idempotency key (hashed), the digest of its
  body and its answer, so that a repeat is answered the same without storing twice;
- ``entries``: one row per stored entry with its indexed columns, and ``entry_data`` the
  entry itself (its JSON compressed with zstd), apart so that scans of entries stay narrow;
- ``agg_minute`` and ``agg_consumer``: per-minute rollups maintained in the same transaction
  as the entries (counts, latency histogram buckets, bytes), so aggregates over millions of
  entries read thousands of rows.

Times are integers: microseconds since the epoch (``started``, ``received``) and minutes
since the epoch (rollups). SQL is written once with ``?`` placeholders; each backend runs it.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
import zstandard

from ..ingest import AlfGroup
from ..settings import TokenSet

__all__ = [
    "SCHEMA_VERSION",
    "SaveRequest",
    "SaveResult",
    "Store",
    "Transaction",
    "schema_statements",
]

SCHEMA_VERSION: Final = 2
"""Version 1 was the old ``http.server`` collector's (requests/alfs/entries tables)."""

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
# One index on entries (random-order indexes cost more at ingest than they save in queries:
# aggregates read the rollups; listings walk `started` newest first and filter as they go).
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS entries_started ON entries (started)",
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


_INSERT_ENTRY: Final = (
    "INSERT INTO entries (id, stream_id, ingest_id, alf_index, alf_version, creator_id, "
    "received, started, method, host, path, route, status, time_ms, bucket, request_bytes, "
    "response_bytes, client_ip, consumer) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DATA: Final = "INSERT INTO entry_data (id, entry) VALUES (?, ?)"


def decode_entry(blob: bytes | memoryview) -> dict[str, Any]:
    """The entry stored as ``blob`` (zstd-compressed JSON)."""
    decoded: dict[str, Any] = orjson.loads(_decompressor().decompress(bytes(blob)))
    return decoded


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


_UPSERT_MINUTE: Final = (
    "INSERT INTO agg_minute (minute, stream_id, method, route, status, bucket, n, time_sum, "
    "bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (minute, stream_id, method, route, status, bucket) DO UPDATE SET "
    "n = agg_minute.n + excluded.n, time_sum = agg_minute.time_sum + excluded.time_sum, "
    "bytes_in = agg_minute.bytes_in + excluded.bytes_in, "
    "bytes_out = agg_minute.bytes_out + excluded.bytes_out"
)
_UPSERT_CONSUMER: Final = (
    "INSERT INTO agg_consumer (minute, stream_id, consumer, status, bucket, n, time_sum, "
    "bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (minute, stream_id, consumer, status, bucket) DO UPDATE SET "
    "n = agg_consumer.n + excluded.n, time_sum = agg_consumer.time_sum + excluded.time_sum, "
    "bytes_in = agg_consumer.bytes_in + excluded.bytes_in, "
    "bytes_out = agg_consumer.bytes_out + excluded.bytes_out"
)


@dataclass(frozen=True)
class SaveRequest:
    """Everything one request stores, in one transaction."""

    groups: Sequence[AlfGroup]
    received: int  # microseconds since the epoch
    status: int
    answer: str  # the JSON answer, replayed for a repeated idempotency key
    key_hash: str | None = None
    digest: str | None = None


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


class Store(ABC):
    """One collector database. Thread-safe; each method is one short transaction.

    ``tokens`` gives the names of named service tokens (stored with their streams).
    """

    dialect: str = ""

    def __init__(self, tokens: TokenSet | None = None) -> None:
        self.tokens = tokens if tokens is not None else TokenSet()
        self._ids_lock = threading.Lock()
        self._stream_ids: dict[str, int] = {}
        self._creator_ids: dict[bytes, int] = {}

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

    # -- writing ------------------------------------------------------------------------

    def find_answer(self, key_hash: str) -> SaveResult | None:
        """The answer stored for an idempotency key, if it is still remembered."""
        row = self.fetchone(
            "SELECT status, answer, digest FROM ingests WHERE key_hash = ?", [key_hash]
        )
        if row is None:
            return None
        return SaveResult(int(row[0]), str(row[1]), row[2], replayed=True)

    def save(self, request: SaveRequest) -> SaveResult:
        """Store the groups' entries and rollups and the request's answer, atomically."""
        new_streams: dict[str, int] = {}
        new_creators: dict[bytes, int] = {}
        with self.transaction() as tx:
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
            entries: list[tuple[Any, ...]] = []
            blobs: list[bytes] = []
            minutes: dict[tuple[Any, ...], list[float]] = {}
            consumers: dict[tuple[Any, ...], list[float]] = {}
            for group in request.groups:
                stream_id = self._stream_id(tx, group.token, group.environment, new_streams)
                creator_id = self._creator_id(tx, group.creator, new_creators)
                for entry_row in group.rows:
                    entries.append(
                        (
                            stream_id,
                            ingest_id,
                            group.index,
                            group.version,
                            creator_id,
                            request.received,
                            entry_row.started,
                            entry_row.method,
                            entry_row.host,
                            entry_row.path,
                            entry_row.route,
                            entry_row.status,
                            entry_row.time_ms,
                            entry_row.bucket,
                            entry_row.request_bytes,
                            entry_row.response_bytes,
                            entry_row.client_ip,
                            entry_row.consumer,
                        )
                    )
                    blobs.append(entry_row.entry)
                    minute = entry_row.started // 60_000_000
                    key = (
                        minute,
                        stream_id,
                        entry_row.method,
                        entry_row.route,
                        entry_row.status,
                        entry_row.bucket,
                    )
                    _add(
                        minutes,
                        key,
                        entry_row.time_ms,
                        entry_row.request_bytes,
                        entry_row.response_bytes,
                    )
                    if entry_row.consumer is not None:
                        consumer_key = (
                            minute,
                            stream_id,
                            entry_row.consumer,
                            entry_row.status,
                            entry_row.bucket,
                        )
                        _add(
                            consumers,
                            consumer_key,
                            entry_row.time_ms,
                            entry_row.request_bytes,
                            entry_row.response_bytes,
                        )
            ids = tx.reserve_ids(len(entries))
            compressor = zstandard.ZstdCompressor(level=1)
            tx.executemany(_INSERT_ENTRY, [(i, *row) for i, row in zip(ids, entries, strict=True)])
            tx.executemany(
                _INSERT_DATA,
                [(i, compressor.compress(data)) for i, data in zip(ids, blobs, strict=True)],
            )
            # Sorted keys: concurrent writers (PostgreSQL) lock rollup rows in the same order.
            tx.executemany(_UPSERT_MINUTE, [(*k, *_ints(v)) for k, v in sorted(minutes.items())])
            if consumers:
                tx.executemany(
                    _UPSERT_CONSUMER, [(*k, *_ints(v)) for k, v in sorted(consumers.items())]
                )
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

    def purge(self, before: int, *, chunk: int = 5_000) -> int:
        """Delete up to ``chunk`` entries started before ``before`` (µs), and old rollups.

        Returns how many rows were deleted; call again until it returns 0. Each call is one
        short transaction, so ingest is never held for long.
        """
        minute = before // 60_000_000
        ids = [
            int(row[0])
            for row in self.fetchall(
                "SELECT id FROM entries WHERE started < ? ORDER BY started LIMIT ?", [before, chunk]
            )
        ]
        with self.transaction() as tx:
            deleted = 0
            if ids:
                listed = ", ".join(map(str, ids))
                tx.execute(f"DELETE FROM entry_data WHERE id IN ({listed})")
                tx.execute(f"DELETE FROM entries WHERE id IN ({listed})")
                deleted = self._changes(tx)
            for table in ("agg_minute", "agg_consumer"):
                row = tx.fetchone(f"SELECT MIN(minute) FROM {table}")
                oldest = row[0] if row else None
                if oldest is not None and oldest < minute:
                    # An hour of rollups per call: a few thousand rows at most.
                    tx.execute(f"DELETE FROM {table} WHERE minute < ?", [min(minute, oldest + 60)])
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
        """Delete everything stored (the schema stays)."""
        with self.transaction() as tx:
            for table in reversed(TABLE_NAMES):
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


def _ints(values: list[float]) -> tuple[int, float, int, int]:
    return int(values[0]), float(values[1]), int(values[2]), int(values[3])


def masked_url(url: str) -> str:
    """A database URL without its password."""
    if "://" not in url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user, _, password = credentials.partition(":")
    return f"{scheme}://{user}:***@{host}" if password else url


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
