"""The collector's dashboard: server-rendered HTML over the query layer, behind the read key.

Every figure on every page comes from :mod:`alf_analytics.collector.queries`, the same
functions the JSON API answers with; this module only chooses what to ask for (from the
page's query string), formats it and renders a Jinja2 template (autoescaped: entries'
headers and bodies are attacker-controlled). The JavaScript in ``static/dashboard.js``
draws the charts from JSON embedded in the page, localizes times, and in live mode
re-fetches the same URL and swaps the page's live regions, so there is one rendering path.

The routes (:func:`dashboard_routes`) are mounted by :func:`~alf_analytics.collector.create_app`:

- ``GET /``: the overview (headline numbers, charts, endpoints, status codes, slowest
  requests, recent failures, consumers) for the selected service, environment and range;
- ``GET /requests``: the request log, newest first, filtered and paginated by cursor;
- ``GET /requests/{id}``: one request in detail;
- ``GET /login``, ``POST /login``, ``POST /logout``: the read-key cookie;
- ``/static``: the stylesheet, the script and the vendored chart library.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from . import auth, queries
from .settings import ServiceToken, TokenSet
from .storage import STORAGE_RETRY_AFTER, is_storage_failure

__all__ = ["dashboard_routes"]

logger = logging.getLogger("alf_analytics.collector")

_HERE: Final = Path(__file__).resolve().parent
STATIC_DIR: Final = _HERE / "static"
TEMPLATES_DIR: Final = _HERE / "templates"

#: Relative time ranges offered by the selector, in the order shown.
RANGES: Final[dict[str, timedelta | None]] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "all": None,
}
DEFAULT_RANGE: Final = "1h"
#: Chart bucket sizes (seconds); the smallest that keeps a chart under ~_MAX_POINTS points.
_INTERVALS: Final = (60, 300, 900, 1800, 3600, 10_800, 21_600, 43_200, 86_400)
_MAX_POINTS: Final = 180
#: Quiet buckets added to a chart at most (an "All time" chart of years stays as answered).
_MAX_FILL: Final = 2000
_TABLE_ROWS: Final = 10
_ENDPOINT_ROWS: Final = 15
LOG_PAGE_SIZE: Final = 50
#: Sort keys of the endpoints table, each with its column title; all sort descending.
ENDPOINT_SORTS: Final = {
    "count": "Requests",
    "errors": "Errors",
    "error_rate": "Error rate",
    "p50": "p50",
    "p95": "p95",
    "p99": "p99",
}
#: The filters the pages carry in their query string (the same names as the JSON API).
FILTER_KEYS: Final = (
    "service",
    "environment",
    "range",
    "since",
    "until",
    "status",
    "method",
    "path",
    "route",
    "consumer",
)
_LOGIN_BODY_LIMIT: Final = 4096
_COOKIE_MAX_AGE: Final = 30 * 24 * 3600
_STATUS_CLASSES: Final = {
    0: "no response",  # an agent records 0 when the client left before the answer
    1: "informational",
    2: "success",
    3: "redirect",
    4: "client error",
    5: "server error",
    **dict.fromkeys(range(6, 10), "non-standard"),  # ALF allows any status up to 999
}
_SECURITY_HEADERS: Final = {
    # No script but ours, no inline script, no framing: a second wall behind autoescaping.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------------------------
# Formatting (Jinja filters)


def fmt_count(value: int | float | None) -> str:
    """``1234567`` -> ``"1,234,567"``; ``None`` -> an en dash."""
    if value is None:
        return "–"
    return f"{int(value):,}"


def fmt_ms(value: float | None) -> str:
    """A duration in milliseconds, at a precision that fits its size."""
    if value is None or not math.isfinite(value):
        return "–"
    if value < 10:
        return f"{value:.2f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.2f} s"


def fmt_bytes(value: int | float | None) -> str:
    """A size in bytes, in B, KiB, MiB or GiB."""
    if value is None or value < 0:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_rate(value: float | None) -> str:
    """An error rate (0..1) as a percentage."""
    if value is None:
        return "–"
    percent = value * 100
    if percent == 0:
        return "0 %"
    if percent < 0.1:
        return "< 0.1 %"
    return f"{percent:.1f} %"


def fmt_time(value: str | datetime | None) -> str:
    """An ISO 8601 instant as ``2026-12-02 07:59:01`` UTC (the script shows local time)."""
    moment = _parse_instant(value)
    if moment is None:
        return "–" if value is None else str(value)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_bucket(seconds: int) -> str:
    """A chart bucket's length as its caption says it: ``300`` -> ``"5-minute"``,
    ``43200`` -> ``"12-hour"`` (not "720-minute"), ``86400`` -> ``"1-day"``."""
    for unit, size in (("day", 86_400), ("hour", 3600)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}-{unit}"
    return f"{seconds // 60}-minute"


def local_input(value: str) -> str:
    """A ``since``/``until`` value as ``<input type=datetime-local>`` shows it (UTC, naive)."""
    moment = _parse_instant(value)
    if moment is None:
        return value
    return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")


def iso(value: str | datetime | None) -> str:
    """The machine-readable form for ``<time datetime>``."""
    moment = _parse_instant(value)
    return "" if moment is None else moment.astimezone(timezone.utc).isoformat()


def status_class(status: int | None) -> str:
    """``404`` -> ``"4xx"``, ``0`` -> ``"0xx"`` (as the API groups them); ``None`` or out of
    ALF's range (0 to 999) -> ``"other"``."""
    if status is None or not 0 <= status <= 999:
        return "other"
    return f"{status // 100}xx"


def status_filter(value: object) -> bool:
    """Whether ``value`` (a status code or class) is a ``status`` filter the API takes, so a
    link to the log filtered by it lists its entries instead of answering a 400 page.

    Every status ingest checks (0 to 999, and their classes 0xx to 9xx) is one; only a
    negative status, which an ALF 1.0.0 entry may carry (its schema sets no minimum), is not.
    """
    try:
        queries.Filters.from_query({"status": str(value)})
    except queries.FilterError:
        return False
    return True


def status_label(status_class_name: str) -> str:
    """``"4xx"`` -> ``"4xx client error"``: status classes are named, not only coloured."""
    if len(status_class_name) == 3 and status_class_name[0].isdigit():
        name = _STATUS_CLASSES.get(int(status_class_name[0]))
        if name:
            return f"{status_class_name} {name}"
    return status_class_name


def _parse_instant(value: object) -> datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value.strip():
        return None
    # The JSON API's reading of a time (epoch seconds or ISO 8601), so a page URL's
    # ``until=1796405400`` shows, fills the From/To inputs and round-trips like its ISO form.
    try:
        return _from_micros(queries.to_micros(value))
    except (queries.FilterError, SelectionError):
        return None


# --------------------------------------------------------------------------------------------
# Templates


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        count=fmt_count,
        ms=fmt_ms,
        bytes=fmt_bytes,
        rate=fmt_rate,
        bucket=fmt_bucket,
        time=fmt_time,
        iso=iso,
        local_input=local_input,
        status_class=status_class,
        status_label=status_label,
    )
    env.tests["status_filter"] = status_filter
    return env


_TEMPLATES: Final = _environment()


def render(request: Request, name: str, context: Mapping[str, Any], status: int = 200) -> Response:
    values = {
        "request": request,
        "url_with": _url_builder(
            request, context.get("link_service") or context.get("params", {}).get("service")
        ),
        "static": _static_url,
        "logout": auth.read_key_configured(request),
        **context,
    }
    html = _TEMPLATES.get_template(name).render(values)
    return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)


def _static_url(path: str) -> str:
    return f"/static/{path}"


def _url_builder(request: Request, service: str | None = None) -> Callable[..., str]:
    """``url_with(sort="p95", cursor=None)``: this page's URL with some parameters changed.

    ``None`` removes a parameter; ``path=`` changes the page. The cursor is dropped whenever
    anything else changes (it belongs to one filtered listing). ``service`` is the id of the
    service the page's ``service`` filter found: links name it so, never by the token the
    URL may have used.
    """

    def url_with(_path: str | None = None, **changes: str | int | None) -> str:
        params = dict(request.query_params)
        if service is not None and "service" in params:
            params["service"] = service
        if "cursor" not in changes:
            params.pop("cursor", None)
        for key, value in changes.items():
            if value is None or value == "":
                params.pop(key, None)
            else:
                params[key] = str(value)
        query = urlencode(params)
        path = _path if _path is not None else request.url.path
        return f"{path}?{query}" if query else path

    return url_with


# --------------------------------------------------------------------------------------------
# The selection a page shows: filters, time range, chart interval


@dataclass(frozen=True)
class Selection:
    """What the query string asks for, validated: the filters and the time window.

    ``params`` are the page's own filter parameters (``range`` included), ``api_params``
    the same filters as the JSON API takes them (``range`` resolved into ``since``): they
    build the HAR export link, so a download holds exactly what the page lists.
    """

    params: dict[str, str]
    api_params: dict[str, str]
    filters: queries.Filters
    range_name: str
    since: datetime | None
    until: datetime | None

    def entry_filters(self) -> dict[str, str]:
        """The filters narrower than service, environment and time (shown as chips)."""
        keys = ("status", "method", "path", "route", "consumer")
        return {key: self.params[key] for key in keys if key in self.params}

    def with_status(self, status: str) -> queries.Filters:
        """These filters with ``status`` replaced (the overview's recent 4xx and 5xx)."""
        return queries.Filters.from_query({**self.api_params, "status": status})


def parse_selection(query: Mapping[str, str], now: datetime) -> Selection:
    """The filters of a page's query string; a bad value raises :class:`SelectionError`."""
    params = {key: query[key].strip() for key in FILTER_KEYS if query.get(key, "").strip()}
    range_name = params.get("range", DEFAULT_RANGE)
    if range_name not in RANGES:
        raise SelectionError(f"range must be one of: {', '.join(RANGES)}")
    api_params = {key: value for key, value in params.items() if key != "range"}
    span = RANGES[range_name]
    try:
        filters = queries.Filters.from_query(api_params)
        since = _from_micros(filters.since)
        until = _from_micros(filters.until)
        if "since" not in params and span is not None:
            # "Last hour" is the hour before "To" when one is given, else before now.
            end = until or now
            # A "To" within the range's span of year 1 starts the range at year 1.
            start = end - span if end - _YEAR_ONE > span else _YEAR_ONE
            api_params["since"] = start.isoformat(timespec="seconds")
            filters = queries.Filters.from_query(api_params)
            since = _from_micros(filters.since)
    except queries.FilterError as exc:
        raise SelectionError(str(exc)) from None
    return Selection(params, api_params, filters, range_name, since, until)


_YEAR_ONE = datetime(1, 1, 1, tzinfo=timezone.utc)


def _from_micros(micros: int | None) -> datetime | None:
    # Filters hold only times within the years 0001 to 9999: no clamping happens here.
    return None if micros is None else queries.utc_datetime(micros)


class SelectionError(ValueError):
    """A filter in the query string is not valid; the message says which and why."""


def chart_interval(since: datetime | None, until: datetime | None) -> int:
    """The bucket size for a window: one minute up to 3 hours, then coarser steps."""
    if since is None or until is None:
        return _INTERVALS[0]
    seconds = max((until - since).total_seconds(), 60.0)
    for interval in _INTERVALS:
        if seconds / interval <= _MAX_POINTS:
            return interval
    return _INTERVALS[-1]


def chart_data(
    series: Sequence[Mapping[str, Any]],
    interval: int,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Column arrays for the charts: requests per minute (all, 4xx, 5xx) and p50/p95/p99.

    Quiet buckets have a zero count and no percentiles, so a quiet minute draws as zero
    requests and as a gap in the latency lines. The query layer answers every bucket of a
    bounded window; for one it leaves open ("All time") it answers from the first entry to
    the last, so the buckets from ``since`` to ``until`` it left out are added here, and
    ``start``/``end`` (epoch seconds) give the charts their x range. Counts are scaled to
    per-minute rates when a bucket is longer than a minute.
    """
    per_minute = 60 / interval
    points: dict[int, Mapping[str, Any]] = {}
    for point in series:
        moment = _parse_instant(point.get("t"))
        if moment is not None:
            points[int(moment.timestamp())] = point
    buckets = sorted(points)
    if since is not None and until is not None and until > since:  # else no bucket to add
        start = _bucket(since, interval)
        last = _bucket(until - timedelta(microseconds=1), interval)
        if 0 <= (last - start) // interval <= _MAX_FILL:
            buckets = sorted({*buckets, *range(start, last + 1, interval)})
    columns: dict[str, list[Any]] = {
        key: [] for key in ("t", "count", "client_errors", "server_errors", "p50", "p95", "p99")
    }
    for t in buckets:
        point = points.get(t, {})
        columns["t"].append(t)
        for key in ("count", "client_errors", "server_errors"):
            columns[key].append(round((point.get(key) or 0) * per_minute, 3))
        for key in ("p50", "p95", "p99"):
            columns[key].append(point.get(key))
    data: dict[str, Any] = {"interval": interval, "columns": columns}
    if buckets:
        data["start"] = buckets[0]
        data["end"] = buckets[-1] + interval
    return data


def _bucket(moment: datetime, interval: int) -> int:
    """The start (epoch seconds) of the chart bucket holding ``moment``."""
    return int(moment.timestamp()) // interval * interval


# --------------------------------------------------------------------------------------------
# Pages


def _store(request: Request) -> Any:
    return request.app.state.store


def _login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)


PageData = Callable[[Any, Selection], dict[str, Any]]


async def _page(request: Request, template: str, build: PageData) -> Response:
    """The shared shape of a data page: auth, selection, one threadpool call, render."""
    if not auth.read_allowed(request):
        return _login_redirect(request)
    store = _store(request)
    try:
        selection = parse_selection(request.query_params, datetime.now(timezone.utc))
        data = await run_in_threadpool(build, store, selection)
    except (SelectionError, queries.FilterError) as exc:  # a bad filter, sort or cursor
        services = await run_in_threadpool(_all_services, store)
        context = _frame(request, None, services, error=str(exc))
        value = request.query_params.get("service")
        link = await run_in_threadpool(_service_link, store, request.app.state.tokens, value)
        context = {**context, "failed": True, "link_service": link}
        return render(request, template, context, status=400)
    services = data.pop("_services")
    scope = data.pop("_scope")
    frame = _frame(request, selection, services, scope=scope)
    if "_har_params" in data:  # the HAR download names the service as the links do
        har_params = dict(data.pop("_har_params"))
        if "service" in har_params:
            har_params["service"] = frame["params"]["service"]
        data["har_query"] = urlencode(har_params)
    return render(request, template, {**frame, **data})


def _service_link(store: Any, tokens: TokenSet, value: str | None) -> str | None:
    """The id of the service a 400 page's ``service`` names (by id, name or token), which
    its links carry instead of the value: the page read no data that would name it."""
    accepted = _accepted_token(tokens, value.strip() if value else "")
    if accepted is not None:
        return accepted.id
    try:
        service = queries.Filters.create(service=value.strip() if value else None).service
    except queries.FilterError:
        return None
    return None if service is None else queries.service_id(store, service)


def _accepted_token(tokens: TokenSet, value: str) -> ServiceToken | None:
    """The accepted service token ``value`` is, if it is one: pages name it by its id."""
    return tokens.lookup(value) if value and tokens.is_service_token(value) else None


def _frame(
    request: Request,
    selection: Selection | None,
    services: Mapping[str, Any],
    error: str | None = None,
    scope: Scope | None = None,
) -> dict[str, Any]:
    """What every page's header needs: the service and environment choices, the range.

    ``scope`` says what the page's data found for its ``service`` and ``environment``
    filters. A filter the selectors' list does not hold is a choice of its own (the store
    holds nothing for it, "(no entries)", or it is newer than the cached list), so the
    selectors never read "All" on a page that is filtered.
    """
    sort = _endpoint_sort(request)
    if sort not in ENDPOINT_SORTS:  # the forms of the 400 page naming it do not carry it on
        sort = "count"
    params = dict(selection.params) if selection else {}
    rows = list(services.get("services", []))
    choices = {str(row["service_token_id"]): str(row["service"]) for row in rows}
    names = {str(row["environment"]) for row in rows if row.get("environment")}
    environments = [(name, name) for name in sorted(names)]
    scope = scope or Scope()
    if "service" in params:
        if scope.service is not None:
            params["service"] = scope.service[0]
            choices.setdefault(*scope.service)
        elif params["service"] not in choices:
            token = _accepted_token(request.app.state.tokens, params["service"])
            if token is not None:  # accepted, nothing sent yet
                params["service"] = token.id  # named so, as in the links, never in full
                choices[token.id] = f"{token.shown} (no entries)"
            else:
                choices[params["service"]] = f"{params['service']} (no entries)"
    environment = params.get("environment")
    if environment is not None and environment not in names:
        label = environment if scope.listed else f"{environment} (no entries)"
        environments.append((environment, label))
    return {
        "selection": selection,
        "params": params,
        "services": sorted(choices.items(), key=lambda item: item[1]),
        "environments": environments,
        "ranges": list(RANGES),
        "range_name": selection.range_name if selection else DEFAULT_RANGE,
        "error": error,
        "failed": False,
        # Nothing stored at all (a new collector): the overview says how to send traffic.
        "store_empty": not rows and selection is not None,
        "live": request.query_params.get("live") == "1",
        "sort": sort,
    }


class _ServicesCache:
    """The selectors' list of services, reused for a few seconds per store.

    Every page shows the service and environment selectors; the list changes only when a
    new service or environment starts sending, so a page may show one up to
    ``SERVICES_TTL`` seconds late instead of asking the store on every page view.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: weakref.WeakKeyDictionary[Any, tuple[float, dict[str, Any]]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, store: Any) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            cached = self._answers.get(store)
        if cached is not None and now - cached[0] < SERVICES_TTL:
            return cached[1]
        answer = queries.services(store, queries.Filters())
        with self._lock:
            self._answers[store] = (now, answer)
        return answer


SERVICES_TTL: Final = 10.0
_services_cache: Final = _ServicesCache()


def _all_services(store: Any) -> dict[str, Any]:
    """Every service and environment stored, whatever the page's filters (the selectors)."""
    return _services_cache.get(store)


@dataclass(frozen=True)
class Scope:
    """What a page's data says about its service and environment filters (for ``_frame``)."""

    #: The service the ``service`` filter names, as ``(service_token_id, name)``.
    service: tuple[str, str] | None = None
    #: The page lists entries (so its filters match some, cached list or not).
    listed: bool = False


def _scope(
    services: Mapping[str, Any], selection: Selection, rows: Sequence[Mapping[str, Any]]
) -> Scope:
    """The service selector's choice for the page's ``service`` filter, which, as on the
    API, may name a service by its id, its name or its token: a link with
    ``service=billing`` or the token selects that service instead of reading "All services"
    over billing's figures. A token, or a service newer than the cached list, is not in the
    selectors' list: the entries the page lists (all of that service) name it."""
    listed = bool(rows)
    value = selection.params.get("service")
    if value is None:
        return Scope(None, listed)
    candidates = [*services.get("services", []), *rows]
    for key in ("service_token_id", "service"):
        for row in candidates:
            if str(row[key]) == value:
                return Scope((str(row["service_token_id"]), str(row["service"])), listed)
    found = next(iter(rows), None)
    if found is None:
        return Scope(None, listed)
    return Scope((str(found["service_token_id"]), str(found["service"])), listed)


def _overview_data(store: Any, selection: Selection, sort: str) -> dict[str, Any]:
    if sort not in ENDPOINT_SORTS:  # before any query: a 400 page naming the choices
        raise SelectionError(f"sort must be one of: {', '.join(ENDPOINT_SORTS)}")
    filters = selection.filters
    services = _all_services(store)
    since = selection.since
    until = selection.until or datetime.now(timezone.utc)
    if since is None:  # "All time": the chart spans what the selected streams hold
        rows = services["services"]
        if filters.service is not None or filters.environment is not None:
            streams = queries.Filters(service=filters.service, environment=filters.environment)
            rows = queries.services(store, streams)["services"]
        firsts = [_parse_instant(row.get("first_seen")) for row in rows]
        since = min((first for first in firsts if first), default=None)
    interval = chart_interval(since, until)
    stats = queries.stats(store, filters, interval=interval)
    endpoints = queries.endpoints(store, filters, sort=sort, limit=_ENDPOINT_ROWS)
    slowest = queries.entries(store, filters, limit=_TABLE_ROWS, sort="slowest")
    consumers = queries.consumers(store, filters, limit=_TABLE_ROWS)
    total = stats["count"] or 0
    codes = sorted(stats["status_codes"].items(), key=lambda item: int(item[0]))  # 42 < 404
    return {
        "_services": services,
        "_scope": _scope(services, selection, slowest["entries"]),
        "stats": stats,
        "chart": {**chart_data(stats["series"], interval, since, until), "total": stats["count"]},
        "status_codes": [(code, count, count / total if total else 0) for code, count in codes],
        "status_classes": sorted(stats["status_classes"].items()),
        "endpoints": endpoints["endpoints"],
        "endpoint_sorts": ENDPOINT_SORTS,
        "slowest": slowest["entries"],
        "failures": _recent_failures(store, selection),
        "consumers": consumers["consumers"],
    }


def _recent_failures(store: Any, selection: Selection) -> list[dict[str, Any]]:
    """The newest 4xx and 5xx answers together; a status filter narrows them further."""
    status = selection.filters.status
    if status is not None:  # "404", "5xx": already failures only; "200", "2xx", "4": none
        low, high = status
        if not (400 <= low and high <= 599):
            return []
        return list(queries.entries(store, selection.filters, limit=_TABLE_ROWS)["entries"])
    rows: list[dict[str, Any]] = []
    for status_filter in ("4xx", "5xx"):
        page = queries.entries(store, selection.with_status(status_filter), limit=_TABLE_ROWS)
        rows.extend(page["entries"])
    rows.sort(key=lambda row: (str(row["started"]), row["id"]), reverse=True)
    return rows[:_TABLE_ROWS]


def _log_data(store: Any, selection: Selection, cursor: str | None) -> dict[str, Any]:
    page = queries.entries(store, selection.filters, limit=LOG_PAGE_SIZE, cursor=cursor)
    services = _all_services(store)
    return {
        "_services": services,
        "_scope": _scope(services, selection, page["entries"]),
        "entries": page["entries"],
        "next_cursor": page["next_cursor"],
        "cursor": cursor,
        "_har_params": selection.api_params,
    }


def _endpoint_sort(request: Request) -> str:
    """The endpoints table's ``sort`` (as the API reads it: empty or absent is ``count``)."""
    return request.query_params.get("sort", "").strip() or "count"


async def overview(request: Request) -> Response:
    sort = _endpoint_sort(request)
    return await _page(request, "overview.html", lambda s, sel: _overview_data(s, sel, sort))


async def request_log(request: Request) -> Response:
    cursor = request.query_params.get("cursor") or None
    return await _page(request, "requests.html", lambda s, sel: _log_data(s, sel, cursor))


async def entry_detail(request: Request) -> Response:
    if not auth.read_allowed(request):
        return _login_redirect(request)
    # Any last segment is this page's: /requests/abc is its 404 page (not the app's JSON).
    raw_id = str(request.path_params["id"])
    store = _store(request)
    detail = None
    if raw_id.isascii() and raw_id.isdigit() and len(raw_id) <= 19:  # ids fit 64 bits
        detail = await run_in_threadpool(queries.entry_detail, store, int(raw_id))
    services = await run_in_threadpool(_all_services, store)
    context = _frame(request, None, services)
    if detail is None:
        shown = raw_id if len(raw_id) <= 40 else raw_id[:40] + "…"
        context["error"] = f"There is no entry {shown} in this store."
        return render(request, "detail.html", {**context, "detail": None}, status=404)
    return render(request, "detail.html", {**context, "detail": detail, "view": EntryView(detail)})


# --------------------------------------------------------------------------------------------
# One entry in detail


class EntryView:
    """The parts of a stored ALF entry the detail page shows, read defensively.

    Entries were schema-checked on ingest, but the page must render whatever is stored, so
    every field falls back to a neutral value instead of raising.
    """

    TIMING_PHASES: Final = ("blocked", "dns", "connect", "ssl", "send", "wait", "receive")

    def __init__(self, detail: Mapping[str, Any]) -> None:
        entry = detail.get("entry") or {}
        self.entry: Mapping[str, Any] = entry if isinstance(entry, Mapping) else {}
        self.request: Mapping[str, Any] = _mapping(self.entry.get("request"))
        self.response: Mapping[str, Any] = _mapping(self.entry.get("response"))
        bodies = _mapping(detail.get("bodies"))
        self.request_body: Mapping[str, Any] = _mapping(bodies.get("request"))
        self.response_body: Mapping[str, Any] = _mapping(bodies.get("response"))

    @property
    def request_body_facts(self) -> BodyFacts:
        return BodyFacts.of(self.request, self.request_body)

    @property
    def response_body_facts(self) -> BodyFacts:
        return BodyFacts.of(self.response, self.response_body)

    @property
    def status(self) -> int | None:
        status = self.response.get("status")
        return status if isinstance(status, int) else None

    @property
    def request_headers(self) -> list[tuple[str, str]]:
        return _pairs(self.request.get("headers"))

    @property
    def response_headers(self) -> list[tuple[str, str]]:
        return _pairs(self.response.get("headers"))

    @property
    def query(self) -> list[tuple[str, str]]:
        return _pairs(self.request.get("queryString"))

    @property
    def timings(self) -> list[tuple[str, float]]:
        """``(phase, ms)`` for each phase the entry measured (HAR's -1 means not measured)."""
        raw = _mapping(self.entry.get("timings"))
        phases = []
        for phase in self.TIMING_PHASES:
            value = raw.get(phase)
            if isinstance(value, (int, float)) and value >= 0:
                phases.append((phase, float(value)))
        return phases

    @property
    def timing_bar(self) -> list[tuple[str, float, float, float]]:
        """``(phase, ms, x, width)`` segments of a bar 1000 units wide (SVG, no inline style)."""
        phases = self.timings
        total = sum(ms for _, ms in phases)
        if total <= 0:
            return []
        segments, x = [], 0.0
        for phase, ms in phases:
            width = 1000 * ms / total
            segments.append((phase, ms, round(x, 2), round(width, 2)))
            x += width
        return segments


@dataclass(frozen=True)
class BodyFacts:
    """How much of a message's body the page has, for the line above the body.

    The agent sets ``bodyCaptured`` only when it captured the whole body; the body it sends
    is then the whole one, but redacted (a secret's value replaced) and decoded (gzip and the
    like undone), so its length is not the size sent: that is ``bodySize``. When the agent
    cut a body at ``max_body_bytes`` it says ``bodyCaptured: false`` and may send the prefix
    it has (only a body it does not redact). An entry without ``bodyCaptured`` (another
    sender) counts as whole unless ``bodySize`` is larger than what it holds.
    """

    #: The body's size as sent (``bodySize``), when the entry says.
    sent: int | None
    #: Bytes of the body the entry holds (after decoding and redaction).
    held: int
    #: The entry holds the whole body.
    whole: bool
    #: The ``Content-Encoding`` the agent decoded ("" when none).
    coding: str

    @classmethod
    def of(cls, message: Mapping[str, Any], body: Mapping[str, Any]) -> BodyFacts:
        sent = _size(message.get("bodySize"))
        held = _size(body.get("size")) or 0
        captured = message.get("bodyCaptured")
        if isinstance(captured, bool):
            whole = captured
        else:
            whole = sent is None or sent <= held
        coding = ""
        for name, value in _pairs(message.get("headers")):
            if name.lower() == "content-encoding" and value.strip().lower() != "identity":
                coding = value.strip()
        return cls(sent, held, whole, coding)

    @property
    def size(self) -> int | None:
        """The size to show: as sent when known, else what the entry holds."""
        if self.sent is not None:
            return self.sent
        return self.held if self.whole else None

    @property
    def prefix(self) -> int | None:
        """Bytes captured of a body the agent cut (None for a whole or an absent body)."""
        return self.held if self.held and not self.whole else None

    @property
    def decoded(self) -> int | None:
        """The decoded size of a whole body sent compressed (None when not compressed)."""
        if self.coding and self.whole and self.held and self.held != self.sent:
            return self.held
        return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pairs(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        return []
    return [
        (str(item.get("name", "")), str(item.get("value", "")))
        for item in value
        if isinstance(item, Mapping)
    ]


# --------------------------------------------------------------------------------------------
# Login and logout


def _safe_next(value: str | None) -> str:
    """Only a path on this site (no ``//host``, no scheme) is a place to go back to."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


async def login_page(request: Request) -> Response:
    target = _safe_next(request.query_params.get("next"))
    if auth.read_allowed(request):
        return RedirectResponse(target, status_code=303)
    return render(request, "login.html", {"next": target, "error": None, "logout": False})


async def login(request: Request) -> Response:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _LOGIN_BODY_LIMIT:
            return Response("Request body too large", status_code=413)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    target = _safe_next(form.get("next"))
    key = form.get("key", "")
    if not auth.read_key_configured(request):
        return RedirectResponse(target, status_code=303)
    if not key or not auth.read_key_matches(request, key):
        context = {"next": target, "error": "That is not the read key.", "logout": False}
        return render(request, "login.html", context, status=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        auth.COOKIE_NAME,
        auth.make_read_cookie(request),
        max_age=_COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


PageHandler = Callable[[Request], Awaitable[Response]]


#: What a page says while its store cannot be read (a PostgreSQL that went away).
UNAVAILABLE: Final = (
    "The collector cannot read its store right now (see its log). "
    "Reload in a few seconds; nothing is lost on the agents' side, they retry."
)


def _unless_store_down(handler: PageHandler, template: str) -> PageHandler:
    """``handler``, answering an HTML 503 with Retry-After while the store cannot be read,
    as the JSON API does, instead of an Internal Server Error."""

    @functools.wraps(handler)
    async def page(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            if not is_storage_failure(exc):
                raise
            logger.error("reading failed (answered 503): %s", exc)
            context = {**_frame(request, None, {}, error=UNAVAILABLE), "failed": True}
            response = render(request, template, {**context, "detail": None}, status=503)
            response.headers["retry-after"] = STORAGE_RETRY_AFTER
            return response

    return page


def dashboard_routes() -> list[BaseRoute]:
    """The dashboard's routes, for :func:`~alf_analytics.collector.create_app` to mount."""
    return [
        Route(
            "/",
            _unless_store_down(overview, "overview.html"),
            methods=["GET"],
            name="dashboard:overview",
        ),
        Route(
            "/requests",
            _unless_store_down(request_log, "requests.html"),
            methods=["GET"],
            name="dashboard:requests",
        ),
        Route(
            "/requests/{id}",
            _unless_store_down(entry_detail, "detail.html"),
            methods=["GET"],
            name="dashboard:entry",
        ),
        Route("/login", login_page, methods=["GET"], name="dashboard:login-page"),
        Route("/login", login, methods=["POST"], name="dashboard:login"),
        Route("/logout", logout, methods=["POST"], name="dashboard:logout"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="dashboard:static"),
    ]
