"""PITFALLS #20: a failure of our own code on the request path never changes the response.

Each internal step the capture takes is made to raise (monkeypatched); the app's response, its
bytes, status and headers, must be what it is without the middleware, and our failure is only
logged (``alf_analytics``, ERROR, with the place).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client

from alf_analytics import (
    AnalyticsASGIMiddleware,
    AnalyticsWSGIMiddleware,
    _consumer,
    _record,
    asgi,
    wsgi,
)
from alf_analytics.collector import Collector

TOKEN = "internal-errors-token-0123"
BODY = b'{"n": 1}' * 100


@pytest.fixture(autouse=True)
def _every_error_logged() -> None:
    """Each place logs once a minute: each test sees its own first one."""
    _record._INTERNAL_LOGGED.clear()


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("an internal step failed")


#: (what, where to patch) for each step of the capture on the request path.
STEPS = [
    pytest.param(_record.Exchange, "decide_response_capture", id="decide_response_capture"),
    pytest.param(_record.Exchange, "request_data", id="request_data"),
    pytest.param(_record.Exchange, "response_data", id="response_data"),
    pytest.param(None, "enter", id="enter"),
    # Every adapter leaves through _consumer.leave_quietly, which calls this.
    pytest.param(_consumer, "leave", id="leave"),
    pytest.param(None, "perf_counter", id="perf_counter"),
]


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("201 Created", [("Content-Type", "application/json"), ("X-App", "yes")])
    yield body
    yield b"-and-more" * 1000


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, status_code=201, headers={"X-App": "yes"}, media_type="text/plain")


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1000

    return StreamingResponse(chunks(), headers={"X-App": "yes"})


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)])


def _wsgi_response(app: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    with Client(app).post("/echo", data=BODY, content_type="application/json") as response:
        return response.status, sorted(response.headers.to_wsgi_list()), response.get_data()


@pytest.mark.parametrize(("owner", "name"), STEPS)
def test_wsgi_response_is_unchanged_when_our_step_fails(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[logging.LogRecord],
    owner: Any,
    name: str,
) -> None:
    expected = _wsgi_response(wsgi_app)
    monkeypatch.setattr(owner if owner is not None else wsgi, name, _boom)
    ours = AnalyticsWSGIMiddleware(
        wsgi_app, service_token=TOKEN, collector_url=collector.url, log_body=True
    )
    assert _wsgi_response(ours) == expected
    assert _wsgi_response(ours) == expected  # and again: nothing left broken
    assert internal_errors and all("internal error" in r.getMessage() for r in internal_errors)
    internal_errors.clear()


@pytest.mark.parametrize(("owner", "name"), STEPS)
@pytest.mark.parametrize("path", ["/echo", "/stream"])
def test_asgi_response_is_unchanged_when_our_step_fails(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[logging.LogRecord],
    owner: Any,
    name: str,
    path: str,
) -> None:
    def fetch(app: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        with TestClient(app) as client:
            if path == "/echo":
                response = client.post(path, content=BODY)
            else:
                response = client.get(path)
            headers = sorted((k, v) for k, v in response.headers.items() if k != "date")
            return response.status_code, headers, response.content

    expected = fetch(starlette_app())
    monkeypatch.setattr(owner if owner is not None else asgi, name, _boom)
    app = starlette_app()
    app.add_middleware(
        AnalyticsASGIMiddleware, service_token=TOKEN, collector_url=collector.url, log_body=True
    )
    assert fetch(app) == expected
    if name == "request_data" and path == "/stream":
        assert not internal_errors  # a GET has no body to count
    else:
        assert internal_errors
        assert all("internal error" in r.getMessage() for r in internal_errors)
    internal_errors.clear()
