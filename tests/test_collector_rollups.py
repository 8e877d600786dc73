"""Rollup answers equal raw-entry answers, on both backends, over random data.

Every aggregate the API gives (stats with its series, endpoints, consumers, services) is
computed twice: as the API computes it (per-minute and hourly rollups, entries at the
edges) and from the entries alone (a ``path="/"`` filter, which every entry matches and
which no rollup carries, forces that). They must be equal, before and after the past
hours are summed into hourly rows, and after late entries arrive for a summed hour. The
slowest-requests listing (found above a latency bucket the histogram gives) must equal a
sort of all the entries.
"""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from alf_analytics.collector import queries
from alf_analytics.collector.ingest import prepare
from alf_analytics.collector.settings import Limits, TokenSet, mask
from alf_analytics.collector.storage import SaveRequest, Store, open_store
from alf_analytics.collector.storage.base import SCHEMA_VERSION
from tests.pg import pg_server, store, store_db

__all__ = ["pg_server", "store", "store_db"]  # fixtures, imported for pytest

_ROUTES = [("GET", "/items/{}"), ("POST", "/items"), ("GET", "/users/{}/orders"), ("PUT", "/x")]
_STATUSES = [200, 200, 200, 201, 204, 301, 400, 404, 500, 503]
_NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
_BASE = _NOW - timedelta(hours=8)  # the data: 6 hours, all compactable


def _entry(rng: random.Random, started: datetime, consumer: bool) -> dict[str, Any]:
    method, route = rng.choice(_ROUTES)
    path = route.format(rng.randint(1, 50))
    headers = [{"name": "accept", "value": "*/*"}]
    if consumer:
        headers.append({"name": "x-alf-consumer", "value": f"c{rng.randint(1, 4)}"})
    # Durations over 5 decades, ties included (rounded), so that buckets and order matter.
    time_ms = round(10 ** rng.uniform(-1, 4), rng.choice([0, 1, 3]))
    return {
        "startedDateTime": started.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "time": time_ms,
        "request": {
            "method": method,
            "url": f"http://api.test{path}?q=1",
            "httpVersion": "HTTP/1.1",
            "queryString": [{"name": "q", "value": "1"}],
            "headers": headers,
            "headersSize": 100,
            "bodyCaptured": False,
            "bodySize": rng.choice([0, 10, 300]),
        },
        "response": {
            "status": rng.choice(_STATUSES),
            "statusText": "",
            "httpVersion": "HTTP/1.1",
            "headers": [],
            "headersSize": 100,
            "bodyCaptured": False,
            "bodySize": rng.randint(0, 5000),
        },
        "timings": {"send": 0, "wait": time_ms, "receive": 0},
    }


def _save(store: Store, rng: random.Random, times: list[datetime]) -> None:
    """Entries at ``times``, in ALF objects of two services (one with two environments)."""
    for start in range(0, len(times), 50):
        alfs = []
        for token, environment in (("svc-a", "prod"), ("svc-a", "dev"), ("svc-b", None)):
            entries = [
                _entry(rng, moment, consumer=token != "svc-b")
                for moment in times[start : start + 50]
                if rng.random() < 0.5
            ]
            if entries:
                alf: dict[str, Any] = {
                    "version": "1.1.0",
                    "serviceToken": token,
                    "har": {"log": {"creator": {"name": "t", "version": "1"}, "entries": entries}},
                }
                if environment:
                    alf["environment"] = environment
                alfs.append(alf)
        save_alfs(store, alfs)


def save_alfs(store: Store, alfs: list[dict[str, Any]]) -> None:
    """Store the entries of ``alfs`` as the collector does for one valid batch request."""
    body = json.dumps(alfs).encode()
    prepared = prepare(body, version="1.1.0", kind="batch", tokens=TokenSet(), limits=Limits())
    assert not prepared.errors, prepared.errors
    store.save(SaveRequest(prepared.groups, 0, 200, "{}"))


def _random_times(rng: random.Random, count: int, hours: float) -> list[datetime]:
    return [_BASE + timedelta(seconds=rng.random() * hours * 3600) for _ in range(count)]


def _ranges(rng: random.Random) -> list[tuple[datetime | None, datetime | None]]:
    spans: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (_BASE, _BASE + timedelta(hours=3)),  # whole hours
        (_BASE - timedelta(days=1), None),
    ]
    for _ in range(4):
        low = _BASE + timedelta(seconds=rng.random() * 6 * 3600)
        spans.append((low, low + timedelta(seconds=rng.random() * 4 * 3600)))
    return spans


def _compare(store: Store, rng: random.Random) -> int:
    """Every aggregate via rollups == via entries; returns how many were compared."""
    compared = 0
    for since, until in _ranges(rng):
        for extra in (
            {},
            {"status": "5xx"},
            {"service": "svc-a"},
            {"service": "svc-a", "environment": "prod"},
            {"method": "GET", "route": "/items/{id}"},
            {"consumer": "c2"},
        ):
            fast = queries.Filters.create(since=since, until=until, **extra)
            raw = queries.Filters.create(since=since, until=until, path="/", **extra)
            for interval in (60, 300, 900, 1800, 3600, 7200):
                assert queries.stats(store, fast, interval) == queries.stats(store, raw, interval)
            if "consumer" not in extra:
                assert queries.endpoints(store, fast) == queries.endpoints(store, raw)
            if "method" not in extra:
                assert queries.consumers(store, fast) == queries.consumers(store, raw)
            slowest = queries.entries(store, fast, limit=7, sort="slowest")
            assert slowest == queries.entries(store, raw, limit=7, sort="slowest")
            if slowest["next_cursor"]:  # the next page too (a cursor below a bucket)
                cursor = slowest["next_cursor"]
                following = queries.entries(store, fast, limit=7, cursor=cursor, sort="slowest")
                assert following == queries.entries(
                    store, raw, limit=7, cursor=cursor, sort="slowest"
                )
            compared += 1
        plain = queries.Filters.create(since=since, until=until)
        assert queries.services(store, plain) == _services_raw(store, plain)
    return compared


def _services_raw(store: Store, filters: queries.Filters) -> dict[str, Any]:
    rows = store.fetchall(
        "SELECT s.name, s.token, s.token_id, s.environment, COUNT(*), "
        "SUM(CASE WHEN e.status >= 400 THEN 1 ELSE 0 END), MIN(e.started), MAX(e.started) "
        "FROM entries e JOIN streams s ON s.id = e.stream_id "
        "WHERE e.started >= ? AND e.started < ? GROUP BY s.id, s.name, s.token, s.token_id, "
        "s.environment",
        [filters.since if filters.since is not None else -(2**62),
         filters.until if filters.until is not None else 2**62],
    )  # fmt: skip
    answer = [
        {
            "service": name or mask(token),
            "service_token_id": token_id,
            "environment": environment,
            "count": int(count),
            "errors": int(errors),
            "first_seen": queries.iso(int(first)),
            "last_seen": queries.iso(int(last)),
        }
        for name, token, token_id, environment, count, errors, first, last in rows
    ]
    answer.sort(key=lambda s: (-s["count"], s["service"], s["environment"] or ""))
    return {"services": answer}


def test_rollups_equal_entries_before_and_after_hours_are_summed(store: Store) -> None:
    rng = random.Random(20261202)
    _save(store, rng, _random_times(rng, 1_500, hours=6))
    assert store.scalar("SELECT COUNT(*) FROM agg_hours") == 0
    assert _compare(store, rng) > 0

    summed = store.compact()
    assert summed == 6  # the six past hours of data; the hours after them have none
    assert store.compact() == 0  # once
    hours = [int(r[0]) for r in store.fetchall("SELECT minute FROM agg_hours ORDER BY minute")]
    first = int(_BASE.timestamp()) // 60
    assert hours == [first + 60 * i for i in range(6)]
    for summed in ("agg_hour", "agg_quarter", "agg_consumer_hour", "agg_consumer_quarter"):
        minutes = "agg_consumer" if "consumer" in summed else "agg_minute"
        assert store.scalar(f"SELECT SUM(n) FROM {summed}") == store.scalar(
            f"SELECT SUM(n) FROM {minutes}"
        )
    _compare(store, rng)

    # Late entries for summed hours (an agent that was offline) go into both tiers.
    _save(store, rng, _random_times(rng, 300, hours=2))
    for summed in ("agg_hour", "agg_quarter"):
        assert store.scalar(f"SELECT SUM(n) FROM {summed}") == store.scalar(
            "SELECT COUNT(*) FROM entries"
        )
    _compare(store, rng)


def test_hours_are_summed_only_once_they_are_over(store: Store) -> None:
    rng = random.Random(7)
    current = datetime.now(timezone.utc)
    _save(store, rng, [current - timedelta(seconds=rng.random() * 60) for _ in range(100)])
    assert store.compact() == 0  # this hour (and the last one, for a few minutes) stay
    fast = queries.Filters.create(since=current - timedelta(hours=2))
    raw = queries.Filters.create(since=current - timedelta(hours=2), path="/")
    assert queries.stats(store, fast, 3600) == queries.stats(store, raw, 3600)
    assert queries.stats(store, fast)["count"] == store.scalar("SELECT COUNT(*) FROM entries")


def test_retention_purges_hourly_rollups_with_their_hours(store: Store) -> None:
    rng = random.Random(3)
    _save(store, rng, _random_times(rng, 400, hours=4))
    assert store.compact() == 4
    cut = _BASE + timedelta(hours=2, minutes=30)
    while store.purge(int(cut.timestamp() * 1_000_000)):
        pass
    first_kept = int(_BASE.timestamp()) // 60 + 120  # the hour holding the cut stays
    assert [int(r[0]) for r in store.fetchall("SELECT minute FROM agg_hours ORDER BY minute")] == [
        first_kept,
        first_kept + 60,
    ]
    assert store.scalar("SELECT MIN(minute) FROM agg_hour") == first_kept
    # From the next whole hour on, rollups and entries still agree.
    since = _BASE + timedelta(hours=3)
    fast = queries.Filters.create(since=since)
    raw = queries.Filters.create(since=since, path="/")
    assert queries.stats(store, fast, 3600) == queries.stats(store, raw, 3600)
    assert queries.endpoints(store, fast) == queries.endpoints(store, raw)


@pytest.mark.parametrize("compacted", [True, False])
def test_after_a_purge_every_aggregate_counts_only_the_remaining_entries(
    store: Store, compacted: bool
) -> None:
    rng = random.Random(11)
    _save(store, rng, _random_times(rng, 600, hours=6))
    if compacted:
        assert store.compact() == 6
    cut = _BASE + timedelta(hours=2, minutes=37, seconds=13)  # mid-minute, mid-hour
    while store.purge(int(cut.timestamp() * 1_000_000)):
        pass
    # Whole hours go: entries of the hour holding the cut stay, with their rollup rows.
    boundary = int((_BASE + timedelta(hours=2)).timestamp() * 1_000_000)
    assert store.scalar("SELECT MIN(started) FROM entries") >= boundary
    hour_after = boundary + 3_600_000_000
    assert store.scalar("SELECT COUNT(*) FROM entries WHERE started < ?", [hour_after])
    left = store.scalar("SELECT COUNT(*) FROM entries")
    for table in ("agg_minute", *(("agg_hour", "agg_quarter") if compacted else ())):
        assert store.scalar(f"SELECT SUM(n) FROM {table}") == left
    everything = queries.Filters.create()
    for interval in (60, 900, 3600):
        assert queries.stats(store, everything, interval)["count"] == left
    assert sum(s["count"] for s in queries.services(store, everything)["services"]) == left
    assert _compare(store, rng) > 0


@pytest.mark.parametrize("version", [2, 3])
def test_older_schemas_are_migrated_on_open(tmp_path: Path, version: int) -> None:
    path = str(tmp_path / f"v{version}.sqlite")
    rng = random.Random(5)
    store = open_store(path)
    _save(store, rng, _random_times(rng, 200, hours=3))
    count = store.scalar("SELECT COUNT(*) FROM entries")
    store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE dictionaries")  # what version 3 had not
    if version == 2:  # nor the hourly tables and the bucket index
        for table in ("agg_hour", "agg_consumer_hour", "agg_quarter", "agg_consumer_quarter",
                      "agg_hours"):  # fmt: skip
            db.execute(f"DROP TABLE {table}")
        db.execute("DROP INDEX entries_bucket")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()

    store = open_store(path)
    try:
        assert store.scalar("PRAGMA user_version") == SCHEMA_VERSION == 4
        assert store.scalar("SELECT COUNT(*) FROM dictionaries") == 0
        assert store.scalar("SELECT COUNT(*) FROM entries") == count
        assert store.compact() == 3
        assert store.scalar("SELECT SUM(n) FROM agg_hour") == count
        _compare(store, rng)
    finally:
        store.close()
