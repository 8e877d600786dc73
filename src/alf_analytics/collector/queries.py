"""The query layer: one source of truth for the JSON API and the dashboard.

Each function takes a :class:`~.storage.Store` and :class:`Filters` and returns the JSON
dict of its ``/api`` endpoint. Aggregates (stats, endpoints, consumers, services) read the
per-minute rollups for whole minutes inside the time range and the entries themselves for
the partial minutes at its edges, so they are exact about the range and fast however many
entries are stored. Filters that rollups do not carry (``path``, or ``consumer`` together
with ``method``/``route``) are answered from the entries. Percentiles come from latency
histograms with 8 buckets per doubling: a reported p95 is within about 5% of the exact one.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Final

from .ingest import MAX_BUCKET, MAX_STARTED, MIN_STARTED, bucket_of, bucket_value, text_column
from .settings import mask
from .storage import Store
from .storage.base import INT64_MAX, TIERS

__all__ = [
    "FilterError",
    "Filters",
    "consumers",
    "endpoints",
    "entries",
    "entry_detail",
    "entry_har",
    "har_export",
    "services",
    "stats",
]

_MINUTE: Final = 60_000_000
_MIN_INT64: Final = -(2**63)
MAX_LIMIT: Final = 1_000
MAX_EXPORT: Final = 10_000
_MAX_SERIES_POINTS: Final = 2_000
# A code in 1 to 3 ASCII digits (0 to 999; "099" is 99) or a class, one digit and "xx" in
# either case ("0xx" is 0 to 99: agents record 0 when the client left before the answer).
# Not r"\d": it and int() take other digits too ("٤٠٤" would have filtered by 404).
_STATUS: Final = re.compile(r"([0-9])[xX]{2}|([0-9]{1,3})")
ENDPOINT_SORTS: Final = ("count", "errors", "error_rate", "p50", "p95", "p99")


class FilterError(ValueError):
    """A query parameter has a value the API does not accept (answered 400)."""


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND: Final = timedelta(microseconds=1)


def _in_range(name: str, text: object, micros: int | float) -> int:
    """``micros`` when a stored time can be in it (years 0001 to 9999 in UTC), else a 400.

    The API and the dashboard read ``since`` and ``until`` here, so they refuse alike."""
    if not MIN_STARTED <= micros <= MAX_STARTED:
        raise FilterError(
            f"{name}: {str(text)[:40]!r} is outside the years 0001 to 9999 (in UTC), "
            "the times this collector can store"
        )
    return int(micros)


def _parse_time(name: str, text: str) -> int:
    """Microseconds since the epoch from epoch seconds or an ISO 8601 date-time."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise FilterError(f"{name}: {text[:40]!r} is out of range")
        return _in_range(name, text, seconds * 1_000_000)
    try:
        moment = _fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise FilterError(
            f"{name}: {text[:40]!r} is neither epoch seconds nor an ISO 8601 date-time"
        ) from None
    return _in_range(name, text, _datetime_micros(moment))


# Before Python 3.11 ``datetime.fromisoformat`` read only what ``isoformat()`` writes: 3 or 6
# digits of fraction, a "+HH:MM" offset, the extended date. What 3.11 reads besides (a fraction
# of any length, with "." or ",", "+HH" and "+HHMM" offsets, the basic "20261201T000000", week
# dates "2026-W49-2") is rewritten into that form: every Python takes the same ``since``/``until``.
_ISO_FALLBACK: Final = re.compile(
    r"(?:([0-9]{4})-?([0-9]{2})-?([0-9]{2})|([0-9]{4})-?W([0-9]{2})(?:-?([0-9]))?)"
    r"(?:[^0-9]([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2})(?:[.,]([0-9]+))?)?)?"
    r"(?:([+-])([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2})(?:[.,]([0-9]+))?)?)?)?)?"
)


def _fromisoformat(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        match = _ISO_FALLBACK.fullmatch(value)
        if match is None:
            raise
    year, month, day, week_year, week, weekday, hour, minute, second, fraction, sign, *offset = (
        match.groups()
    )
    if week_year:
        day_of = date.fromisocalendar(int(week_year), int(week), int(weekday or 1))
        year, month, day = f"{day_of.year:04}", f"{day_of.month:02}", f"{day_of.day:02}"
    text = f"{year}-{month}-{day}T{hour or '00'}:{minute or '00'}:{second or '00'}"
    text += f".{(fraction or '')[:6]:0<6}"
    if sign:
        off_hour, off_minute, off_second, off_fraction = offset
        text += f"{sign}{off_hour}:{off_minute or '00'}:{off_second or '00'}"
        text += f".{(off_fraction or '')[:6]:0<6}"
    return datetime.fromisoformat(text)


def _datetime_micros(moment: datetime) -> int:
    """Exactly (no float), and for any offset: ``0001-01-01T00:00:00+14:00`` is year 0 in UTC."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def to_micros(value: datetime | float | int | str | None, name: str = "time") -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _in_range(name, value, _datetime_micros(value))
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise FilterError(f"{name}: {value!r} is out of range")
        return _in_range(name, value, value * 1_000_000)
    return _parse_time(name, value)


def utc_datetime(micros: int) -> datetime:
    """The UTC datetime of microseconds since the epoch, exactly (no float).

    Never fails: a time outside the years 0001 to 9999 (which a database written before
    ingest refused them may hold) reads as the nearest one inside.
    """
    return _EPOCH + timedelta(microseconds=min(max(int(micros), MIN_STARTED), MAX_STARTED))


def iso(micros: int | None) -> str | None:
    """An ISO 8601 UTC time (milliseconds) from microseconds since the epoch."""
    if micros is None:
        return None
    return utc_datetime(micros).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(name: str, value: str | None, limit: int = 2048) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > limit:
        raise FilterError(f"{name} is longer than {limit} characters")
    return text_column(value)  # a NUL matches what ingest stored for it (U+FFFD)


def _environment(value: str | None) -> str | None:
    return text_column(value) if value is not None else None


@dataclass(frozen=True)
class Filters:
    """What to look at. ``status`` is an inclusive range: ``"500"`` is (500, 500), ``"5xx"``
    (500, 599), ``"0"`` (0, 0) and ``"0xx"`` (0, 99); any code 0 to 999 or class 0xx to 9xx.

    ``service`` matches a service token's id (``service_token_id`` in answers), its name,
    or the token itself; ``environment`` matches exactly; ``path`` is a prefix of the
    request path; ``route`` a route template (``/items/{id}``); ``since`` and ``until``
    bound ``startedDateTime`` (since inclusive, until exclusive).
    """

    service: str | None = None
    environment: str | None = None
    since: int | None = None
    until: int | None = None
    status: tuple[int, int] | None = None
    method: str | None = None
    path: str | None = None
    route: str | None = None
    consumer: str | None = None

    @classmethod
    def create(
        cls,
        *,
        service: str | None = None,
        environment: str | None = None,
        since: datetime | float | str | None = None,
        until: datetime | float | str | None = None,
        status: str | int | None = None,
        method: str | None = None,
        path: str | None = None,
        route: str | None = None,
        consumer: str | None = None,
    ) -> Filters:
        """Filters from Python values (datetimes, epoch seconds or ISO strings for times)."""
        return cls(
            service=_text("service", service, 256),
            environment=_environment(environment),
            since=to_micros(since, "since"),
            until=to_micros(until, "until"),
            status=_parse_status(str(status)) if status is not None else None,
            method=_text("method", method.upper() if method else None, 64),
            path=_text("path", path),
            route=_text("route", route),
            consumer=_text("consumer", consumer, 256),
        )

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> Filters:
        """Filters from a query string (the API's and the dashboard's parameter names)."""
        service = params.get("service") or params.get("service_token")
        times: dict[str, int | None] = {}
        for name in ("since", "until"):
            text = params.get(name)
            times[name] = _parse_time(name, text) if text else None
        status = params.get("status")
        method = params.get("method")
        return cls(
            service=_text("service", service, 256),
            environment=_environment(params.get("environment")),
            since=times["since"],
            until=times["until"],
            status=_parse_status(status) if status else None,
            method=_text("method", method.upper() if method else None, 64),
            path=_text("path", params.get("path")),
            route=_text("route", params.get("route")),
            consumer=_text("consumer", params.get("consumer"), 256),
        )

    def as_query(self) -> dict[str, str]:
        """The query-string form of these filters (for links)."""
        query: dict[str, str] = {}
        for name in ("service", "environment", "method", "path", "route", "consumer"):
            value = getattr(self, name)
            if value is not None:
                query[name] = value
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                query[name] = iso(value) or ""
        if self.status is not None:
            low, high = self.status  # a code is (n, n); a class (n00, n99), never one value
            query["status"] = str(low) if low == high else f"{low // 100}xx"
        return query


def _parse_status(text: str) -> tuple[int, int]:
    """``"404"`` -> (404, 404), ``"4xx"`` -> (400, 499), ``"0xx"`` -> (0, 99), else a 400."""
    match = _STATUS.fullmatch(text.strip())
    if match is None:
        raise FilterError(
            f"status: {text[:20]!r} is neither a code (0 to 999, such as 404) "
            "nor a class (0xx to 9xx, such as 4xx)"
        )
    if match.group(1) is not None:
        low = int(match.group(1)) * 100
        return low, low + 99
    code = int(match.group(2))
    return code, code


_WHOLE: Final = re.compile(r"[0-9]{1,18}")


def whole_number(text: str, low: int, high: int) -> int | None:
    """``text`` as an integer from ``low`` to ``high`` when it is one in ASCII digits, else
    ``None``: ``str.isdigit`` also takes ``①`` and ``²`` (which ``int`` refuses) and
    thousands of digits (which ``int`` refuses past 4,300), both once a 500."""
    if _WHOLE.fullmatch(text) is None:
        return None
    value = int(text)
    return value if low <= value <= high else None


def parse_limit(text: str | None, default: int, maximum: int = MAX_LIMIT) -> int:
    if text is None or text == "":
        return default
    value = whole_number(text, 1, maximum)
    if value is None:
        raise FilterError(f"limit must be an integer from 1 to {maximum}")
    return value


# -- where clauses ----------------------------------------------------------------------------


#: A ``service`` filter names a service by its id, its name or its token.
_SERVICE_MATCH: Final = "(token_id = ? OR name = ? OR token = ?)"


def service_id(store: Store, service: str) -> str | None:
    """The id of the service that a ``service`` filter value names (None: none stored)."""
    rows = store.fetchall(f"SELECT token_id FROM streams WHERE {_SERVICE_MATCH}", [service] * 3)
    return str(rows[0][0]) if rows else None


def _stream_ids(store: Store, filters: Filters) -> list[int] | None:
    """The stream ids the service/environment filters allow (``None``: no such filter)."""
    if filters.service is None and filters.environment is None:
        return None
    where: list[str] = []
    params: list[Any] = []
    if filters.service is not None:
        where.append(_SERVICE_MATCH)
        params += [filters.service] * 3
    if filters.environment is not None:
        where.append("environment = ?")
        params.append(filters.environment)
    rows = store.fetchall(f"SELECT id FROM streams WHERE {' AND '.join(where)}", params)
    return [int(r[0]) for r in rows]


def _in(column: str, values: Sequence[int]) -> str:
    return f"{column} IN ({', '.join(str(int(v)) for v in values)})" if values else "1 = 0"


@dataclass
class _Where:
    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.clauses) if self.clauses else ""


def _common_where(where: _Where, filters: Filters, streams: list[int] | None, alias: str) -> None:
    p = f"{alias}." if alias else ""
    if streams is not None:
        where.add(_in(f"{p}stream_id", streams))
    if filters.status is not None:
        where.add(f"{p}status BETWEEN ? AND ?", *filters.status)


def _entry_where(
    filters: Filters,
    streams: list[int] | None,
    since: int | None,
    until: int | None,
    alias: str = "",
) -> _Where:
    p = f"{alias}." if alias else ""
    where = _Where()
    _common_where(where, filters, streams, alias)
    if since is not None:
        where.add(f"{p}started >= ?", since)
    if until is not None:
        where.add(f"{p}started < ?", until)
    if filters.method is not None:
        where.add(f"{p}method = ?", filters.method)
    if filters.route is not None:
        where.add(f"{p}route = ?", filters.route)
    if filters.consumer is not None:
        where.add(f"{p}consumer = ?", filters.consumer)
    if filters.path is not None:
        where.add(f"substr({p}path, 1, ?) = ?", len(filters.path), filters.path)
    return where


# -- aggregation ------------------------------------------------------------------------------


@dataclass
class Agg:
    """Counts and a latency histogram for one group of entries."""

    count: int = 0
    errors: int = 0
    client_errors: int = 0
    server_errors: int = 0
    time_sum: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    status_codes: dict[int, int] = field(default_factory=dict)

    def add(self, status: int, bucket: int, n: int, time_sum: float, b_in: int, b_out: int) -> None:
        self.count += n
        if 400 <= status <= 599:  # 4xx and 5xx; 0xx and 6xx to 9xx are no errors
            self.errors += n
            if status >= 500:
                self.server_errors += n
            else:
                self.client_errors += n
        self.time_sum += time_sum
        self.bytes_in = min(self.bytes_in + b_in, INT64_MAX)  # saturated, as the rollups
        self.bytes_out = min(self.bytes_out + b_out, INT64_MAX)
        self.histogram[bucket] = self.histogram.get(bucket, 0) + n
        self.status_codes[status] = self.status_codes.get(status, 0) + n

    def merge(self, other: Agg) -> None:
        self.count += other.count
        self.errors += other.errors
        self.client_errors += other.client_errors
        self.server_errors += other.server_errors
        self.time_sum += other.time_sum
        self.bytes_in = min(self.bytes_in + other.bytes_in, INT64_MAX)
        self.bytes_out = min(self.bytes_out + other.bytes_out, INT64_MAX)
        for bucket, n in other.histogram.items():
            self.histogram[bucket] = self.histogram.get(bucket, 0) + n
        for status, n in other.status_codes.items():
            self.status_codes[status] = self.status_codes.get(status, 0) + n

    def percentile(self, percent: float) -> float | None:
        """Nearest-rank percentile in ms (the middle of its latency bucket)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(percent / 100 * self.count))
        seen = 0
        for bucket in sorted(self.histogram):
            seen += self.histogram[bucket]
            if seen >= rank:
                return round(bucket_value(bucket), 3)
        return None  # pragma: no cover - the histogram sums to count

    @property
    def error_rate(self) -> float:
        return round(self.errors / self.count, 6) if self.count else 0.0

    def latency(self) -> dict[str, float | None]:
        return {"p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99)}


_DIMS: Final = {"method", "route", "consumer", "period", "stream_id"}


def _aggregate(
    store: Store, filters: Filters, dims: Sequence[str], period_minutes: int = 1
) -> dict[tuple[Any, ...], Agg]:
    """Aggregates grouped by ``dims`` (``method``, ``route``, ``consumer``, ``period``).

    ``period`` is the start of each ``period_minutes`` interval, in minutes since the epoch.
    """
    assert set(dims) <= _DIMS
    streams = _stream_ids(store, filters)
    results: dict[tuple[Any, ...], Agg] = {}
    if streams == []:
        return results
    by_consumer = "consumer" in dims or filters.consumer is not None
    by_endpoint = bool({"method", "route"} & set(dims)) or filters.method or filters.route
    raw_only = filters.path is not None or (by_consumer and by_endpoint)
    since, until = filters.since, filters.until
    raw_ranges: list[tuple[int | None, int | None]] = []
    if raw_only:
        raw_ranges.append((since, until))
    else:
        low = -(-since // _MINUTE) if since is not None else None  # first whole minute
        high = until // _MINUTE if until is not None else None  # end of the last whole one
        if low is not None and high is not None and low >= high:
            raw_ranges.append((since, until))
        else:
            table = "agg_consumer" if by_consumer else "agg_minute"
            # Summed hours are read per hour, or per quarter when the interval is shorter.
            size = next((n for n in TIERS if "period" not in dims or period_minutes % n == 0), None)
            hours, minutes = _tiers(store, low, high) if size else ([], [(low, high)])
            for low_m, high_m in hours:
                assert size is not None
                _rollup(store, TIERS[size][table], filters, streams, dims, period_minutes,
                        low_m, high_m, results)  # fmt: skip
            for low_m, high_m in minutes:
                _rollup(store, table, filters, streams, dims, period_minutes, low_m, high_m,
                        results)  # fmt: skip
            if since is not None and low is not None and since < low * _MINUTE:
                raw_ranges.append((since, low * _MINUTE))
            if until is not None and high is not None and high * _MINUTE < until:
                raw_ranges.append((high * _MINUTE, until))
    for low_us, high_us in raw_ranges:
        _raw(store, filters, streams, dims, period_minutes, low_us, high_us, results)
    return results


Span = tuple[int | None, int | None]


def _tiers(store: Store, low: int | None, high: int | None) -> tuple[list[Span], list[Span]]:
    """The whole minutes ``[low, high)`` as runs of summed hours, and the minutes between.

    An hour is read from the hourly rollups once :meth:`~.storage.Store.compact` has
    summed it (``agg_hours``), else from its minutes; both give the same answer.
    """
    where = _Where()
    if low is not None:
        where.add("minute >= ?", low)
    if high is not None:
        where.add("minute <= ?", high - 60)
    hours = [int(r[0]) for r in store.fetchall(f"SELECT minute FROM agg_hours{where.sql()}"
                                               " ORDER BY minute", where.params)]  # fmt: skip
    runs: list[list[int]] = []
    for hour in hours:
        if runs and runs[-1][1] == hour:
            runs[-1][1] = hour + 60
        else:
            runs.append([hour, hour + 60])
    minutes: list[Span] = []
    start: int | None = low
    for first, end in runs:
        if start is None or start < first:
            minutes.append((start, first))
        start = end
    if start is None or high is None or start < high:
        minutes.append((start, high))
    return [(first, end) for first, end in runs], minutes


def _dim_sql(dim: str, period_minutes: int, raw: bool) -> str:
    if dim == "period":
        minute = "(started / 60000000)" if raw else "minute"
        return (
            f"(({minute} / {period_minutes}) * {period_minutes})" if period_minutes > 1 else minute
        )
    return dim


def _collect(
    rows: Iterable[Sequence[Any]], n_dims: int, results: dict[tuple[Any, ...], Agg]
) -> None:
    for row in rows:
        key = tuple(row[:n_dims])
        agg = results.get(key)
        if agg is None:
            agg = results[key] = Agg()
        status, bucket, n, time_sum, b_in, b_out = row[n_dims:]
        agg.add(
            int(status), int(bucket), int(n), float(time_sum or 0), int(b_in or 0), int(b_out or 0)
        )


def _rollup(
    store: Store,
    table: str,
    filters: Filters,
    streams: list[int] | None,
    dims: Sequence[str],
    period_minutes: int,
    low: int | None,
    high: int | None,
    results: dict[tuple[Any, ...], Agg],
) -> None:
    where = _Where()
    _common_where(where, filters, streams, "")
    if low is not None:
        where.add("minute >= ?", low)
    if high is not None:
        where.add("minute < ?", high)
    if table in ("agg_minute", "agg_hour", "agg_quarter"):
        if filters.method is not None:
            where.add("method = ?", filters.method)
        if filters.route is not None:
            where.add("route = ?", filters.route)
    elif filters.consumer is not None:
        where.add("consumer = ?", filters.consumer)
    columns = [_dim_sql(d, period_minutes, raw=False) for d in dims]
    group = ", ".join([*columns, "status", "bucket"])
    sql = (
        f"SELECT {group}, SUM(n), SUM(time_sum), {store.sum_sql('bytes_in')}, "
        f"{store.sum_sql('bytes_out')} FROM {table}{where.sql()} GROUP BY {group}"
    )
    _collect(store.fetchall(sql, where.params), len(dims), results)


def _raw(
    store: Store,
    filters: Filters,
    streams: list[int] | None,
    dims: Sequence[str],
    period_minutes: int,
    since: int | None,
    until: int | None,
    results: dict[tuple[Any, ...], Agg],
) -> None:
    where = _entry_where(filters, streams, since, until)
    if "consumer" in dims:
        where.add("consumer IS NOT NULL")
    columns = [_dim_sql(d, period_minutes, raw=True) for d in dims]
    group = ", ".join([*columns, "status", "bucket"])
    sql = (
        f"SELECT {group}, COUNT(*), SUM(time_ms), {store.sum_sql('request_bytes')}, "
        f"{store.sum_sql('response_bytes')} FROM entries{where.sql()} GROUP BY {group}"
    )
    _collect(store.fetchall(sql, where.params), len(dims), results)


# -- the API's answers -----------------------------------------------------------------------


def services(store: Store, filters: Filters | None = None) -> dict[str, Any]:
    """Each (service, environment) seen, with entry counts and first and last seen times."""
    filters = filters or Filters()
    streams = _stream_ids(store, filters)
    rows = store.fetchall(
        "SELECT id, token, token_id, name, environment FROM streams"
        + (f" WHERE {_in('id', streams)}" if streams is not None else "")
    )
    counts = _aggregate(store, Filters(since=filters.since, until=filters.until), ["stream_id"])
    answer = []
    for stream_id, token, token_id, name, environment in rows:
        agg = counts.get((stream_id,))
        if agg is None or not agg.count:
            continue
        first, last = _seen(store, stream_id, filters.since, filters.until)
        answer.append(
            {
                "service": name or mask(token),
                "service_token_id": token_id,
                "environment": environment,
                "count": agg.count,
                "errors": agg.errors,
                "first_seen": iso(first),
                "last_seen": iso(last),
            }
        )
    answer.sort(key=lambda s: (-s["count"], s["service"], s["environment"] or ""))
    return {"services": answer}


def _seen(
    store: Store, stream_id: int, since: int | None, until: int | None
) -> tuple[int | None, int | None]:
    """First and last ``started`` of a stream: the rollups find the minutes, entries refine.

    Only a minute cut by ``since`` or ``until`` can hold no entry inside the range: then
    the next minute (the one before, for the last) with entries is the one.
    """
    low_minute = since // _MINUTE if since is not None else None
    high_minute = until // _MINUTE if until is not None else None
    result: list[int | None] = []
    for function in ("MIN", "MAX"):
        low, high = low_minute, high_minute
        value = None
        for _ in range(2):
            where = _Where()
            where.add("stream_id = ?", stream_id)
            if low is not None:
                where.add("minute >= ?", low)
            if high is not None:
                where.add("minute <= ?", high)
            minute = store.scalar(f"SELECT {function}(minute) FROM agg_minute{where.sql()}",
                                  where.params)  # fmt: skip
            if minute is None:
                break
            minute = int(minute)
            start = max(minute * _MINUTE, since) if since is not None else minute * _MINUTE
            end = (
                min((minute + 1) * _MINUTE, until) if until is not None else (minute + 1) * _MINUTE
            )
            value = store.scalar(
                f"SELECT {function}(started) FROM entries WHERE stream_id = ? "
                "AND started >= ? AND started < ?",
                [stream_id, start, end],
            )
            if value is not None:
                break
            if function == "MIN":
                low = minute + 1
            else:
                high = minute - 1
        result.append(int(value) if value is not None else None)
    return result[0], result[1]


def stats(store: Store, filters: Filters | None = None, interval: int = 60) -> dict[str, Any]:
    """Totals, error rate, latency percentiles, status breakdown and a time series."""
    filters = filters or Filters()
    if interval < 60 or interval % 60:
        raise FilterError("interval must be a multiple of 60 seconds")
    period = interval // 60
    groups = _aggregate(store, filters, ["period"], period)
    total = Agg()
    for agg in groups.values():
        total.merge(agg)
    classes: dict[str, int] = {}
    for status, n in sorted(total.status_codes.items()):
        name = f"{status // 100}xx"
        classes[name] = classes.get(name, 0) + n
    periods = sorted(int(key[0]) for key in groups)
    series = []
    if periods:
        first = periods[0]
        last = periods[-1]
        if filters.since is not None:
            first = min(first, (filters.since // _MINUTE // period) * period)
        if filters.until is not None:
            last = max(last, ((filters.until - 1) // _MINUTE // period) * period)
        steps = (last - first) // period + 1
        keys = range(first, last + 1, period) if steps <= _MAX_SERIES_POINTS else periods
        for minute in keys:
            agg = groups.get((minute,)) or Agg()
            series.append(
                {
                    "t": iso(minute * _MINUTE),
                    "count": agg.count,
                    "errors": agg.errors,
                    "client_errors": agg.client_errors,
                    "server_errors": agg.server_errors,
                    **agg.latency(),
                }
            )
    return {
        "count": total.count,
        "errors": total.errors,
        "error_rate": total.error_rate,
        **total.latency(),
        "mean": round(total.time_sum / total.count, 3) if total.count else None,
        "bytes_in": total.bytes_in,
        "bytes_out": total.bytes_out,
        "status_classes": classes,
        "status_codes": {str(code): n for code, n in sorted(total.status_codes.items())},
        "interval": interval,
        "series": series,
    }


def endpoints(
    store: Store, filters: Filters | None = None, sort: str = "count", limit: int = 100
) -> dict[str, Any]:
    """Per method and route template: count, errors, error rate, p50/p95/p99 (sorted desc)."""
    filters = filters or Filters()
    if sort not in ENDPOINT_SORTS:
        raise FilterError(f"sort must be one of {', '.join(ENDPOINT_SORTS)}")
    rows = []
    for (method, route), agg in _aggregate(store, filters, ["method", "route"]).items():
        rows.append(
            {
                "method": method,
                "route": route,
                "count": agg.count,
                "errors": agg.errors,
                "error_rate": agg.error_rate,
                **agg.latency(),
            }
        )
    rows.sort(key=lambda r: (-(r[sort] or 0), -r["count"], r["route"], r["method"]))
    return {"endpoints": rows[:limit]}


def consumers(store: Store, filters: Filters | None = None, limit: int = 100) -> dict[str, Any]:
    """Per consumer (entries that carry one): count, errors and p95."""
    filters = filters or Filters()
    rows = []
    for (consumer,), agg in _aggregate(store, filters, ["consumer"]).items():
        rows.append(
            {
                "consumer": consumer,
                "count": agg.count,
                "errors": agg.errors,
                "error_rate": agg.error_rate,
                "p95": agg.percentile(95),
            }
        )
    rows.sort(key=lambda r: (-r["count"], r["consumer"]))
    return {"consumers": rows[:limit]}


# -- entries ----------------------------------------------------------------------------------

_ROW_COLUMNS: Final = (
    "e.id, e.started, e.method, e.host, e.path, e.route, e.status, e.time_ms, "
    "e.request_bytes, e.response_bytes, e.consumer, e.client_ip, s.token, s.name, "
    "s.token_id, s.environment"
)


def _row(row: Sequence[Any]) -> dict[str, Any]:
    (entry_id, started, method, host, path, route, status, time_ms, b_in, b_out, consumer,
     client_ip, token, name, token_id, environment) = row  # fmt: skip
    return {
        "id": int(entry_id),
        "started": iso(int(started)),
        "method": method,
        "host": host,
        "path": path,
        "route": route,
        "status": int(status),
        "time_ms": float(time_ms),
        "request_bytes": int(b_in),
        "response_bytes": int(b_out),
        "consumer": consumer,
        "client_ip": client_ip,
        "service": name or mask(token),
        "service_token_id": token_id,
        "environment": environment,
    }


def _encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(":".join(str(p) for p in parts).encode()).decode().rstrip("=")


_MAX_CURSOR: Final = 200
_MIN_TIME_MS: Final = -1.0
_MAX_TIME_MS: Final = 1e12  # what ingest accepts as an entry's time


def _decode_cursor(cursor: str, kinds: tuple[type, ...]) -> tuple[Any, ...]:
    """The values of a cursor this API gave out: ``(started, id)`` or ``(time_ms, id)``.

    Anything else (garbage, ``inf``, ``nan``, a time no entry can have, an id that is not
    a positive 64-bit integer) is a 400 naming the cursor, never a 500.
    """
    refused = FilterError("cursor is not one this API gave out")
    if len(cursor) > _MAX_CURSOR:
        raise refused
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        parts = text.split(":")
        if len(parts) != len(kinds):
            raise ValueError(text)
        values = tuple(kind(part) for kind, part in zip(kinds, parts, strict=True))
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise refused from None
    position, entry_id = values
    # The stores bind integers as signed 64-bit: a forged cursor beyond that is not ours.
    if not 0 < entry_id <= INT64_MAX:
        raise refused
    if isinstance(position, float):
        if not (math.isfinite(position) and _MIN_TIME_MS <= position < _MAX_TIME_MS):
            raise refused
    elif not _MIN_INT64 <= position <= INT64_MAX:
        raise refused
    return values


def entries(
    store: Store,
    filters: Filters | None = None,
    limit: int = 50,
    cursor: str | None = None,
    sort: str = "newest",
) -> dict[str, Any]:
    """Entries newest first (``sort="slowest"``: slowest first), ``limit`` per page.

    ``next_cursor`` continues the listing (keyset pagination: pages cost the same however
    deep they are); it is ``None`` on the last page.
    """
    filters = filters or Filters()
    if sort not in ("newest", "slowest"):
        raise FilterError("sort must be newest or slowest")
    streams = _stream_ids(store, filters)
    if streams == []:
        return {"entries": [], "next_cursor": None}
    where = _entry_where(filters, streams, filters.since, filters.until, alias="e")
    if sort == "newest":
        if cursor:
            started, entry_id = _decode_cursor(cursor, (int, int))
            where.add("(e.started < ? OR (e.started = ? AND e.id < ?))", started, started, entry_id)
        order = "e.started DESC, e.id DESC"
    else:
        time_ms = None
        if cursor:
            time_ms, entry_id = _decode_cursor(cursor, (float, int))
            where.add("(e.time_ms < ? OR (e.time_ms = ? AND e.id < ?))", time_ms, time_ms, entry_id)
        order = "e.time_ms DESC, e.id DESC"
        threshold = _slow_threshold(store, filters, limit + 1, time_ms)
        if threshold:
            fast = _Where(list(where.clauses), list(where.params))
            fast.add("e.bucket >= ?", threshold)
            # "+e.started": walk the bucket index (a few rows), not the range of times.
            sql = fast.sql().replace("e.started", "+e.started")
            rows = store.fetchall(
                f"SELECT {_ROW_COLUMNS} FROM entries e JOIN streams s ON s.id = e.stream_id"
                f"{sql} ORDER BY {order} LIMIT ?",
                [*fast.params, limit + 1],
            )
            if len(rows) > limit:  # else entries went meanwhile (retention): ask them all
                return _page(rows, limit, sort)
    rows = store.fetchall(
        f"SELECT {_ROW_COLUMNS} FROM entries e JOIN streams s ON s.id = e.stream_id"
        f"{where.sql()} ORDER BY {order} LIMIT ?",
        [*where.params, limit + 1],
    )
    return _page(rows, limit, sort)


def _page(rows: list[tuple[Any, ...]], limit: int, sort: str) -> dict[str, Any]:
    page = [_row(r) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = _encode_cursor(last[1] if sort == "newest" else repr(float(last[7])), last[0])
    return {"entries": page, "next_cursor": next_cursor}


def _slow_threshold(store: Store, filters: Filters, wanted: int, below: float | None) -> int:
    """A latency bucket that holds, with those above it, the ``wanted`` slowest entries.

    From the rollups' histogram for the same filters (0: no useful bound, or the filters
    need the entries themselves anyway). With ``below`` (a cursor's time), only entries
    faster than it count: the buckets under its own bucket must hold ``wanted``.
    """
    by_endpoint = filters.method is not None or filters.route is not None
    if filters.path is not None or (filters.consumer is not None and by_endpoint):
        return 0
    totals = _aggregate(store, filters, []).get(())
    if totals is None:
        return 0
    top = bucket_of(below) - 1 if below is not None else MAX_BUCKET
    seen = 0
    for bucket in sorted(totals.histogram, reverse=True):
        if bucket > top:
            continue
        seen += totals.histogram[bucket]
        if seen >= wanted:
            return bucket
    return 0


def _load_entry(store: Store, entry_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    if not 0 < entry_id <= INT64_MAX:  # no row has such an id (SQLite cannot even bind it)
        return None
    row = store.fetchone(
        f"SELECT {_ROW_COLUMNS}, e.received, d.entry FROM entries e "
        "JOIN streams s ON s.id = e.stream_id JOIN entry_data d ON d.id = e.id WHERE e.id = ?",
        [entry_id],
    )
    if row is None:
        return None
    summary = _row(row[:16])
    summary["received"] = iso(int(row[16]))
    entry = store.decode_entry(row[17])
    return summary, entry


def _body(part: Mapping[str, Any] | None) -> dict[str, Any]:
    """A captured body decoded for reading: JSON pretty-printed, text as text, else binary.

    Bytes (``encoding: base64``) are read in the ``charset`` their content type declares when
    Python knows it as a text codec (undecodable bytes replaced), else as UTF-8, strictly: a
    body that is not UTF-8 then counts as binary, as does one holding control characters.
    A body given as text (no ``encoding``) is already characters. ``size`` is in bytes.
    """
    if not isinstance(part, Mapping):
        return {"kind": "none", "text": "", "size": 0, "mime_type": ""}
    text = part.get("text")
    mime_type = str(part.get("mimeType") or "")
    if not isinstance(text, str) or not text:
        return {"kind": "none", "text": "", "size": 0, "mime_type": mime_type}
    data: bytes
    charset = ""
    if part.get("encoding") == "base64":
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            return {"kind": "binary", "text": "", "size": len(text), "mime_type": mime_type}
        charset = _declared_charset(mime_type)
    else:
        data = text.encode("utf-8", "surrogatepass")
    decoded = _as_text(data, charset)
    if decoded is None:
        return {"kind": "binary", "text": "", "size": len(data), "mime_type": mime_type}
    if "json" in mime_type.lower() or decoded.lstrip()[:1] in ("{", "["):
        try:
            pretty = json.dumps(json.loads(decoded), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
        else:
            return {"kind": "json", "text": pretty, "size": len(data), "mime_type": mime_type}
    if any(ord(ch) < 32 and ch not in "\t\r\n" for ch in decoded[:4096]):
        return {"kind": "binary", "text": "", "size": len(data), "mime_type": mime_type}
    return {"kind": "text", "text": decoded, "size": len(data), "mime_type": mime_type}


def _declared_charset(mime_type: str) -> str:
    """The ``charset`` parameter of a content type, or ``""``."""
    for parameter in mime_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip("\"'").strip()
    return ""


def _as_text(data: bytes, charset: str) -> str | None:
    """``data`` read in ``charset`` when Python knows it as a text codec (undecodable bytes
    replaced), else as UTF-8, strictly; None when it is not text in either."""
    if charset:
        try:  # LookupError: not a codec, or not a text one ("base64", "rot13")
            return data.decode(charset, "replace")
        except (LookupError, ValueError, TypeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def entry_detail(store: Store, entry_id: int) -> dict[str, Any] | None:
    """One entry in full with its service, environment, received time and decoded bodies."""
    loaded = _load_entry(store, entry_id)
    if loaded is None:
        return None
    summary, entry = loaded
    request = _mapping(entry.get("request"))
    response = _mapping(entry.get("response"))
    return {
        "id": summary["id"],
        "service": summary["service"],
        "service_token_id": summary["service_token_id"],
        "environment": summary["environment"],
        "received": summary["received"],
        "summary": summary,
        "entry": entry,
        "bodies": {
            "request": _body(request.get("postData")),
            "response": _body(response.get("content")),
        },
    }


# -- HAR --------------------------------------------------------------------------------------


def _location(headers: object) -> str:
    """The first ``Location`` response header: what HAR 1.2's ``redirectURL`` holds."""
    if isinstance(headers, list):
        for header in headers:
            if isinstance(header, dict) and str(header.get("name", "")).lower() == "location":
                value = header.get("value")
                return value if isinstance(value, str) else ""
    return ""


def _har_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An ALF entry as a HAR 1.2 entry (the fields HAR requires and ALF leaves out added)."""
    request = dict(entry.get("request") or {})
    response = dict(entry.get("response") or {})
    request.setdefault("httpVersion", "HTTP/1.1")
    request.setdefault("queryString", [])
    request.setdefault("cookies", [])
    request.pop("bodyCaptured", None)
    post = request.pop("postData", None)
    if isinstance(post, dict):
        request["postData"] = _har_content(post, for_request=True)
    response.setdefault("httpVersion", "HTTP/1.1")
    response.setdefault("cookies", [])
    if not response.get("redirectURL"):
        response["redirectURL"] = _location(response.get("headers"))
    response.pop("bodyCaptured", None)
    content = response.pop("content", None)
    size = response.get("bodySize", -1)
    if isinstance(content, dict):
        # HAR's content.size is the body's decoded length, which ALF 1.0.0 (HAR itself)
        # carries; 1.1.0 has none, and its bodySize is the nearest.
        own_size = content.get("size")
        if isinstance(own_size, int) and not isinstance(own_size, bool):
            size = own_size
        response["content"] = {"size": size, **_har_content(content, for_request=False)}
    else:
        response["content"] = {"size": size, "mimeType": ""}
    timings = dict(entry.get("timings") or {})
    for key in ("blocked", "dns", "connect", "ssl"):
        timings.setdefault(key, -1)
    cache = entry.get("cache")
    har: dict[str, Any] = {
        "startedDateTime": entry.get("startedDateTime"),
        "time": entry.get("time", 0),
        "request": request,
        "response": response,
        "cache": cache if isinstance(cache, dict) else {},
        "timings": timings,
    }
    for key in _HAR_ENTRY_FIELDS:  # an ALF 1.0.0 entry is a HAR entry: what it held stays
        if key in entry:
            har[key] = entry[key]
    if entry.get("serverIPAddress"):
        har["serverIPAddress"] = entry["serverIPAddress"]
    if entry.get("clientIPAddress"):
        har["_clientIPAddress"] = entry["clientIPAddress"]
    return har


_HAR_ENTRY_FIELDS: Final = ("pageref", "connection", "comment")
"""Optional HAR 1.2 entry fields an ALF 1.0.0 entry may hold, kept as they came."""
_HAR_CONTENT_FIELDS: Final = {
    "postData": ("params", "comment"),
    "content": ("compression", "comment"),
}
"""The same of ``request.postData`` and ``response.content``."""


def _har_content(part: Mapping[str, Any], *, for_request: bool) -> dict[str, Any]:
    mime_type = str(part.get("mimeType") or "")
    text = part.get("text") if isinstance(part.get("text"), str) else ""
    kept = {
        key: part[key]
        for key in _HAR_CONTENT_FIELDS["postData" if for_request else "content"]
        if key in part
    }
    if part.get("encoding") == "base64":
        if for_request:  # HAR postData has no encoding: decode when it is text
            body = _body(part)
            if body["kind"] in ("json", "text"):
                return {"mimeType": mime_type, "text": _plain_text(part), **kept}
            return {**kept, "mimeType": mime_type, "text": "", "comment": "binary body left out"}
        return {"mimeType": mime_type, "text": text, "encoding": "base64", **kept}
    if for_request and "text" not in part and isinstance(part.get("params"), list):
        return {"mimeType": mime_type, **kept}  # HAR: params or text, never both required
    return {"mimeType": mime_type, "text": text, **kept}


def _plain_text(part: Mapping[str, Any]) -> str:
    """A base64 request body as HAR's postData text, in its declared charset (as shown)."""
    try:
        data = base64.b64decode(str(part.get("text") or ""))
    except (binascii.Error, ValueError):
        return ""
    return _as_text(data, _declared_charset(str(part.get("mimeType") or ""))) or ""


def _har(entries_: list[dict[str, Any]]) -> dict[str, Any]:
    from .._version import __version__

    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "alf-analytics collector", "version": __version__},
            "pages": [],
            "entries": entries_,
        }
    }


def entry_har(store: Store, entry_id: int) -> dict[str, Any] | None:
    """One entry as a HAR 1.2 document."""
    loaded = _load_entry(store, entry_id)
    return _har([_har_entry(loaded[1])]) if loaded is not None else None


def har_export(store: Store, filters: Filters | None = None, limit: int = 1_000) -> dict[str, Any]:
    """The newest ``limit`` filtered entries as a HAR 1.2 document (oldest first)."""
    filters = filters or Filters()
    streams = _stream_ids(store, filters)
    if streams == []:
        return _har([])
    where = _entry_where(filters, streams, filters.since, filters.until, alias="e")
    rows = store.fetchall(
        f"SELECT d.entry FROM entries e JOIN entry_data d ON d.id = e.id{where.sql()} "
        "ORDER BY e.started DESC, e.id DESC LIMIT ?",
        [*where.params, limit],
    )
    return _har([_har_entry(store.decode_entry(r[0])) for r in reversed(rows)])
