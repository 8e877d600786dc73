"""Delivery under latency: entries/s one process delivers to a collector that is far away.

One process, our WSGI middleware around a plain WSGI app (no framework, so the producer
is cheap), ``batch_size`` 100 and every other option at its default unless given
(``--max-inflight``); the sink answers each batch POST only after ``--latency`` seconds
(50 ms), without blocking other connections.  The producer offers ``--rate`` requests/s
(paced, above the target so that a pipeline too slow for it shows up as loss) for
``--seconds``; then ``flush()`` and the sink is polled until every entry arrived or
nothing more arrives.

Reported: the rate offered and achieved, entries/s delivered (entries the sink received
over the time from the first request to the last entry's arrival), loss (entries
captured but not received, with ``stats()["dropped"]`` by reason), batches and the mean
entries per batch, and the largest number of POSTs the sink saw at once.  With at most
``max_inflight`` POSTs in flight the ceiling is ``max_inflight × batch_size / latency``
(4 × 100 / 0.05 s = 8,000 entries/s), which the result states too.

The result is one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid
from typing import Any

from apps import make_raw_wsgi_app
from common import SCENARIOS, SERVICE_TOKEN, SMALL_JSON, SinkClient
from inprocess import wsgi_environ
from sink import running_sink

BATCH_SIZE = 100
STALL_S = 5.0


def produce_paced(app: Any, environ: dict[str, Any], rate: float, seconds: float) -> int:
    """Call ``app`` at ``rate`` requests/s for ``seconds``; return how many were made.

    Works in 1 ms slices: make the requests due by now, then sleep (which lets the worker
    thread run, as an idle moment of a real server would).  Each request has its own
    X-Request-ID, so entries do not compress unrealistically well.
    """

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    ids = [uuid.uuid4().hex for _ in range(int(rate * seconds) + 1)]
    made = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = min(int((now - t0) * rate), len(ids))
        while made < due:
            env = dict(environ)
            env["HTTP_X_REQUEST_ID"] = ids[made]
            env["wsgi.input"] = io.BytesIO(b"")
            result = app(env, start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()
            made += 1
        time.sleep(0.001)
    return made


def option_default(name: str) -> Any:
    """The default of one of our options (None when this version has no such option)."""
    try:
        from alf_analytics._config import make_config

        config = make_config({"service_token": SERVICE_TOKEN})
    except Exception:
        return None
    return getattr(config, name, None)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import alf_analytics

    options: dict[str, Any] = {"batch_size": BATCH_SIZE}
    if args.max_inflight is not None:
        options["max_inflight"] = args.max_inflight
    body = json.dumps(SMALL_JSON).encode()
    try:
        app = alf_analytics.AnalyticsWSGIMiddleware(
            make_raw_wsgi_app(body),
            service_token=SERVICE_TOKEN,
            collector_url=args.sink,
            **options,
        )
    except (TypeError, ValueError) as exc:
        return {"status": "n/a", "reason": f"options {options} not accepted: {exc}"}
    inflight = args.max_inflight
    if inflight is None:
        inflight = option_default("max_inflight")
    environ = wsgi_environ(SCENARIOS["get"])
    sink = SinkClient(args.sink)

    produce_paced(app, environ, 2000, 0.2)  # warm up: connections open, caches filled
    alf_analytics.flush(timeout=30)
    base = sink.stats()
    before = alf_analytics.stats()

    t0 = time.monotonic()
    made = produce_paced(app, environ, args.rate, args.seconds)
    produced_s = time.monotonic() - t0
    alf_analytics.flush(timeout=60)
    end = wait_settled(sink, base["entries"] + made)
    after = alf_analytics.stats()

    received = end["entries"] - base["entries"]
    captured = after["captured"] - before["captured"]
    arrival_s = end["last_entry_at"] - t0 if received else float("nan")
    dropped = {
        k: after["dropped"].get(k, 0) - before["dropped"].get(k, 0) for k in after["dropped"]
    }
    batches = end["alf_batches"] - base["alf_batches"]
    return {
        "status": "ok",
        "latency_ms": args.latency * 1000,
        "batch_size": BATCH_SIZE,
        "max_inflight": inflight,
        "max_inflight_given": args.max_inflight is not None,
        "ceiling_entries_per_s": (
            inflight * BATCH_SIZE / args.latency if isinstance(inflight, int) else None
        ),
        "offered_rate": args.rate,
        "achieved_rate": made / produced_s,
        "seconds": args.seconds,
        "requests": made,
        "captured": captured,
        "received": received,
        "lost": captured - received,
        "dropped": {k: v for k, v in dropped.items() if v},
        "delivered_per_s": received / arrival_s if received else 0.0,
        "batches": batches,
        "entries_per_batch": received / batches if batches else float("nan"),
        "max_concurrent_posts": end.get("max_concurrent", None),
    }


def wait_settled(sink: SinkClient, target: int) -> dict[str, Any]:
    """Poll the sink until ``target`` entries arrived or nothing arrived for ``STALL_S``."""
    last = sink.stats()
    since = time.monotonic()
    while last["entries"] < target and time.monotonic() - since < STALL_S:
        time.sleep(0.05)
        now = sink.stats()
        if now["entries"] != last["entries"]:
            since = time.monotonic()
        last = now
    return last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sink", help="a sink with latency already set (default: start one)")
    p.add_argument("--latency", type=float, default=0.05, help="seconds per batch answer")
    p.add_argument("--rate", type=float, default=15_000, help="requests/s offered")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-inflight", type=int, help="default: the option's default")
    a = p.parse_args()
    try:
        with running_sink(a.sink, a.latency) as a.sink:
            result = measure(a)
    except (ImportError, AttributeError) as exc:
        result = {"status": "n/a", "reason": f"alf_analytics API not importable: {exc}"}
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
