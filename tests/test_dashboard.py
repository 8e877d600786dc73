"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

One collector (the real app under uvicorn, with a read key) is filled once per module by a
real agent (AnalyticsWSGIMiddleware around a small WSGI app, driven by httpx), and one
browser serves every test. Each page a test opens is watched: a console error, an uncaught
exception or a dialog (an ``alert`` that got through) fails the test that opened it.

Without Chromium or Playwright these tests are skipped with the reason; under CI=true they
fail instead, because CI must run them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

import alf_analytics
from alf_analytics.collector import Collector
from alf_analytics.wsgi import AnalyticsWSGIMiddleware
from tests.pg import PostgresServer, pg_server
from tests.test_collector import make_alf

__all__ = ["pg_server"]  # a fixture, imported for pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READ_KEY = "browser-read-key-0123456789"
TOKEN = "browser-service-token"
ENV = "browser"
XSS_HEADER = "<script>alert('header')</script>"
XSS_BODY = {"comment": "<script>alert('body')</script><img src=x onerror=alert('img')>"}


def _playwright() -> Any:
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = reason or "playwright is not installed (pip install playwright)"
        sync_playwright = None
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    return sync_playwright


# -- the app the agent records ----------------------------------------------------------------


#: What ``/latin1`` answers, in ISO 8859-1: not UTF-8, so only its charset can read it.
LATIN1_TEXT = "Café crème brûlée à ½ prix ©"
#: ``/big`` answers more than the agent captures (its default ``max_body_bytes``, 64 KiB).
BIG_BODY = b"0123456789abcdef" * 6400
#: ``/gzip`` answers this JSON, gzip-compressed: the agent stores it decoded.
GZIP_JSON = {"items": [{"id": i, "name": f"item {i}"} for i in range(40)]}


def shop(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A small JSON API: items, a failing endpoint, a missing one, and an echo; and bodies of
    other shapes: Latin-1 text (declared ``?charset=``), gzip-coded JSON, one too big."""
    path = environ["PATH_INFO"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    json_type = ("Content-Type", "application/json")
    if path == "/boom":
        start_response("500 Internal Server Error", [json_type])
        return [b'{"error": "boom"}']
    if path.startswith("/items/") and environ["REQUEST_METHOD"] == "GET":
        item = path.rsplit("/", 1)[1]
        start_response("200 OK", [json_type])
        return [json.dumps({"id": item, "name": f"item {item}"}).encode()]
    if path == "/items" and environ["REQUEST_METHOD"] == "POST":
        start_response("201 Created", [json_type])
        return [body]
    if path == "/xss":
        start_response("200 OK", [json_type, ("X-Echo", environ.get("HTTP_X_EVIL", ""))])
        return [body]
    if path == "/latin1":
        charset = parse_qs(environ.get("QUERY_STRING", "")).get("charset", ["iso-8859-1"])[0]
        start_response("200 OK", [("Content-Type", f"text/plain; charset={charset}")])
        return [LATIN1_TEXT.encode("iso-8859-1")]
    if path == "/gzip":
        compressed = gzip.compress(json.dumps(GZIP_JSON).encode(), mtime=0)
        start_response("200 OK", [json_type, ("Content-Encoding", "gzip")])
        return [compressed]
    if path == "/big":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [BIG_BODY]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


def consumer_of(request: Any) -> str | None:
    user = request.get("HTTP_X_USER")
    return str(user) if user else None


def agent_client(collector: Collector, environment: str) -> httpx.Client:
    app = AnalyticsWSGIMiddleware(
        shop,
        service_token=TOKEN,
        collector_url=collector.url,
        environment=environment,
        log_body=True,
        identify=consumer_of,
    )
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://shop.test")


@dataclass
class Traffic:
    """What the module's agent sent: how many of each, and the JSON posted."""

    total: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    posted: list[dict[str, Any]] = field(default_factory=list)

    def send(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> None:
        response = client.request(method, path, **kwargs)
        self.total += 1
        self.by_status[response.status_code] = self.by_status.get(response.status_code, 0) + 1
        self.by_method[method] = self.by_method.get(method, 0) + 1


def backend_db(request: pytest.FixtureRequest) -> str:
    """The ``db`` for a module's collector: SQLite in memory, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return ":memory:"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.fresh_url()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request: pytest.FixtureRequest) -> Iterator[tuple[Collector, Traffic]]:
    """The module's collector, once on each storage backend, filled by the real agent."""
    traffic = Traffic()
    db = backend_db(request)
    with Collector(db, read_key=READ_KEY, tokens=[f"web={TOKEN}"]) as collector:
        with agent_client(collector, ENV) as client:
            for i in range(40):
                user = {"X-User": ("alice", "bob")[i % 2]}
                traffic.send(client, "GET", f"/items/{i}", headers=user)
            for i in range(12):
                item = {"name": f"kite {i}", "price": 10 + i, "tags": ["red", "new"]}
                traffic.posted.append(item)
                traffic.send(client, "POST", "/items", json=item, headers={"X-User": "carol"})
            for i in range(8):
                traffic.send(client, "GET", f"/missing/{i}")
            for _ in range(5):
                traffic.send(client, "GET", "/boom")
            traffic.send(client, "POST", "/xss", json=XSS_BODY, headers={"X-Evil": XSS_HEADER})
        alf_analytics.flush(10)
        assert collector.wait_for_entries(traffic.total, 10), collector.count()
        yield collector, traffic
    alf_analytics.close(timeout=2.0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Watched:
    """A page with everything that would mean a broken or attacked page recorded."""

    page: Any
    base: str
    problems: list[str] = field(default_factory=list)

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)


def watch(page: Any, base: str) -> Watched:
    watched = Watched(page, base)

    def on_console(message: Any) -> None:
        if message.type == "error":
            watched.problems.append(f"console error: {message.text}")

    def on_dialog(dialog: Any) -> None:
        watched.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.problems.append(f"page error: {error}"))
    page.on("dialog", on_dialog)
    return watched


@pytest.fixture(scope="module")
def signed_in(browser: Any, filled: tuple[Collector, Traffic]) -> Iterator[Any]:
    """A browser context logged in through the real login form."""
    collector, _ = filled
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{collector.url}/login")
    page.fill("input[name=key]", READ_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{collector.url}/")
    page.close()
    yield context
    context.close()


@pytest.fixture
def web(signed_in: Any, filled: tuple[Collector, Traffic]) -> Iterator[Watched]:
    watched = watch(signed_in.new_page(), filled[0].url)
    yield watched
    watched.page.close()
    assert watched.problems == []


def rows(page: Any, selector: str = "table.log tbody tr[data-entry-id]") -> list[Any]:
    return list(page.locator(selector).all())


def statuses(page: Any) -> list[str]:
    return [text.strip() for text in page.locator("table.log tbody .status").all_text_contents()]


#: JavaScript: how many pixels of the chart ``name`` in the colour of the CSS variable
#: ``variable`` lie in the top ``share`` of its canvas.
SERIES_PIXELS_ABOVE = """([name, variable, share]) => {
    const canvas = document.querySelector(`[data-chart=${name}] canvas`);
    const probe = document.createElement('span');
    probe.style.color = `var(${variable})`;
    document.body.appendChild(probe);
    const [r, g, b] = getComputedStyle(probe).color.match(/\\d+/g).map(Number);
    probe.remove();
    const height = Math.floor(canvas.height * share);
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, height).data;
    let count = 0;
    for (let i = 0; i < pixels.length; i += 4) {
        const near = Math.abs(pixels[i] - r) + Math.abs(pixels[i + 1] - g)
            + Math.abs(pixels[i + 2] - b);
        if (pixels[i + 3] > 200 && near < 60) count++;
    }
    return count;
}"""


# -- tests -------------------------------------------------------------------------------------


def test_overview_draws_the_charts_and_headline_numbers(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    """The overview loads clean, both charts draw data, and the headline is the stored count."""
    _, traffic = filled
    web.goto(f"/?environment={ENV}")
    assert web.page.locator("[data-figure=count]").text_content() == f"{traffic.total:,}"
    for name in ("requests", "latency"):
        chart = web.page.locator(f"[data-chart={name}] canvas")
        chart.wait_for()
        assert int(web.page.locator(f"[data-chart={name}] .uplot").get_attribute("data-points"))
    # The series themselves painted, not only axes and grid: the top of each chart's y range
    # is its highest value, so the line of "All" (requests) and of p99 (latency) reaches the
    # upper part of its canvas in that series' colour; an empty or all-zero series would not.
    for name, variable in (("requests", "--chart-all"), ("latency", "--chart-p99")):
        high = web.page.evaluate(SERIES_PIXELS_ABOVE, [name, variable, 0.35])
        assert high > 3, (name, high)
    # Status classes carry their names, not only a colour.
    classes = web.page.locator(".classes").text_content() or ""
    assert "4xx client error: 8" in classes and "5xx server error: 5" in classes


def test_clicking_an_endpoint_filters_everything(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    _, traffic = filled
    web.goto(f"/?environment={ENV}")
    web.page.click("table.endpoints a:text-is('/boom')")
    web.page.wait_for_url(re.compile(r"route=%2Fboom"))
    assert web.page.locator("[data-figure=count]").text_content() == "5"
    assert web.page.locator("[data-figure=error_rate]").text_content() == "100.0 %"
    codes = web.page.locator("table.codes tbody td:first-child").all_text_contents()
    assert [code.strip() for code in codes] == ["500"]
    assert web.page.locator("table.endpoints tbody tr").count() == 1
    # The endpoint is one chip, and clicking it removes the whole filter: removing only the
    # route (two chips, method and route) left the page filtered to GET.
    chips = web.page.locator(".chips .chip")
    assert chips.count() == 1
    assert "endpoint: GET /boom" in (chips.text_content() or "")
    chips.click()
    web.page.wait_for_url(re.compile(rf"/\?environment={ENV}$"))
    assert web.page.locator("[data-figure=count]").text_content() == f"{traffic.total:,}"


def test_endpoints_table_sorts_by_a_column(web: Watched) -> None:
    web.goto(f"/?environment={ENV}")
    web.page.click("table.endpoints thead a[data-sort-key=error_rate]")
    web.page.wait_for_url(re.compile(r"sort=error_rate"))
    header = web.page.locator("table.endpoints th[aria-sort=descending]")
    assert (header.text_content() or "").startswith("Error rate")
    values = [
        float(v)
        for v in web.page.locator("table.endpoints tbody td:nth-child(5)").evaluate_all(
            "cells => cells.map(c => c.dataset.value)"
        )
    ]
    assert values == sorted(values, reverse=True) and values[0] == 1.0 and values[-1] == 0.0


def test_a_filter_narrows_the_log_to_matching_rows_only(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    _, traffic = filled
    web.goto(f"/requests?environment={ENV}")
    assert len(rows(web.page)) == 50  # the first page of more than 50
    web.page.fill("form.filters input[name=status]", "404")
    web.page.click("form.filters button[type=submit]")
    web.page.wait_for_url(re.compile(r"status=404"))
    assert statuses(web.page) == ["404"] * traffic.by_status[404]

    web.page.fill("form.filters input[name=status]", "2xx")
    web.page.select_option("form.filters select[name=method]", "POST")
    web.page.click("form.filters button[type=submit]")
    web.page.wait_for_url(re.compile(r"method=POST"))
    methods = web.page.locator("table.log tbody .method").all_text_contents()
    assert methods == ["POST"] * (len(traffic.posted) + 1)  # the items and the /xss echo
    assert set(statuses(web.page)) == {"200", "201"}


def test_the_log_pages_by_cursor_without_overlap(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    _, traffic = filled
    web.goto(f"/requests?environment={ENV}")
    first = [row.get_attribute("data-entry-id") for row in rows(web.page)]
    web.page.click("a[rel=next]")
    web.page.wait_for_url(re.compile(r"cursor="))
    second = [row.get_attribute("data-entry-id") for row in rows(web.page)]
    assert len(first) == 50 and len(second) == traffic.total - 50
    assert not set(first) & set(second)
    ids = [int(i) for i in first + second]
    assert ids == sorted(ids, reverse=True)  # newest first across pages
    assert web.page.locator("a[rel=next]").count() == 0


def test_detail_shows_the_decoded_json_body_and_downloads_har(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    _, traffic = filled
    web.goto(f"/requests?environment={ENV}&method=POST&path=/items")
    web.page.locator("table.log tbody td.path a").last.click()  # the oldest: the first POST
    web.page.wait_for_url(re.compile(r"/requests/\d+$"))
    bodies = web.page.locator("pre.body.json")
    request_body = bodies.first.text_content() or ""
    assert json.loads(request_body) == traffic.posted[0]
    assert '\n  "name": "kite 0"' in request_body  # pretty-printed, not the wire form
    assert web.page.locator("svg.timing rect").count() >= 1

    with web.page.expect_download() as info:
        web.page.click("a:text('Download as HAR')")
    har = json.loads(Path(info.value.path()).read_text("utf-8"))
    [entry] = har["log"]["entries"]
    assert entry["request"]["url"] == "http://shop.test/items"
    assert har["log"]["version"] == "1.2"


def test_script_in_a_header_and_a_body_shows_as_text(web: Watched) -> None:
    """An attacker's ``<script>`` never runs: no dialog, no console error, shown as text."""
    web.goto(f"/requests?environment={ENV}&path=/xss")
    web.page.locator("table.log tbody td.path a").first.click()
    web.page.wait_for_url(re.compile(r"/requests/\d+$"))
    header = web.page.locator("table.pairs tr:has(th:text-is('x-evil')) td")
    assert header.text_content() == XSS_HEADER
    echoed = web.page.locator("table.pairs tr:has(th:text-is('x-echo')) td")
    assert echoed.text_content() == XSS_HEADER
    assert json.loads(web.page.locator("pre.body.json").first.text_content() or "") == XSS_BODY
    # Only the dashboard's own scripts exist; no <img> came out of the body.
    sources = web.page.locator("script[src]").evaluate_all("s => s.map(e => e.src)")
    assert [src.rsplit("/", 1)[1] for src in sources] == ["uPlot.iife.min.js", "dashboard.js"]
    assert web.page.locator("script:not([src])").count() == 0
    assert web.page.locator("main img").count() == 0
    web.page.wait_for_timeout(100)  # give an injected handler the chance to fire


def test_the_login_page_holds_without_the_key(
    browser: Any, filled: tuple[Collector, Traffic]
) -> None:
    collector, _ = filled
    context = browser.new_context()
    try:
        web = watch(context.new_page(), collector.url)
        for path in ("/", "/requests?status=500", "/requests/1"):
            web.goto(path)
            assert web.page.url.startswith(f"{collector.url}/login?next=")
            text = web.page.locator("body").text_content() or ""
            assert "/items" not in text and "boom" not in text
        assert web.page.request.get(f"{collector.url}/api/stats").status == 401

        web.page.fill("input[name=key]", "not-the-key")
        web.page.click("button[type=submit]")
        assert "not the read key" in (web.page.locator("[role=alert]").text_content() or "")
        assert web.page.url == f"{collector.url}/login"
        assert context.cookies() == []

        web.goto("/login?next=/requests/1")
        web.page.fill("input[name=key]", READ_KEY)
        web.page.click("button[type=submit]")
        web.page.wait_for_url(f"{collector.url}/requests/1")
        [cookie] = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
            "alf_read",
            True,
            "Strict",
        )
        assert READ_KEY not in cookie["value"]

        web.page.click("form.logout button")
        web.page.wait_for_url(re.compile(r"/login$"))
        assert context.cookies() == []
        web.goto("/")
        assert "/login" in web.page.url
        # The console shows the refused /api request (401) and the wrong key's 401 page.
        assert all("401" in problem for problem in web.problems), web.problems
    finally:
        context.close()


def test_live_mode_shows_new_traffic_without_a_reload(
    web: Watched, filled: tuple[Collector, Traffic]
) -> None:
    collector, _ = filled
    web.page.clock.install()
    web.goto("/requests?environment=live&live=1")
    assert web.page.locator("table.log tbody .empty").count() == 1
    assert web.page.locator("[data-live-toggle]").text_content() == "Live: on"
    marker = web.page.evaluate("() => { window.__same_document = true; return 1; }")

    before = collector.count()
    with agent_client(collector, "live") as client:
        client.get("/items/live-1")
    alf_analytics.flush(10)
    assert collector.wait_for_entries(before + 1, 10)

    web.page.clock.run_for(6_000)
    web.page.locator("table.log tbody tr[data-entry-id]").wait_for()
    assert web.page.locator("table.log tbody td.path a").all_text_contents() == ["/items/live-1"]
    assert web.page.evaluate("() => window.__same_document") == marker == 1

    # The overview's numbers and charts refresh the same way.
    web.goto("/?environment=live&live=1")
    assert web.page.locator("[data-figure=count]").text_content() == "1"
    with agent_client(collector, "live") as client:
        client.get("/boom")
    alf_analytics.flush(10)
    assert collector.wait_for_entries(before + 2, 10)
    web.page.clock.run_for(6_000)
    web.page.locator("[data-figure=count]:text-is('2')").wait_for()
    assert web.page.locator("[data-figure=error_rate]").text_content() == "50.0 %"
    assert web.page.locator("[data-chart=requests] canvas").count() == 1


#: Names too long for a phone's width, with no place to break a line.
LONG_ENV = "customer_acceptance_eu_central_1_blue_green_canary_2026"
LONG_CONSUMER = "acct_" + "0123456789abcdef" * 3 + "_x"
LONG_PATH = "/items/" + "averyveryverylongpathsegmentwithoutanyplacetobreakit" * 2


@pytest.fixture(scope="module")
def long_names(filled: tuple[Collector, Traffic]) -> int:
    """Traffic with a long environment, consumer, path and route (one id each), recorded
    by the agent; the id of the newest entry."""
    collector, _ = filled
    before = collector.count()
    with agent_client(collector, LONG_ENV) as client:
        for _ in range(3):
            client.get(LONG_PATH, headers={"X-User": LONG_CONSUMER})
        client.get("/boom", headers={"X-User": LONG_CONSUMER})
    alf_analytics.flush(10)
    assert collector.wait_for_entries(before + 4, 10)
    with httpx.Client(base_url=collector.url, timeout=10) as client:
        listed = client.get(
            "/api/entries",
            params={"environment": LONG_ENV, "path": LONG_PATH},
            headers={"Authorization": f"Bearer {READ_KEY}"},
        ).json()
    return int(listed["entries"][0]["id"])


#: JavaScript: for each table of the page (not the charts' legends), whether a sideways-
#: scrolling box holds it, that box's edges, and its last column's edges once scrolled right.
TABLE_BOXES = """() => [...document.querySelectorAll('main table:not(.u-legend)')].map((table) => {
    const box = table.closest('.scroll');
    if (!box) return { table: table.className, box: null };
    box.scrollLeft = box.scrollWidth;
    const outer = box.getBoundingClientRect();
    const cells = table.rows[0].cells;
    const last = cells[cells.length - 1].getBoundingClientRect();
    const scrolls = getComputedStyle(box).overflowX;
    box.scrollLeft = 0;
    return { table: table.className, scrolls, left: outer.left, right: outer.right,
             lastLeft: last.left, lastRight: last.right };
})"""


def test_the_pages_fit_a_phone(
    browser: Any, filled: tuple[Collector, Traffic], long_names: int
) -> None:
    """At 390 px wide no page scrolls sideways, even with a long environment, consumer, path
    and route: every table scrolls in its own box, whose last column scrolls into view; the
    charts fit the screen and the log's filters are folded away."""
    collector, _ = filled
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    try:
        web = watch(context.new_page(), collector.url)
        web.goto("/login")
        web.page.fill("input[name=key]", READ_KEY)
        web.page.click("button[type=submit]")
        web.page.wait_for_url(f"{collector.url}/")
        viewport = web.page.locator("meta[name=viewport]")
        assert viewport.count() == 1
        assert viewport.get_attribute("content") == "width=device-width, initial-scale=1"
        first = web.page.request.get(
            f"{collector.url}/api/entries?environment={ENV}&limit=1"
        ).json()["entries"][0]["id"]
        narrow = f"consumer={LONG_CONSUMER}&route={LONG_PATH}&path={LONG_PATH}"
        for path in (
            f"/?environment={ENV}",
            f"/requests?environment={ENV}",
            f"/requests/{first}",
            f"/?environment={LONG_ENV}",
            f"/requests?environment={LONG_ENV}",
            f"/?environment={LONG_ENV}&{narrow}",
            f"/requests?environment={LONG_ENV}&{narrow}",
            f"/requests/{long_names}",
        ):
            web.goto(path)
            widths = web.page.evaluate(
                "() => [document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert widths == [390, 390], (path, widths)
            tables = web.page.evaluate(TABLE_BOXES)
            assert tables, path
            for table in tables:
                assert table.get("box", True) is not None, (path, table)
                assert table["scrolls"] == "auto", (path, table)
                assert 0 <= table["left"] and table["right"] <= 390, (path, table)
                assert table["left"] - 1 <= table["lastLeft"], (path, table)
                assert table["lastRight"] <= table["right"] + 1, (path, table)
            if path.startswith("/?"):
                for name in ("requests", "latency"):
                    box = web.page.locator(f"[data-chart={name}] canvas").bounding_box()
                    assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= 390
            if path.startswith("/requests?"):
                if "consumer=" not in path:  # an active filter keeps them open
                    assert web.page.locator("details.filter-box").get_attribute("open") is None
                assert web.page.locator("div.scroll > table.log").count() == 1
                # Every column stays: the log scrolls sideways to show it.
                headers = web.page.locator("table.log thead th")
                hidden = "hs => hs.filter(h => getComputedStyle(h).display === 'none').length"
                assert headers.evaluate_all(hidden) == 0
                assert headers.all_text_contents() == [
                    "Time", "Method", "Path", "Status", "Duration", "In", "Out", "Consumer",
                    "Service",
                ]  # fmt: skip
                box = web.page.locator("div.scroll:has(> table.log)")
                assert box.evaluate("b => b.scrollWidth > b.clientWidth"), path
            if path == f"/?environment={LONG_ENV}":
                consumers = web.page.locator("table.consumers tbody td:first-child a")
                assert consumers.all_text_contents() == [LONG_CONSUMER]
        assert web.problems == []
    finally:
        context.close()


#: JavaScript: for each input matching a selector, its placeholder's width in its own font
#: and the width its content box offers, in CSS pixels.
PLACEHOLDER_FIT = """(selector) => [...document.querySelectorAll(selector)].map((input) => {
    const style = getComputedStyle(input);
    const context = document.createElement('canvas').getContext('2d');
    context.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const text = context.measureText(input.placeholder).width;
    const room = input.clientWidth - parseFloat(style.paddingLeft)
        - parseFloat(style.paddingRight);
    return [input.name, input.placeholder, Math.ceil(text), Math.floor(room)];
})"""


@pytest.mark.parametrize(
    "viewport", [{"width": 1280, "height": 900}, {"width": 390, "height": 844}], ids=str
)
def test_the_log_filters_show_their_whole_placeholders(
    browser: Any, filled: tuple[Collector, Traffic], viewport: dict[str, int]
) -> None:
    """The hint "500 or 5xx" and the others fit their inputs, on a laptop and on a phone."""
    collector, _ = filled
    context = browser.new_context(viewport=viewport, is_mobile=viewport["width"] < 640)
    try:
        web = watch(context.new_page(), collector.url)
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        web.goto(f"/requests?environment={ENV}")
        web.page.locator("details.filter-box").evaluate("box => { box.open = true; }")
        fits = web.page.evaluate(PLACEHOLDER_FIT, "form.filters input[placeholder]")
        assert {name for name, *_ in fits} == {"status", "path", "route"}
        for name, placeholder, text, room in fits:
            assert text <= room, (name, placeholder, text, room)
        widths = web.page.evaluate(
            "() => [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert widths[0] == widths[1]
        assert web.problems == []
    finally:
        context.close()


#: Latencies (ms) of the environments the tick test charts: tens of microseconds, below a
#: millisecond, around ten milliseconds, and over a second.
TICK_LATENCIES = {
    "ticks-us": [0.011, 0.02, 0.035, 0.05],
    "ticks-sub-ms": [0.12, 0.25, 0.31, 0.44, 0.58],
    "ticks-ms": [3.0, 4.5, 6.0, 8.0, 11.0, 14.0],
    "ticks-s": [250.0, 700.0, 1200.0, 1800.0],
}


@pytest.fixture(scope="module")
def timed(filled: tuple[Collector, Traffic]) -> Collector:
    """The module's collector with entries of the latencies above, a minute ago, per
    environment (posted to the ingest API: the agent's own timings cannot be chosen)."""
    collector, _ = filled
    when = datetime.now(timezone.utc) - timedelta(minutes=1)
    with httpx.Client(base_url=collector.url, timeout=10) as client:
        for environment, latencies in TICK_LATENCIES.items():
            calls = [("GET", f"https://shop.test/{environment}", 200, ms) for ms in latencies]
            alf = make_alf(calls, token=TOKEN, environment=environment)
            for entry in alf["har"]["log"]["entries"]:
                entry["startedDateTime"] = when.isoformat().replace("+00:00", "Z")
            response = client.post("/1.1.0/single", json=alf)
            assert response.status_code == 200, response.text
    return collector


@pytest.mark.parametrize("environment", list(TICK_LATENCIES))
def test_latency_ticks_share_one_format_per_axis(
    web: Watched, timed: Collector, environment: str
) -> None:
    """One unit and one number of decimals per axis ("5 ms", "10 ms", not "5.00 ms" next to
    "10 ms"), enough decimals to tell the ticks apart, and sub-millisecond ticks readable."""
    web.goto(f"/?environment={environment}")
    chart = web.page.locator("[data-chart=latency]")
    chart.locator("canvas").wait_for()
    labels = (chart.get_attribute("data-y-ticks") or "").split("|")
    assert len(labels) >= 3, labels
    assert len(set(labels)) == len(labels), labels  # no two ticks read the same
    numbers = [re.fullmatch(r"(\d+(?:\.(\d+))?) (µs|ms|s)", label) for label in labels]
    assert all(numbers), labels
    units = {match.group(3) for match in numbers if match}
    decimals = {len(match.group(2) or "") for match in numbers if match}
    assert len(units) == 1 and len(decimals) == 1, labels
    assert decimals <= {0, 1, 2}, labels
    expected = {"ticks-us": "µs", "ticks-sub-ms": "ms", "ticks-ms": "ms", "ticks-s": "s"}
    assert units == {expected[environment]}, labels


def selected_range(page: Any) -> str:
    option = page.locator("form.scope select[name=range] option:checked")
    return (option.text_content() or "").strip()


def test_a_from_time_shows_as_a_custom_range_that_a_chosen_range_replaces(web: Watched) -> None:
    """With a "From" the Range selector says "Custom", not the "Last 1h" it no longer means;
    choosing a range then drops From and To; the URL alone holds that state."""
    since = (datetime.now(timezone.utc) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S")
    until = (datetime.now(timezone.utc) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
    for page in ("/", "/requests"):
        web.goto(f"{page}?environment={ENV}&range=6h&since={since}&until={until}")
        assert selected_range(web.page) == "Custom (From/To)", page
        assert web.page.locator(".chips [data-chip=since]").count() == 1
        assert web.page.locator(".chips [data-chip=until]").count() == 1
        web.page.reload()  # the same view again: nothing of it lives outside the URL
        assert selected_range(web.page) == "Custom (From/To)", page

        web.page.select_option("form.scope select[name=range]", "15m")
        web.page.wait_for_url(re.compile(r"range=15m"))
        query = web.page.url.split("?", 1)[1]
        assert "since=" not in query and "until=" not in query, web.page.url
        assert selected_range(web.page) == "Last 15m"
        assert web.page.locator(".chips [data-chip]").count() == 0
        if page == "/requests":
            assert web.page.input_value("form.filters input[name=since]") == ""
            assert len(rows(web.page)) == 50  # the last 15 minutes: all of the module's traffic

    # Changing the service or environment keeps a custom range.
    web.goto(f"/requests?since={since}")
    web.page.select_option("form.scope select[name=environment]", ENV)
    web.page.wait_for_url(re.compile(rf"environment={ENV}"))
    assert "since=" in web.page.url and selected_range(web.page) == "Custom (From/To)"


def test_a_to_time_alone_keeps_the_range_and_says_where_it_ends(web: Watched) -> None:
    """A "To" alone ends the chosen range there: the selector says so, and still works."""
    until = (datetime.now(timezone.utc) + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
    web.goto(f"/requests?environment={ENV}&until={until}")
    assert selected_range(web.page) == "1h up to To"
    web.page.select_option("form.scope select[name=range]", "6h")
    web.page.wait_for_url(re.compile(r"range=6h"))
    assert "until=" in web.page.url
    assert selected_range(web.page) == "6h up to To"


def test_epoch_seconds_in_the_url_show_and_submit_like_iso(
    browser: Any, filled: tuple[Collector, Traffic]
) -> None:
    """``until=<epoch seconds>`` (the API's other time form) shows as a local time in its
    chip and in the To input, and filtering the log from there keeps it, as an ISO time."""
    collector, traffic = filled
    context = browser.new_context(timezone_id="Asia/Kolkata")
    warnings: list[str] = []
    try:
        web = watch(context.new_page(), collector.url)
        web.page.on(
            "console",
            lambda message: warnings.append(message.text) if message.type == "warning" else None,
        )
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        until = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=5)
        local = until.astimezone(timezone(timedelta(hours=5, minutes=30)))
        web.goto(f"/requests?environment={ENV}&until={until.timestamp():.0f}&range=1h")
        chip = web.page.locator(".chips [data-chip=until] time")
        assert datetime.fromisoformat(chip.get_attribute("datetime") or "") == until
        assert chip.text_content() == local.strftime("%Y-%m-%d %H:%M:%S")
        assert web.page.input_value("form.filters input[name=until]") == local.strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
        assert len(rows(web.page)) == 50

        web.page.locator("details.filter-box").evaluate("box => { box.open = true; }")
        web.page.fill("form.filters input[name=status]", "5xx")
        web.page.click("form.filters button[type=submit]")
        web.page.wait_for_url(re.compile(r"status=5xx"))
        query = parse_qs(web.page.url.split("?", 1)[1])
        assert query["until"] == [until.strftime("%Y-%m-%dT%H:%M:%S")]
        assert query["range"] == ["1h"] and "since" not in query
        assert statuses(web.page) == ["500"] * traffic.by_status[500]

        # The overview's From chip the same way.
        since = until - timedelta(hours=2)
        web.goto(f"/?environment={ENV}&since={since.timestamp():.0f}")
        chip = web.page.locator(".chips [data-chip=since] time")
        assert datetime.fromisoformat(chip.get_attribute("datetime") or "") == since
        assert chip.text_content() == (local - timedelta(hours=2)).strftime("%Y-%m-%d %H:%M:%S")
        assert web.page.locator("[data-figure=count]").text_content() == f"{traffic.total:,}"
        assert [text for text in warnings if "conform" in text] == []
        assert web.problems == []
    finally:
        context.close()


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_choosing_a_scope_keeps_the_logs_filters(
    browser: Any, filled: tuple[Collector, Traffic], javascript: bool
) -> None:
    """Choosing a service, environment or range on the log keeps its status, method, path,
    route and consumer filters, as on the overview, with or without JavaScript (then the
    form's Apply button sends it)."""
    collector, traffic = filled
    context = browser.new_context(java_script_enabled=javascript)
    try:
        web = watch(context.new_page(), collector.url)
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        for page in ("/requests", "/"):
            web.goto(f"{page}?environment={ENV}&status=2xx&method=POST&path=/items&consumer=carol")
            for name, value in (("range", "6h"), ("environment", "")):
                select = f"form.scope select[name={name}]"
                if javascript:
                    with web.page.expect_navigation():
                        web.page.select_option(select, value)
                else:
                    web.page.select_option(select, value)
                    with web.page.expect_navigation():
                        web.page.click("form.scope button[type=submit]")
                query = parse_qs(web.page.url.split("?", 1)[1])
                kept = {key: query.get(key) for key in ("status", "method", "path", "consumer")}
                assert kept == {
                    "status": ["2xx"],
                    "method": ["POST"],
                    "path": ["/items"],
                    "consumer": ["carol"],
                }, (page, name, web.page.url)
                assert query["range"] == ["6h"], web.page.url
                chips = web.page.locator(".chips").text_content() or ""
                assert "status: 2xx" in chips and "consumer: carol" in chips
            assert "environment" not in parse_qs(web.page.url.split("?", 1)[1])
            if page == "/requests":
                assert len(rows(web.page)) == len(traffic.posted)
                assert set(statuses(web.page)) == {"201"}
        assert web.problems == []
    finally:
        context.close()
