"""Framework features met in a black-box audit on real servers, each pinned down here.

The collector runs on a fixed port range (19150-19199) rather than any free port, so these
tests can run beside servers that must stay inside a known range.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from flask import Flask, Response, g, stream_with_context
from flask import request as flask_request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route
from werkzeug.test import Client as WerkzeugClient

import alf_analytics
from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware
from alf_analytics._alf import CONSUMER_HEADER
from alf_analytics.collector import Collector

from .conftest import received_entries, wait_until

TOKEN = "framework-audit-token-0123456789"


def _port_in_range() -> int:
    for port in range(19150, 19200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 19150-19199")


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(port=_port_in_range()) as running:
        yield running


def consumer_of(entry: dict[str, Any]) -> str | None:
    for header in entry["request"]["headers"]:
        if header["name"] == CONSUMER_HEADER:
            return str(header["value"])
    return None


def test_flask_identify_can_read_flask_g_and_the_request_proxy(collector: Collector) -> None:
    """identify reads the user a before_request hook put on flask.g (what login extensions
    do): Flask's app context is gone once the server closes the response, so identify must
    not wait for it (it used to raise RuntimeError there and record no consumer)."""
    app = Flask(__name__)

    @app.before_request
    def login() -> None:
        g.user = flask_request.headers.get("X-User")

    @app.get("/plain")
    def plain() -> Response:
        return Response(b"ok", mimetype="text/plain")

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"a"
            yield b"b"

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    def identify(request: Any) -> str | None:
        return f"{g.user}@{flask_request.endpoint}"

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, service_token=TOKEN, collector_url=collector.url, identify=identify
    )
    client = WerkzeugClient(app)
    for path, user in (("/plain", "alice"), ("/stream", "bob")):
        response = client.get(path, headers={"X-User": user})
        assert response.status_code == 200
        response.close()
    entries = received_entries(collector, 2)
    assert sorted(map(str, map(consumer_of, entries))) == ["alice@plain", "bob@stream"]


@pytest.fixture
def uvicorn_serving() -> Iterator[Callable[[Any], str]]:
    """Serve an ASGI app with uvicorn in a thread (a port in the audit's range); its URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(app: Any) -> str:
        port = _port_in_range()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        assert wait_until(lambda: server.started, 10.0)
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_a_stream_the_client_left_is_cut_behind_base_http_middleware(
    collector: Collector, uvicorn_serving: Callable[[Any], str]
) -> None:
    """Starlette's BaseHTTPMiddleware (FastAPI's @app.middleware("http")) ends a stream the
    client left with an empty last body message: the entry must still show the body as cut
    (bodyCaptured false, only the bytes sent before the disconnect), not as complete."""

    async def slow(request: Request) -> StarletteResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(200):
                yield b"x" * 1000
                await anyio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def passthrough(
        request: Request, call_next: Callable[[Request], Awaitable[StarletteResponse]]
    ) -> StarletteResponse:
        return await call_next(request)

    app = Starlette(routes=[Route("/slow", slow)])
    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    app.add_middleware(
        AnalyticsASGIMiddleware,
        service_token=TOKEN,
        collector_url=collector.url,
        log_body=True,
    )
    url = uvicorn_serving(app)
    with httpx.Client() as client, client.stream("GET", f"{url}/slow") as response:
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 3000:
                break
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodyCaptured"] is False
    assert 3000 <= entry["response"]["bodySize"] < 200_000


def test_set_consumer_in_a_streamed_flask_body_names_the_consumer(collector: Collector) -> None:
    """Under WSGI the server iterates the body after the app returned: set_consumer() in a
    streamed generator (with or without stream_with_context) is still inside the request."""
    app = Flask(__name__)
    took: list[bool] = []

    def chunks(name: str) -> Iterator[bytes]:
        took.append(alf_analytics.set_consumer(name))
        yield b"a"

    @app.get("/with-context")
    def with_context() -> Response:
        return Response(stream_with_context(chunks("with-context")), mimetype="text/plain")

    @app.get("/plain")
    def plain() -> Response:
        return Response(chunks("plain"), mimetype="text/plain")

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, service_token=TOKEN, collector_url=collector.url
    )
    client = WerkzeugClient(app)
    for path in ("/with-context", "/plain"):
        response = client.get(path)
        assert response.get_data() == b"a"
        response.close()
    assert took == [True, True]
    entries = received_entries(collector, 2)
    assert sorted(map(str, map(consumer_of, entries))) == ["plain", "with-context"]


class Login(BaseModel):
    username: str
    password: int
    max_tokens: int


def test_a_fastapi_validation_error_does_not_echo_a_secret(
    collector: Collector, uvicorn_serving: Callable[[Any], str]
) -> None:
    """FastAPI's 422 (pydantic's errors) repeats the rejected value under "input", naming its
    field in "loc": a password that failed validation must not reach the collector there."""
    app = FastAPI()

    @app.post("/login")
    def login(body: Login) -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(
        AnalyticsASGIMiddleware, service_token=TOKEN, collector_url=collector.url, log_body=True
    )
    url = uvicorn_serving(app)
    sent = {"username": "bob", "password": "hunter2-secret", "max_tokens": "many"}
    answer = httpx.post(f"{url}/login", json=sent)
    assert answer.status_code == 422 and "hunter2-secret" in answer.text
    (entry,) = received_entries(collector, 1)
    stored = json.loads(base64.b64decode(entry["response"]["content"]["text"]))
    inputs = {tuple(error["loc"]): error["input"] for error in stored["detail"]}
    assert inputs == {("body", "password"): "[REDACTED]", ("body", "max_tokens"): "[REDACTED]"}
    assert "hunter2-secret" not in json.dumps(entry)


def test_wsgiref_default_content_type_is_not_recorded_as_sent(collector: Collector) -> None:
    """wsgiref's server (and Django's runserver, built on it) puts CONTENT_TYPE "text/plain"
    in the environ of every request that sent none: a GET must not be recorded with a
    Content-Type header its client never sent (nor headersSize count it)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    wrapped = AnalyticsWSGIMiddleware(app, service_token=TOKEN, collector_url=collector.url)
    server = make_server("127.0.0.1", _port_in_range(), wrapped, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        head = b"GET /plain HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(head)
            while sock.recv(65536):
                pass
        sent_type = b"text/plain; charset=utf-8"
        with httpx.Client() as client:
            port = server.server_address[1]
            client.post(
                f"http://127.0.0.1:{port}/typed",
                content=b"x",
                headers={"content-type": sent_type.decode()},
            )
    finally:
        server.shutdown()
        thread.join(10)
    entries = {e["request"]["url"].rpartition("/")[2]: e for e in received_entries(collector, 2)}
    request = entries["plain"]["request"]
    assert [h["name"] for h in request["headers"]] == ["host", "connection"]
    assert request["headersSize"] == len(head)
    assert request["bodyCaptured"] is False
    typed = entries["typed"]["request"]["headers"]
    assert {"name": "content-type", "value": "text/plain; charset=utf-8"} in typed
