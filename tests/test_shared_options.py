"""Options of the worker shared by every middleware of one collector are never silently ignored."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware
from alf_analytics.collector import Collector

from .conftest import received_entries
from .test_faults import app, call


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "alf_analytics" and r.levelno == logging.WARNING
    ]


def test_a_second_middleware_asking_other_worker_options_gets_one_warning_each(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alf_analytics")
    first = AnalyticsWSGIMiddleware(
        app, service_token="first-token-0001", collector_url=collector.url, retries=3
    )
    second: Any = AnalyticsWSGIMiddleware(
        app,
        service_token="second-token-0002",
        collector_url=collector.url,
        retries=7,
        timeout=3.0,
    )
    for i in range(3):
        call(first, i)
        call(second, 100 + i)
    received_entries(collector, 6)  # both tokens' entries still arrive, never mixed
    assert {stored.service_token for stored in collector.entries()} == {
        "first-token-0001",
        "second-token-0002",
    }
    messages = _warnings(caplog)
    retries = [m for m in messages if "retries=7" in m]
    timeout = [m for m in messages if "timeout=3.0" in m]
    # Once per option, naming the value asked for and the one in force.
    assert len(retries) == 1 and "retries=3" in retries[0] and "in force" in retries[0]
    assert len(timeout) == 1 and "timeout=10.0" in timeout[0]
    assert not [m for m in messages if "first-token-0001" in m or "second-token-0002" in m]
    assert alf_analytics.stats()["sent"] == 6


def test_the_same_options_twice_warn_nothing(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alf_analytics")
    for token in ("same-token-0001", "same-token-0002"):
        call(
            AnalyticsWSGIMiddleware(app, service_token=token, collector_url=collector.url),
            1,
        )
    received_entries(collector, 2)
    assert not [m for m in _warnings(caplog) if "in force" in m]


def test_an_option_a_later_middleware_left_at_its_default_warns_nothing(
    collector: Collector, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first one set timeout and retries; the second asked nothing of them: no warning.
    One that sets them by environment variable asks for them, as by keyword."""
    caplog.set_level(logging.WARNING, logger="alf_analytics")
    first = AnalyticsWSGIMiddleware(
        app, service_token="first-token-0001", collector_url=collector.url, timeout=3.0,
        retries=2,
    )  # fmt: skip
    second = AnalyticsWSGIMiddleware(
        app, service_token="second-token-0002", collector_url=collector.url
    )
    call(first, 1)
    call(second, 2)
    assert not [m for m in _warnings(caplog) if "in force" in m]
    monkeypatch.setenv("ALF_RETRIES", "4")
    third = AnalyticsWSGIMiddleware(
        app, service_token="third-token-0003", collector_url=collector.url
    )
    call(third, 3)
    received_entries(collector, 3)
    messages = [m for m in _warnings(caplog) if "in force" in m]
    assert len(messages) == 1 and "retries=4" in messages[0] and "retries=2" in messages[0]
