"""The worker: one thread per collector, grouping, batching, retries, drops, stats, lifecycle.

End-to-end behaviour runs through the WSGI middleware to the real collector (or the loopback
fault server); status handling and crash injection use a scripted in-process transport.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware, _batching, _delivery, _worker
from alf_analytics._config import Config, make_config, mask_token
from alf_analytics._record import Exchange
from alf_analytics._transport import Outcome
from alf_analytics._worker import MAX_BACKOFF, MAX_RETRY_AFTER, Worker, backoff, get_worker
from alf_analytics.collector import Collector
from alf_analytics.wsgi import read_environ

from .conftest import received_entries, wait_until
from .faulty_collector import FaultyCollector

TOKEN = "worker-token-0123456789abcdef"
OTHER_TOKEN = "other-token-9876543210fedcba"
UNREACHABLE = "http://127.0.0.1:9"


# -- helpers ----------------------------------------------------------------------------------


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A tiny WSGI app: echoes the request body (or ``ok``)."""
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body or b"ok"]


def call(middleware: Any, query: str = "", body: bytes = b"") -> bytes:
    """One in-process WSGI request through ``middleware``; returns the response body."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["QUERY_STRING"] = query
    environ["REQUEST_METHOD"] = "POST" if body else "GET"
    environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input"] = io.BytesIO(body)
    result = middleware(environ, lambda status, headers, exc_info=None: None)
    try:
        return b"".join(result)
    finally:
        result.close()


def wrap(url: str, **options: Any) -> AnalyticsWSGIMiddleware:
    options.setdefault("service_token", TOKEN)
    options.setdefault("retry_backoff", 0.01)
    return AnalyticsWSGIMiddleware(app, collector_url=url, **options)


def config(**options: Any) -> Config:
    options.setdefault("service_token", TOKEN)
    options.setdefault("collector_url", UNREACHABLE)
    options.setdefault("retry_backoff", 0.001)
    # One POST at a time, so that scripted answers meet batches in a known order; the tests
    # of concurrent sends ask for more.
    options.setdefault("max_inflight", 1)
    return make_config(options)


def exchange(cfg: Config, i: int = 0, body: bytes = b"") -> Exchange:
    """A finished exchange, as an adapter hands it to the worker."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["QUERY_STRING"] = f"id={i}"
    ex = Exchange(cfg, environ, read_environ)
    ex.status, ex.reason = 200, "OK"
    ex.response_headers = [("Content-Type", "text/plain")]
    ex.t_response = perf_counter()
    ex.response_data(body or b"ok")
    ex.t_end = perf_counter()
    return ex


def ids(payload: list[dict[str, Any]]) -> list[str]:
    return [e["request"]["url"].rpartition("id=")[2] for alf in payload for e in alf_entries(alf)]


def alf_entries(alf: dict[str, Any]) -> list[dict[str, Any]]:
    return alf["har"]["log"]["entries"]  # type: ignore[no-any-return]


OK = Outcome(200)


class ScriptedTransport:
    """An in-process transport: answers from ``script`` (then ``default``), records payloads."""

    def __init__(
        self,
        script: list[Outcome | BaseException] | None = None,
        default: Outcome | Callable[[list[dict[str, Any]]], Outcome] = OK,
    ) -> None:
        self.script = list(script or [])
        self.default = default
        self.payloads: list[list[dict[str, Any]]] = []
        self.keys: list[str | None] = []
        self.times: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.closed = 0

    def send(self, payload: bytes | list[bytes], idempotency_key: str | None = None) -> Outcome:
        data = json.loads(payload if isinstance(payload, bytes) else b"".join(payload))
        self.payloads.append(data)
        self.keys.append(idempotency_key)
        self.times.append(time.monotonic())
        self.entered.set()
        self.release.wait(30)
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return self.default(data) if callable(self.default) else self.default

    def close(self) -> None:
        self.closed += 1

    def entry_count(self) -> int:
        return sum(len(alf_entries(alf)) for payload in self.payloads for alf in payload)


@pytest.fixture
def workers() -> Iterator[Callable[..., tuple[Worker, ScriptedTransport]]]:
    """Make private workers on a scripted transport; they are closed after the test."""
    made: list[tuple[Worker, ScriptedTransport]] = []

    def make(
        cfg: Config | None = None, transport: ScriptedTransport | None = None
    ) -> tuple[Worker, ScriptedTransport]:
        transport = transport or ScriptedTransport()
        worker = Worker(cfg or config(), transport_factory=lambda: transport)
        made.append((worker, transport))
        return worker, transport

    yield make
    for worker, transport in made:
        transport.release.set()
        worker.close(timeout=2.0)


class Boom(BaseException):
    """An unexpected error that is not an Exception (like the worst a dependency can raise)."""


def agent_threads(url: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"alf-analytics-worker:{url}"]


# -- one worker per collector -----------------------------------------------------------------


def test_counters_are_read_without_itertools_pickling() -> None:
    """The counters were read through ``itertools.count.__reduce__``, which warns since
    Python 3.12 and is gone in 3.14: ``stats()`` and the bound of every shutdown flush
    (atexit, lifespan, FlushOnShutdown, the SIGTERM helper) raised a DeprecationWarning
    under ``-W error`` on 3.12 and 3.13 (this suite's setting) and a TypeError on 3.14, so
    the flush at exit never ran there. Fails before the fix on 3.12+."""
    import itertools
    import warnings

    counter = itertools.count()
    for _ in range(41):
        next(counter)
    AnalyticsWSGIMiddleware(lambda e, s: [], service_token="counter-token")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _worker._value(counter) == 41
        assert alf_analytics.stats()["captured"] == 0
        assert _worker.shutdown_bound(1.0) == 1.0
    assert next(counter) == 41  # read, not advanced


def test_middlewares_share_one_worker_per_collector(collector: Collector) -> None:
    """Middlewares for one collector share one worker whatever their tokens; not across URLs."""
    first = wrap(collector.url)
    second = wrap(collector.url, service_token=OTHER_TOKEN, environment="staging")
    third = wrap(UNREACHABLE)
    assert first._worker is second._worker
    assert third._worker is not first._worker
    assert get_worker(first.config) is first._worker


def test_worker_thread_starts_lazily_and_only_once(collector: Collector) -> None:
    """No thread before the first request; one thread for 200 requests from 8 threads."""
    middleware = wrap(collector.url, delay=0.05)
    assert agent_threads(collector.url) == []
    before = set(threading.enumerate())

    def hammer(start: int) -> None:
        for i in range(start, start + 25):
            call(middleware, f"id={i}")

    threads = [threading.Thread(target=hammer, args=(n * 25,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Everything delivered first: senders start when the worker cuts its first batch.
    entries = received_entries(collector, 200)
    assert len(agent_threads(collector.url)) == 1
    started = [t for t in threading.enumerate() if t not in before]
    # The collector in this process runs threads of its own (uvicorn, its store's thread
    # pool); ours are the worker and the senders it started, at most max_inflight of them.
    ours = [t.name for t in started if t.name.startswith("alf-analytics-")]
    assert ours.count(f"alf-analytics-worker:{collector.url}") == 1
    senders = ours.count(f"alf-analytics-sender:{collector.url}")
    assert 1 <= senders <= middleware.config.max_inflight
    # ...and no agent thread of any other kind (a second worker, a timer, a pool).
    assert sorted(set(ours)) == sorted(
        {f"alf-analytics-worker:{collector.url}", f"alf-analytics-sender:{collector.url}"}
    )
    assert sorted(int(e["request"]["url"].rpartition("=")[2]) for e in entries) == list(range(200))


def test_groups_never_mix_tokens_or_environments(collector: Collector) -> None:
    """Interleaved entries of three (token, environment) groups reach the collector unmixed."""
    groups = {
        "a": wrap(collector.url, environment="production", delay=0.05),
        "b": wrap(collector.url, service_token=OTHER_TOKEN, environment="staging", delay=0.05),
        "c": wrap(collector.url, delay=0.05),
    }
    expected = {"a": (TOKEN, "production"), "b": (OTHER_TOKEN, "staging"), "c": (TOKEN, None)}
    for i in range(30):
        for name, middleware in groups.items():
            call(middleware, f"group={name}&id={i}")
    received_entries(collector, 90)
    stored = collector.entries()
    assert len(stored) == 90
    for entry in stored:
        group = entry.url.split("group=")[1][0]  # type: ignore[union-attr]
        assert (entry.service_token, entry.environment) == expected[group]
    for alf in collector.alfs():
        names = {e["request"]["url"].split("group=")[1][0] for e in alf_entries(alf)}
        assert len(names) == 1


# -- batching -----------------------------------------------------------------------------------


def test_batch_is_cut_at_batch_size(collector: Collector) -> None:
    """With a long delay, 12 entries at batch_size=5 leave as two batches of 5, then 2 on flush."""
    middleware = wrap(collector.url, batch_size=5, delay=60.0)
    for i in range(12):
        call(middleware, f"id={i}")
    assert collector.wait_for_requests(2)
    assert [r.entry_count for r in collector.requests()] == [5, 5]
    received_entries(collector, 12)
    assert [r.entry_count for r in collector.requests()] == [5, 5, 2]


def test_batch_is_sent_after_delay_without_flush(collector: Collector) -> None:
    """A partial batch leaves once `delay` has passed since its oldest entry, without a flush."""
    middleware = wrap(collector.url, batch_size=100, delay=0.2)
    for i in range(3):
        call(middleware, f"id={i}")
    assert collector.wait_for_entries(3, timeout=10)
    # The entries are stored before the collector records the request it answered.
    assert collector.wait_for_requests(1, timeout=10)
    assert [r.entry_count for r in collector.requests()] == [3]


def test_steady_light_traffic_is_not_starved(collector: Collector) -> None:
    """An entry every 0.15 s with delay=0.5 is sent in several batches while traffic goes on."""
    middleware = wrap(collector.url, batch_size=100, delay=0.5)
    for i in range(16):
        call(middleware, f"id={i}")
        time.sleep(0.15)
    # Kong's inactivity timer (ANCHORS 5.3) would not have sent anything by now.
    sent_before_flush = len(collector.requests())
    assert sent_before_flush >= 3
    received_entries(collector, 16)
    assert all(r.entry_count < 16 for r in collector.requests())


def test_batches_never_exceed_max_batch_bytes(collector: Collector) -> None:
    """Every request body is at most max_batch_bytes, decompressed and on the wire."""
    limit = 8192
    options: dict[str, Any] = {"max_batch_bytes": limit, "batch_size": 1000, "delay": 60.0}
    first = wrap(collector.url, **options)
    second = wrap(collector.url, service_token=OTHER_TOKEN, **options)
    for i in range(60):
        call(first if i % 3 else second, f"id={i}&pad=" + chr(65 + i % 26) * (200 + 37 * i))
    received_entries(collector, 60)
    requests = collector.requests()
    assert len(requests) >= 5
    for record in requests:
        assert record.status == 200
        assert 0 < record.body_bytes <= limit
        assert record.wire_bytes <= limit
    # Batches are cut when needed, not far earlier: on average they are at least half full.
    assert sum(r.body_bytes for r in requests) / len(requests) > limit / 2


def test_entry_too_large_alone_is_dropped_and_counted(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry that cannot fit in max_batch_bytes even alone is dropped as too_large."""
    middleware = wrap(collector.url, max_batch_bytes=2048)
    call(middleware, "id=0")
    call(middleware, "pad=" + "x" * 3000 + "&id=1")
    call(middleware, "id=2")
    entries = received_entries(collector, 2)
    assert [e["request"]["url"].rpartition("=")[2] for e in entries] == ["0", "2"]
    stats = alf_analytics.stats()
    assert stats["dropped"]["too_large"] == 1
    assert (stats["captured"], stats["sent"], stats["dropped_total"]) == (3, 2, 1)
    assert any("exceeds max_batch_bytes=2048" in r.getMessage() for r in caplog.records)


def test_one_connection_carries_many_batches() -> None:
    """With max_inflight=1, ten batches reach the collector over a single TCP connection."""
    with FaultyCollector() as faulty:
        middleware = wrap(faulty.url, batch_size=2, delay=60.0, max_inflight=1)
        for i in range(20):
            call(middleware, f"id={i}")
        assert alf_analytics.flush(5)
        assert faulty.count() == 20
        assert len(faulty.seen()) == 10
        assert faulty.connections == 1


def test_connections_are_bounded_by_max_inflight() -> None:
    """Fifty slow batches open at most max_inflight connections, each reused."""
    with FaultyCollector() as faulty:
        faulty.slow(0.02)
        middleware = wrap(faulty.url, batch_size=2, delay=60.0, max_inflight=3)
        for i in range(100):
            call(middleware, f"id={i}")
        assert alf_analytics.flush(10)
        assert faulty.count() == 100
        assert len(faulty.seen()) == 50
        assert 1 <= faulty.connections <= 3


def test_a_request_body_is_made_of_parts_that_join_into_the_batch() -> None:
    """Every group's ALF object in one JSON array, as parts of a bounded size: an entry of
    _PART_BYTES or more is a part by itself (not copied), small ones are joined."""
    big = b'"' + b"x" * _delivery._PART_BYTES + b'"'
    small = [b"%d" % n for n in range(5000)]
    batch = [(b'{"a":[', [b"1", big, b"2"]), (b'{"b":[', small), (b'{"c":[', [big])]
    parts = _delivery._body(batch)
    expected = b"[" + b",".join(p + b",".join(items) + b"]}}}" for p, items in batch) + b"]"
    assert b"".join(parts) == expected
    assert all(parts) and sum(part is big for part in parts) == 2
    assert max(len(part) for part in parts if part is not big) < 2 * _delivery._PART_BYTES


# -- answers and retries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "sent", "reason", "requests", "retried"),
    [
        pytest.param(Outcome(200), 4, None, 1, 0, id="200"),
        pytest.param(Outcome(207, b'{"errors":["alf 0: bad"]}'), 4, None, 1, 0, id="207"),
        # A 400 is bisected: 4 -> 2 + 2 -> 1 + 1 + 1 + 1, each part tried once.
        pytest.param(Outcome(400, b'{"errors":["bad"]}'), 0, "rejected", 7, 8, id="400"),
        # Refused credentials: the pause (shortened here), then the same batch probes again.
        pytest.param(Outcome(401), 0, "rejected", 3, 8, id="401"),
        pytest.param(Outcome(403), 0, "rejected", 3, 8, id="403"),
        pytest.param(Outcome(404), 0, "rejected", 1, 0, id="404"),
        pytest.param(Outcome(408), 0, "retries_exhausted", 3, 8, id="408"),
        pytest.param(Outcome(429), 0, "retries_exhausted", 3, 8, id="429"),
        pytest.param(Outcome(500), 0, "retries_exhausted", 3, 8, id="500"),
        pytest.param(Outcome(502), 0, "retries_exhausted", 3, 8, id="502"),
        pytest.param(Outcome(503), 0, "retries_exhausted", 3, 8, id="503"),
        pytest.param(Outcome(0, error="ConnectError"), 0, "retries_exhausted", 3, 8, id="network"),
        pytest.param(
            Outcome(0, error="ReadTimeout", maybe_delivered=True), 0, None, 3, 8, id="unknown"
        ),
    ],
)
def test_answer_decides_sent_rejected_or_retried(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
    monkeypatch: pytest.MonkeyPatch,
    answer: Outcome,
    sent: int,
    reason: str | None,
    requests: int,
    retried: int,
) -> None:
    """2xx is delivered, other 4xx given up at once, 5xx/408/429/network and refused
    credentials retried `retries` times.

    flush() says True only when everything was delivered.
    """
    monkeypatch.setattr(_delivery, "AUTH_PAUSE", 0.05)
    worker, transport = workers(config(retries=2), ScriptedTransport(default=answer))
    cfg = config(retries=2)
    for i in range(4):
        worker.submit(exchange(cfg, i))
    assert worker.flush(10) is (sent == 4)
    stats = worker.stats()
    assert len(transport.payloads) == requests
    assert stats["sent"] == sent
    assert stats["captured"] == 4
    assert stats["queued"] == 0
    if reason is not None:
        assert stats["dropped"][reason] == stats["dropped_total"] == 4 - sent
    if answer.maybe_delivered:
        # Never answered after the body was sent: maybe stored, so not counted as a loss.
        assert (stats["unknown"], stats["dropped_total"]) == (4, 0)
    else:
        assert stats["unknown"] == 0
    assert stats["retried"] == retried


def test_retries_then_success_delivers_once(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """Two 503s then a 200 deliver the batch once, counted as retried twice."""
    transport = ScriptedTransport([Outcome(503), Outcome(0, error="reset")])
    cfg = config(retries=2)
    worker, _ = workers(cfg, transport)
    for i in range(3):
        worker.submit(exchange(cfg, i))
    assert worker.flush(10)
    assert [ids(p) for p in transport.payloads] == [["0", "1", "2"]] * 3
    stats = worker.stats()
    assert (stats["sent"], stats["retried"], stats["dropped_total"]) == (3, 6, 0)


def test_an_outage_is_warned_soon_rate_limited_and_its_recovery_said_once(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One warning at the first failure (not when retries run out), none while it lasts, one
    "delivery recovered"; an outage that starts within the rate limit of the last warning is
    still warned once the limit allows, so its recovery is said too."""
    monkeypatch.setattr(_delivery, "_LOG_INTERVAL", 2.5)
    down = threading.Event()
    down.set()

    def answer(payload: list[dict[str, Any]]) -> Outcome:
        return Outcome(0, error="ConnectError: refused") if down.is_set() else OK

    cfg = config(delay=0.01, retries=100, retry_backoff=0.01)
    worker, transport = workers(cfg, ScriptedTransport(default=answer))

    def lines() -> list[str]:
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        return [
            "down" if "unreachable" in m else "up"
            for m in said
            if "unreachable" in m or "recovered" in m
        ]

    def wait_for(expected: list[str], timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while lines() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines() == expected, caplog.text

    started = time.monotonic()
    worker.submit(exchange(cfg, 1))
    wait_for(["down"])
    assert time.monotonic() - started < 0.5  # at the first failure, not after 100 retries
    time.sleep(0.2)
    assert len(transport.payloads) >= 3 and lines() == ["down"]  # failing on, said once
    down.clear()
    wait_for(["down", "up"])
    down.set()  # down again, well within 2.5 s of the first warning
    worker.submit(exchange(cfg, 2))
    time.sleep(0.3)
    assert lines() == ["down", "up"]  # rate-limited...
    wait_for(["down", "up", "down"])  # ...then said, while the outage lasts
    down.clear()
    wait_for(["down", "up", "down", "up"])
    assert worker.flush(5)


def test_an_isolated_failure_does_not_hold_up_later_batches(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """A batch that gets one 503 waits for its retry while the next batches go out at once."""
    transport = ScriptedTransport([Outcome(503)])
    cfg = config(batch_size=2, retry_backoff=0.5)
    worker, _ = workers(cfg, transport)
    for i in range(6):
        worker.submit(exchange(cfg, i))
    assert worker.flush(10)
    sent = [ids(p) for p in transport.payloads]
    # The failed batch is retried last, after the two batches cut after it were delivered.
    assert sent == [["0", "1"], ["2", "3"], ["4", "5"], ["0", "1"]]
    stats = worker.stats()
    assert (stats["sent"], stats["retried"], stats["dropped_total"]) == (6, 2, 0)


def test_a_collector_that_keeps_failing_pauses_every_send(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """After two failures in a row nothing is sent until the backoff ends, then all of it is."""
    transport = ScriptedTransport([Outcome(503), Outcome(503)])
    cfg = config(batch_size=1, retry_backoff=0.5, retries=3, queue_size=100)
    worker, _ = workers(cfg, transport)
    for i in range(20):
        worker.submit(exchange(cfg, i))
    time.sleep(0.15)
    # Two batches failed, so the collector counts as down: the other 18 wait, unsent.
    assert len(transport.payloads) == 2
    assert worker.stats()["queued"] == 20
    assert worker.flush(20)
    assert len(transport.payloads) == 22
    assert sorted(int(i) for p in transport.payloads[2:] for i in ids(p)) == list(range(20))
    stats = worker.stats()
    assert (stats["sent"], stats["retried"], stats["dropped_total"]) == (20, 2, 0)


def test_rejection_is_logged_once(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], caplog: pytest.LogCaptureFixture
) -> None:
    """Three batches refused with 404 produce one warning, which names the status."""
    cfg = config(batch_size=1)
    worker, transport = workers(
        cfg, ScriptedTransport(default=Outcome(404, b'{"errors":["no such endpoint"]}'))
    )
    with caplog.at_level(logging.WARNING, logger="alf_analytics"):
        for i in range(3):
            worker.submit(exchange(cfg, i))
        assert worker.flush(10) is False
    assert len(transport.payloads) == 3
    warnings = [r for r in caplog.records if r.name == "alf_analytics"]
    assert len(warnings) == 1
    assert "404" in warnings[0].getMessage() and "no such endpoint" in warnings[0].getMessage()


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_pause_every_send_of_the_token_and_say_why_once(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """After a 401/403 nothing more is sent for AUTH_PAUSE (PITFALLS #44), the refused batch
    included (it waits to probe again); close() gives up on all of it."""
    cfg = config(batch_size=1, max_inflight=4)
    worker, transport = workers(cfg, ScriptedTransport(default=Outcome(status)))
    with caplog.at_level(logging.WARNING, logger="alf_analytics"):
        worker.submit(exchange(cfg, 0))
        assert worker.flush(0.3) is False
        for i in range(1, 6):
            worker.submit(exchange(cfg, i))
        assert worker.flush(0.3) is False
        assert len(transport.payloads) == 1
        assert worker.close(0.2) is False
    # close() does not give up untried: the refused batch probes once more, refused again.
    assert len(transport.payloads) == 2
    stats = worker.stats()
    assert stats["dropped"]["rejected"] == 0
    assert stats["dropped"]["shutdown"] == 6
    assert stats["queued"] == 0
    pauses = [r.getMessage() for r in caplog.records if "sends pause" in r.getMessage()]
    assert len(pauses) == 1 and str(status) in pauses[0]
    (given_up,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "6 queued entries dropped (the collector refused our credentials, and the next " in (
        given_up
    )


def test_a_collector_back_during_a_long_backoff_is_found_out_at_close(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """Two failures in a row pause every send for the backoff (here at least 15 s, past the
    bound of close()); the collector came back meanwhile: close() probes at once and
    delivers everything instead of dropping it untried."""
    cfg = config(batch_size=2, retry_backoff=30.0)
    transport = ScriptedTransport([Outcome(503), Outcome(503)], default=Outcome(200))
    worker, _ = workers(cfg, transport)
    for i in range(4):
        worker.submit(exchange(cfg, i))
    assert worker.flush(0.5) is False  # both batches failed: sends paused for the backoff
    assert worker.close(5) is True
    stats = worker.stats()
    assert (stats["sent"], stats["dropped_total"], stats["queued"]) == (4, 0, 0)


def test_a_token_fixed_during_the_pause_is_found_out_at_close(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """The process exits during the 60 s pause after a 401, after the operator added the
    token: close() probes at once instead of dropping, and everything is delivered."""
    cfg = config(batch_size=2)
    transport = ScriptedTransport([Outcome(401)], default=Outcome(200))
    worker, _ = workers(cfg, transport)
    for i in range(5):
        worker.submit(exchange(cfg, i))
    assert worker.flush(0.3) is False  # paused for AUTH_PAUSE (60 s)
    assert worker.close(5) is True
    stats = worker.stats()
    assert (stats["sent"], stats["dropped_total"], stats["queued"]) == (5, 0, 0)


def test_a_token_fixed_on_the_collector_during_the_pause_loses_nothing(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch refused with 401 is the probe after the pause: once the collector knows the
    token, it is delivered, with the entries queued meanwhile."""
    monkeypatch.setattr(_delivery, "AUTH_PAUSE", 0.2)
    transport = ScriptedTransport([Outcome(401)], default=Outcome(200))
    worker, _ = workers(config(batch_size=2), transport)
    for i in range(5):
        worker.submit(exchange(config(batch_size=2), i))
    assert worker.flush(10) is True
    stats = worker.stats()
    assert (stats["sent"], stats["dropped_total"], stats["queued"]) == (5, 0, 0)
    assert stats["retried"] == 2


def refusing(token: str) -> Callable[[list[dict[str, Any]]], Outcome]:
    """A collector that refuses (401) every request carrying ``token``, as one revoking it."""

    def answer(payload: list[dict[str, Any]]) -> Outcome:
        if any(alf["serviceToken"] == token for alf in payload):
            return Outcome(401, b'{"errors": ["service token not accepted"]}')
        return OK

    return answer


def sent_ids(transport: ScriptedTransport, token: str) -> list[str]:
    return [
        e["request"]["url"].rpartition("id=")[2]
        for payload in transport.payloads
        for alf in payload
        if alf["serviceToken"] == token
        for e in alf_entries(alf)
    ]


def test_a_refused_token_pauses_only_its_own_sends(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], caplog: pytest.LogCaptureFixture
) -> None:
    """One tenant's revoked token must not hold the others back: its group pauses for
    AUTH_PAUSE (one request refused, the rest kept back), the other token's entries go on."""
    bad, good = config(batch_size=1), config(batch_size=1, service_token=OTHER_TOKEN)
    worker, transport = workers(bad, ScriptedTransport(default=refusing(TOKEN)))
    with caplog.at_level(logging.WARNING, logger="alf_analytics"):
        worker.submit(exchange(bad, 0))
        assert worker.flush(0.3) is False
        for i in range(1, 6):
            worker.submit(exchange(bad, i))
            worker.submit(exchange(good, i))
        assert worker.flush(0.5) is False  # the refused token's entries wait
    assert sent_ids(transport, OTHER_TOKEN) == ["1", "2", "3", "4", "5"]
    assert sent_ids(transport, TOKEN) == ["0"]  # refused once, nothing more sent meanwhile
    stats = worker.stats()
    assert (stats["sent"], stats["queued"], stats["dropped_total"]) == (5, 6, 0)
    (pause,) = [r.getMessage() for r in caplog.records if "sends pause" in r.getMessage()]
    assert TOKEN not in pause and f"service token {mask_token(TOKEN)} " in pause  # masked
    assert worker.close(0.2) is False
    assert worker.stats()["dropped"]["shutdown"] == 6


def test_a_refusal_with_credentials_in_the_url_names_them_too(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], caplog: pytest.LogCaptureFixture
) -> None:
    """collector_url's user and password go out as Basic auth: a 401 may be about them, and
    the warning says so (never showing them)."""
    cfg = config(collector_url="http://alice:s3cret-pw@127.0.0.1:9")
    worker, _ = workers(cfg, ScriptedTransport(default=Outcome(401)))
    with caplog.at_level(logging.WARNING, logger="alf_analytics"):
        worker.submit(exchange(cfg, 0))
        assert worker.flush(0.3) is False
    (pause,) = [r.getMessage() for r in caplog.records if "sends pause" in r.getMessage()]
    assert "(or collector_url's user and password)" in pause
    assert "s3cret-pw" not in pause and "alice" not in pause


def test_a_batch_refused_whole_finds_out_group_by_group(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """A collector that refuses a whole request for one of its ALF objects' tokens: the
    batch is tried again as one request per group, so the accepted group is delivered."""
    bad, good = config(batch_size=4), config(batch_size=4, service_token=OTHER_TOKEN)
    worker, transport = workers(bad, ScriptedTransport(default=refusing(TOKEN)))
    for i in range(3):
        worker.submit(exchange(bad, i))
        worker.submit(exchange(good, i))
    assert worker.flush(0.5) is False  # cut together at the flush: one request, refused
    assert sent_ids(transport, OTHER_TOKEN) == ["0", "1", "2", "0", "1", "2"]
    assert [len(payload) for payload in transport.payloads] == [2, 1, 1]
    stats = worker.stats()
    assert (stats["sent"], stats["queued"], stats["dropped_total"]) == (3, 3, 0)


def test_a_token_accepted_again_delivers_what_its_group_kept_back(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is added to the collector during the pause: the refused batch probes, is
    accepted, and every batch its group kept back follows, in order; nothing is lost."""
    monkeypatch.setattr(_delivery, "AUTH_PAUSE", 0.3)
    bad, good = config(batch_size=1), config(batch_size=1, service_token=OTHER_TOKEN)
    refuse = refusing(TOKEN)
    fixed = threading.Event()
    transport = ScriptedTransport(default=lambda data: OK if fixed.is_set() else refuse(data))
    worker, _ = workers(bad, transport)
    worker.submit(exchange(bad, 0))
    assert worker.flush(0.1) is False
    for i in range(1, 4):
        worker.submit(exchange(bad, i))
        worker.submit(exchange(good, i))
    fixed.set()
    assert worker.flush(10) is True
    assert sent_ids(transport, TOKEN) == ["0", "0", "1", "2", "3"]  # refused, then accepted
    stats = worker.stats()
    assert (stats["sent"], stats["queued"], stats["dropped_total"]) == (7, 0, 0)


def test_a_token_refused_at_every_probe_drops_what_its_group_kept_back(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``retries`` refused probes the group's batches are rejected, not kept until the
    queue is full of them; the other token was never held back."""
    monkeypatch.setattr(_delivery, "AUTH_PAUSE", 0.05)
    bad, good = config(batch_size=1, retries=2), config(batch_size=1, service_token=OTHER_TOKEN)
    worker, transport = workers(bad, ScriptedTransport(default=refusing(TOKEN)))
    for i in range(4):
        worker.submit(exchange(bad, i))
        worker.submit(exchange(good, i))
    assert worker.flush(10) is False  # entries were rejected meanwhile
    assert sent_ids(transport, TOKEN) == ["0", "0", "0"]  # refused, then 2 probes
    stats = worker.stats()
    assert (stats["sent"], stats["queued"]) == (4, 0)
    assert stats["dropped"]["rejected"] == 4


def test_a_revoked_tenant_does_not_delay_the_others_at_the_real_collector() -> None:
    """Per-request tokens, one of them unknown to the collector: the known tenant's entries
    are all stored within the flush, while the unknown one's wait for their probe."""
    with Collector(tokens=[OTHER_TOKEN]) as collector:
        middleware = wrap(
            collector.url,
            service_token=lambda environ: (
                TOKEN if "bad" in environ["QUERY_STRING"] else OTHER_TOKEN
            ),
            batch_size=2,
            delay=0.05,
        )
        for i in range(4):
            call(middleware, f"bad&id={i}")
        assert alf_analytics.flush(1) is False  # refused: that token's sends pause
        for i in range(10):
            call(middleware, f"good&id={i}")
            call(middleware, f"bad&id={i + 4}")
        assert alf_analytics.flush(3) is False  # the unknown token's entries wait
        stored = sorted(int(e.url.rpartition("=")[2]) for e in collector.entries())
        assert stored == list(range(10))
        stats = alf_analytics.stats()
        assert (stats["sent"], stats["queued"], stats["dropped_total"]) == (10, 14, 0)


def test_207_errors_are_logged(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], caplog: pytest.LogCaptureFixture
) -> None:
    """A 207 counts as delivered and its per-ALF errors reach the log."""
    worker, _ = workers(
        config(), ScriptedTransport(default=Outcome(207, b'{"errors":["alf 1: no entries"]}'))
    )
    worker.submit(exchange(config()))
    assert worker.flush(10)
    assert worker.stats()["sent"] == 1
    assert any("alf 1: no entries" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("retry_after", "floor"),
    [pytest.param(0.3, 0.3, id="seconds"), pytest.param(0.0, 0.0, id="zero")],
)
def test_retry_after_is_a_floor_for_the_pause(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], retry_after: float, floor: float
) -> None:
    """After a 429 with Retry-After, the next attempt waits at least that long."""
    transport = ScriptedTransport([Outcome(429, retry_after=retry_after)])
    worker, _ = workers(config(retry_backoff=0.0), transport)
    worker.submit(exchange(config()))
    assert worker.flush(10)
    assert len(transport.times) == 2
    assert transport.times[1] - transport.times[0] >= floor
    assert worker.stats()["sent"] == 1


@pytest.mark.parametrize(
    ("attempt", "base", "retry_after", "low", "high"),
    [
        pytest.param(1, 1.0, None, 0.5, 1.0, id="first"),
        pytest.param(2, 1.0, None, 1.0, 2.0, id="doubles"),
        pytest.param(4, 0.01, None, 0.04, 0.08, id="small-base"),
        pytest.param(10, 1.0, None, MAX_BACKOFF / 2, MAX_BACKOFF, id="capped"),
        pytest.param(500, 1.0, None, MAX_BACKOFF / 2, MAX_BACKOFF, id="huge-attempt"),
        pytest.param(1, 0.01, 3.0, 3.0, 3.0, id="retry-after-floor"),
        pytest.param(1, 0.01, 1e9, MAX_RETRY_AFTER, MAX_RETRY_AFTER, id="retry-after-capped"),
        pytest.param(1, 0.0, None, 0.0, 0.0, id="no-backoff"),
    ],
)
def test_backoff_is_capped_exponential_with_jitter(
    attempt: int, base: float, retry_after: float | None, low: float, high: float
) -> None:
    """Each pause lies in [half, all] of base*2**(attempt-1), capped, with Retry-After a floor."""
    pauses = [backoff(attempt, base, retry_after) for _ in range(200)]
    assert all(low <= p <= high for p in pauses)
    if low < high:
        assert len(set(pauses)) > 100  # jittered


def test_413_splits_the_batch_until_it_fits(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """A 413 halves the batch (keeping each entry's group) until the halves are accepted."""

    def answer(payload: list[dict[str, Any]]) -> Outcome:
        count = sum(len(alf_entries(alf)) for alf in payload)
        return Outcome(413 if count > 3 else 200)

    worker, transport = workers(config(batch_size=100), ScriptedTransport(default=answer))
    first, second = config(), config(service_token=OTHER_TOKEN, environment="staging")
    for i in range(10):
        worker.submit(exchange(first if i % 2 else second, i))
    assert worker.flush(10)
    assert worker.stats()["sent"] == 10
    assert worker.stats()["dropped_total"] == 0
    delivered = [p for p in transport.payloads if sum(len(alf_entries(a)) for a in p) <= 3]
    assert sorted(int(i) for p in delivered for i in ids(p)) == list(range(10))
    expected = {TOKEN: None, OTHER_TOKEN: "staging"}
    for payload in delivered:
        for alf in payload:
            assert alf.get("environment") == expected[alf["serviceToken"]]
            for i in ids([alf]):
                assert (alf["serviceToken"] == TOKEN) == bool(int(i) % 2)


def test_413_for_a_single_entry_drops_it_as_too_large(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """When even single entries get 413, each is dropped and counted too_large."""
    worker, transport = workers(config(), ScriptedTransport(default=Outcome(413)))
    for i in range(4):
        worker.submit(exchange(config(), i))
    assert worker.flush(10) is False
    stats = worker.stats()
    assert stats["dropped"]["too_large"] == 4
    assert stats["sent"] == 0
    # 4 -> 2+2 -> 1+1+1+1: seven requests.
    assert len(transport.payloads) == 7


# -- queue, stats -------------------------------------------------------------------------------


def test_request_path_wakes_the_thread_only_when_it_must_act(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """Entries under a batch's room wait unseen while a batch is timed; a full batch wakes."""
    cfg = config(batch_size=10, delay=60.0)
    worker, transport = workers(cfg, ScriptedTransport())
    worker.submit(exchange(cfg, 0))  # the sleeping thread must wake for the first one
    assert wait_until(lambda: worker._books.held_count == 1 and worker._idle is False)
    assert wait_until(lambda: worker._wake_at == 9)  # room left in the timed batch
    assert wait_until(lambda: worker._queue.qsize() == 0)  # a token put at start-up is taken
    for i in range(1, 9):
        worker.submit(exchange(cfg, i))
    # No wake-up token per entry: they wait in the deque for the batch's due time.
    assert worker._queue.qsize() == 0
    assert len(worker._entries) == 8
    worker.submit(exchange(cfg, 9))  # fills the batch: the thread wakes and sends it
    assert wait_until(lambda: transport.entry_count() == 10)
    assert [ids(p) for p in transport.payloads] == [[str(i) for i in range(10)]]
    worker.submit(exchange(cfg, 10))  # nothing to time again: the next entry wakes it
    assert wait_until(lambda: worker._books.held_count == 1 and not worker._entries)
    assert worker.flush(10)
    assert transport.entry_count() == 11


def test_a_slice_of_waiting_entries_wakes_the_thread_before_a_batch_fills(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """With room for many more, 64 waiting entries still wake the thread (they are built then,
    not all at once when the batch is due)."""
    cfg = config(batch_size=1000, delay=60.0)
    worker, transport = workers(cfg, ScriptedTransport())
    worker.submit(exchange(cfg, 0))
    assert wait_until(lambda: worker._books.held_count == 1 and worker._wake_at == 64)
    assert wait_until(lambda: worker._queue.qsize() == 0)
    for i in range(1, 64):
        worker.submit(exchange(cfg, i))
    assert worker._queue.qsize() == 0 and len(worker._entries) == 63
    worker.submit(exchange(cfg, 64))
    assert wait_until(lambda: worker._books.held_count == 65 and not worker._entries)
    assert transport.payloads == []  # built and held: the batch is not due yet
    assert worker.flush(10)
    assert transport.entry_count() == 65


def test_entries_waiting_unseen_keep_their_own_delay(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """An entry of another stream, queued while one batch is timed, is not held a delay more."""
    cfg = config(batch_size=100, delay=1.0)
    other = config(batch_size=100, delay=1.0, environment="other")
    worker, transport = workers(cfg, ScriptedTransport())
    worker.submit(exchange(cfg, 0))
    assert wait_until(lambda: worker._books.held_count == 1)
    time.sleep(0.5)
    late = exchange(other, 1)
    handed_over = time.monotonic()
    worker.submit(late)  # waits in the deque until the first batch is due, 0.5 s from now
    assert wait_until(lambda: transport.entry_count() == 1)
    assert wait_until(lambda: worker._books.held_count == 1 and not worker._entries)
    # Its batch is timed from when it was handed over, not from when the thread took it.
    assert worker._batcher.groups[late.group].oldest < handed_over + 0.25
    assert wait_until(lambda: transport.entry_count() == 2)


def test_full_queue_drops_new_entries_without_blocking(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """With the worker stuck in a send, submit returns at once and overflow is counted."""
    transport = ScriptedTransport()
    transport.release.clear()
    cfg = config(queue_size=20, batch_size=1)
    worker, _ = workers(cfg, transport)
    assert worker.submit(exchange(cfg, 0))
    assert transport.entered.wait(10)
    results: list[bool] = []
    submitter = threading.Thread(
        target=lambda: results.extend(worker.submit(exchange(cfg, i)) for i in range(1, 71))
    )
    submitter.start()
    submitter.join(10)
    assert not submitter.is_alive(), "submit blocked on a full queue"
    # The entry in flight counts against queue_size too.
    assert results == [True] * 19 + [False] * 51
    assert worker.stats()["dropped"]["queue_full"] == 51
    assert worker.stats()["in_flight"] == 1
    transport.release.set()
    assert worker.flush(10)
    stats = worker.stats()
    assert (stats["captured"], stats["sent"], stats["dropped_total"]) == (71, 20, 51)


def test_stats_add_up_with_a_collector_that_stays_broken(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """With every answer a 503, sent + dropped == captured, all as retries_exhausted."""
    cfg = config(retries=1, batch_size=7)
    worker, _ = workers(cfg, ScriptedTransport(default=Outcome(503)))
    for i in range(30):
        worker.submit(exchange(cfg, i))
    assert worker.flush(10) is False
    stats = worker.stats()
    assert stats["captured"] == 30
    assert stats["sent"] + stats["dropped_total"] == stats["captured"]
    assert stats["dropped"]["retries_exhausted"] == 30
    assert stats["queued"] == 0


# -- flush and close --------------------------------------------------------------------------


def test_flush_and_close_are_idempotent_and_thread_safe(collector: Collector) -> None:
    """8 threads flushing and closing at once all return True; every entry arrives once."""
    middleware = wrap(collector.url, delay=60.0)
    for i in range(40):
        call(middleware, f"id={i}")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def control() -> None:
        barrier.wait()
        results.extend([alf_analytics.flush(5), alf_analytics.close(5), alf_analytics.close(5)])

    threads = [threading.Thread(target=control) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [True] * 24
    assert agent_threads(collector.url) == []
    entries = received_entries(collector, 40)
    assert sorted(int(e["request"]["url"].rpartition("=")[2]) for e in entries) == list(range(40))


def test_flush_with_no_time_is_true_once_everything_is_delivered(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """flush(0) cannot wait for the worker, but with nothing waiting or in flight it has
    nothing to wait for: True. With an entry still queued it is False."""
    cfg = config(delay=60.0, batch_size=100)
    worker, transport = workers(cfg)
    assert worker.flush(0)  # nothing ever handed over
    worker.submit(exchange(cfg, 0))
    assert not worker.flush(0)  # queued, the batch waits for its delay
    assert worker.flush(5)
    assert worker.stats()["queued"] == 0
    assert worker.flush(0) and worker.flush(0.0)
    assert [ids(p) for p in transport.payloads] == [["0"]]


def test_worker_restarted_after_close_keeps_running(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """After close, the next entry restarts a thread that a late stop request cannot end."""
    cfg = config(delay=0.1, batch_size=100)
    worker, transport = workers(cfg)
    worker.submit(exchange(cfg, 0))
    assert worker.close(5)
    old = worker._thread
    assert old is not None and not old.is_alive()
    # A close() that lost a race with another one leaves its stop request for a dead thread.
    worker._queue.put(_worker._Stop(old))
    for i in range(1, 4):
        assert worker.submit(exchange(cfg, i))
    assert worker.flush(5)
    new = worker._thread
    assert new is not old and new is not None and new.is_alive()
    worker.submit(exchange(cfg, 4))
    assert worker.flush(5)
    assert [ids(p) for p in transport.payloads] == [["0"], ["1", "2", "3"], ["4"]]
    assert worker._thread is new and new.is_alive()


@pytest.mark.parametrize("mode", ["refuse", "blackhole", "slow"])
def test_flush_and_close_are_bounded_with_a_bad_collector(mode: str) -> None:
    """flush(0.5) and close(0.5) return far sooner than the collector timeout or backoff."""
    with FaultyCollector() as faulty:
        middleware = wrap(faulty.url, timeout=30.0, retry_backoff=30.0, retries=3)
        getattr(faulty, mode)(*([30.0] if mode == "slow" else []))
        for i in range(5):
            call(middleware, f"id={i}")
        started = time.monotonic()
        assert alf_analytics.flush(0.5) is False
        alf_analytics.close(0.5)
        elapsed = time.monotonic() - started
        assert elapsed < 5.0  # vs. 30 s of timeout or backoff per attempt
        if mode == "refuse":
            # The retry pause was cut short by close(): the batch counts as a shutdown drop.
            stats = alf_analytics.stats()
            assert stats["dropped"]["shutdown"] == 5
            assert stats["sent"] + stats["dropped_total"] == stats["captured"] == 5


def test_request_made_while_the_thread_starts_does_not_deadlock(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit re-entering from the starting thread (a finalizer, a log handler) just queues."""
    cfg = config()
    worker, transport = workers(cfg)
    real_thread = threading.Thread

    class ReenteringThread(real_thread):
        def start(self) -> None:
            # What a __del__ run by a collection inside Thread.start() would do.
            worker.submit(exchange(cfg, 1))
            super().start()

    monkeypatch.setattr(_worker.threading, "Thread", ReenteringThread)
    submitter = real_thread(target=worker.submit, args=(exchange(cfg, 0),))
    submitter.start()
    submitter.join(10)
    assert not submitter.is_alive(), "deadlocked in Worker._start"
    monkeypatch.undo()
    assert worker.flush(5)
    assert sorted(i for p in transport.payloads for i in ids(p)) == ["0", "1"]
    assert len(agent_threads(UNREACHABLE)) == 1


def test_flush_and_close_from_the_worker_thread_return_at_once(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
) -> None:
    """A log handler running on the worker thread may call flush()/close() without hanging."""
    cfg = config()
    worker, _ = workers(cfg, ScriptedTransport(default=Outcome(400)))
    results: list[bool] = []

    class Flusher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            results.extend([worker.flush(None), worker.close(None)])

    handler = Flusher()
    logging.getLogger("alf_analytics").addHandler(handler)
    try:
        worker.submit(exchange(cfg))
        assert worker.flush(5) is False  # the entry was rejected
    finally:
        logging.getLogger("alf_analytics").removeHandler(handler)
    assert results == [False, False]
    assert worker.stats()["dropped"]["rejected"] == 1


# -- crashes ----------------------------------------------------------------------------------


def test_worker_killed_by_builder_error_restarts_on_next_entry(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[logging.LogRecord],
) -> None:
    """A BaseException in the builder kills the thread once; it is logged once and restarted."""
    real = _batching.build_entry
    calls = {"n": 0}

    def flaky(exchange: Exchange) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] in (1, 3):
            raise Boom("injected")
        return real(exchange)

    monkeypatch.setattr(_batching, "build_entry", flaky)
    middleware = wrap(collector.url, delay=0.05)
    assert call(middleware, "id=0") == b"ok"
    started = time.monotonic()
    alf_analytics.flush(5)  # False if the crash came after this call, True if before
    assert time.monotonic() - started < 4  # not stuck behind the dead thread
    assert call(middleware, "id=1") == b"ok"
    assert call(middleware, "id=2") == b"ok"  # second crash
    assert call(middleware, "id=3") == b"ok"
    entries = received_entries(collector, 2)
    assert sorted(e["request"]["url"].rpartition("=")[2] for e in entries) == ["1", "3"]
    stats = alf_analytics.stats()
    assert stats["worker_restarts"] == 2
    assert stats["dropped"]["error"] == 2
    assert (stats["captured"], stats["sent"]) == (4, 2)
    assert [r.getMessage().count("crashed") for r in internal_errors] == [1]
    internal_errors.clear()


def test_a_flush_the_dying_thread_held_is_answered_by_the_next_one(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[logging.LogRecord],
) -> None:
    """The thread dies right after taking a flush marker off its queue, before it keeps it
    with the others: the marker goes back, so flush() returns True once the fresh thread has
    sent everything (it used to wait out its timeout, or for ever with none)."""
    cfg = config(batch_size=100, delay=60.0)
    worker, transport = workers(cfg, ScriptedTransport())
    real = Worker._take
    died = {"once": False}

    def dying_take(self: Worker, item: Any) -> None:
        if type(item) is _worker._Flush and not died["once"]:
            died["once"] = True
            raise Boom("injected")
        real(self, item)

    monkeypatch.setattr(Worker, "_take", dying_take)
    for i in range(5):
        assert worker.submit(exchange(cfg, i))
    assert worker.flush(10) is True
    stats = worker.stats()
    assert (stats["captured"], stats["sent"], stats["queued"]) == (5, 5, 0)
    assert stats["worker_restarts"] == 1
    internal_errors.clear()


def test_worker_killed_in_a_send_counts_the_batch_and_restarts(
    workers: Callable[..., tuple[Worker, ScriptedTransport]],
    internal_errors: list[logging.LogRecord],
) -> None:
    """A BaseException out of the transport loses that batch (counted) and nothing else."""
    cfg = config(batch_size=5)
    worker, transport = workers(cfg, ScriptedTransport([Boom("injected")]))
    for i in range(5):
        assert worker.submit(exchange(cfg, i))
    assert transport.entered.wait(10)
    worker.flush(5)  # False when the crash is reported after this call, True if before
    for i in range(5, 8):
        assert worker.submit(exchange(cfg, i))
    assert worker.flush(5)
    stats = worker.stats()
    assert stats["worker_restarts"] == 1
    assert stats["dropped"]["error"] == 5
    assert (stats["captured"], stats["sent"], stats["dropped_total"]) == (8, 3, 5)
    assert ids(transport.payloads[-1]) == ["5", "6", "7"]
    assert transport.closed >= 1  # the crashed thread's transport was closed
    assert len(internal_errors) == 1
    internal_errors.clear()


def test_flush_is_bounded_when_the_thread_cannot_restart(
    workers: Callable[..., tuple[Worker, ScriptedTransport]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no thread able to start (interpreter shutdown), flush returns False at once."""
    cfg = config()
    worker, _ = workers(cfg)
    monkeypatch.setattr(_worker, "_finalizing", True)
    assert worker.submit(exchange(cfg)) is False
    assert worker.flush(5) is True  # nothing was queued
    assert worker.stats()["dropped"]["shutdown"] == 1


# -- logging ----------------------------------------------------------------------------------


def test_logs_stay_on_the_agent_logger_and_never_show_the_token() -> None:
    """Every log line is on alf_analytics; the token never appears in full, not even echoed."""
    records: list[logging.LogRecord] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    recorder = Recorder(logging.DEBUG)
    root.addHandler(recorder)
    agent = logging.getLogger("alf_analytics")
    agent_level = agent.level
    agent.setLevel(logging.DEBUG)
    try:
        with FaultyCollector() as faulty:
            echo = json.dumps({"errors": [f"unknown serviceToken {TOKEN}"]}).encode()
            middleware = wrap(faulty.url, batch_size=1, retries=1, max_batch_bytes=2048)
            faulty.fail(404, times=1, body=echo)
            call(middleware, "id=0")
            assert alf_analytics.flush(5) is False
            faulty.fail(503, body=echo)
            call(middleware, "id=1")
            call(middleware, "pad=" + "x" * 4096 + "&id=2")
            assert alf_analytics.flush(5) is False
            faulty.healthy()
            faulty.fail(207, times=1, body=echo)
            call(middleware, "id=3")
            assert alf_analytics.flush(5)
    finally:
        root.removeHandler(recorder)
        agent.setLevel(agent_level)
    assert root.handlers == handlers and root.level == level
    messages = [r.getMessage() for r in records]
    assert len(messages) >= 4, messages
    assert {r.name for r in records} <= {"alf_analytics"}
    assert not [m for m in messages if TOKEN in m]
    assert any("***" + TOKEN[-4:] in m for m in messages)  # shown masked
