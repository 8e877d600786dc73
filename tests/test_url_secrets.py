"""Credentials in ``collector_url`` never show in a log line or a thread's name."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware

from .servers import free_port
from .test_faults import app, call

SECRET = "s3cret-pass-word"


def test_collector_url_credentials_are_masked_in_logs_and_thread_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="alf_analytics")
    url = f"http://analytics:{SECRET}@127.0.0.1:{free_port()}"  # nobody listens: sends fail
    middleware = AnalyticsWSGIMiddleware(
        app,
        service_token="url-secret-token-0001",
        collector_url=url,
        retries=1,
        retry_backoff=0.0,
        timeout=0.5,
        delay=0.05,
        debug=True,
    )
    call(middleware, 1)
    names: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("unreachable" in r.getMessage() for r in
                                                  caplog.records):  # fmt: skip
        names.update(thread.name for thread in threading.enumerate())
        time.sleep(0.02)
    names.update(thread.name for thread in threading.enumerate())
    alf_analytics.flush(2.0)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("alf_analytics")]
    assert any("unreachable" in m for m in messages), messages  # the failure was logged
    assert any("127.0.0.1" in m for m in messages), messages  # and names the collector
    assert not [m for m in messages if SECRET in m], messages
    assert [n for n in names if "alf" in n.lower()], names  # the worker thread was seen
    assert not [n for n in names if SECRET in n], names
    assert SECRET not in repr(middleware.config)
