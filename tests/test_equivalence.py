"""The same exchange through Flask, Starlette and Django yields the same ALF entry.

One request (``POST /echo?x=1&x=2``, a JSON body, ``Authorization`` and a few other headers) goes
through four stacks, each answering with the same status, headers, cookie and body:

- Flask behind :class:`AnalyticsWSGIMiddleware`, called with a hand-built WSGI environ;
- Starlette behind :class:`AnalyticsASGIMiddleware`, called with a hand-built ASGI scope;
- Django with ``alf_analytics.django.AnalyticsMiddleware`` under its ``WSGIHandler`` (same
  environ) and under its ``ASGIHandler`` (same scope).

The environ and scope are written out here instead of coming from each framework's test client,
because those clients add their own headers (Django's an empty ``Cookie``, Starlette's
``user-agent: testclient``, Werkzeug's ``Host: localhost``) and that would be a difference in the
request, not in our capture. Nothing runs behind a server, so no server header (``Date``,
``Server``) is ever visible to a middleware here either.

Entries are compared as the collector received them, after dropping exactly these fields, which
measure this particular run rather than describe the exchange:

- ``startedDateTime``: the wall clock at the start of each request;
- ``time`` and ``timings``: durations, different on every run.

Framework facts were avoided by building the responses alike rather than normalised away:
Werkzeug upper-cases reason phrases it derives itself (``201 CREATED``), so the Flask view gives
``"201 Created"``; Starlette's ``set_cookie`` adds ``SameSite=lax`` by default, so the Starlette
view passes ``samesite=None``; Flask and Starlette add ``Content-Length`` themselves and Django
does not, so every view sets it; headers are set in the same order everywhere. A WSGI environ
cannot carry a repeated request header, so the request has none.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.test import override_settings
from flask import Flask, Response, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware
from alf_analytics.collector import Collector

from .conftest import received_entries
from .djangoproject import project_settings, setup
from .djangoproject.harness import call_asgi, call_wsgi
from .djangoproject.views import ECHO_HEADERS, echo_body
from .raw import asgi_scope, wsgi_environ

setup()

TOKEN = "equivalence-token-0123456789"
BODY = json.dumps({"hello": "world", "n": [1, 2, 3]}).encode()
REQUEST_HEADERS = [
    ("host", "api.example.test"),
    ("user-agent", "alf-equivalence/1.0"),
    ("accept", "application/json"),
    ("authorization", "Bearer equivalence-secret"),
    ("x-request-id", "req-42"),
    # Last, because a WSGI environ keeps these two apart from the HTTP_* keys.
    ("content-type", "application/json"),
    ("content-length", str(len(BODY))),
]
CLIENT = ("192.0.2.10", 50123)
SERVER = ("127.0.0.1", 8000)
RESPONSE_BODY = echo_body(["1", "2"], BODY)
#: Fields that measure the run, not the exchange (see the module docstring).
EXCLUDED = ("startedDateTime", "time", "timings")
#: What the two builders below share (``host`` and ``content-length`` are in the headers).
REQUEST: dict[str, Any] = {
    "query": "x=1&x=2",
    "headers": REQUEST_HEADERS,
    "body": BODY,
    "host": None,
    "length": False,
    "client": CLIENT,
    "server": SERVER,
}


def environ() -> dict[str, Any]:
    """The request as a WSGI server presents it."""
    return wsgi_environ("POST", "/echo", **REQUEST)


def scope() -> dict[str, Any]:
    """The request as an ASGI server presents it."""
    return asgi_scope("POST", "/echo", **REQUEST)


def options(collector: Collector, environment: str) -> dict[str, Any]:
    """The same options everywhere; the environment tells the stacks apart at the collector."""
    return {
        "service_token": TOKEN,
        "environment": environment,
        "collector_url": collector.url,
        "log_body": True,
    }


def flask_app() -> Flask:
    app = Flask("equivalence")

    @app.post("/echo")
    def echo() -> Response:
        body = echo_body(request.args.getlist("x"), request.get_data())
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        response = Response(body, status="201 Created", headers=headers + [*ECHO_HEADERS.items()])
        response.set_cookie("session", "s3cr3t", httponly=True)
        return response

    return app


def starlette_app() -> Starlette:
    async def echo(request: Request) -> StarletteResponse:
        body = echo_body(request.query_params.getlist("x"), await request.body())
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        response = StarletteResponse(body, status_code=201, headers=headers | ECHO_HEADERS)
        response.set_cookie("session", "s3cr3t", httponly=True, samesite=None)
        return response

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def send_flask(collector: Collector) -> None:
    app = flask_app()
    app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, **options(collector, "flask"))  # type: ignore[method-assign]
    status, _, body = call_wsgi(app, environ())
    assert (status, body) == ("201 Created", RESPONSE_BODY)


def send_starlette(collector: Collector) -> None:
    app = AnalyticsASGIMiddleware(starlette_app(), **options(collector, "starlette"))
    status, _, body = asyncio.run(call_asgi(app, scope(), [BODY[:10], BODY[10:]]))
    assert (status, body) == (201, RESPONSE_BODY)


def send_django_wsgi(collector: Collector) -> None:
    with override_settings(ALF_ANALYTICS=options(collector, "django-wsgi")):
        status, _, body = call_wsgi(WSGIHandler(), environ())
    assert (status, body) == ("201 Created", RESPONSE_BODY)


def send_django_asgi(collector: Collector) -> None:
    with override_settings(ALF_ANALYTICS=options(collector, "django-asgi")):
        handler = ASGIHandler()
        status, _, body = asyncio.run(call_asgi(handler, scope(), [BODY[:10], BODY[10:]]))
    assert (status, body) == (201, RESPONSE_BODY)


SENDERS = {
    "starlette": send_starlette,
    "django-wsgi": send_django_wsgi,
    "django-asgi": send_django_asgi,
}


@pytest.fixture(autouse=True)
def _django_project() -> Iterator[None]:
    with override_settings(**project_settings()):
        yield


def entry_for(collector: Collector, environment: str) -> dict[str, Any]:
    stored = collector.entries(environment=environment)
    assert len(stored) == 1, [s.environment for s in collector.entries()]
    return stored[0].entry


def normalised(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in EXCLUDED}


def test_reference_entry_records_the_exchange(collector: Collector) -> None:
    """The Flask entry (the reference) holds exactly the request and response sent."""
    send_flask(collector)
    received_entries(collector, 1)
    entry = normalised(entry_for(collector, "flask"))
    request_headers = [
        # Authorization keeps its scheme; the credentials are redacted.
        {"name": n, "value": "Bearer [REDACTED]" if n == "authorization" else v}
        for n, v in REQUEST_HEADERS
    ]
    assert entry["request"] == {
        "method": "POST",
        "url": "http://api.example.test/echo?x=1&x=2",
        "httpVersion": "HTTP/1.1",
        "queryString": [{"name": "x", "value": "1"}, {"name": "x", "value": "2"}],
        "headers": request_headers,
        "headersSize": sum(len(n) + len(v) + 4 for n, v in REQUEST_HEADERS)
        + len("POST /echo?x=1&x=2 HTTP/1.1\r\n")
        + 2,
        "bodyCaptured": True,
        "bodySize": len(BODY),
        "postData": {
            "mimeType": "application/json",
            "encoding": "base64",
            "text": base64.b64encode(BODY).decode(),
        },
    }
    response_headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(RESPONSE_BODY))),
        ("x-custom", "custom-value"),
        ("set-cookie", "session=s3cr3t; HttpOnly; Path=/"),
    ]
    assert entry["response"] == {
        "status": 201,
        "statusText": "Created",
        "httpVersion": "HTTP/1.1",
        "headers": [
            {"name": n, "value": "[REDACTED]" if n == "set-cookie" else v}
            for n, v in response_headers
        ],
        "headersSize": sum(len(n) + len(v) + 4 for n, v in response_headers)
        + len("HTTP/1.1 201 Created\r\n")
        + 2,
        "bodyCaptured": True,
        "bodySize": len(RESPONSE_BODY),
        "content": {
            "mimeType": "application/json",
            "encoding": "base64",
            "text": base64.b64encode(RESPONSE_BODY).decode(),
        },
    }
    assert (entry["clientIPAddress"], entry["serverIPAddress"]) == (CLIENT[0], SERVER[0])
    assert set(entry) == {"request", "response", "clientIPAddress", "serverIPAddress"}


@pytest.mark.parametrize("framework", list(SENDERS))
def test_same_entry_as_flask(collector: Collector, framework: str) -> None:
    """The same exchange gives Flask's entry, apart from startedDateTime, time and timings."""
    send_flask(collector)
    SENDERS[framework](collector)
    received_entries(collector, 2)
    reference = normalised(entry_for(collector, "flask"))
    assert normalised(entry_for(collector, framework)) == reference
