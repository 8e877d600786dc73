"""Hostile requests through real servers: one bad request never costs the other entries.

uvicorn + Starlette, gunicorn + Flask and gunicorn + Django each get 30 innocent requests, the
hostile ones (written byte by byte on a raw socket, since HTTP clients refuse to send them),
and 30 more. Every request is answered by the app, so every one of them must be stored by the
real collector, which validates each ALF object against the 1.1.0 schema; the stored objects
are checked again here with format checks on (``uri``, ``date-time``, ``ipv4``/``ipv6``).
Before the fix, a single ``Host: [1]`` made the collector reject the whole batch (issue 8).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from alf_analytics._alf import MAX_DECLARED_SIZE
from alf_analytics._net import INVALID_HOST
from alf_analytics.collector import Collector

from .conftest import assert_valid_alf
from .djangoproject.harness import Server, server_env

pytestmark = pytest.mark.slow

MARK = b"hostile-test-app"

#: (label, raw request head without the final CRLF). Each reaches the app on all three servers.
HOSTILE: list[tuple[str, bytes]] = [
    ("host-[1]", b"GET /attack HTTP/1.1\r\nHost: [1]"),
    ("host-[1.2.3.4]", b"GET /attack HTTP/1.1\r\nHost: [1.2.3.4]"),
    ("host-[:]", b"GET /attack HTTP/1.1\r\nHost: [:]"),
    ("host-scoped", b"GET /attack HTTP/1.1\r\nHost: [fe80::1%25lo]:8000"),
    ("host-port-out-of-range", b"GET /attack HTTP/1.1\r\nHost: example.com:99999"),
    ("host-userinfo", b"GET /attack HTTP/1.1\r\nHost: user:pass@example.com"),
    ("host-utf8", b"GET /attack HTTP/1.1\r\nHost: b\xc3\xbccher.example"),
    ("host-latin1", b"GET /attack HTTP/1.1\r\nHost: \xff\xfe"),
    ("path-escapes", b"GET /a%zz/%/b%2 HTTP/1.1\r\nHost: h"),
    ("path-quote", b'GET /a"b<c>{d}|e^f`g HTTP/1.1\r\nHost: h'),
    (
        "content-length-2**63",
        b"GET /attack HTTP/1.1\r\nHost: h\r\nContent-Length: 9223372036854775808",
    ),
    ("header-latin1", b"GET /attack HTTP/1.1\r\nHost: h\r\nX-Bin: \xff\xfe\x80"),
    ("forwarded-scoped", b'GET /attack HTTP/1.1\r\nHost: h\r\nForwarded: for="[fe80::1%25lo]"'),
    ("xff-scoped", b"GET /attack HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: fe80::1%lo"),
    ("consumer-forged", b"GET /attack HTTP/1.1\r\nHost: h\r\nX-ALF-Consumer: admin"),
]
INNOCENT = 30


def send_raw(url: str, head: bytes) -> bytes:
    """Send one request head (no body), read the whole answer (the server closes)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + b"\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def innocent(url: str, index: int, path: str) -> None:
    answer = send_raw(url, f"GET {path}?i={index} HTTP/1.1\r\nHost: api.example.test".encode())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


# -- the apps each server runs (imported by the server process) --------------------------------

AGENT = {"batch_size": 100, "delay": 0.2, "log_body": True, "trusted_proxies": ["127.0.0.1"]}


def create_starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from alf_analytics import AnalyticsASGIMiddleware

    async def anything(request: Any) -> Response:
        return Response(MARK, media_type="text/plain")

    app = Starlette(routes=[Route("/{path:path}", anything)])
    return AnalyticsASGIMiddleware(
        app,
        service_token="hostile-starlette",
        collector_url=os.environ["ALF_COLLECTOR_URL"],
        **AGENT,
    )


def create_flask() -> Any:
    from flask import Flask

    from alf_analytics import AnalyticsWSGIMiddleware

    app = Flask("hostile")

    @app.route("/", defaults={"path": ""})
    @app.route("/<path:path>")
    def anything(path: str) -> tuple[bytes, int, dict[str, str]]:
        return MARK, 200, {"Content-Type": "text/plain"}

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        service_token="hostile-flask",
        collector_url=os.environ["ALF_COLLECTOR_URL"],
        **AGENT,
    )
    return app


SERVERS = {
    "uvicorn-starlette": (
        ["uvicorn", "--fd", "{fd}", "--no-access-log", "--factory", f"{__name__}:create_starlette"],
        "/ok",
        MARK,
    ),
    "gunicorn-flask": (
        ["gunicorn", "--bind", "fd://{fd}", "--workers", "1", f"{__name__}:create_flask()"],
        "/ok",
        MARK,
    ),
    "gunicorn-django": (
        ["gunicorn", "--bind", "fd://{fd}", "--workers", "1", "tests.djangoproject.wsgi"],
        "/sync",
        b'"view": "sync"',
    ),
}


@pytest.fixture(params=sorted(SERVERS))
def served(
    request: pytest.FixtureRequest, collector: Collector
) -> Iterator[tuple[Server, str, bytes]]:
    argv, path, mark = SERVERS[request.param]
    env = server_env(collector.url)
    env["DJANGOPROJECT_ALF_DELAY"] = "0.2"
    server = Server(argv, env)
    try:
        server.wait_ready(path)
        yield server, path, mark
    finally:
        server.stop()
        server.close()


def test_hostile_requests_cost_no_other_entry(
    served: tuple[Server, str, bytes], collector: Collector
) -> None:
    server, path, mark = served
    for index in range(INNOCENT):
        innocent(server.url, index, path)
    for label, head in HOSTILE:
        if path != "/ok":
            head = head.replace(b"/attack", path.encode(), 1)
        answer = send_raw(server.url, head)
        # (Django answers a path it has no route for itself, with its 404 page.)
        by_app = mark in answer or b"<h1>Not Found</h1>" in answer
        assert by_app, f"{label}: not answered by the app: {answer[:300]!r}"
    for index in range(INNOCENT, 2 * INNOCENT):
        innocent(server.url, index, path)

    expected = 2 * INNOCENT + len(HOSTILE) + 1  # + the readiness probe
    assert collector.wait_for_entries(expected, timeout=20), (
        f"stored {collector.count()} of {expected}\n{server.output()[-3000:]}"
    )
    for alf in collector.alfs():
        assert_valid_alf(alf)
    entries = [stored.entry for stored in collector.entries()]
    assert len(entries) == expected
    urls = [entry["request"]["url"] for entry in entries]
    assert sum(f"://{INVALID_HOST}/" in url for url in urls) >= 6  # the bad Host headers
    for entry in entries:
        request = entry["request"]
        assert request["bodySize"] <= MAX_DECLARED_SIZE
        assert all(pair["value"] != "admin" for pair in request["headers"])
        if "clientIPAddress" in entry:
            assert "%" not in entry["clientIPAddress"]
