"""What is recorded, and under which name: every control works the same in each framework.

Each test runs against Flask (WSGI), Starlette (ASGI) and Django (sync under WSGI, async under
ASGI), through the real collector.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.test import AsyncClient, override_settings
from django.test import Client as DjangoClient
from flask import Flask, Response, send_file
from flask import Request as FlaskRequest
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client as WerkzeugClient
from werkzeug.wrappers import Request as WerkzeugRequest

import alf_analytics
from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware, _config, _worker
from alf_analytics._alf import CONSUMER_HEADER
from alf_analytics._config import ENV_VARS
from alf_analytics.collector import Collector

from .conftest import received_entries
from .djangoproject import setup as django_setup
from .djangoproject.controls import FILE_BYTES

django_setup()
# Django's own FileResponse under ASGI (a sync file read in a thread) says so; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:StreamingHttpResponse must consume synchronous iterators"
)

TOKEN = "controls-secret-token-0123456789"
JSON_BODY = b'{"greeting": "hello"}'


# -- one app per framework, the same routes ------------------------------------------------------


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.route("/")
    @app.route("/health")
    @app.route("/static/app.js")
    def index() -> Response:
        return Response(b"ok", mimetype="text/plain")

    @app.route("/echo", methods=["POST", "PUT"])
    def echo() -> Response:
        content_type = flask_request.headers.get("content-type", "application/octet-stream")
        return Response(flask_request.get_data(), content_type=content_type)

    @app.route("/events")
    def events() -> Response:
        return Response(iter([b"data: 1\n\n", b"data: 2\n\n"]), mimetype="text/event-stream")

    @app.route("/file")
    def file() -> Response:
        return send_file(io.BytesIO(FILE_BYTES), mimetype="application/octet-stream")

    @app.route("/whoami")
    def whoami() -> Response:
        took = alf_analytics.set_consumer(flask_request.args["user"])
        return Response(json.dumps(took), mimetype="application/json")

    return app


async def _index(request: StarletteRequest) -> StarletteResponse:
    return PlainTextResponse("ok")


async def _echo(request: StarletteRequest) -> StarletteResponse:
    content_type = request.headers.get("content-type", "application/octet-stream")
    return StarletteResponse(await request.body(), media_type=content_type)


async def _events(request: StarletteRequest) -> StarletteResponse:
    async def chunks() -> Any:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def _file(request: StarletteRequest) -> StarletteResponse:
    async def chunks() -> Any:
        yield FILE_BYTES

    headers = {"content-length": str(len(FILE_BYTES))}
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


def _whoami(request: StarletteRequest) -> StarletteResponse:
    # A sync endpoint: Starlette runs it in a thread, on a copy of the request's context.
    took = alf_analytics.set_consumer(request.query_params["user"])
    return StarletteResponse(json.dumps(took), media_type="application/json")


async def _awhoami(request: StarletteRequest) -> StarletteResponse:
    took = alf_analytics.set_consumer(request.query_params["user"])
    return StarletteResponse(json.dumps(took), media_type="application/json")


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", _index),
            Route("/health", _index),
            Route("/static/app.js", _index),
            Route("/echo", _echo, methods=["POST", "PUT"]),
            Route("/events", _events),
            Route("/file", _file),
            Route("/whoami", _whoami),
            Route("/awhoami", _awhoami),
        ]
    )


class Harness:
    """Build the framework's app with the given options, and send it requests."""

    name = ""
    #: What the option callables receive in this framework.
    request_type: type = object
    whoami = "/whoami"

    def build(self, **options: Any) -> None:
        raise NotImplementedError

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FlaskHarness(Harness):
    name = "flask"
    request_type = WerkzeugRequest

    def build(self, **options: Any) -> None:
        app = flask_app()
        app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
        self.client = WerkzeugClient(app)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        response = self.client.open(path, method=method, data=body, headers=headers or {})
        try:
            return response.status_code, response.get_data()
        finally:
            response.close()


class StarletteHarness(Harness):
    name = "starlette"
    request_type = StarletteRequest

    def build(self, **options: Any) -> None:
        self.client = TestClient(AnalyticsASGIMiddleware(starlette_app(), **options))

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        response = self.client.request(method, path, content=body, headers=headers)
        return response.status_code, response.content


class DjangoHarness(Harness):
    name = "django"
    request_type = HttpRequest

    def __init__(self) -> None:
        self.stack = ExitStack()

    def build(self, **options: Any) -> None:
        self.stack.enter_context(
            override_settings(
                ALF_ANALYTICS=options,
                ROOT_URLCONF="tests.djangoproject.controls",
                MIDDLEWARE=["alf_analytics.django.AnalyticsMiddleware"],
            )
        )
        self.client = DjangoClient()
        self.client.handler.load_middleware()  # raises a bad configuration here, as servers do

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        headers = dict(headers or {})
        content_type = headers.pop("content-type", "application/octet-stream")
        response = self.client.generic(
            method, path, data=body, content_type=content_type, headers=headers
        )
        if response.streaming:
            return response.status_code, b"".join(response.streaming_content)  # type: ignore[arg-type]
        return response.status_code, response.content

    def close(self) -> None:
        self.stack.close()


class DjangoAsyncHarness(DjangoHarness):
    name = "django-async"
    whoami = "/awhoami"

    def build(self, **options: Any) -> None:
        super().build(**options)
        self.async_client = AsyncClient()
        self.async_client.handler.load_middleware(is_async=True)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        headers = dict(headers or {})
        content_type = headers.pop("content-type", "application/octet-stream")

        async def call() -> tuple[int, bytes]:
            response = await self.async_client.generic(
                method, path, data=body, content_type=content_type, headers=headers
            )
            if response.streaming:
                chunks = [chunk async for chunk in response]  # type: ignore[attr-defined]
                return response.status_code, b"".join(chunks)
            return response.status_code, response.content

        return async_to_sync(call)()


HARNESSES: dict[str, Callable[[], Harness]] = {
    "flask": FlaskHarness,
    "starlette": StarletteHarness,
    "django": DjangoHarness,
    "django-async": DjangoAsyncHarness,
}


@pytest.fixture(autouse=True)
def _no_alf_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    _config._announced.clear()  # "recording is off" is said once per process


@pytest.fixture(params=list(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    made = HARNESSES[request.param]()
    try:
        yield made
    finally:
        made.close()


Build = Callable[..., Harness]


@pytest.fixture
def build(harness: Harness, collector: Collector) -> Build:
    """Build the harness with a token and the test collector, plus the given options."""

    def make(**options: Any) -> Harness:
        harness.build(**{"service_token": TOKEN, "collector_url": collector.url, **options})
        return harness

    return make


def stat(name: str) -> int:
    alf_analytics.flush(5.0)
    value: int = alf_analytics.stats()[name]
    return value


def urls(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["request"]["url"].partition("://")[2].partition("/")[2] for e in entries)


def consumer_of(entry: dict[str, Any]) -> str | None:
    values = [h["value"] for h in entry["request"]["headers"] if h["name"] == CONSUMER_HEADER]
    assert len(values) <= 1, values
    return values[0] if values else None


# -- on, off, no token ---------------------------------------------------------------------------


def test_enabled_false_passes_through_with_no_worker(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """enabled=False: the app answers as ever, nothing is recorded, no worker exists."""
    client = build(enabled=False)
    assert client.request("POST", "/echo", JSON_BODY) == (200, JSON_BODY)
    assert _worker._workers == {}
    assert alf_analytics.stats()["captured"] == 0
    # A warning: Python shows only warnings when the app configured no logging.
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "recording is off" in r.msg]
    assert lines == [
        (logging.WARNING, "alf_analytics: recording is off (enabled=False); requests pass through")
    ]
    assert collector.count() == 0


def test_enabled_from_the_environment(
    build: Build,
    monkeypatch: pytest.MonkeyPatch,
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ALF_ENABLED", "false")
    client = build()
    assert client.request("GET", "/") == (200, b"ok")
    assert _worker._workers == {}
    assert sum("recording is off (enabled=False)" in r.msg for r in caplog.records) == 1


_OFF_SCRIPT = """
import io
from alf_analytics import AnalyticsWSGIMiddleware

def app(environ, start_response):
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]

for _ in range(2):  # two middlewares: still one line
    middleware = AnalyticsWSGIMiddleware(app)
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "h", "SERVER_PORT": "80",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO()}
assert b"".join(middleware(environ, lambda *args: None)) == b"ok"
"""


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        ({"ALF_ENABLED": "false", "ALF_SERVICE_TOKEN": TOKEN}, "(enabled=False)"),
        ({"ALF_REQUIRE_TOKEN": "false"}, "no service_token (and require_token=False)"),
    ],
)
def test_recording_off_is_said_once_where_an_unconfigured_process_shows_it(
    variables: dict[str, str], line: str
) -> None:
    """No logging set up (gunicorn, uvicorn, a script): the one line reaches stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALF_")}
    done = subprocess.run(
        [sys.executable, "-c", _OFF_SCRIPT],
        capture_output=True,
        env={**env, **variables},
        timeout=60,
        check=True,
    )
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "recording is off" in lines[0] and line in lines[0], lines


def test_no_token_with_require_token_false_passes_through(
    harness: Harness, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """Dev and test setups start without a token: one warning, every request untouched."""
    harness.build(require_token=False, collector_url=collector.url)
    for _ in range(3):
        assert harness.request("GET", "/") == (200, b"ok")
    assert _worker._workers == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "alf_analytics: recording is off: no service_token (and require_token=False); "
        "requests pass through"
    ]


def test_no_token_is_refused_naming_the_option_and_the_variable(
    harness: Harness, collector: Collector
) -> None:
    with pytest.raises((ValueError, ImproperlyConfigured)) as raised:
        harness.build(collector_url=collector.url)
    assert "service_token" in str(raised.value) and "ALF_SERVICE_TOKEN" in str(raised.value)


# -- skipping and sampling -----------------------------------------------------------------------


def test_skip_paths_methods_and_callable(build: Build, collector: Collector) -> None:
    """Exact paths, prefixes, regular expressions, methods and a callable: no entry, counted."""
    seen: list[Any] = []

    def skip(request: Any) -> bool:
        seen.append(request)
        return "x-synthetic" in request.headers

    client = build(
        skip_paths=["/health", "/static/*", re.compile(r"^/ev")],
        skip_methods=["put"],
        skip=skip,
    )
    answers = [
        client.request("GET", "/health"),
        client.request("GET", "/static/app.js"),
        client.request("GET", "/events"),
        client.request("PUT", "/echo", b"put body"),
        client.request("GET", "/", headers={"x-synthetic": "1"}),
        client.request("GET", "/"),
        client.request("POST", "/echo", b"kept", headers={"content-type": "text/plain"}),
    ]
    assert answers[3] == (200, b"put body") and answers[5] == (200, b"ok")
    assert [status for status, _ in answers] == [200] * 7
    entries = received_entries(collector, 2)
    assert urls(entries) == ["", "echo"]
    assert stat("skipped") == 5
    assert stat("captured") == 2
    # The callable ran only for requests the cheaper rules let through, with the framework's
    # request object.
    assert len(seen) == 3 and all(isinstance(r, client.request_type) for r in seen)


def test_skip_callable_failing_records_the_request_and_logs_once(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    def skip(request: Any) -> bool:
        raise RuntimeError("secret-in-message-0001")

    client = build(skip=skip)
    assert client.request("GET", "/") == (200, b"ok")
    assert client.request("GET", "/") == (200, b"ok")
    assert len(received_entries(collector, 2)) == 2
    complaints = [r.getMessage() for r in caplog.records if "skip option" in r.getMessage()]
    assert len(complaints) == 1 and "RuntimeError" in complaints[0]
    assert "secret-in-message-0001" not in caplog.text


@pytest.mark.slow
def test_sample_rate_is_honest(build: Build, collector: Collector) -> None:
    """sample_rate=0.3 over 2,000 requests: recorded count within 5 standard deviations."""
    requests, rate = 2000, 0.3
    client = build(sample_rate=rate, delay=60.0, batch_size=1000)
    for _ in range(requests):
        client.request("GET", "/")
    captured, sampled_out = stat("captured"), stat("sampled_out")
    assert captured + sampled_out == requests
    sigma = (requests * rate * (1 - rate)) ** 0.5
    assert abs(captured - requests * rate) <= 5 * sigma, captured


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_workers_forked_from_one_middleware_sample_on_their_own(collector: Collector) -> None:
    """gunicorn --preload and uWSGI fork their workers after the middleware was built: each
    worker must draw its own samples, not repeat its siblings' (they would all keep or drop
    their n-th request together)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    middleware = AnalyticsWSGIMiddleware(
        app, service_token=TOKEN, collector_url=collector.url, sample_rate=0.5
    )
    assert middleware._gate is not None

    def draws() -> str:
        return "".join("1" if middleware._gate.admit({}) else "0" for _ in range(64))

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, draws().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 64 and child != draws()


def test_sample_rate_zero_and_one(build: Build, harness: Harness, collector: Collector) -> None:
    client = build(sample_rate=0.0)
    for _ in range(20):
        client.request("GET", "/")
    assert (stat("captured"), stat("sampled_out")) == (0, 20)


# -- who the caller is ---------------------------------------------------------------------------


def test_identify_gets_the_framework_request_and_names_the_consumer(
    build: Build, collector: Collector
) -> None:
    got: list[Any] = []

    def identify(request: Any) -> str | None:
        got.append(request)
        return request.headers.get("x-user")

    client = build(identify=identify)
    client.request("GET", "/", headers={"x-user": "user-7"})
    client.request("GET", "/")
    entries = received_entries(collector, 2)
    assert sorted(map(str, map(consumer_of, entries))) == ["None", "user-7"]
    assert len(got) == 2 and all(isinstance(r, client.request_type) for r in got)


def test_identify_gets_flasks_own_request_with_its_view_args(collector: Collector) -> None:
    """Flask: identify runs after the view, on Flask's request (view_args, endpoint), not a
    bare Werkzeug one made from the environ (Flask clears it from the environ at its end)."""
    app = Flask(__name__)

    @app.route("/tenants/<tenant>/items")
    def items(tenant: str) -> Response:
        return Response(b"ok", mimetype="text/plain")

    got: list[Any] = []

    def identify(request: Any) -> str:
        got.append(request)
        return f"tenant-{request.view_args['tenant']}"

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, service_token=TOKEN, collector_url=collector.url, identify=identify
    )
    response = WerkzeugClient(app).get("/tenants/acme/items")
    assert response.get_data() == b"ok"
    response.close()
    (entry,) = received_entries(collector, 1)
    assert consumer_of(entry) == "tenant-acme"
    assert len(got) == 1 and isinstance(got[0], FlaskRequest) and got[0].endpoint == "items"


def test_identify_failing_never_reaches_the_app(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    def identify(request: Any) -> str:
        raise KeyError("user")

    client = build(identify=identify)
    assert client.request("GET", "/") == (200, b"ok")
    (entry,) = received_entries(collector, 1)
    assert consumer_of(entry) is None
    assert sum("identify option" in r.getMessage() for r in caplog.records) == 1


def test_set_consumer_in_the_view_wins_over_identify(build: Build, collector: Collector) -> None:
    client = build(identify=lambda request: "from-identify")
    status, body = client.request("GET", f"{client.whoami}?user=user-42")
    assert (status, json.loads(body)) == (200, True)
    client.request("GET", "/")
    entries = received_entries(collector, 2)
    assert sorted(str(consumer_of(e)) for e in entries) == ["from-identify", "user-42"]


def test_set_consumer_outside_a_recorded_request_does_nothing(
    build: Build, collector: Collector
) -> None:
    client = build(skip_paths=["/whoami", "/awhoami"])
    status, body = client.request("GET", f"{client.whoami}?user=nobody")
    assert (status, json.loads(body)) == (200, False)
    assert alf_analytics.set_consumer("outside") is False
    assert stat("captured") == 0


def test_set_consumer_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="set_consumer"):
        alf_analytics.set_consumer(42)  # type: ignore[arg-type]


# -- per-request token and environment -----------------------------------------------------------


def test_per_request_token_and_environment(build: Build, collector: Collector) -> None:
    """A callable token routes requests to tenants; None skips; batches never mix."""

    def token(request: Any) -> str | None:
        tenant = request.headers.get("x-tenant")
        return None if tenant is None else f"token-of-{tenant}-0123456789"

    def environment(request: Any) -> str | None:
        return request.headers.get("x-env")

    client = build(service_token=token, environment=environment)
    client.request("GET", "/", headers={"x-tenant": "a", "x-env": "prod"})
    client.request("GET", "/", headers={"x-tenant": "b"})
    client.request("GET", "/", headers={"x-tenant": "a", "x-env": "prod"})
    client.request("GET", "/")  # no tenant: skipped
    received_entries(collector, 3)
    stored = sorted((s.service_token, s.environment) for s in collector.entries())
    assert stored == [
        ("token-of-a-0123456789", "prod"),
        ("token-of-a-0123456789", "prod"),
        ("token-of-b-0123456789", None),
    ]
    assert stat("skipped") == 1


def test_per_request_token_or_environment_of_the_wrong_type_is_said_once(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """A token callable returning a non-str skips the request, a blank one too (after
    stripping, as a static token is); a non-str environment is left out; each callable's
    mistake is logged once, and the app never sees any of it."""
    tokens: dict[str | None, Any] = {"int": 5, "blank": "  ", "padded": " token-of-p-0123456 "}
    environments: dict[str | None, Any] = {"int": 7}

    def token(request: Any) -> Any:
        return tokens.get(request.headers.get("x-tenant"), TOKEN)

    def environment(request: Any) -> Any:
        return environments.get(request.headers.get("x-env"), "prod")

    client = build(service_token=token, environment=environment)
    for tenant in ("int", "int", "blank", "padded"):
        assert client.request("GET", "/", headers={"x-tenant": tenant}) == (200, b"ok")
    for _ in range(2):
        assert client.request("GET", "/", headers={"x-env": "int"}) == (200, b"ok")
    received_entries(collector, 3)
    stored = sorted((s.service_token, s.environment) for s in collector.entries())
    assert stored == [(TOKEN, None), (TOKEN, None), ("token-of-p-0123456", "prod")]
    assert stat("skipped") == 3
    said = [r.getMessage() for r in caplog.records if "option's callable" in r.getMessage()]
    assert said == [
        "alf_analytics: the service_token option's callable returned int, not a str or None "
        "(logged once; the app is not affected)",
        "alf_analytics: the environment option's callable returned int, not a str or None "
        "(logged once; the app is not affected)",
    ]


# -- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_body", "request_kept", "response_kept"),
    [
        pytest.param(True, True, True, id="both"),
        pytest.param("request", True, False, id="request"),
        pytest.param("response", False, True, id="response"),
        pytest.param(False, False, False, id="none"),
    ],
)
def test_log_body_directions(
    build: Build,
    collector: Collector,
    log_body: Any,
    request_kept: bool,
    response_kept: bool,
) -> None:
    client = build(log_body=log_body)
    headers = {"content-type": "application/json"}
    assert client.request("POST", "/echo", JSON_BODY, headers) == (200, JSON_BODY)
    (entry,) = received_entries(collector, 1)
    request, response = entry["request"], entry["response"]
    assert ("postData" in request, request["bodyCaptured"]) == (request_kept, request_kept)
    assert ("content" in response, response["bodyCaptured"]) == (response_kept, response_kept)
    assert (request["bodySize"], response["bodySize"]) == (len(JSON_BODY), len(JSON_BODY))


def test_log_body_types_default_allow_list(build: Build, collector: Collector) -> None:
    """JSON and text are captured; binary uploads, files and event streams only measured."""
    client = build(log_body=True)
    client.request("POST", "/echo", b"\x00\x01binary", {"content-type": "application/octet-stream"})
    client.request("POST", "/echo", JSON_BODY, {"content-type": "application/problem+json"})
    assert client.request("GET", "/events") == (200, b"data: 1\n\ndata: 2\n\n")
    assert client.request("GET", "/file") == (200, FILE_BYTES)
    by_type = {_content_type(e): e for e in received_entries(collector, 4)}
    assert len(by_type) == 4
    binary = by_type["application/octet-stream-echo"]
    assert not binary["request"]["bodyCaptured"] and binary["request"]["bodySize"] == 8
    problem = by_type["application/problem+json"]
    assert problem["request"]["bodyCaptured"] and problem["response"]["bodyCaptured"]
    events = by_type["text/event-stream"]
    assert not events["response"]["bodyCaptured"] and events["response"]["bodySize"] == 18
    file = by_type["application/octet-stream-file"]
    assert not file["response"]["bodyCaptured"]
    assert file["response"]["bodySize"] == len(FILE_BYTES)


def _content_type(entry: dict[str, Any]) -> str:
    value = next(
        h["value"] for h in entry["response"]["headers"] if h["name"] == "content-type"
    ).partition(";")[0]
    if value == "application/octet-stream":
        return value + ("-file" if entry["request"]["url"].endswith("/file") else "-echo")
    return value


def test_event_streams_are_captured_when_listed(build: Build, collector: Collector) -> None:
    client = build(log_body=True, log_body_types=["text/event-stream"])
    client.request("GET", "/events")
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodyCaptured"]


# -- concurrency of set_consumer -----------------------------------------------------------------


def test_set_consumer_is_per_request_across_threads(collector: Collector) -> None:
    """WSGI: 16 threads at once, each request names its own consumer."""
    app = flask_app()
    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, service_token=TOKEN, collector_url=collector.url
    )
    barrier = threading.Barrier(16)

    def one(index: int) -> None:
        barrier.wait()
        for round_ in range(5):
            response = WerkzeugClient(app).get(f"/whoami?user=u{index}-{round_}")
            response.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = received_entries(collector, 80)
    assert all(consumer_of(e) == e["request"]["url"].rpartition("=")[2] for e in entries)


def test_set_consumer_is_per_request_across_tasks(collector: Collector) -> None:
    """ASGI: 50 concurrent requests, sync (threadpool) and async endpoints interleaved."""
    import httpx

    app = AnalyticsASGIMiddleware(starlette_app(), service_token=TOKEN, collector_url=collector.url)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            await asyncio.gather(
                *(
                    client.get(f"/{'a' if i % 2 else ''}whoami", params={"user": f"u{i}"})
                    for i in range(50)
                )
            )

    asyncio.run(main())
    entries = received_entries(collector, 50)
    assert all(consumer_of(e) == e["request"]["url"].rpartition("=")[2] for e in entries)
