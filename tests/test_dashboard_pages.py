"""The dashboard's HTTP side without a browser: access, cookies, headers, figures, packaging.

Against a real collector (the app under uvicorn) filled by a real agent, over loopback HTTP.
The browser tests (test_dashboard.py) cover what needs a page to run.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import alf_analytics
from alf_analytics.collector import Collector, dashboard, queries
from tests.pg import PostgresServer, pg_server, reader_of_a_stopped_database
from tests.test_collector import make_alf
from tests.test_dashboard import (
    BIG_BODY,
    GZIP_JSON,
    LATIN1_TEXT,
    READ_KEY,
    TOKEN,
    Traffic,
    agent_client,
    backend_db,
)

__all__ = ["pg_server"]  # a fixture, imported for pytest

LONG_PASSWORD = "a-very-very-long-password-value-0123456789"
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "alf_analytics" / "collector"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request: pytest.FixtureRequest) -> Iterator[tuple[Collector, Traffic]]:
    traffic = Traffic()
    with Collector(backend_db(request), read_key=READ_KEY, tokens=[f"web={TOKEN}"]) as collector:
        with agent_client(collector, "pages") as client:
            for i in range(6):
                traffic.send(client, "GET", f"/items/{i}", headers={"X-User": "alice"})
            for _ in range(3):
                traffic.send(client, "GET", "/boom")
            traffic.send(client, "GET", "/missing")
            for password in (LONG_PASSWORD, "short"):  # redacted: longer and shorter
                traffic.send(client, "POST", "/items", json={"name": "np", "password": password})
            traffic.send(client, "GET", "/latin1")
            traffic.send(client, "GET", "/latin1", params={"charset": "no-such-charset"})
            traffic.send(client, "GET", "/gzip")
            traffic.send(client, "GET", "/big")
        alf_analytics.flush(10)
        assert collector.wait_for_entries(traffic.total, 10)
        yield collector, traffic
    alf_analytics.close(timeout=2.0)


@pytest.fixture
def anonymous(filled: tuple[Collector, Traffic]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=filled[0].url, timeout=10) as client:
        yield client


@pytest.fixture
def reader(anonymous: httpx.Client) -> httpx.Client:
    response = anonymous.post("/login", data={"key": READ_KEY, "next": "/"})
    assert response.status_code == 303
    return anonymous


def figure(page: str, name: str) -> str:
    match = re.search(rf'data-figure="{name}">([^<]*)<', page)
    assert match, name
    return html.unescape(match.group(1))


# -- access ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/requests?status=5xx", "/requests/1"])
def test_no_page_shows_data_without_the_read_key(anonymous: httpx.Client, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 303
    assert response.text == ""
    location = urlsplit(response.headers["location"])
    assert location.path == "/login" and parse_qs(location.query)["next"] == [path]

    anonymous.cookies.set("alf_read", "0" * 64)  # a forged cookie is no better
    assert anonymous.get(path).status_code == 303


def test_the_bearer_header_opens_the_pages_too(anonymous: httpx.Client) -> None:
    response = anonymous.get("/", headers={"Authorization": f"Bearer {READ_KEY}"})
    assert response.status_code == 200
    assert "Top endpoints" in response.text


def test_login_sets_an_httponly_strict_cookie_that_is_not_the_key(
    anonymous: httpx.Client,
) -> None:
    response = anonymous.post("/login", data={"key": READ_KEY, "next": "/requests?status=500"})
    assert response.status_code == 303
    assert response.headers["location"] == "/requests?status=500"
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain http on loopback: a Secure cookie would be lost
    assert READ_KEY not in cookie
    assert anonymous.get("/requests?status=500").status_code == 200


def test_a_wrong_key_is_refused_with_the_login_page(anonymous: httpx.Client) -> None:
    response = anonymous.post("/login", data={"key": "guess", "next": "/"})
    assert response.status_code == 401
    assert "That is not the read key." in response.text
    assert "set-cookie" not in response.headers
    assert anonymous.post("/login", data={"key": ""}).status_code == 401


def test_a_login_body_is_bounded(anonymous: httpx.Client) -> None:
    response = anonymous.post("/login", data={"key": "x" * 10_000})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"]
)
def test_login_never_redirects_off_site(anonymous: httpx.Client, target: str) -> None:
    response = anonymous.post("/login", data={"key": READ_KEY, "next": target})
    assert response.headers["location"] == "/"


def test_logout_forgets_the_cookie(reader: httpx.Client) -> None:
    response = reader.post("/logout")
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert re.search(r'alf_read=(""|);', response.headers["set-cookie"])
    assert "max-age=0" in response.headers["set-cookie"].lower()
    assert reader.get("/").status_code == 303


def test_a_collector_without_read_key_shows_the_dashboard_at_once() -> None:
    with Collector() as collector, httpx.Client(base_url=collector.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "Log out" not in page.text
        assert client.get("/login?next=/requests").headers["location"] == "/requests"


# -- what every page carries -------------------------------------------------------------------


def test_pages_forbid_inline_script_and_caching(anonymous: httpx.Client) -> None:
    pages = [anonymous.get("/login")]
    anonymous.post("/login", data={"key": READ_KEY})
    pages += [anonymous.get(path) for path in ("/", "/requests", "/requests/1")]
    for page in pages:
        assert page.status_code == 200
        headers = page.headers
        policy = headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/?range=2y", "range must be one of"),
        ("/requests?status=abc", "status"),
        ("/requests?since=yesterday", "since"),
        ("/requests?cursor=not-a-cursor", "cursor"),
        ("/?sort=bogus", "sort must be one of: count, errors, error_rate, p50, p95, p99"),
        ("/requests?until=-99999999999", "until: "),  # epoch seconds before the year 1
        ("/?since=-99999999999", "since: "),
    ],
)
def test_a_bad_filter_is_a_400_page_that_says_why(
    reader: httpx.Client, path: str, reason: str
) -> None:
    response = reader.get(path)
    assert response.status_code == 400
    [alert] = re.findall(r'<p class="error" role="alert">([^<]*)</p>', response.text)
    assert reason in html.unescape(alert)


@pytest.mark.parametrize("path", ["/", "/requests"])
def test_a_to_time_early_in_year_one_starts_the_range_at_year_one(
    reader: httpx.Client, path: str
) -> None:
    """As ``/api/...?until=0001-01-01T00:30:00Z`` answers (nothing stored so early), the
    page does too: its range, cut at the year 1, is not an error."""
    for until in ("0001-01-01T00:30:00Z", "0001-01-01T00:00:00Z"):
        response = reader.get(path, params={"until": until, "range": "24h"})
        assert response.status_code == 200, response.text
        assert 'role="alert"' not in response.text
    assert (
        reader.get("/api/entries", params={"until": "0001-01-01T00:30:00Z"}).json()["entries"] == []
    )


def test_a_bad_sort_is_refused_and_not_carried_on(reader: httpx.Client) -> None:
    """``sort`` is checked like every other name in the URL (the API's ``/api/endpoints``
    refuses it too); its 400 page's forms do not carry the bad value on."""
    response = reader.get("/", params={"environment": "pages", "sort": "bogus"})
    assert response.status_code == 400
    [alert] = re.findall(r'<p class="error" role="alert">([^<]*)</p>', response.text)
    assert alert.startswith("sort must be one of")
    assert all(key in alert for key in dashboard.ENDPOINT_SORTS)
    assert "bogus" not in response.text.replace(alert, "").split("<main>", 1)[1]
    assert reader.get("/api/endpoints", params={"sort": "bogus"}).status_code == 400
    for sort in ("", "count", "p95", "error_rate"):
        assert reader.get("/", params={"sort": sort}).status_code == 200, sort


def test_an_unknown_entry_is_a_404_page(reader: httpx.Client) -> None:
    response = reader.get("/requests/999999")
    assert response.status_code == 404
    assert "There is no entry 999999" in response.text


def test_the_vendored_chart_library_is_served_with_its_license(anonymous: httpx.Client) -> None:
    script = anonymous.get("/static/vendor/uPlot.iife.min.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.text.startswith("/*! https://github.com/leeoniya/uPlot")
    license_text = anonymous.get("/static/vendor/uPlot.LICENSE").text
    assert "The MIT License" in license_text and "Leon Sorokin" in license_text


# -- one source of truth -----------------------------------------------------------------------


def test_overview_figures_are_the_query_apis(
    reader: httpx.Client, filled: tuple[Collector, Traffic]
) -> None:
    _, traffic = filled
    page = reader.get("/", params={"environment": "pages"}).text
    # The page resolved "last hour" into since=...; ask the API the same.
    api = reader.get("/api/stats", params={"environment": "pages"}).json()
    assert api["count"] == traffic.total
    assert figure(page, "count") == dashboard.fmt_count(api["count"])
    assert figure(page, "error_rate") == dashboard.fmt_rate(api["error_rate"])
    rows = re.findall(r'<td class="route"><a href="([^"]+)"[^>]*>([^<]+)</a>', page)
    endpoints = reader.get("/api/endpoints", params={"environment": "pages"}).json()
    assert [html.unescape(route) for _, route in rows] == [
        row["route"] for row in endpoints["endpoints"]
    ]
    href = html.unescape(rows[0][0])
    assert parse_qs(urlsplit(href).query) == {
        "environment": ["pages"],
        "method": [endpoints["endpoints"][0]["method"]],
        "route": [endpoints["endpoints"][0]["route"]],
    }


def test_the_logs_har_download_holds_what_the_log_lists(reader: httpx.Client) -> None:
    page = reader.get("/requests", params={"environment": "pages", "status": "5xx"}).text
    [link] = re.findall(r'href="(/api/export\.har\?[^"]*)"', page)
    link = html.unescape(link)
    query = parse_qs(urlsplit(link).query)
    assert query["status"] == ["5xx"] and query["environment"] == ["pages"]
    since = datetime.fromisoformat(query["since"][0])
    assert timedelta(minutes=59) < datetime.now(timezone.utc) - since < timedelta(minutes=61)
    har = reader.get(link).json()
    statuses = [entry["response"]["status"] for entry in har["log"]["entries"]]
    assert statuses == [500, 500, 500]
    assert page.count('class="status s5xx"') == 3


def scope_form(page: str) -> dict[str, str]:
    """The hidden fields of a page's service/environment/range form."""
    match = re.search(r'<form class="scope".*?</form>', page, re.S)
    assert match
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', match.group(0))
    return {name: html.unescape(value) for name, value in fields}


@pytest.mark.parametrize("path", ["/", "/requests"])
def test_the_scope_form_keeps_the_filters_narrower_than_it(reader: httpx.Client, path: str) -> None:
    """Choosing a service, environment or range (the form posts without JavaScript too)
    keeps status, method, path, route, consumer and a "To" on both pages."""
    narrower = {
        "status": "5xx",
        "method": "GET",
        "path": "/bo",
        "route": "/boom",
        "consumer": "alice & bob",
        "until": "2099-01-01T00:00:00",
    }
    page = reader.get(path, params={"environment": "pages", "range": "6h", **narrower})
    assert page.status_code == 200
    assert scope_form(page.text) == narrower


# -- bodies as the real agent captured them ------------------------------------------------------


def body_lines(page: str) -> list[str]:
    """What a detail page says above its request body and its response body."""
    lines = re.findall(r'<h3>Body</h3>\s*<p class="[^"]*">(.*?)</p>', page, re.S)
    assert len(lines) == 2, lines
    return [html.unescape(line) for line in lines]


def details(reader: httpx.Client, **params: str) -> list[dict[str, Any]]:
    """``/api/entries/{id}`` of each of the module's entries the filters pick, newest first."""
    listed = reader.get("/api/entries", params={"environment": "pages", **params}).json()
    return [reader.get(f"/api/entries/{row['id']}").json() for row in listed["entries"]]


def test_a_redacted_body_is_whole_and_shows_the_size_sent(reader: httpx.Client) -> None:
    """Redacting a password makes the stored JSON shorter (or longer) than the body sent; it
    is still the whole body (``bodyCaptured``), shown with the size sent, never as cut."""
    posted = details(reader, method="POST", path="/items")
    assert len(posted) == 2
    for detail in posted:
        request, response = detail["entry"]["request"], detail["entry"]["response"]
        assert request["bodyCaptured"] is True and response["bodyCaptured"] is True
        sent = request["bodySize"]
        assert detail["bodies"]["request"]["size"] != sent  # the redacted copy's length
        page = reader.get(f"/requests/{detail['id']}").text
        line = f"JSON · {dashboard.fmt_bytes(sent)} · application/json"
        assert body_lines(page) == [line, line]  # the response echoes the request
        assert "[REDACTED]" in page and LONG_PASSWORD not in page


def test_a_compressed_body_shows_the_size_sent_and_decoded(reader: httpx.Client) -> None:
    [detail] = details(reader, path="/gzip")
    response = detail["entry"]["response"]
    decoded = len(json.dumps(GZIP_JSON).encode())
    assert response["bodyCaptured"] is True and 0 < response["bodySize"] < decoded
    assert detail["bodies"]["response"]["size"] == decoded
    page = reader.get(f"/requests/{detail['id']}").text
    sent, whole = dashboard.fmt_bytes(response["bodySize"]), dashboard.fmt_bytes(decoded)
    assert body_lines(page)[1] == f"JSON · {sent} (gzip, {whole} decoded) · application/json"
    assert "captured" not in body_lines(page)[1]


def test_a_body_cut_at_max_body_bytes_says_how_much_was_captured(reader: httpx.Client) -> None:
    [detail] = details(reader, path="/big")
    response = detail["entry"]["response"]
    assert response["bodyCaptured"] is False and response["bodySize"] == len(BIG_BODY)
    held = detail["bodies"]["response"]["size"]
    assert 0 < held < len(BIG_BODY)
    page = reader.get(f"/requests/{detail['id']}").text
    assert body_lines(page)[1] == (
        f"Text · {dashboard.fmt_bytes(len(BIG_BODY))}, "
        f"first {dashboard.fmt_bytes(held)} captured · text/plain"
    )


def test_text_in_a_declared_charset_is_read_in_it(reader: httpx.Client) -> None:
    """Latin-1 text declared as such is text, on the page and in the API; declared in a
    charset Python does not know it is read as UTF-8, as without one: binary."""
    unknown, known = details(reader, path="/latin1")
    size = len(LATIN1_TEXT.encode("iso-8859-1"))
    mime = "text/plain; charset=iso-8859-1"
    assert known["bodies"]["response"] == {
        "kind": "text",
        "text": LATIN1_TEXT,
        "size": size,
        "mime_type": mime,
    }
    page = reader.get(f"/requests/{known['id']}").text
    assert body_lines(page)[1] == f"Text · {size} B · {mime}"
    assert f'<pre class="body text">{LATIN1_TEXT}</pre>' in page

    assert unknown["bodies"]["response"]["kind"] == "binary"
    page = reader.get(f"/requests/{unknown['id']}").text
    expected = f"Binary body, {size} B (text/plain; charset=no-such-charset); not shown."
    assert body_lines(page)[1] == expected


# -- time windows and bodies: entries at known times, posted to the ingest API -------------------


@pytest.fixture(scope="module")
def dated() -> Iterator[tuple[Collector, datetime]]:
    """A collector holding entries of known times: three two days ago ("old"), two a minute
    ago ("recent"), one with a partly captured and an uncaptured body ("bodies"), and text
    in declared charsets ("charsets")."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = [now - timedelta(days=2, minutes=m) for m in (0, 10, 20)]
    recent = [now - timedelta(minutes=1)] * 2
    with Collector(read_key=READ_KEY, tokens=[f"web={TOKEN}"]) as collector:
        with httpx.Client(base_url=collector.url, timeout=10) as client:
            charsets = [now] * len(CHARSET_BODIES)
            for environment, times in (
                ("old", old),
                ("recent", recent),
                ("bodies", [now]),
                ("charsets", charsets),
            ):
                calls = [
                    ("GET", f"https://shop.test/{environment}/{i}", 200, 5.0)
                    for i in range(len(times))
                ]
                alf = make_alf(calls, token=TOKEN, environment=environment)
                for entry, when in zip(alf["har"]["log"]["entries"], times, strict=True):
                    entry["startedDateTime"] = when.isoformat().replace("+00:00", "Z")
                if environment == "bodies":
                    _partly_captured(alf["har"]["log"]["entries"][0])
                if environment == "charsets":
                    for entry, (mime, data, _) in zip(
                        alf["har"]["log"]["entries"], CHARSET_BODIES, strict=True
                    ):
                        entry["response"]["content"] = {
                            "mimeType": mime,
                            "encoding": "base64",
                            "text": base64.b64encode(data).decode(),
                        }
                        entry["response"].update(bodyCaptured=True, bodySize=len(data))
                response = client.post("/1.1.0/single", json=alf)
                assert response.status_code == 200, response.text
        yield collector, now


#: Response bodies of the "charsets" entries: (content type, bytes, the API's decoded kind and
#: text). A declared charset reads the bytes when Python has it as a text codec; the
#: control-character check still applies; "base64" is a codec but not a text one.
CHARSET_BODIES: list[tuple[str, bytes, tuple[str, str]]] = [
    ("text/plain; charset=ISO-8859-1", "Grüße".encode("latin-1"), ("text", "Grüße")),
    ('text/csv; charset="windows-1252"', "a;€\r\n".encode("cp1252"), ("text", "a;€\r\n")),
    (
        "application/json; charset=utf-16",
        '{"name": "Zoë"}'.encode("utf-16"),
        ("json", '{\n  "name": "Zoë"\n}'),
    ),
    ("text/plain; charset=utf-8", b"caf\xe9 au lait", ("text", "caf\ufffd au lait")),
    ("text/plain; charset=iso-8859-1", b"bell\x07\x00\x01", ("binary", "")),
    ("text/plain; charset=base64", "Grüße".encode("latin-1"), ("binary", "")),
    ("text/plain; charset=base64", "Grüße".encode(), ("text", "Grüße")),
]


@pytest.mark.parametrize(("mime", "data", "shown"), CHARSET_BODIES)
def test_a_har_request_body_is_read_in_its_charset_as_the_page_reads_it(
    mime: str, data: bytes, shown: tuple[str, str]
) -> None:
    """HAR's postData has no base64: a text body is written as the text the page shows (not
    pretty-printed), a binary one left out with a comment saying so."""
    part = {"mimeType": mime, "encoding": "base64", "text": base64.b64encode(data).decode()}
    har = queries._har_content(part, for_request=True)
    kind, _ = shown
    if kind == "binary":
        assert har == {"mimeType": mime, "text": "", "comment": "binary body left out"}
    else:
        charset = queries._declared_charset(mime)
        try:
            expected = data.decode(charset, "replace")
        except LookupError:
            expected = data.decode("utf-8")
        assert har == {"mimeType": mime, "text": expected}


def _partly_captured(entry: dict[str, Any]) -> None:
    """1 KiB of a 5,000-byte binary upload captured; a 68-byte response not captured at all."""
    entry["request"]["method"] = "POST"
    entry["request"].update(bodyCaptured=False, bodySize=5000)
    entry["request"]["postData"] = {
        "mimeType": "application/octet-stream",
        "encoding": "base64",
        "text": base64.b64encode(bytes(range(256)) * 4).decode(),
    }
    entry["response"].update(bodyCaptured=False, bodySize=68)


@pytest.fixture
def dated_reader(dated: tuple[Collector, datetime]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    with httpx.Client(base_url=dated[0].url, headers=headers, timeout=10) as client:
        yield client


def chart_of(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', page)
    assert match
    chart: dict[str, Any] = json.loads(match.group(1))
    return chart


def test_a_to_time_alone_ends_the_range_there(
    dated_reader: httpx.Client, dated: tuple[Collector, datetime]
) -> None:
    """A "To" two days back with the default "last hour" lists that hour, not nothing."""
    _, now = dated
    until = (now - timedelta(days=2) + timedelta(minutes=1)).isoformat()
    page = dated_reader.get("/requests", params={"environment": "old", "until": until}).text
    assert page.count("data-entry-id=") == 3
    [link] = re.findall(r'href="(/api/export\.har\?[^"]*)"', page)
    query = parse_qs(urlsplit(html.unescape(link)).query)
    assert datetime.fromisoformat(query["since"][0]) == datetime.fromisoformat(until) - timedelta(
        hours=1
    )
    params = {"environment": "old", "until": until, "range": "15m"}
    page = dated_reader.get("/requests", params=params).text
    assert page.count("data-entry-id=") == 2
    assert figure(dated_reader.get("/", params=params).text, "count") == "2"


def test_all_time_charts_the_selections_own_span_up_to_now(
    dated_reader: httpx.Client, dated: tuple[Collector, datetime]
) -> None:
    """The "All time" chart spans from the selection's first entry to now, every bucket."""
    _, now = dated
    asked = datetime.now(timezone.utc)
    for environment, first in (
        ("recent", now - timedelta(minutes=1)),
        ("old", now - timedelta(days=2, minutes=20)),
    ):
        page = dated_reader.get("/", params={"environment": environment, "range": "all"}).text
        chart = chart_of(page)
        interval, times = chart["interval"], chart["columns"]["t"]
        assert times[0] == int(first.timestamp()) // interval * interval, environment
        assert times[-1] >= int(asked.timestamp()) // interval * interval, environment
        assert times == list(range(times[0], times[-1] + 1, interval))
        assert (chart["start"], chart["end"]) == (times[0], times[-1] + interval)
        assert sum(count > 0 for count in chart["columns"]["count"]) in (1, 2)
        assert chart["columns"]["count"][-1] == 0  # the minute asked in is quiet


def test_detail_says_how_much_of_a_body_was_captured(dated_reader: httpx.Client) -> None:
    [row] = dated_reader.get("/api/entries", params={"environment": "bodies"}).json()["entries"]
    page = dated_reader.get(f"/requests/{row['id']}").text
    assert (
        "Binary body, 4.9 KiB (application/octet-stream), first 1.0 KiB captured; not shown."
        in page
    )
    assert "No body captured (68 B sent)." in page


def test_the_apis_decoded_bodies_follow_the_declared_charset(dated_reader: httpx.Client) -> None:
    listed = dated_reader.get("/api/entries", params={"environment": "charsets"}).json()
    ids = sorted(row["id"] for row in listed["entries"])
    assert len(ids) == len(CHARSET_BODIES)
    for entry_id, (mime, data, (kind, text)) in zip(ids, CHARSET_BODIES, strict=True):
        body = dated_reader.get(f"/api/entries/{entry_id}").json()["bodies"]["response"]
        assert body == {"kind": kind, "text": text, "size": len(data), "mime_type": mime}


def test_epoch_seconds_in_the_url_are_read_like_their_iso_form(
    dated_reader: httpx.Client, dated: tuple[Collector, datetime]
) -> None:
    """The API takes "ISO 8601 or epoch seconds" and the pages take the API's names: an
    epoch ``until``/``since`` lists, shows (chip, From/To inputs) and links like its ISO form."""
    _, now = dated
    until = now - timedelta(days=2) + timedelta(minutes=1)
    since = until - timedelta(minutes=5)  # holds the newest of the three "old" entries

    def view(path: str, **params: str) -> dict[str, Any]:
        response = dated_reader.get(path, params={"environment": "old", **params})
        assert response.status_code == 200
        page = response.text
        chips = re.findall(r'data-chip="(\w+)">\w+: <time datetime="([^"]*)"[^>]*>([^<]*)<', page)
        return {
            "rows": re.findall(r'data-entry-id="(\d+)"', page),
            "figure": figure(page, "count") if path == "/" else None,
            "chips": chips,
            "inputs": re.findall(r'type="datetime-local" name="(\w+)" value="([^"]*)"', page),
            "har": [
                {
                    key: queries.to_micros(value) if key in ("since", "until") else value
                    for key, [value] in parse_qs(html.unescape(query)).items()
                }
                for query in re.findall(r'href="/api/export\.har\?([^"]*)"', page)
            ],
        }

    for path in ("/", "/requests"):
        for params in ({"until": until}, {"since": since}, {"since": since, "until": until}):
            iso_form = view(path, **{key: value.isoformat() for key, value in params.items()})
            epoch = view(path, **{key: f"{value.timestamp():.0f}" for key, value in params.items()})
            assert epoch == iso_form, (path, params)
            assert [(key, datetime.fromisoformat(value)) for key, value, _ in epoch["chips"]] == [
                (key, params[key]) for key in ("since", "until") if key in params
            ]
            assert all(text == dashboard.fmt_time(params[key]) for key, _, text in epoch["chips"])
            if path == "/requests":
                assert len(epoch["rows"]) == (1 if "since" in params else 3)
                assert epoch["inputs"] == [
                    (key, params[key].strftime("%Y-%m-%dT%H:%M:%S") if key in params else "")
                    for key in ("since", "until")
                ]


# -- helpers -----------------------------------------------------------------------------------


def test_formatting() -> None:
    assert dashboard.fmt_count(1234567) == "1,234,567"
    assert [dashboard.fmt_ms(v) for v in (0.123, 42.4, 1500, None)] == [
        "0.12 ms",
        "42 ms",
        "1.50 s",
        "–",
    ]
    assert [dashboard.fmt_bytes(v) for v in (512, 2048, 5 * 1024**2, -1)] == [
        "512 B",
        "2.0 KiB",
        "5.0 MiB",
        "–",
    ]
    assert [dashboard.fmt_rate(v) for v in (0, 0.0004, 0.1234, 1)] == [
        "0 %",
        "< 0.1 %",
        "12.3 %",
        "100.0 %",
    ]
    assert dashboard.fmt_time("2026-12-02T07:59:01.123Z") == "2026-12-02 07:59:01"
    # Epoch seconds read as the API reads them, whole or not.
    assert dashboard.fmt_time("1796198400") == "2026-12-02 08:00:00"
    assert dashboard.local_input("1796198400.5") == "2026-12-02T08:00:00"
    assert dashboard.iso("1796198400.5") == "2026-12-02T08:00:00.500000+00:00"
    assert dashboard.iso("-99999999999") == "" and dashboard.iso("soon") == ""
    assert dashboard.status_label("4xx") == "4xx client error"
    assert dashboard.status_label("0xx") == "0xx no response"
    buckets = [dashboard.fmt_bucket(s) for s in (300, 1800, 3600, 10_800, 43_200, 86_400)]
    assert buckets == ["5-minute", "30-minute", "1-hour", "3-hour", "12-hour", "1-day"]
    assert dashboard.status_class(503) == "5xx" and dashboard.status_class(None) == "other"


def test_chart_buckets_keep_charts_under_a_few_hundred_points() -> None:
    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    for span, interval in [
        (timedelta(minutes=15), 60),
        (timedelta(hours=1), 60),
        (timedelta(hours=6), 300),
        (timedelta(days=1), 900),
        (timedelta(days=7), 3600),
        (timedelta(days=30), 21_600),
    ]:
        assert dashboard.chart_interval(now - span, now) == interval


def test_chart_data_is_per_minute_with_gaps_for_quiet_buckets() -> None:
    series = [
        {"t": "2026-12-02T08:00:00Z", "count": 10, "client_errors": 5, "server_errors": 0,
         "p50": 1.0, "p95": 2.0, "p99": 3.0},
        {"t": "2026-12-02T08:05:00Z", "count": 0, "client_errors": 0, "server_errors": 0,
         "p50": None, "p95": None, "p99": None},
    ]  # fmt: skip
    columns = dashboard.chart_data(series, 300)["columns"]
    assert columns["t"] == [1796198400, 1796198700]
    assert columns["count"] == [2.0, 0.0] and columns["client_errors"] == [1.0, 0.0]
    assert columns["p95"] == [2.0, None]


def test_entry_view_reads_any_stored_shape() -> None:
    view = dashboard.EntryView(
        {
            "entry": {
                "request": {"headers": [{"name": "a", "value": "1"}, "junk", {"value": 2}]},
                "timings": {"blocked": -1, "send": 1, "wait": 2, "receive": 1, "ssl": "x"},
            },
            "bodies": None,
        }
    )
    assert view.request_headers == [("a", "1"), ("", "2")]
    assert view.response_headers == [] and view.query == [] and view.status is None
    assert [(phase, x, width) for phase, _, x, width in view.timing_bar] == [
        ("send", 0.0, 250.0),
        ("wait", 250.0, 500.0),
        ("receive", 750.0, 250.0),
    ]
    assert dashboard.EntryView({}).timing_bar == []


def test_body_facts_take_body_captured_over_lengths() -> None:
    """Whole or cut comes from ``bodyCaptured``, the size shown from ``bodySize``; only an
    entry without ``bodyCaptured`` (another sender) is judged by the lengths."""
    of = dashboard.BodyFacts.of
    redacted = of({"bodySize": 83, "bodyCaptured": True}, {"size": 51})
    assert (redacted.size, redacted.prefix, redacted.decoded) == (83, None, None)
    longer = of({"bodySize": 41, "bodyCaptured": True}, {"size": 44})
    assert (longer.size, longer.prefix) == (41, None)
    cut = of({"bodySize": 5000, "bodyCaptured": False}, {"size": 1024})
    assert (cut.size, cut.prefix, cut.decoded) == (5000, 1024, None)
    gzipped: dict[str, Any] = {"bodySize": 236, "bodyCaptured": True}
    gzipped["headers"] = [{"name": "Content-Encoding", "value": "gzip"}]
    compressed = of(gzipped, {"size": 1200})
    assert (compressed.size, compressed.prefix, compressed.decoded) == (236, None, 1200)
    assert compressed.coding == "gzip"
    assert of({"bodySize": -1, "bodyCaptured": False}, {"size": 10}).size is None
    assert of({"bodySize": 68, "bodyCaptured": False}, {"size": 0}).prefix is None
    assert of({"bodySize": 5000}, {"size": 1024}).prefix == 1024
    assert of({"bodySize": 10}, {"size": 10}).prefix is None
    assert of({}, {"size": 10}).size == 10


def test_pages_answer_an_html_503_while_the_database_is_down(pg_server: PostgresServer) -> None:
    """With PostgreSQL gone the pages say so, as a 503 with Retry-After (the API's JSON 503),
    never an Internal Server Error; the login page still works."""
    with reader_of_a_stopped_database("/") as (client, url):
        for path in ("/", "/requests?status=5xx", "/requests/1"):
            down = client.get(url + path)
            assert down.status_code == 503, (path, down.text)
            assert down.headers["retry-after"] == "5"
            assert down.headers["content-type"].startswith("text/html")
            assert "The collector cannot read its store right now" in down.text, path
        with httpx.Client(trust_env=False, timeout=60.0) as anonymous:
            assert anonymous.get(url + "/login").status_code == 200


@pytest.mark.slow
def test_the_wheel_ships_every_template_and_static_file(tmp_path: Path) -> None:
    """``pip install`` brings the dashboard: templates, script, styles, uPlot and its license."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("alf_analytics-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        "alf_analytics/collector/" + str(path.relative_to(PACKAGE))
        for folder in ("templates", "static")
        for path in (PACKAGE / folder).rglob("*")
        if path.is_file()
    }
    assert "alf_analytics/collector/static/vendor/uPlot.LICENSE" in wanted
    assert "alf_analytics/collector/templates/overview.html" in wanted
    assert wanted <= shipped, wanted - shipped
