"""Memory while the collector is down: bytes held per queued entry, and peak RSS.

The collector URL points at a closed loopback port (connections are refused at once), so
every entry stays in the process: queued, or built and waiting for a retry.

- ``--mode queued``: tracemalloc counts what N requests leave behind (queue_size above N,
  so nothing is dropped) and divides by N: the bytes one queued entry costs.
- ``--mode rss``: with the default queue_size, requests are pushed until the queue is full
  (``stats()`` reports ``queue_full`` drops) and then some; the process's peak RSS
  (``ru_maxrss``) is reported beside its RSS before the first request.  No tracemalloc
  here, it would inflate RSS.

The result is one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import socket
import sys
import tracemalloc
from typing import Any

import psutil

from apps import make_raw_wsgi_app
from common import RESPONSE_BODY_4K, SCENARIOS, SERVICE_TOKEN, SMALL_JSON
from inprocess import wsgi_environ


def closed_port_url() -> str:
    """A loopback URL where nothing listens: every send fails fast with 'refused'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make(bodies: bool, queue_size: int | None) -> tuple[Any, dict[str, Any], bytes]:
    import alf_analytics

    sc = SCENARIOS["post" if bodies else "get"]
    body_out = RESPONSE_BODY_4K if bodies else json.dumps(SMALL_JSON).encode()
    options: dict[str, Any] = {"log_body": bodies}
    if queue_size is not None:
        options["queue_size"] = queue_size
    app = alf_analytics.AnalyticsWSGIMiddleware(
        make_raw_wsgi_app(body_out),
        service_token=SERVICE_TOKEN,
        collector_url=closed_port_url(),
        **options,
    )
    return app, wsgi_environ(sc), sc.body


def call(app: Any, environ: dict[str, Any], body: bytes, n: int) -> None:
    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    for _ in range(n):
        env = dict(environ)
        env["wsgi.input"] = io.BytesIO(body)
        result = app(env, start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()


def dropped_queue_full() -> int:
    import alf_analytics

    return int(alf_analytics.stats()["dropped"].get("queue_full", 0))


def queued_bytes(bodies: bool, entries: int) -> dict[str, Any]:
    import alf_analytics

    app, environ, body = make(bodies, entries + 1000)
    call(app, environ, body, 100)  # warm-up: worker thread, transport, caches
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    call(app, environ, body, entries)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    stats = alf_analytics.stats()
    return {
        "status": "ok",
        "mode": "queued",
        "bodies": bodies,
        "entries": entries,
        "bytes_per_entry": held / entries,
        "queued": stats.get("queued"),
        "dropped_total": stats.get("dropped_total"),
    }


def peak_rss(bodies: bool, max_requests: int) -> dict[str, Any]:
    import alf_analytics

    app, environ, body = make(bodies, None)
    queue_size = app.config.queue_size
    call(app, environ, body, 100)
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    sent = 0
    while sent < max_requests and dropped_queue_full() == 0:
        call(app, environ, body, 1000)
        sent += 1000
    full = dropped_queue_full() > 0
    extra = max(1000, queue_size // 5)
    call(app, environ, body, extra)  # keep hammering the full queue
    sent += extra
    stats = alf_analytics.stats()
    return {
        "status": "ok" if full else "error",
        "reason": None if full else f"queue never filled after {sent} requests",
        "mode": "rss",
        "bodies": bodies,
        "queue_size": queue_size,
        "requests": sent,
        "queued": stats.get("queued"),
        "dropped_queue_full": stats["dropped"].get("queue_full"),
        "rss_before_mib": rss_before / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_now_mib": psutil.Process().memory_info().rss / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["queued", "rss"], required=True)
    p.add_argument("--bodies", action="store_true")
    p.add_argument("--entries", type=int, default=20_000)
    p.add_argument("--max-requests", type=int, default=300_000)
    a = p.parse_args()
    try:
        if a.mode == "queued":
            result = queued_bytes(a.bodies, a.entries)
        else:
            result = peak_rss(a.bodies, a.max_requests)
    except (ImportError, AttributeError) as exc:
        result = {"status": "n/a", "reason": f"alf_analytics API not importable: {exc}"}
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Exit without the atexit flush: the collector is down by design, don't wait for it.
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
