"""Shared fixtures: a real ALF collector on loopback, schema validation, and hygiene checks.

Every test that sends entries does so to :class:`alf_analytics.collector.Collector` over real
HTTP; the collector validates each ALF against the bundled 1.1.0 schema and the helpers here
validate what it stored once more, with format checks on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
from jsonschema import Draft4Validator, FormatChecker

import alf_analytics
from alf_analytics import _worker
from alf_analytics.collector import Collector

_SCHEMAS = resources.files("alf_analytics") / "schemas"
ALF_VALIDATOR = Draft4Validator(
    json.loads((_SCHEMAS / "1.1.0.json").read_text()), format_checker=FormatChecker()
)
BATCH_VALIDATOR = Draft4Validator(
    json.loads((_SCHEMAS / "1.1.0-batch.json").read_text()), format_checker=FormatChecker()
)
# Without these, jsonschema silently skips `format: uri` and `format: date-time`.
assert "uri" in FormatChecker().checkers and "date-time" in FormatChecker().checkers


def assert_valid_alf(alf: Any) -> None:
    """Fail with every schema error of one ALF object (format checks on)."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in ALF_VALIDATOR.iter_errors(alf)]
    assert not errors, errors


def assert_valid_batch(payload: Any) -> None:
    """Fail with every schema error of a ``/1.1.0/batch`` request body."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in BATCH_VALIDATOR.iter_errors(payload)]
    assert not errors, errors


def received_entries(
    collector: Collector, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Flush, wait for ``count`` entries, schema-check every ALF received, return the entries."""
    alf_analytics.flush(timeout)
    assert collector.wait_for_entries(count, timeout), (
        f"expected {count} entries, collector has {collector.count()}"
    )
    alfs = collector.alfs()
    for alf in alfs:
        assert_valid_alf(alf)
    return [stored.entry for stored in collector.entries()]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real ALF collector on 127.0.0.1 (in-memory SQLite, schema validation on)."""
    with Collector() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_workers() -> Iterator[None]:
    """Each test gets its own workers; threads from the last test are stopped."""
    yield
    alf_analytics.close(timeout=2.0)
    _worker._workers.clear()
    _worker._shutdown = None


class _ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def internal_errors(request: pytest.FixtureRequest) -> Iterator[list[logging.LogRecord]]:
    """Fail a test in which the agent logged an internal error (like sentry's fixture).

    A test that provokes internal errors on purpose takes this fixture and clears the list.
    The collector's own errors, and the configuration errors an ASGI middleware logs as it
    raises them (``alf_analytics.config``), are not the agent's internal errors.
    """
    recorder = _ErrorRecorder()
    agent_logger = logging.getLogger("alf_analytics")
    agent_logger.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        agent_logger.removeHandler(recorder)
    errors = [
        r.getMessage()
        for r in recorder.records
        if not r.name.startswith(("alf_analytics.collector", "alf_analytics.config"))
    ]
    assert not errors, f"alf_analytics logged internal errors: {errors}"
