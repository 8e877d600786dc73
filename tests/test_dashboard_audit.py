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

import httpx
import pytest

import alf_analytics
from alf_analytics.collector import Collector
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
    """A status 0 (the client left) or 600 is stored and counted like any other, but the log
    cannot be filtered by "0xx" or "0": those classes and codes are shown, named, not linked
    (they linked to a 400 page)."""
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
