"""The cost of a skipped request on its own, without a framework's noise around it.

``make bench`` measures a skipped request through Starlette and Flask, where one process's
noise (several µs) is larger than what a skip costs. Here the app is a bare WSGI or ASGI
callable and the middleware skips its path (``skip_paths=["/health"]``), so the difference
is only our admission check: the minimum of 3 repeats of 20,000 calls, bare and skipped
interleaved, over 15 rounds, and the median of the per-round differences.

Run: ``benchmarks/.venv/bin/python benchmarks/skip_cost.py`` (prints one line per interface).
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware

ROUNDS, REPEATS, CALLS = 15, 3, 20_000
NOWHERE = "http://127.0.0.1:9/"  # nothing is ever sent: every request is skipped


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


def environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/health",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }


def wsgi_loop(app: Any) -> float:
    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    start = time.perf_counter()
    for _ in range(CALLS):
        body = app(environ(), start_response)
        for _chunk in body:
            pass
        getattr(body, "close", lambda: None)()
    return (time.perf_counter() - start) / CALLS * 1e6


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/health",
    "raw_path": b"/health",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"localhost")],
    "client": ("127.0.0.1", 50000),
    "server": ("localhost", 80),
}


async def asgi_loop(app: Any) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    start = time.perf_counter()
    for _ in range(CALLS):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - start) / CALLS * 1e6


def report(name: str, measure: Callable[[Any], float], bare: Any, ours: Any) -> None:
    added, bare_us, ours_us = [], [], []
    for _ in range(ROUNDS):
        b = min(measure(bare) for _ in range(REPEATS))
        o = min(measure(ours) for _ in range(REPEATS))
        bare_us.append(b)
        ours_us.append(o)
        added.append(o - b)
    print(
        f"{name}: bare {statistics.median(bare_us):.2f} µs, skipped "
        f"{statistics.median(ours_us):.2f} µs, added {statistics.median(added):.2f} µs per request"
    )


def main() -> None:
    skip = {"service_token": "bench", "collector_url": NOWHERE, "skip_paths": ["/health"]}
    report("WSGI", wsgi_loop, wsgi_app, AnalyticsWSGIMiddleware(wsgi_app, **skip))
    asgi = AnalyticsASGIMiddleware(asgi_app, **skip)
    report("ASGI", lambda app: asyncio.run(asgi_loop(app)), asgi_app, asgi)


if __name__ == "__main__":
    main()
