"""Fault injection: a real loopback collector misbehaves while a WSGI app serves requests.

For each fault the host app's request latency is compared with a healthy collector (relative,
generous), every entry arrives once the collector recovers, duplicates appear only where a
timeout left a send's outcome unknown, and with a collector that stays broken
``sent + dropped == captured`` with every drop under its reason. A last test shows that memory
stays bounded by ``queue_size`` (not by the number of requests) while the collector is down.
"""

from __future__ import annotations

import email.utils
import gc
import io
import json
import logging
import statistics
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware
from alf_analytics._transport import HTTPTransport

from .conftest import wait_until
from .faulty_collector import FaultyCollector

TOKEN = "faults-token-0123456789abcdef"
REQUESTS = 300

_BASE_ENVIRON: dict[str, Any] = {}
setup_testing_defaults(_BASE_ENVIRON)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def call(middleware: Any, i: int) -> None:
    """One in-process request with a unique id in its query string."""
    environ = dict(_BASE_ENVIRON)
    environ["QUERY_STRING"] = f"id={i}"
    environ["wsgi.input"] = io.BytesIO()
    result = middleware(environ, lambda status, headers, exc_info=None: None)
    for _ in result:
        pass
    result.close()


def timed_requests(middleware: Any, ids: range) -> list[float]:
    """Serve one request per id and return each one's latency."""
    latencies = []
    for i in ids:
        started = perf_counter()
        call(middleware, i)
        latencies.append(perf_counter() - started)
    return latencies


def received_ids(faulty: FaultyCollector) -> Counter[int]:
    return Counter(int(e["request"]["url"].rpartition("id=")[2]) for _, _, e in faulty.entries())


@pytest.fixture
def faulty() -> Iterator[FaultyCollector]:
    with FaultyCollector() as running:
        yield running


@dataclass(frozen=True)
class Fault:
    inject: Callable[[FaultyCollector], None]
    #: Duplicates at the collector: "never"; "possible" where a timeout leaves a send's outcome
    #: unknown; "expected" where the collector stores a batch and answers after the timeout.
    duplicates: str = "never"
    #: The fault makes the agent retry.
    retries: bool = True
    #: Seconds the fault lasts before the collector recovers.
    hold: float = 0.4
    #: The agent's send timeout.
    timeout: float = 0.3


def _retry_after_date(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


def REFUSE(faulty: FaultyCollector) -> None:
    faulty.refuse()


TRANSIENT = [
    pytest.param(Fault(REFUSE), id="connection-refused"),
    pytest.param(
        Fault(lambda f: f.blackhole(), duplicates="possible", hold=0.6), id="never-answers"
    ),
    pytest.param(
        Fault(lambda f: f.slow(0.6), duplicates="expected", hold=0.8), id="answers-after-timeout"
    ),
    pytest.param(
        Fault(lambda f: f.slow(0.3), retries=False, hold=0.0, timeout=3.0), id="answers-slowly"
    ),
    pytest.param(Fault(lambda f: f.fail(500, times=3)), id="500-then-recovers"),
    pytest.param(
        Fault(lambda f: f.fail(502, times=3, body=b"<html>bad gateway</html>")),
        id="502-html-then-recovers",
    ),
    pytest.param(Fault(lambda f: f.fail(503, times=3)), id="503-then-recovers"),
    pytest.param(
        Fault(lambda f: f.fail(429, times=1, retry_after="1"), hold=0.0), id="429-retry-after"
    ),
    pytest.param(
        Fault(lambda f: f.fail(429, times=1, retry_after=_retry_after_date(2)), hold=0.0),
        id="429-retry-after-date",
    ),
    pytest.param(Fault(lambda f: f.too_large_above(4096)), id="413-above-size"),
    pytest.param(Fault(lambda f: f.cut(times=3)), id="closed-mid-response"),
    pytest.param(Fault(lambda f: f.partial(), retries=False), id="207-per-alf-errors"),
    pytest.param(Fault(lambda f: f.not_json(), retries=False), id="200-not-json"),
]


def assert_latency_unchanged(healthy: list[float], faulty: list[float]) -> None:
    """The median request under the fault is within 3x the healthy median, plus 1 ms.

    A request that waited on the collector would take at least a loopback round trip, and the
    slow and black-holed faults hold theirs for 300 ms or more: the slack is there so a noisy
    machine never fails this, while a request path that waited still would.
    """
    healthy_median = statistics.median(healthy)
    faulty_median = statistics.median(faulty)
    assert faulty_median < 3 * healthy_median + 1e-3, (healthy_median, faulty_median)


@pytest.fixture
def sending_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of every HTTP send the agent makes (the request path makes none)."""
    names: list[str] = []
    send = HTTPTransport.send

    def recording(
        self: HTTPTransport, payload: bytes | list[bytes], idempotency_key: str | None = None
    ) -> Any:
        names.append(threading.current_thread().name)
        return send(self, payload, idempotency_key)

    monkeypatch.setattr(HTTPTransport, "send", recording)
    return names


@pytest.mark.parametrize("fault", TRANSIENT)
def test_fault_then_recovery_delivers_everything(
    faulty: FaultyCollector, fault: Fault, sending_threads: list[str]
) -> None:
    """Latency unchanged, every entry arrives after recovery, duplicates only if unknown."""
    middleware = AnalyticsWSGIMiddleware(
        app,
        service_token=TOKEN,
        collector_url=faulty.url,
        batch_size=50,
        delay=0.05,
        retries=8,
        retry_backoff=0.01,
        timeout=fault.timeout,
    )
    healthy = timed_requests(middleware, range(REQUESTS))
    assert alf_analytics.flush(10)
    answered_before = len(faulty.seen())

    fault.inject(faulty)
    failing = timed_requests(middleware, range(REQUESTS, 2 * REQUESTS))
    # Let the fault bite before the collector recovers.
    assert fault.inject is REFUSE or faulty.wait_for_requests(answered_before + 1)
    time.sleep(fault.hold)
    faulty.healthy()
    assert alf_analytics.flush(20)

    assert_latency_unchanged(healthy, failing)
    received = received_ids(faulty)
    assert set(received) == set(range(2 * REQUESTS)), "entries lost"
    duplicates = sum(received.values()) - len(received)
    if fault.duplicates == "expected":
        assert duplicates > 0  # the collector stored batches whose answer timed out
    elif fault.duplicates == "never":
        assert duplicates == 0
    stats = alf_analytics.stats()
    assert (stats["captured"], stats["sent"], stats["dropped_total"]) == (
        2 * REQUESTS,
        2 * REQUESTS,
        0,
    )
    assert (stats["retried"] > 0) is fault.retries
    # Every send, the failing ones included, happened on the agent's own threads.
    assert sending_threads
    assert threading.current_thread().name not in sending_threads
    assert all(name.startswith("alf-analytics") for name in sending_threads), set(sending_threads)


def test_latency_unchanged_with_a_full_queue(faulty: FaultyCollector) -> None:
    """With the worker stuck on a black-holed collector and its queue full, requests drop fast."""
    with FaultyCollector() as healthy_collector:
        baseline = AnalyticsWSGIMiddleware(
            app, service_token=TOKEN, collector_url=healthy_collector.url
        )
        healthy = timed_requests(baseline, range(REQUESTS))
        faulty.blackhole()
        stuck = AnalyticsWSGIMiddleware(
            app,
            service_token=TOKEN,
            collector_url=faulty.url,
            queue_size=50,
            batch_size=10,
            timeout=30.0,
        )
        timed_requests(stuck, range(100))
        assert faulty.wait_for_requests(1)
        full = timed_requests(stuck, range(100, 100 + REQUESTS))
        assert alf_analytics.flush(0.5) is False  # still stuck: bounded, not hanging
    assert_latency_unchanged(healthy, full)
    stats = alf_analytics.stats()
    assert stats["dropped"]["queue_full"] >= REQUESTS


@pytest.mark.parametrize(
    "retry_after",
    [
        pytest.param(lambda: "1", id="seconds"),
        # A date 2 s ahead, truncated to whole seconds: at least 1 s from now.
        pytest.param(lambda: _retry_after_date(2), id="http-date"),
    ],
)
def test_429_retry_after_is_honoured_as_a_floor(
    faulty: FaultyCollector, retry_after: Callable[[], str]
) -> None:
    """After a 429 with Retry-After of (at least) 1 s, the next attempt waits that long."""
    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=faulty.url, retry_backoff=0.001
    )
    faulty.fail(429, times=1, retry_after=retry_after())
    call(middleware, 0)
    assert alf_analytics.flush(10)
    first, second = faulty.seen()
    assert (first.status, second.status) == (429, 200)
    assert first.answered is not None
    assert second.received - first.answered >= 0.9


def test_400_costs_only_the_entry_the_collector_objects_to(
    faulty: FaultyCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch refused with 400 is bisected: only the bad entry is dropped, logged once."""
    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=faulty.url, batch_size=10, delay=60.0
    )
    faulty.reject_containing(b"id=13")
    for i in range(40):
        call(middleware, i)
    assert alf_analytics.flush(10) is False  # one entry was lost
    received = received_ids(faulty)
    assert sorted(received) == [i for i in range(40) if i != 13]
    assert max(received.values()) == 1
    stats = alf_analytics.stats()
    assert stats["dropped"] == {**stats["dropped"], "rejected": 1}
    assert (stats["dropped_total"], stats["sent"], stats["captured"]) == (1, 39, 40)
    # Halving 10 entries down to the bad one takes a handful of requests, not one per entry.
    assert 5 <= sum(r.status == 400 for r in faulty.seen()) <= 5
    warnings = [r.getMessage() for r in caplog.records if r.name == "alf_analytics"]
    assert len(warnings) == 1 and "400" in warnings[0] and "invalid entry" in warnings[0]


def test_a_collector_that_refuses_everything_is_not_bisected_forever(
    faulty: FaultyCollector,
) -> None:
    """When every request gets 400, bisection stops after a streak: batches then drop whole."""
    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=faulty.url, batch_size=100, delay=60.0
    )
    faulty.fail(400)
    for i in range(1000):
        call(middleware, i)
    assert alf_analytics.flush(10) is False
    stats = alf_analytics.stats()
    assert stats["dropped"]["rejected"] == 1000
    # 10 batches: full bisection would take 199 requests each (1,990 in all). Bounded by the
    # streak, the 10 whole batches, and up to max_inflight POSTs of split halves already in
    # flight, each of which may be split once more before the streak is seen.
    assert len(faulty.seen()) < 16 + 10 + 4 * middleware.config.max_inflight


BROKEN = [
    pytest.param(lambda f: f.refuse(), "retries_exhausted", id="connection-refused"),
    # No answer after the body was sent: maybe stored (the slow one does store), so these
    # are counted as unknown, never as lost.
    pytest.param(lambda f: f.blackhole(), "unknown", id="never-answers"),
    pytest.param(lambda f: f.slow(0.5), "unknown", id="answers-after-timeout"),
    pytest.param(lambda f: f.cut(), "unknown", id="closed-mid-response"),
    pytest.param(lambda f: f.fail(500), "retries_exhausted", id="500"),
    pytest.param(lambda f: f.fail(503, body=b"<html>down</html>"), "retries_exhausted", id="503"),
    pytest.param(lambda f: f.fail(429, retry_after="0"), "retries_exhausted", id="429"),
    pytest.param(lambda f: f.fail(400), "rejected", id="400"),
    # A 401 pauses the token's sends (AUTH_PAUSE), the refused batches waiting to probe again:
    # all of it is given up at close().
    pytest.param(lambda f: f.fail(401), "shutdown", id="401"),
    pytest.param(lambda f: f.too_large_above(0), "too_large", id="413-always"),
]


@pytest.mark.parametrize(("inject", "reason"), BROKEN)
def test_collector_that_stays_broken_accounts_for_every_entry(
    faulty: FaultyCollector, inject: Callable[[FaultyCollector], None], reason: str
) -> None:
    """sent + dropped + unknown == captured exactly, each under the fault's reason."""
    middleware = AnalyticsWSGIMiddleware(
        app,
        service_token=TOKEN,
        collector_url=faulty.url,
        batch_size=25,
        delay=0.05,
        retries=2,
        retry_backoff=0.01,
        timeout=0.2,
    )
    inject(faulty)
    for i in range(100):
        call(middleware, i)
    paused = reason == "shutdown"
    assert alf_analytics.flush(1 if paused else 20) is False
    alf_analytics.close(0.5)
    stats = alf_analytics.stats()
    assert stats["captured"] == 100
    assert stats["sent"] == 0
    assert stats["sent"] + stats["dropped_total"] + stats["unknown"] == stats["captured"]
    counted = {**stats["dropped"], "unknown": stats["unknown"]}
    assert sum(counted[part] for part in reason.split("+")) == 100
    assert stats["queued"] == 0


def test_memory_is_bounded_by_the_queue_not_the_traffic(faulty: FaultyCollector) -> None:
    """50,000 requests against a dead collector hold no more memory than the first 2,000."""
    faulty.refuse()
    middleware = AnalyticsWSGIMiddleware(
        app,
        service_token=TOKEN,
        collector_url=faulty.url,
        queue_size=1000,
        batch_size=100,
        retries=3,
        retry_backoff=30.0,
    )
    agent_logger = logging.getLogger("alf_analytics")
    level = agent_logger.level
    agent_logger.setLevel(logging.ERROR)  # the (rate-limited) drop warnings

    def settled() -> int:
        # Compare like with like: the worker thread takes queued entries in slices, so at any
        # instant some are raw records and some built batches (which differ in size). A flush
        # makes it build all of them and send; each send fails and waits for its retry.
        assert alf_analytics.flush(0.05) is False
        worker = middleware._worker
        assert worker is not None
        assert wait_until(
            lambda: (
                not worker._entries
                and all(marker.target for marker in worker._books.flushes)
                and worker.stats()["requests"] >= 1
                and worker.stats()["in_flight"] == 0
            )
        ), "the worker did not settle"
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    gc.collect()
    tracemalloc.start()
    try:
        for i in range(2000):
            call(middleware, i)
        held = settled()
        for i in range(2000, 50_000):
            call(middleware, i)
        after = settled()
    finally:
        tracemalloc.stop()
        agent_logger.setLevel(level)
    stats = alf_analytics.stats()
    accepted = 50_000 - stats["dropped"]["queue_full"]
    assert accepted <= 1000 + 100  # the queue plus the batch the worker holds
    # What 1,000 queued entries cost is held after 2,000 requests; 48,000 more add ~nothing.
    assert after - held < 0.1 * held, (held, after)
    # And that is proportional to the bound: a few KiB per queued entry.
    assert after < (1000 + 100) * 8192, after


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_dropped_at_once_and_says_where_it_points(
    faulty: FaultyCollector, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """Redirects are not followed and would not change on a retry: the batch is dropped as
    rejected at the first answer (not retried quietly until retries run out), with one warning
    naming the Location, its credentials and query left out."""
    caplog.set_level(logging.WARNING, logger="alf_analytics")
    location = "https://user:secret@elsewhere.example/analytics?key=hunter2"
    faulty.fail(status, headers=(("Location", location),))
    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=faulty.url, retries=3, retry_backoff=0.01
    )
    call(middleware, 0)
    assert alf_analytics.flush(5) is False
    stats = alf_analytics.stats()
    assert len(faulty.seen()) == 1
    assert stats["dropped"]["rejected"] == 1 == stats["captured"]
    assert stats["sent"] + stats["dropped_total"] + stats["unknown"] + stats["queued"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "alf_analytics"]
    assert f"answered {status}" in warning and "redirects are not followed" in warning
    assert "https://***@elsewhere.example/analytics?..." in warning
    assert "secret" not in warning and "hunter2" not in warning


def test_any_2xx_is_delivered_never_resent(faulty: FaultyCollector) -> None:
    """A collector answering a 2xx we do not name (203) has stored the batch: resending it
    would store it twice."""
    faulty.fail(203, body=b"{}")
    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=faulty.url, retries=3, retry_backoff=0.01
    )
    call(middleware, 0)
    assert alf_analytics.flush(5)
    assert len(faulty.seen()) == 1
    assert alf_analytics.stats()["sent"] == 1


def test_a_collector_answer_quoting_the_url_password_is_masked_in_the_log(
    faulty: FaultyCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector of someone else's may quote what it was sent (the Basic credentials of
    ``collector_url``) in its error: the log line masks the password, as it masks tokens."""
    caplog.set_level(logging.WARNING, logger="alf_analytics")
    password = "s3cr%40t-password"  # percent-encoded in the URL, sent (and quoted) decoded
    quoted = {"errors": ["bad credentials bob:s3cr@t-password"]}
    faulty.fail(404, body=json.dumps(quoted).encode())
    url = faulty.url.replace("http://", f"http://bob:{password}@")
    middleware = AnalyticsWSGIMiddleware(app, service_token=TOKEN, collector_url=url)
    call(middleware, 0)
    assert alf_analytics.flush(5) is False
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "alf_analytics"]
    assert "bad credentials bob:***" in warning
    assert "s3cr@t" not in warning and "s3cr%40t" not in warning
