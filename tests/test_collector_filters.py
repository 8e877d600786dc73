"""The ``status`` filter takes every status the collector stores, and a read key is never a
service token.

Agents record status 0 when the client left before the response, and ingest stores any
status from 0 to 999: the API and the dashboard filter by each code (``0``, ``42``,
``999``) and each class (``0xx`` to ``9xx``), on SQLite and on PostgreSQL (``collector_db``
of :mod:`tests.pg`), through a real collector over loopback. A read key equal to one of the
accepted service tokens is refused when the collector is configured (CLI and factory).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest

from alf_analytics.collector import Collector, CollectorError, create_app
from alf_analytics.collector.queries import FilterError, Filters
from alf_analytics.collector.settings import SettingsError, TokenSet
from alf_analytics.collector.storage import open_store
from tests.pg import collector_db, pg_server
from tests.test_collector import SRC, cli_command, load, make_alf

__all__ = ["collector_db", "pg_server"]  # fixtures, imported for pytest

#: One entry per status, each on its own path (a word, so no route folds two together).
STATUSES = {0: "/left", 42: "/answer", 200: "/ok", 404: "/missing", 650: "/odd", 999: "/last"}


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def base() -> datetime:
    """The entries' minute: five minutes ago, inside the dashboard's default range (1h)."""
    return _minute(datetime.now(timezone.utc)) - timedelta(minutes=5)


@pytest.fixture
def filled(collector_db: str, base: datetime) -> Iterator[Collector]:
    """A collector holding one entry of each of :data:`STATUSES`, 20 to 25 s into ``base``'s
    minute (so a range cut inside that minute reads the entries, a whole one the rollups)."""
    calls = [("GET", f"https://api.test{path}", status, 5.0) for status, path in STATUSES.items()]
    alf = make_alf(calls, token="filters-token", environment="filters")
    for i, entry in enumerate(alf["har"]["log"]["entries"]):
        entry["startedDateTime"] = _iso(base + timedelta(seconds=20 + i))
    with Collector(collector_db) as collector:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            answer = client.post(collector.endpoint("1.1.0", "batch"), json=[alf])
            assert answer.status_code == 200, answer.text
        assert collector.wait_for_entries(len(STATUSES))
        yield collector


@pytest.fixture
def api(filled: Collector) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=filled.url, trust_env=False, timeout=10.0) as client:
        yield client


def _statuses(api: httpx.Client, **params: str) -> list[int]:
    answer = api.get("/api/entries", params=params)
    assert answer.status_code == 200, (params, answer.text)
    return sorted(entry["status"] for entry in answer.json()["entries"])


def _span(window: str, base: datetime) -> dict[str, str]:
    """The time ranges a filter is checked over: none (read from the rollups), one cut inside
    the entries' minute (read from the entries) and one of whole minutes (the rollups)."""
    if window == "partial":
        since, until = base + timedelta(seconds=10), base + timedelta(minutes=1, seconds=30)
    elif window == "whole":
        since, until = base - timedelta(minutes=1), base + timedelta(minutes=2)
    else:
        return {}
    return {"since": _iso(since), "until": _iso(until)}


WANTED = [
    ("0", [0]),
    ("0xx", [0, 42]),
    ("0XX", [0, 42]),
    ("0xX", [0, 42]),
    ("00", [0]),
    ("42", [42]),
    ("042", [42]),
    ("1xx", []),
    ("2xx", [200]),
    ("4xx", [404]),
    ("404", [404]),
    ("6xx", [650]),
    ("650", [650]),
    ("9xx", [999]),
    ("999", [999]),
    (" 999 ", [999]),
    ("500", []),
]


@pytest.mark.parametrize("window", ["all", "partial", "whole"])
def test_entries_stats_and_endpoints_filter_by_every_status(
    api: httpx.Client, base: datetime, window: str
) -> None:
    """Each code and class lists exactly its entries, and stats and endpoints count them:
    0xx is 0 to 99 (the agents' 0 and a non-standard 42), 6xx and 9xx the non-standard."""
    span = _span(window, base)
    assert _statuses(api, **span) == sorted(STATUSES)
    for status, wanted in WANTED:
        assert _statuses(api, status=status, **span) == wanted, status
        assert _statuses(api, status=status, path="/", **span) == wanted, status  # no rollups

        stats = api.get("/api/stats", params={"status": status, **span})
        assert stats.status_code == 200, (status, stats.text)
        answer = stats.json()
        assert answer["count"] == len(wanted), status
        assert answer["status_codes"] == {str(code): 1 for code in wanted}, status
        classes = Counter(f"{code // 100}xx" for code in wanted)
        assert answer["status_classes"] == classes, status
        assert answer["errors"] == sum(1 for code in wanted if 400 <= code <= 599), status

        endpoints = api.get("/api/endpoints", params={"status": status, **span})
        assert endpoints.status_code == 200, (status, endpoints.text)
        routes = sorted(row["route"] for row in endpoints.json()["endpoints"])
        assert routes == sorted(STATUSES[code] for code in wanted), status
        assert all(row["count"] == 1 for row in endpoints.json()["endpoints"]), status

        har = api.get("/api/export.har", params={"status": status, **span})
        assert har.status_code == 200, (status, har.text)
        exported = [entry["response"]["status"] for entry in har.json()["log"]["entries"]]
        assert sorted(exported) == wanted, status


@pytest.mark.parametrize("window", ["all", "partial", "whole"])
def test_errors_are_the_4xx_and_5xx_answers_only(
    api: httpx.Client, base: datetime, window: str
) -> None:
    """The README's error rate is that of "the 4xx+5xx count", the overview says "N errors
    (4xx, 5xx)" beside its "All 4xx" and "All 5xx" links and draws a 4xx and a 5xx line:
    the non-standard 650 and 999 (the dashboard's "6xx-9xx non-standard") are neither.
    They counted as errors, and as 5xx in the series."""
    span = _span(window, base)
    stats = api.get("/api/stats", params={**span, "interval": "3600"}).json()
    assert stats["count"] == len(STATUSES)
    assert stats["errors"] == 1  # the 404
    assert stats["error_rate"] == round(1 / len(STATUSES), 6)
    series = stats["series"]
    assert sum(point["client_errors"] for point in series) == 1
    assert sum(point["server_errors"] for point in series) == 0
    assert sum(point["errors"] for point in series) == 1
    rows = api.get("/api/endpoints", params=span).json()["endpoints"]
    assert {row["route"]: row["errors"] for row in rows} == {
        path: int(code == 404) for code, path in STATUSES.items()
    }
    services = api.get("/api/services", params=span).json()["services"]
    assert [row["errors"] for row in services] == [1]


BAD = ["1000", "0404", "xx", "x", "4x", "4xxx", "10xx", "-1", "+1", "-0", "1e2", "4.0",
       "0x1", "4 04", "\u0664\u0660\u0664", "\uff14\uff10\uff14", "\u00b2", "\u2463xx"]  # fmt: skip


def test_a_status_that_is_neither_a_code_nor_a_class_is_a_400_naming_it(
    api: httpx.Client,
) -> None:
    """Arabic-Indic ``404`` (which ``int()`` reads), a sign, a fourth digit: a 400 with a
    JSON error naming ``status`` on every endpoint, and the dashboard's 400 page."""
    for status in BAD:
        for path in ("/api/entries", "/api/stats", "/api/endpoints", "/api/consumers",
                     "/api/export.har"):  # fmt: skip
            answer = api.get(path, params={"status": status})
            assert answer.status_code == 400, (path, status, answer.text)
            assert answer.headers["content-type"].startswith("application/json")
            [error] = answer.json()["errors"]
            assert error.startswith("status: ") and "0xx to 9xx" in error, error
        for page in ("/", "/requests"):
            answer = api.get(page, params={"status": status})
            assert answer.status_code == 400, (page, status)
            assert answer.headers["content-type"].startswith("text/html")
            assert "status: " in unescape(answer.text), (page, status)


@pytest.mark.parametrize(
    ("text", "bounds", "query"),
    [
        ("0", (0, 0), "0"),
        ("00", (0, 0), "0"),
        ("0xx", (0, 99), "0xx"),
        ("0XX", (0, 99), "0xx"),
        ("9", (9, 9), "9"),
        ("99", (99, 99), "99"),
        ("099", (99, 99), "99"),
        ("1xx", (100, 199), "1xx"),
        ("404", (404, 404), "404"),
        ("4Xx", (400, 499), "4xx"),
        ("6xx", (600, 699), "6xx"),
        ("999", (999, 999), "999"),
        ("9xx", (900, 999), "9xx"),
    ],
)
def test_a_status_filter_round_trips_through_the_query_string(
    text: str, bounds: tuple[int, int], query: str
) -> None:
    """``low == high`` is a code, else a class: the class 0xx (0 to 99) never prints as
    the code ``0``, and what ``as_query`` prints reads back as the same filter."""
    filters = Filters.from_query({"status": text})
    assert filters.status == bounds
    assert filters.as_query() == {"status": query}
    assert Filters.from_query(filters.as_query()) == filters
    assert Filters.create(status=text) == filters


def test_filters_from_python_values_take_the_same_statuses() -> None:
    assert Filters.create(status=0).status == (0, 0)
    assert Filters.create(status=999).status == (999, 999)
    for bad in (-1, 1000, True, "1000", "-0"):
        with pytest.raises(FilterError, match="^status: "):
            Filters.create(status=bad)


_NOON = int(datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp()) * 1_000_000


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("2026-12-01T12:00:00Z", _NOON),
        ("2026-12-01t12:00:00z", _NOON),
        ("2026-12-01 12:00", _NOON),
        ("2026-12-01T12Z", _NOON),
        ("2026-12-01T12:00:00.5Z", _NOON + 500_000),  # a fraction of any length
        ("2026-12-01T12:00:00.12Z", _NOON + 120_000),
        ("2026-12-01T12:00:00.1234567Z", _NOON + 123_456),
        ("2026-12-01T12:00:00,25Z", _NOON + 250_000),
        ("2026-12-01T13:00:00+01:00", _NOON),  # offsets with and without the colon
        ("2026-12-01T13:00:00+0100", _NOON),
        ("2026-12-01T13:00:00.5+01", _NOON + 500_000),
        ("2026-12-01T10:30:00-01:30", _NOON),
        ("20261201T120000Z", _NOON),  # the basic format
        ("2026-W49-2T12:00:00Z", _NOON),  # a week date
        ("2026-12-01", _NOON - 12 * 3_600_000_000),
    ],
)
def test_since_and_until_take_the_same_iso_forms_on_every_python(text: str, micros: int) -> None:
    """Before 3.11 ``datetime.fromisoformat`` read only what ``isoformat()`` writes."""
    filters = Filters.create(since=text, until=text)
    assert (filters.since, filters.until) == (micros, micros)
    assert Filters.from_query({"since": text}).since == micros


@pytest.mark.parametrize(
    "text", ["2026-12-01T25:00Z", "2026-02-30", "2026-W49-8", "2026-12-01T12:00+24:00", "12:00"]
)
def test_a_since_that_is_no_date_time_is_refused_on_every_python(text: str) -> None:
    with pytest.raises(FilterError, match="^since: .* neither epoch seconds nor an ISO 8601"):
        Filters.create(since=text)


def _links(page: str) -> list[str]:
    return [unescape(href) for href in re.findall(r'href="([^"]*)"', page)]


def test_the_overview_links_every_status_class_and_code_to_the_filtered_log(
    api: httpx.Client,
) -> None:
    """The status panel links 0xx, 6xx and 9xx (and the codes 0, 42, 650, 999) as it links
    2xx and 4xx, and each link lists exactly that status's requests."""
    overview = api.get("/")
    assert overview.status_code == 200
    links = _links(overview.text)
    classes = ("0xx", "2xx", "4xx", "6xx", "9xx")
    for status in (*classes, *(str(code) for code in STATUSES)):
        assert f"/requests?status={status}" in links, status
    table = re.search(r'<table class="codes">(.*?)</table>', overview.text, re.S)
    assert table is not None
    rows = [int(code) for code in re.findall(r'href="/requests\?status=(\d+)"', table.group(1))]
    assert rows == sorted(STATUSES)  # in numeric order: 42 before 200 and 404
    text = re.sub(r"<[^>]+>", "", unescape(overview.text))
    assert "0xx no response: 2" in text and "6xx non-standard: 1" in text
    for status, wanted in [("0xx", [0, 42]), ("0", [0]), ("6xx", [650]), ("999", [999])]:
        log = api.get("/requests", params={"status": status})
        assert log.status_code == 200, status
        listed = {code for code, path in STATUSES.items() if f">{path}<" in log.text}
        assert sorted(listed) == wanted, status


def test_a_negative_status_of_alf_1_0_0_is_shown_but_not_linked(base: datetime) -> None:
    """ALF 1.0.0's schema sets no minimum status and ingest takes it: such a status is no
    filter the API takes, so the overview shows it unlinked; every link it has answers."""
    alf = load("1.0.0", "minimal.json")
    [template] = alf["har"]["log"]["entries"]
    entries = alf["har"]["log"]["entries"] = [copy.deepcopy(template) for _ in range(2)]
    for entry, status in zip(entries, (-5, 0), strict=True):
        entry["response"]["status"] = status
        entry["startedDateTime"] = _iso(base)
    with Collector() as collector, httpx.Client(base_url=collector.url, timeout=10.0) as api:
        assert api.post("/1.0.0/single", json=alf).status_code == 200
        assert collector.wait_for_entries(2)
        overview = api.get("/")
        assert overview.status_code == 200
        links = _links(overview.text)
        assert "/requests?status=0" in links and "/requests?status=0xx" in links
        assert not [link for link in links if "status=-" in link]
        assert "-5" in re.sub(r"<[^>]+>", "", overview.text)
        for link in {link for link in links if link.startswith("/requests?status=")}:
            assert api.get(link).status_code == 200, link


def test_the_requests_page_offers_and_keeps_every_status_class(api: httpx.Client) -> None:
    """The Status input suggests 0xx to 9xx, takes letters (no digits-only keypad), and
    shows the filter it was given back in the input and as a chip."""
    page = api.get("/requests", params={"status": "0xx"})
    assert page.status_code == 200
    field = re.search(r'<input name="status"[^>]*>', page.text)
    assert field is not None and 'value="0xx"' in field.group(0)
    assert "inputmode" not in field.group(0)
    choices = re.search(r'<datalist id="status-choices">(.*?)</datalist>', page.text, re.S)
    assert choices is not None
    offered = re.findall(r'<option value="([^"]+)"', choices.group(1))
    assert offered == [f"{digit}xx" for digit in range(10)]
    assert 'label="0xx no response"' in choices.group(1)


# -- a read key that is a service token --------------------------------------------------------

SHARED = "shared-secret-value-8642"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith("ALF_COLLECTOR_")
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    environ.update(env or {})
    return subprocess.run(
        cli_command("collector", "--port", "0", "--db", ":memory:", *args),
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def _assert_refused(done: subprocess.CompletedProcess[str], name: str | None) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    [line] = lines
    assert line.startswith("alf-analytics: the read key is also "), line
    assert "could read all stored data" in line
    if name is not None:
        assert f"the service token {name!r}" in line
    assert SHARED not in line and SHARED[-4:] not in line  # not even its mask


@pytest.mark.parametrize("spec", [f"billing={SHARED}", SHARED], ids=["named", "unnamed"])
def test_the_cli_refuses_a_read_key_that_is_a_token_option(spec: str) -> None:
    done = _cli("--token", "other-token-1111", "--token", spec, "--read-key", SHARED)
    _assert_refused(done, "billing" if "=" in spec else None)


def test_the_cli_refuses_it_from_a_tokens_file_and_the_environment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# comment\nbilling={SHARED}\n", encoding="utf-8")
    _assert_refused(_cli("--tokens-file", str(tokens), "--read-key", SHARED), "billing")
    from_env = {"ALF_COLLECTOR_TOKENS": f"a-token-0000,{SHARED}", "ALF_COLLECTOR_READ_KEY": SHARED}
    _assert_refused(_cli(env=from_env), None)
    # Refused before anything else: also with --workers (whose processes never start).
    _assert_refused(_cli("--workers", "2", "--token", SHARED, "--read-key", SHARED), None)


def _assert_settings_error(error: pytest.ExceptionInfo[SettingsError]) -> None:
    assert isinstance(error.value, ValueError) and isinstance(error.value, CollectorError)
    message = str(error.value)
    assert message.startswith("the read key is also ") and SHARED[-4:] not in message


def test_the_factory_refuses_a_read_key_that_is_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as error:
        create_app(":memory:", tokens=[f"billing={SHARED}"], read_key=SHARED)
    _assert_settings_error(error)
    assert "'billing'" in str(error.value)
    with pytest.raises(ValueError, match="^the read key is also an accepted service token"):
        create_app(":memory:", tokens=TokenSet.parse([SHARED]), read_key=SHARED)
    with pytest.raises(SettingsError) as error:
        Collector(tokens=[SHARED], read_key=SHARED)
    _assert_settings_error(error)
    monkeypatch.setenv("ALF_COLLECTOR_TOKENS", f"one-token-2222,{SHARED}")
    monkeypatch.setenv("ALF_COLLECTOR_READ_KEY", SHARED)
    with pytest.raises(SettingsError) as error:
        create_app(":memory:")  # both read from the environment
    _assert_settings_error(error)


def test_a_read_key_that_only_resembles_a_token_is_accepted() -> None:
    """Only the very same string is refused: a token that holds the key, or a token's name
    equal to it, leaves agents without the key."""
    store = open_store(":memory:")
    try:
        for tokens, key in [
            ([f"{SHARED}-x"], SHARED),
            ([SHARED.upper()], SHARED),
            ([f"{SHARED}=other-token-3333"], SHARED),  # a token named like the key
            ([f"billing={SHARED}"], "billing"),
            ([], SHARED),
        ]:
            app: Any = create_app(store, tokens=tokens, read_key=key)
            assert app.state.read_access.read_key == key
    finally:
        store.close()
