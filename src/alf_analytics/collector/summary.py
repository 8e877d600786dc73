"""``alf-analytics summary``: entries grouped by environment, method, path and status."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .settings import CollectorError
from .storage import Store, is_postgres_url, open_store

__all__ = ["Summary", "SummaryRow", "summarize", "summarize_store"]


@dataclass(frozen=True)
class SummaryRow:
    """Entries grouped by (environment, method, path, status), with ``time`` percentiles in ms.

    Percentiles use the nearest-rank method over the exact stored times, so every value is
    one that was observed.
    """

    environment: str | None
    method: str | None
    path: str | None
    status: int | None
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return {
            "environment": self.environment,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
        }


@dataclass(frozen=True)
class Summary:
    """What a collector database holds: grouped rows plus totals.

    ``service_tokens`` counts the distinct tokens and ``streams`` the distinct
    (token, environment) pairs among stored entries.
    """

    rows: tuple[SummaryRow, ...]
    entries: int
    service_tokens: int
    streams: int

    def as_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict: ``{"rows": [...], "totals": {...}}``."""
        return {
            "rows": [row.as_dict() for row in self.rows],
            "totals": {
                "entries": self.entries,
                "service_tokens": self.service_tokens,
                "streams": self.streams,
            },
        }


def _percentile(sorted_values: Sequence[float], percent: int) -> float:
    rank = max(1, -(-percent * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def summarize_store(store: Store) -> Summary:
    """The summary of an open store."""
    groups: dict[tuple[str | None, str, str, int], list[float]] = {}
    rows = store.fetchall(
        "SELECT s.environment, e.method, e.path, e.status, e.time_ms FROM entries e "
        "JOIN streams s ON s.id = e.stream_id"
    )
    for environment, method, path, status, time_ms in rows:
        groups.setdefault((environment, method, path, int(status)), []).append(float(time_ms))

    def sort_key(key: tuple[str | None, str, str, int]) -> tuple[Any, ...]:
        return tuple((part is not None, part if part is not None else "") for part in key)

    summary_rows = []
    for key in sorted(groups, key=sort_key):
        times = sorted(groups[key])
        summary_rows.append(
            SummaryRow(
                *key,
                count=len(times),
                p50=_percentile(times, 50),
                p90=_percentile(times, 90),
                p99=_percentile(times, 99),
                max=times[-1],
            )
        )
    streams = store.fetchall(
        "SELECT token FROM streams WHERE id IN (SELECT DISTINCT stream_id FROM entries)"
    )
    return Summary(
        rows=tuple(summary_rows),
        entries=sum(row.count for row in summary_rows),
        service_tokens=len({row[0] for row in streams}),
        streams=len(streams),
    )


def summarize(db: str) -> Summary:
    """Summarise a collector database (an SQLite file or a ``postgresql://`` URL).

    The collector may be running. Raises ``FileNotFoundError`` when an SQLite file does not
    exist and :class:`CollectorError` when the database is not a collector's.
    """
    if not is_postgres_url(db) and not os.path.isfile(db):
        raise FileNotFoundError(f"no such database file: {db}")
    store = open_store(db)
    try:
        return summarize_store(store)
    except CollectorError:
        raise
    except Exception as exc:
        raise CollectorError(f"cannot read {store.display_name}: {exc}") from exc
    finally:
        store.close()
