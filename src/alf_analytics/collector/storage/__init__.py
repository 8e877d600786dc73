"""Collector storage: one interface (:class:`Store`), SQLite and PostgreSQL backends."""

from __future__ import annotations

from ..settings import CollectorError, TokenSet
from .base import SaveRequest, SaveResult, Store, hash_key, masked_url

__all__ = [
    "SaveRequest",
    "SaveResult",
    "STORAGE_RETRY_AFTER",
    "Store",
    "hash_key",
    "is_postgres_url",
    "is_storage_failure",
    "masked_url",
    "open_store",
]


#: The ``Retry-After`` (seconds) of every 503 that a storage failure answers: ingest, the query
#: API and /health.
STORAGE_RETRY_AFTER = "5"


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be used right now (a 503, not a 500): ours,
    or one of the drivers' own (sqlite3, psycopg, its pool)."""
    return isinstance(exc, CollectorError) or type(exc).__module__.split(".")[0] in (
        "sqlite3",
        "psycopg",
        "psycopg_pool",
    )


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str, *, tokens: TokenSet | None = None, pool_size: int = 4) -> Store:
    """The store for ``db``: a ``postgresql://`` URL, else an SQLite path (or ``:memory:``).

    The schema is created or migrated on open. Raises :class:`CollectorError` when the
    database cannot be used.
    """
    if is_postgres_url(db):
        try:
            from .postgres import PostgresStore
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise CollectorError(
                "PostgreSQL storage needs psycopg: pip install 'alf-analytics[postgres]'"
            ) from exc
        return PostgresStore(db, tokens=tokens, pool_size=pool_size)
    from .sqlite import SQLiteStore

    return SQLiteStore(db, tokens=tokens)
