"""The dashboard as a user finds it: every link it shows leads somewhere, odd traffic reads
well, keyboard and live use keep their place.

One collector (SQLite in memory: what is checked here is the pages, the stores answer alike,
see test_dashboard_pages.py) filled by the real agent and by ALF posted directly (statuses
the agent cannot produce, a route far too long for a table), one browser for every test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from html import unescape
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import httpx
import pytest

import alf_analytics
from alf_analytics.collector import Collector, dashboard
from tests.test_collector import make_alf
from tests.test_dashboard import (
    READ_KEY,
    TOKEN,
    Traffic,
    Watched,
    agent_client,
    browser,
    watch,
)

__all__ = ["browser"]  # a fixture, imported for pytest

ENV = "audit"
#: Statuses ALF allows that are not 1xx to 5xx: 0 (the client left) and non-standard ones.
ODD_STATUSES = (0, 600, 999)
#: A route template as long as the store keeps (2,048 characters), with nowhere to break.
LONG_ROUTE = "/" + "verylongsegment" * 136


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def audited() -> Iterator[tuple[Collector, Traffic]]:
    traffic = Traffic()
    with Collector(":memory:", read_key=READ_KEY, tokens=[f"web={TOKEN}"]) as collector:
        with agent_client(collector, ENV) as client:
            for i in range(20):
                traffic.send(client, "GET", f"/items/{i}", headers={"X-User": "alice"})
            for _ in range(3):
                traffic.send(client, "GET", "/boom")
            traffic.send(client, "GET", "/missing")
        alf_analytics.flush(10)
        assert collector.wait_for_entries(traffic.total, 10)
        calls = [("GET", f"https://shop.test/odd/{s}", s, 2.0) for s in ODD_STATUSES]
        calls.append(("GET", f"https://shop.test{LONG_ROUTE}", 200, 3.0))
        alf = make_alf(calls, token=TOKEN, environment=ENV)
        for entry in alf["har"]["log"]["entries"]:
            entry["startedDateTime"] = now_iso()
        with httpx.Client(base_url=collector.url, timeout=10) as client:
            assert client.post("/1.1.0/single", json=alf).status_code == 200
        traffic.total += len(calls)
        assert collector.wait_for_entries(traffic.total, 10)
        yield collector, traffic
    alf_analytics.close(timeout=2.0)


@pytest.fixture
def reader(audited: tuple[Collector, Traffic]) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {READ_KEY}"}
    with httpx.Client(base_url=audited[0].url, headers=headers, timeout=10) as client:
        yield client


@pytest.fixture
def web(browser: Any, audited: tuple[Collector, Traffic]) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
    watched = watch(context.new_page(), audited[0].url)
    yield watched
    context.close()
    assert watched.problems == []


def links(page: str) -> list[str]:
    """The page's own links (to the dashboard's pages), as the browser would follow them."""
    hrefs = [unescape(href) for href in re.findall(r'href="([^"]*)"', page)]
    return [href for href in hrefs if href.startswith("/") and not href.startswith("/static/")]


# -- every link leads somewhere ----------------------------------------------------------------


@pytest.mark.parametrize("path", [f"/?environment={ENV}", f"/requests?environment={ENV}"])
def test_every_link_on_a_page_answers(reader: httpx.Client, path: str) -> None:
    """A status 0 (the client left) or 600 is stored and counted like any other, and the log
    filters by "0xx" and "0" as by "4xx" and "404": those classes and codes are linked too
    (once shown unlinked, since the API refused them), and each link lists its entries."""
    page = reader.get(path)
    assert page.status_code == 200
    hrefs = links(page.text)
    assert len(hrefs) > 10
    for href in sorted(set(hrefs)):
        answer = reader.get(href)
        assert answer.status_code == 200, (href, answer.status_code)
    if path.startswith("/?"):
        classes = re.search(r'<p class="classes">(.*?)</p>', page.text, re.S)
        assert classes is not None
        text = re.sub(r"<[^>]+>", "", classes.group(1))
        assert "0xx no response: 1" in text and "6xx non-standard: 1" in text
        assert "9xx non-standard: 1" in text and "2xx success" in text
        for status in ("0xx", "6xx", "9xx", "0", "600", "999"):
            assert f"/requests?environment={ENV}&status={status}" in hrefs, status


# -- odd traffic reads well --------------------------------------------------------------------


def test_a_long_route_never_hides_the_figures(web: Watched) -> None:
    """A 2,048-character route wraps and is cut after three lines (whole in its title): the
    endpoints table keeps its figures in view on a laptop (it pushed them off to the right,
    behind a sideways scroll), and no row of a table fills the screen."""
    web.goto(f"/?environment={ENV}")
    box = web.page.locator("div.scroll:has(> table.endpoints)")
    assert box.evaluate("b => b.scrollWidth <= b.clientWidth"), "the figures scroll out of view"
    link = web.page.locator(f'table.endpoints a[title="Show only GET {LONG_ROUTE}"]')
    assert link.text_content() == LONG_ROUTE
    for table in ("endpoints", "entries"):
        heights = web.page.locator(f"table.{table} tbody tr").evaluate_all(
            "rows => rows.map(r => r.getBoundingClientRect().height)"
        )
        assert heights and max(heights) < 90, (table, heights)
    web.goto(f"/requests?environment={ENV}&path={LONG_ROUTE}")
    row = web.page.locator("table.log tbody tr[data-entry-id]")
    assert row.count() == 1
    assert row.evaluate("r => r.getBoundingClientRect().height") < 120
    assert row.locator("td.path a").get_attribute("title") == f"shop.test{LONG_ROUTE}"


def test_without_javascript_no_dead_control_shows(
    browser: Any, audited: tuple[Collector, Traffic]
) -> None:
    """The Live button needs the script: without it, it stays hidden (a CSS display rule
    showed it, doing nothing), and the chart panels say why they are empty."""
    context = browser.new_context(java_script_enabled=False)
    try:
        web = watch(context.new_page(), audited[0].url)
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        for path in (f"/?environment={ENV}", f"/requests?environment={ENV}"):
            web.goto(path)
            assert web.page.locator("[data-live-toggle]").is_hidden(), path
        web.goto(f"/?environment={ENV}")
        notes = web.page.locator("[data-chart] noscript p")
        assert notes.count() == 2 and notes.first.is_visible()
        assert web.problems == []
    finally:
        context.close()


# -- keyboard and live use keep their place ----------------------------------------------------


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_the_arrow_keys_browse_a_selector_and_enter_applies_it(web: Watched) -> None:
    """With the keyboard, the arrows step through the ranges without loading a page per
    step (each step loaded one and dropped the focus to the page's top); Enter applies the
    choice, and the selector has the focus again on the new page."""
    web.goto(f"/?environment={ENV}")
    select = web.page.locator("form.scope select[name=range]")
    select.focus()
    web.page.keyboard.press("ArrowDown")
    web.page.keyboard.press("ArrowDown")
    web.page.wait_for_timeout(300)
    assert urlsplit(web.page.url).query == f"environment={ENV}", web.page.url
    assert select.input_value() == "24h"
    with web.page.expect_navigation():
        web.page.keyboard.press("Enter")
    assert query_of(web.page.url) == {"environment": [ENV], "range": ["24h"]}
    assert web.page.evaluate("document.activeElement.name") == "range"
    # Leaving the selector after stepping applies it too; the mouse applies at once.
    web.page.keyboard.press("ArrowUp")
    with web.page.expect_navigation():
        web.page.keyboard.press("Tab")
    assert query_of(web.page.url)["range"] == ["6h"]
    with web.page.expect_navigation():
        web.page.select_option("form.scope select[name=range]", "7d")
    assert query_of(web.page.url)["range"] == ["7d"]


def test_a_filtered_view_is_a_clean_link(web: Watched) -> None:
    """The log's filters send only what is filled in: ``?status=5xx``, not ``&path=&route=
    &consumer=&since=&until=`` after it (and the scope form no ``service=&environment=``)."""
    web.goto(f"/requests?environment={ENV}")
    web.page.fill("form.filters input[name=status]", "5xx")
    with web.page.expect_navigation():
        web.page.click("form.filters button[type=submit]")
    assert query_of(web.page.url) == {"environment": [ENV], "status": ["5xx"]}
    assert len(web.page.locator("table.log tbody tr[data-entry-id]").all()) == 3
    with web.page.expect_navigation():
        web.page.select_option("form.scope select[name=range]", "6h")
    assert query_of(web.page.url) == {"environment": [ENV], "range": ["6h"], "status": ["5xx"]}


def live_state(web: Watched, state: str) -> None:
    """Run the page's clock on until the Live button says ``state``."""
    for _ in range(10):
        web.page.clock.run_for(5_000)
        if web.page.locator("[data-live-toggle]").text_content() == f"Live: {state}":
            return
    raise AssertionError(web.page.locator("[data-live-toggle]").text_content())


def test_live_mode_keeps_the_focus_and_outlasts_a_failed_poll(
    web: Watched, audited: tuple[Collector, Traffic], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh gives the focus back to the link it was on (it fell to the page's start
    every 5 s); a poll answered 503 (the store away) says "retrying" and the next one
    refreshes again (live mode stopped for good, still saying "on"); a new environment
    shows in the selector without a reload."""
    collector, _ = audited
    monkeypatch.setattr(dashboard, "SERVICES_TTL", 0.0)  # the collector runs in this process
    answers = {"down": False}

    def route(handled: Any) -> None:
        if answers["down"]:
            handled.fulfill(status=503, body="unavailable", headers={"Retry-After": "1"})
        else:
            handled.continue_()

    web.page.clock.install()
    web.page.route(re.compile(r".*live=1.*"), route)
    web.goto(f"/?environment={ENV}&live=1")
    sort = web.page.locator("table.endpoints th a[data-sort-key=p95]")
    sort.focus()
    refreshed(web)
    assert web.page.evaluate("document.activeElement.dataset.sortKey") == "p95"

    answers["down"] = True
    live_state(web, "retrying")
    assert web.page.locator("[data-figure=count]").text_content() != ""
    with httpx.Client(base_url=collector.url, timeout=10) as client:
        alf = make_alf([("GET", "https://shop.test/new", 200, 1.0)], token=TOKEN)
        alf["environment"] = "audit-new"
        alf["har"]["log"]["entries"][0]["startedDateTime"] = now_iso()
        assert client.post("/1.1.0/single", json=alf).status_code == 200
    answers["down"] = False
    options = web.page.locator("form.scope select[name=environment] option")
    live_state(web, "on")
    assert "audit-new" in options.all_text_contents()
    assert web.page.locator("form.scope select[name=environment]").input_value() == ENV
    # The two 503s were this test's own doing.
    expected = [p for p in web.problems if "status of 503" in p]
    assert len(expected) >= 1
    web.problems[:] = [p for p in web.problems if p not in expected]


# -- what the page says matches what it shows --------------------------------------------------


def selected(page: str, name: str) -> str:
    select = re.search(rf'<select name="{name}">(.*?)</select>', page, re.S)
    assert select is not None, name
    option = re.search(r'<option value="([^"]*)" selected>([^<]*)</option>', select.group(1))
    return unescape(option.group(2)) if option else "(none)"


@pytest.mark.parametrize("path", ["/", "/requests"])
def test_the_selectors_show_the_filter_in_force(reader: httpx.Client, path: str) -> None:
    """``service`` takes an id, a name or the token, as on the API: the selector shows that
    service (it read "All services" over its figures); a service or environment the store
    holds nothing for is shown as such, not as "All"."""
    for value in ("web", TOKEN):
        page = reader.get(path, params={"service": value, "environment": ENV})
        assert page.status_code == 200
        assert selected(page.text, "service") == "web", value
        assert selected(page.text, "environment") == ENV
        assert TOKEN not in re.search(r'<form class="scope".*?</form>', page.text, re.S).group(0)
    page = reader.get(path, params={"service": "nobody", "environment": "nowhere"})
    assert selected(page.text, "service") == "nobody (no entries)"
    assert selected(page.text, "environment") == "nowhere (no entries)"


@pytest.mark.parametrize("path", ["/", "/requests"])
def test_a_page_filtered_by_the_token_never_shows_it(reader: httpx.Client, path: str) -> None:
    """``service=TOKEN`` selects that service, and every link the page shows (the other
    page, the chips, the status codes, the consumers, the HAR download) names it by its id:
    a page is an answer, and tokens never appear in answers (the access log masks them
    too). They repeated the token, so the next click or a shared link carried it."""
    page = reader.get(path, params={"service": TOKEN, "environment": ENV, "status": "5xx"})
    assert page.status_code == 200
    assert selected(page.text, "service") == "web"
    assert TOKEN not in unquote_plus(unescape(page.text))
    assert "/requests?service=web&amp;" in page.text
    page = reader.get(path, params={"service": TOKEN, "status": "bogus"})  # the 400 page too
    assert page.status_code == 400
    assert TOKEN not in unquote_plus(unescape(page.text))
    assert "service=web&amp;status=bogus" in page.text


QUIET_TOKEN = "quiet-service-token-0123456789"


@pytest.mark.parametrize("path", ["/", "/requests"])
def test_an_accepted_token_with_no_entries_yet_is_not_shown_either(path: str) -> None:
    """A service that has not sent anything yet, filtered by its token: the selector reads
    its name (or the token's mask) "(no entries)" and the links name it by its id; they
    showed the token in full, as the label of the choice and in every link."""
    tokens = [f"web={TOKEN}", f"quiet={QUIET_TOKEN}", "unnamed-service-token-abcdef"]
    with Collector(":memory:", read_key=READ_KEY, tokens=tokens) as collector:
        headers = {"Authorization": f"Bearer {READ_KEY}"}
        with httpx.Client(base_url=collector.url, headers=headers, timeout=10) as client:
            page = client.get(path, params={"service": QUIET_TOKEN})
            assert page.status_code == 200
            assert selected(page.text, "service") == "quiet (no entries)"
            assert QUIET_TOKEN not in unquote_plus(unescape(page.text))
            assert "service=quiet" in page.text
            page = client.get(path, params={"service": "unnamed-service-token-abcdef"})
            assert selected(page.text, "service") == "...cdef (no entries)"
            assert "unnamed-service-token" not in unquote_plus(unescape(page.text))
            page = client.get(path, params={"service": QUIET_TOKEN, "status": "bogus"})
            assert page.status_code == 400
            assert QUIET_TOKEN not in unquote_plus(unescape(page.text))


@pytest.mark.parametrize("tail", ["abc", "-1", "9" * 5000, "%3Cscript%3E"])
def test_any_entry_address_is_the_detail_pages_404(reader: httpx.Client, tail: str) -> None:
    """Not a number, or one of 5,000 digits (the int route converter raised: a 500), is the
    HTML 404 page, under the same headers as every page."""
    answer = reader.get(f"/requests/{tail}")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert "There is no entry" in answer.text and "<script>" not in answer.text


def test_the_detail_page_names_the_consumer(reader: httpx.Client) -> None:
    listed = reader.get("/api/entries", params={"consumer": "alice", "limit": 1}).json()
    page = reader.get(f"/requests/{listed['entries'][0]['id']}").text
    assert '<dt>Consumer</dt><dd><a href="/requests?consumer=alice&amp;range=all"' in page


def test_a_new_collector_says_how_to_send_it_traffic() -> None:
    """An empty store's overview shows how to point an agent at this collector (its own
    URL), and no error rate ("–", like the percentiles: there is no rate of nothing)."""
    with Collector(":memory:") as collector, httpx.Client(base_url=collector.url) as client:
        page = client.get("/").text
        assert "No traffic stored yet" in page
        assert f'collector_url="{collector.url}"' in page
        assert re.search(r'data-figure="error_rate">–<', page)


def refreshed(web: Watched) -> None:
    """Run the page's clock to its next live refresh and wait until that one is swapped in
    (measuring while it is in flight may read the region it is about to replace)."""
    attribute = "document.documentElement.getAttribute('data-refreshed')"
    before = web.page.evaluate(attribute)
    web.page.clock.run_for(5_000)
    for _ in range(100):
        if web.page.evaluate(attribute) != before:
            return
        web.page.wait_for_timeout(50)
    raise AssertionError("no live refresh")


def test_a_live_refresh_keeps_a_phones_sideways_scroll(
    browser: Any, audited: tuple[Collector, Traffic]
) -> None:
    """On a phone the log scrolls sideways to show its status column; a live refresh kept
    the rows but put the box back to its left edge every 5 s."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        web = watch(context.new_page(), audited[0].url)
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        web.page.clock.install()
        web.goto(f"/requests?environment={ENV}&live=1")
        box = web.page.locator("#live-log div.scroll")
        assert box.evaluate("b => b.scrollWidth > b.clientWidth")
        box.evaluate("b => { b.scrollLeft = 200; }")
        refreshed(web)
        assert box.evaluate("b => b.scrollLeft") == 200
        assert web.problems == []
    finally:
        context.close()


@pytest.mark.parametrize(("value", "shown"), [("get", "GET"), ("PROPFIND", "PROPFIND")])
def test_the_method_selector_shows_the_method_filtered_by(
    reader: httpx.Client, value: str, shown: str
) -> None:
    """``method=get`` filters GET (the API reads it in upper case) and ``PROPFIND`` is a
    method too: the log's Method selector said "Any" over either."""
    page = reader.get("/requests", params={"environment": ENV, "method": value}).text
    form = re.search(r'<form class="filters".*?</form>', page, re.S)
    assert form is not None
    assert re.findall(r"<option selected>([^<]*)</option>", form.group(0)) == [shown]


def test_a_phone_sees_each_requests_status_without_scrolling(
    browser: Any, audited: tuple[Collector, Traffic]
) -> None:
    """At 390 px the log still scrolls sideways for its figures, but time, method, path and
    status are in view at once (the status column started past the screen's edge)."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        web = watch(context.new_page(), audited[0].url)
        web.page.set_extra_http_headers({"Authorization": f"Bearer {READ_KEY}"})
        web.goto(f"/requests?environment={ENV}")
        for cell in ("thead th", "tbody tr[data-entry-id] td"):
            status = web.page.locator(f"table.log {cell}:nth-child(4)").first
            box = status.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390, (cell, box)
        assert web.page.locator("div.scroll:has(> table.log)").evaluate(
            "b => b.scrollWidth > b.clientWidth"
        )
        assert web.problems == []
    finally:
        context.close()


def test_live_mode_on_the_unavailable_page_loads_the_page_once_the_store_answers(
    web: Watched, reader: httpx.Client
) -> None:
    """A page opened while the store was away (the HTML 503, with no figures) and left in
    live mode shows the figures once the store answers again (it said "Live: on" over the
    error for ever: there was nothing to swap)."""
    error_page = reader.get("/", params={"range": "bogus", "live": "1"}).text
    assert 'id="live-overview"' not in error_page
    served = {"first": True}

    def route(handled: Any) -> None:
        if served["first"] and handled.request.resource_type == "document":
            served["first"] = False
            handled.fulfill(status=503, body=error_page, content_type="text/html")
        else:
            handled.continue_()

    web.page.route(re.compile(r".*live=1.*"), route)
    web.page.clock.install()
    web.goto(f"/?environment={ENV}&live=1")
    assert web.page.locator("[data-figure=count]").count() == 0
    with web.page.expect_navigation():
        web.page.clock.run_for(5_000)
    web.page.locator("[data-figure=count]").wait_for()
    assert web.page.locator("[data-figure=count]").text_content() != "0"
    web.problems[:] = [p for p in web.problems if "status of 503" not in p]


def test_live_mode_says_when_a_logout_stopped_it(
    browser: Any, audited: tuple[Collector, Traffic]
) -> None:
    """Logged out (in another tab, or the cookie gone), the poll lands on the login page:
    live mode stops and its button says so instead of "Live: on" over stale figures."""
    collector, _ = audited
    context = browser.new_context()
    try:
        web = watch(context.new_page(), collector.url)
        web.goto("/login")
        web.page.fill("input[name=key]", READ_KEY)
        with web.page.expect_navigation():
            web.page.click("button[type=submit]")
        web.page.clock.install()
        web.goto(f"/?environment={ENV}&live=1")
        live_state(web, "on")
        context.clear_cookies()
        live_state(web, "stopped")
        assert web.page.locator("[data-figure=count]").count() == 1  # the page stays
        assert web.problems == []
    finally:
        context.close()


def test_a_filter_newer_than_the_selectors_list_is_not_called_empty(
    reader: httpx.Client, audited: tuple[Collector, Traffic]
) -> None:
    """The selectors' list is cached for 10 s: an environment that started sending since is
    selected by its name, not "(no entries)" over its entries."""
    assert reader.get("/", params={"environment": ENV}).status_code == 200  # the list cached
    alf = make_alf([("GET", "https://shop.test/fresh", 200, 1.0)], token=TOKEN)
    alf["environment"] = "audit-fresh"
    alf["har"]["log"]["entries"][0]["startedDateTime"] = now_iso()
    assert reader.post("/1.1.0/single", json=alf).status_code == 200
    assert audited[0].wait_for_entries(audited[0].count(), 10)
    for path in ("/", "/requests"):
        page = reader.get(path, params={"environment": "audit-fresh"}).text
        assert selected(page, "environment") == "audit-fresh", path
