"""The worker alone: entries per second it builds, serialises, compresses and sends.

Driven through the public API: a plain WSGI app (no framework, so producing exchanges is
cheap) is wrapped by our middleware, called N times as fast as possible, then
``alf_analytics.flush()`` pushes everything to the loopback sink, which counts the ALF
entries it receives.  The worker's cost is the CPU time of every thread except the main
one (read from the kernel per thread with psutil), so "entries per second on one core" is
N divided by that CPU time, regardless of how the producer and the worker interleaved.
The wall-clock rate (produce + drain, sharing one GIL) is reported beside it, as are the
bytes on the wire per entry (gzip) and before compression.

The result is one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
import uuid
from typing import Any

import psutil

from apps import make_raw_wsgi_app
from common import RESPONSE_BODY_4K, SCENARIOS, SERVICE_TOKEN, SMALL_JSON, SinkClient
from inprocess import wsgi_environ
from sink import running_sink


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native id."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def produce(app: Any, environ: dict[str, Any], body: bytes, n: int) -> None:
    """Call the app ``n`` times; each request gets its own X-Request-ID, as in real traffic
    (identical requests would compress unrealistically well)."""

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    ids = [uuid.uuid4().hex for _ in range(n)]
    for request_id in ids:
        env = dict(environ)
        env["HTTP_X_REQUEST_ID"] = request_id
        env["wsgi.input"] = io.BytesIO(body)
        result = app(env, start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()


def measure(url: str, entries: int, bodies: bool) -> dict[str, Any]:
    import alf_analytics

    sc = SCENARIOS["post" if bodies else "get"]
    body_out = RESPONSE_BODY_4K if bodies else json.dumps(SMALL_JSON).encode()
    app = alf_analytics.AnalyticsWSGIMiddleware(
        make_raw_wsgi_app(body_out),
        service_token=SERVICE_TOKEN,
        collector_url=url,
        log_body=bodies,
        # Nothing may be dropped while we produce at full speed: the queue holds every entry
        # (in count, and in bytes: a queued GET's raw record is estimated at about 3.5 KiB).
        queue_size=entries + 10_000,
        max_queue_bytes=(entries + 10_000) * 8192,
    )
    environ = wsgi_environ(sc)
    sink = SinkClient(url)
    main_tid = threading.get_native_id()

    produce(app, environ, sc.body, 1000)
    alf_analytics.flush(timeout=60)
    base = sink.stats()
    before = thread_cpu()

    t0 = time.perf_counter()  # (the request ids are made inside: negligible, main thread)
    produce(app, environ, sc.body, entries)
    t_produced = time.perf_counter()
    alf_analytics.flush(timeout=300)
    sink.wait_events(base["events"] + entries, timeout=60)
    t_end = time.perf_counter()

    after = thread_cpu()
    after.pop(main_tid, None)
    worker_cpu = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items())
    end = sink.stats()
    received = end["entries"] - base["entries"]
    wire = end["bytes"] - base["bytes"]
    raw = end["alf_raw_bytes"] - base["alf_raw_bytes"]
    stats = alf_analytics.stats()
    return {
        "status": "ok",
        "bodies": bodies,
        "entries": entries,
        "received": received,
        "worker_cpu_s": worker_cpu,
        "entries_per_cpu_s": entries / worker_cpu if worker_cpu else float("nan"),
        "worker_us_per_entry": worker_cpu * 1e6 / entries,
        "wall_entries_per_s": entries / (t_end - t0),
        "produce_s": t_produced - t0,
        "drain_after_produce_s": t_end - t_produced,
        "wire_bytes_per_entry": wire / max(received, 1),
        "json_bytes_per_entry": raw / max(received, 1),
        "compression_ratio": raw / wire if wire else float("nan"),
        "batches": end["alf_batches"] - base["alf_batches"],
        "dropped_total": stats.get("dropped_total"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sink", help="the sink's URL (default: start one for this run)")
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--bodies", action="store_true")
    a = p.parse_args()
    try:
        with running_sink(a.sink) as url:
            result = measure(url, a.entries, a.bodies)
    except (ImportError, AttributeError) as exc:
        result = {"status": "n/a", "reason": f"alf_analytics API not importable: {exc}"}
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
