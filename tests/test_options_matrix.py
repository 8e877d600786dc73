"""Every option of the README's table, in every framework: the options no other test covers so.

tests/test_controls.py runs ``enabled``, ``require_token``, a missing and a per-request
``service_token``, a per-request ``environment``, ``skip_paths``, ``skip_methods``, ``skip``,
``sample_rate``, ``identify``, ``log_body`` and ``log_body_types`` through Flask, Starlette and
Django (sync and async). This file does the same for the rest: the static token and
environment, ``collector_url``, ``max_body_bytes``, the redaction lists and
``default_redactions``, ``client_ip``, ``trusted_proxies`` and ``forwarded_header``,
``before_send``, the delivery options (``batch_size``, ``delay``, ``max_batch_bytes``,
``queue_size``, ``max_queue_bytes``, ``max_inflight``, ``timeout``, ``retries``,
``retry_backoff``, ``shutdown_timeout``) and ``debug``; and it checks the README's "What
leaves your process by default" claims one by one.

Requests are hand-built WSGI environs and ASGI scopes (as gunicorn and uvicorn present them,
so the peer address is under the test's control) sent to Flask behind
:class:`AnalyticsWSGIMiddleware`, Starlette behind :class:`AnalyticsASGIMiddleware` and Django
under its ``WSGIHandler`` and ``ASGIHandler``; entries go to the real collector over loopback
(or, for the failure modes, to tests/faulty_collector.py). Each test asserts what the option
changes, so it fails if the option is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import re_path
from flask import Flask
from flask import Response as FlaskResponse
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

import alf_analytics
from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware, _config
from alf_analytics._config import DEFAULT_COLLECTOR_URL, ENV_VARS, REDACTED
from alf_analytics.collector import Collector

from .conftest import assert_valid_alf, received_entries
from .djangoproject import project_settings, setup
from .djangoproject.harness import REPO_ROOT, call_asgi, call_wsgi
from .faulty_collector import FaultyCollector
from .raw import HOST, SERVER, asgi_scope, wsgi_environ

setup()

TOKEN = "matrix-secret-token-0123456789"
PEER = "203.0.113.77"
JSON_BODY = json.dumps(
    {"user": "visible", "password": "pw-1", "pin": "1234", "nested": [{"otp": "x"}]}
).encode()


# -- the same app in every framework --------------------------------------------------------------


def answer(path: str, body: bytes, content_type: str) -> tuple[int, list[tuple[str, str]], bytes]:
    if path == "/echo":
        return 200, [("Content-Type", content_type or "application/octet-stream")], body
    headers = [("Content-Type", "text/plain"), ("Set-Cookie", "sid=cookie-value; Path=/")]
    return 200, headers, b"ok"


def flask_app() -> Flask:
    app = Flask("matrix")

    @app.route("/", defaults={"rest": ""}, methods=["GET", "POST"])
    @app.route("/<path:rest>", methods=["GET", "POST"])
    def view(rest: str) -> FlaskResponse:
        status, headers, body = answer(
            flask_request.path, flask_request.get_data(), flask_request.content_type or ""
        )
        return FlaskResponse(body, status=status, headers=headers)

    return app


async def _starlette_view(request: StarletteRequest) -> StarletteResponse:
    status, headers, body = answer(
        request.url.path, await request.body(), request.headers.get("content-type", "")
    )
    response = StarletteResponse(body, status_code=status)
    response.raw_headers = [
        *[(n.lower().encode(), v.encode()) for n, v in headers],
        (b"content-length", str(len(body)).encode()),
    ]
    return response


def _django_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    status, headers, body = answer(
        request.path, request.body, request.headers.get("content-type", "")
    )
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    return response


class DjangoURLs:
    """The URLconf (``ROOT_URLCONF`` may be any object with ``urlpatterns``)."""

    urlpatterns = [re_path(r"^(?P<rest>.*)$", _django_view)]


class Stack:
    """One framework with our middleware, built with the given options."""

    interface = ""

    def __init__(self, stack: ExitStack, options: dict[str, Any]) -> None:
        self.app = self.build(stack, options)

    def build(self, stack: ExitStack, options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def send(
        self,
        method: str = "GET",
        path: str = "/",
        query: str = "",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        peer: str = PEER,
    ) -> int:
        request = {"query": query, "headers": headers or [], "body": body, "client": (peer, 50123)}
        if self.interface == "wsgi":
            status, _, _ = call_wsgi(self.app, wsgi_environ(method, path, **request))
            return int(status.split()[0])
        scope = asgi_scope(method, path, **request)
        code, _, _ = asyncio.run(call_asgi(self.app, scope, [body]))
        return code


class FlaskStack(Stack):
    interface = "wsgi"

    def build(self, stack: ExitStack, options: dict[str, Any]) -> Any:
        app = flask_app()
        app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
        return app


class StarletteStack(Stack):
    interface = "asgi"

    def build(self, stack: ExitStack, options: dict[str, Any]) -> Any:
        app = Starlette(routes=[Route("/{rest:path}", _starlette_view, methods=["GET", "POST"])])
        return AnalyticsASGIMiddleware(app, **options)


class DjangoStack(Stack):
    interface = "wsgi"

    def build(self, stack: ExitStack, options: dict[str, Any]) -> Any:
        stack.enter_context(override_settings(ALF_ANALYTICS=options, ROOT_URLCONF=DjangoURLs))
        return WSGIHandler()


class DjangoAsyncStack(DjangoStack):
    interface = "asgi"

    def build(self, stack: ExitStack, options: dict[str, Any]) -> Any:
        super().build(stack, options)
        return ASGIHandler()


STACKS: dict[str, type[Stack]] = {
    "flask": FlaskStack,
    "starlette": StarletteStack,
    "django": DjangoStack,
    "django-async": DjangoAsyncStack,
}

Build = Callable[..., Stack]


@pytest.fixture(autouse=True)
def _no_alf_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    _config._announced.clear()
    with override_settings(**project_settings()):
        yield


@pytest.fixture(params=list(STACKS))
def framework(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make(framework: str) -> Iterator[Build]:
    """Build the framework's stack with a token plus the given options (collector_url too)."""
    with ExitStack() as stack:

        def build(**options: Any) -> Stack:
            return STACKS[framework](stack, {"service_token": TOKEN, **options})

        yield build


@pytest.fixture
def build(make: Build, collector: Collector) -> Build:
    """Like ``make``, sending to the test collector."""

    def with_collector(**options: Any) -> Stack:
        return make(collector_url=collector.url, **options)

    return with_collector


def header(message: dict[str, Any], name: str) -> list[str]:
    return [h["value"] for h in message["headers"] if h["name"] == name]


def body_of(message: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(message[key]["text"])


def stats() -> dict[str, Any]:
    return alf_analytics.stats()


# -- where entries go, under which name -----------------------------------------------------------


def test_token_environment_and_an_endpoint_url_as_collector_url(
    make: Build, collector: Collector
) -> None:
    """A static token and environment travel on the ALF; an endpoint URL is taken as base."""
    stack = make(collector_url=collector.endpoint("1.1.0", "batch"), environment="staging")
    assert stack.send() == 200
    received_entries(collector, 1)
    (stored,) = collector.entries()
    assert (stored.service_token, stored.environment) == (TOKEN, "staging")
    assert [r.endpoint for r in collector.requests()] == ["/1.1.0/batch"]


# -- bodies ---------------------------------------------------------------------------------------


def test_max_body_bytes_caps_each_captured_body(build: Build, collector: Collector) -> None:
    stack = build(log_body=True, max_body_bytes=100)
    text = [("content-type", "text/plain")]
    stack.send("POST", "/echo", headers=text, body=b"a" * 300)
    stack.send("POST", "/echo", headers=text, body=b"b" * 100)
    cut, whole = sorted(received_entries(collector, 2), key=lambda e: -e["request"]["bodySize"])
    for side, key in ((cut["request"], "postData"), (cut["response"], "content")):
        assert (side["bodyCaptured"], side["bodySize"], body_of(side, key)) == (
            False,
            300,
            b"a" * 100,
        )
    for side, key in ((whole["request"], "postData"), (whole["response"], "content")):
        assert (side["bodyCaptured"], body_of(side, key)) == (True, b"b" * 100)


# -- redaction ------------------------------------------------------------------------------------

REDACTION_REQUEST: dict[str, Any] = {
    "method": "POST",
    "path": "/echo",
    "query": "otp=q-otp&api_key=q-key&page=2",
    "headers": [
        ("x-internal", "internal-value"),
        ("cookie", "c=cookie-value"),
        ("x-visible", "visible"),
        ("content-type", "application/json"),
    ],
    "body": JSON_BODY,
}


def test_redaction_lists_add_to_the_defaults(build: Build, collector: Collector) -> None:
    stack = build(
        log_body=True, redact_headers=["X-Internal"], redact_query=["otp"], redact_body_keys=["pin"]
    )
    stack.send(**REDACTION_REQUEST)
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert header(request, "x-internal") == [REDACTED]
    assert header(request, "cookie") == [REDACTED]  # the defaults still apply
    assert header(request, "x-visible") == ["visible"]
    assert request["url"] == f"http://{HOST}/echo?otp=%5BREDACTED%5D&api_key=%5BREDACTED%5D&page=2"
    assert [p["value"] for p in request["queryString"]] == [REDACTED, REDACTED, "2"]
    sent = json.loads(body_of(request, "postData"))
    assert sent == {
        "user": "visible",
        "password": REDACTED,
        "pin": REDACTED,
        "nested": [{"otp": "x"}],
    }
    assert json.loads(body_of(entry["response"], "content")) == sent


def test_keys_named_like_secrets_are_redacted(build: Build, collector: Collector) -> None:
    """Names outside the key lists that hold token, secret, password... are redacted in the
    query and the body (a count is kept), in every framework."""
    stack = build(log_body=True)
    body = json.dumps({"new_password": "np-secret", "max_tokens": 7}).encode()
    stack.send(
        method="POST",
        path="/echo",
        query="auth_token=q-auth-secret&page=2",
        headers=[("content-type", "application/json")],
        body=body,
    )
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert request["url"] == f"http://{HOST}/echo?auth_token=%5BREDACTED%5D&page=2"
    sent = json.loads(body_of(request, "postData"))
    assert sent == {"new_password": REDACTED, "max_tokens": 7}
    assert json.loads(body_of(entry["response"], "content")) == sent
    assert request["bodySize"] == len(body)
    shown = json.dumps(entry)
    assert "np-secret" not in shown and "q-auth-secret" not in shown


def test_default_redactions_false_applies_only_the_given_lists(
    build: Build, collector: Collector
) -> None:
    stack = build(
        log_body=True,
        redact_headers=["x-internal"],
        redact_query=["otp"],
        redact_body_keys=["pin"],
        default_redactions=False,
    )
    stack.send(**REDACTION_REQUEST)
    stack.send()
    entries = {e["request"]["url"].partition("?")[0]: e for e in received_entries(collector, 2)}
    request = entries[f"http://{HOST}/echo"]["request"]
    assert header(request, "x-internal") == [REDACTED]
    assert header(request, "cookie") == ["c=cookie-value"]
    assert request["url"] == f"http://{HOST}/echo?otp=%5BREDACTED%5D&api_key=q-key&page=2"
    sent = json.loads(body_of(request, "postData"))
    assert sent == {
        "user": "visible",
        "password": "pw-1",
        "pin": REDACTED,
        "nested": [{"otp": "x"}],
    }
    response = entries[f"http://{HOST}/"]["response"]
    assert header(response, "set-cookie") == ["sid=cookie-value; Path=/"]


def test_headers_spelled_with_underscores_are_redacted(
    build: Build, collector: Collector, framework: str
) -> None:
    """uvicorn passes ``X-Api_Key`` on as sent (gunicorn and Django drop such headers): the
    default list and ``redact_headers`` match ``_`` as ``-``."""
    stack = build(redact_headers=["x-internal"])
    stack.send(headers=[("x-api_key", "underscore-key"), ("x_internal", "underscore-internal")])
    (entry,) = received_entries(collector, 1)
    shown = json.dumps(entry)
    assert "underscore-key" not in shown and "underscore-internal" not in shown
    names = {h["name"].replace("_", "-"): h["value"] for h in entry["request"]["headers"]}
    if framework == "starlette":  # the one stack that keeps them: they are there, redacted
        assert names["x-api-key"] == names["x-internal"] == REDACTED


# -- the client's address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full", PEER), ("anonymized", "203.0.113.0"), ("none", None)],
)
def test_client_ip(build: Build, collector: Collector, mode: str, expected: str | None) -> None:
    build(client_ip=mode).send()
    (entry,) = received_entries(collector, 1)
    assert entry.get("clientIPAddress") == expected


FORWARDED = [("x-forwarded-for", "198.51.100.7, 10.0.0.3"), ("forwarded", "for=192.0.2.99")]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({}, "10.0.0.2", id="no-trusted-proxy"),
        pytest.param({"trusted_proxies": ["10.0.0.0/8"]}, "198.51.100.7", id="x-forwarded-for"),
        pytest.param(
            {"trusted_proxies": ["10.0.0.2"], "forwarded_header": "forwarded"},
            "192.0.2.99",
            id="forwarded",
        ),
        pytest.param(
            {"trusted_proxies": ["10.0.0.0/8"], "client_ip": "anonymized"},
            "198.51.100.0",
            id="anonymized-behind-proxies",
        ),
    ],
)
def test_trusted_proxies_and_forwarded_header(
    build: Build, collector: Collector, options: dict[str, Any], expected: str
) -> None:
    build(**options).send(headers=FORWARDED, peer="10.0.0.2")
    (entry,) = received_entries(collector, 1)
    assert entry["clientIPAddress"] == expected


# -- before_send ----------------------------------------------------------------------------------


def test_before_send_edits_drops_and_fails_on_the_worker_thread(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    threads: set[str] = set()

    def hook(entry: dict[str, Any]) -> dict[str, Any] | None:
        threads.add(threading.current_thread().name)
        path = entry["request"]["url"].partition(HOST)[2]
        if path == "/drop":
            return None
        if path == "/fail":
            raise RuntimeError("hook failed on purpose")
        # It sees the entry after redaction, and may redact more.
        assert header(entry["request"], "cookie") == [REDACTED]
        entry["request"]["headers"] = [
            h for h in entry["request"]["headers"] if h["name"] != "x-visible"
        ]
        return entry

    stack = build(before_send=hook)
    for path in ("/drop", "/fail", "/kept"):
        stack.send(path=path, headers=[("cookie", "c=1"), ("x-visible", "v")])
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["url"].endswith("/kept")
    assert header(entry["request"], "x-visible") == []
    dropped = stats()["dropped"]
    assert (dropped["filtered"], dropped["hook"]) == (1, 1)
    assert threading.current_thread().name not in threads and len(threads) == 1
    (logged,) = [r.getMessage() for r in caplog.records if "before_send raised" in r.getMessage()]
    # The exception's type and where it was raised, never its message (it may quote the entry).
    assert "RuntimeError at " in logged and "on purpose" not in logged


# -- delivery -------------------------------------------------------------------------------------


def test_batch_size(build: Build, collector: Collector) -> None:
    stack = build(batch_size=2, delay=60.0)
    for _ in range(4):
        stack.send()
    received_entries(collector, 4)
    assert [r.entry_count for r in collector.requests()] == [2, 2]


def test_delay_holds_a_partial_batch(build: Build, collector: Collector) -> None:
    """delay=60: nothing is sent for longer than the default delay (2 s); flush sends it."""
    build(delay=60.0).send()
    assert not collector.wait_for_requests(1, timeout=3.0)
    assert collector.requests() == []
    received_entries(collector, 1)


def test_delay_short_sends_without_a_flush(build: Build, collector: Collector) -> None:
    build(delay=0.05).send()
    assert collector.wait_for_entries(1, timeout=30.0)


def test_max_batch_bytes(build: Build, collector: Collector) -> None:
    stack = build(max_batch_bytes=2048, delay=60.0)
    for _ in range(6):
        stack.send(headers=[("x-padding", "p" * 300)])
    received_entries(collector, 6)
    records = collector.requests()
    assert len(records) >= 2
    assert all(0 < r.body_bytes <= 2048 for r in records), [r.body_bytes for r in records]


def test_queue_size_counts_what_waits_for_a_batch(build: Build, collector: Collector) -> None:
    stack = build(queue_size=2, delay=60.0)
    for _ in range(5):
        assert stack.send() == 200  # the app answers whatever the queue holds
    assert stats()["dropped"]["queue_full"] == 3
    assert len(received_entries(collector, 2)) == 2


def test_max_queue_bytes(build: Build, collector: Collector) -> None:
    stack = build(max_queue_bytes=8192, delay=60.0, log_body=True)
    stack.send()
    assert stack.send("POST", "/echo", headers=[("content-type", "text/plain")], body=b"x" * 8192)
    assert stats()["dropped"]["queue_full"] == 1
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["method"] == "GET"


class _Slow:
    """The collector's app, answering each request 0.2 s late; counts requests at once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.now = 0
        self.most = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.now += 1  # one event loop: no lock needed
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(0.2)
                await self.app(scope, receive, send)
            finally:
                self.now -= 1
        else:
            await self.app(scope, receive, send)


@pytest.mark.parametrize("inflight", [1, 3])
def test_max_inflight(make: Build, inflight: int) -> None:
    collector = Collector()
    slow = _Slow(collector.app)
    collector.app = slow  # type: ignore[assignment]
    with collector:
        stack = make(collector_url=collector.url, max_inflight=inflight, batch_size=1, delay=60.0)
        for _ in range(8):
            stack.send()
        assert alf_analytics.flush(30.0)
        assert collector.count() == 8
    assert slow.most <= inflight
    if inflight > 1:
        assert slow.most > 1  # batches did overlap: the bound above was tested


def test_timeout(make: Build) -> None:
    """A collector that never answers: timeout=0.3 and no retry settle the batch as unknown."""
    with FaultyCollector() as faulty:
        faulty.blackhole()
        stack = make(collector_url=faulty.url, timeout=0.3, retries=0)
        stack.send()
        assert not alf_analytics.flush(5.0)
        assert stats()["unknown"] == 1  # the body was written: it may have arrived


def test_retries(make: Build) -> None:
    with FaultyCollector() as faulty:
        faulty.fail(503)
        stack = make(collector_url=faulty.url, retries=2, retry_backoff=0.0)
        stack.send()
        assert not alf_analytics.flush(10.0)
        assert len(faulty.requests) == 3
        assert stats()["dropped"]["retries_exhausted"] == 1


@pytest.mark.parametrize("backoff", [0.0, 60.0])
def test_retry_backoff(make: Build, backoff: float) -> None:
    """One 503, then healthy: no backoff delivers at once; 60 s (15 s at least) waits."""
    with FaultyCollector() as faulty:
        faulty.fail(503, times=1)
        stack = make(collector_url=faulty.url, retry_backoff=backoff)
        stack.send()
        delivered = alf_analytics.flush(3.0)
        assert delivered is (backoff == 0.0)
        assert faulty.count() == (1 if delivered else 0)
        alf_analytics.close(0.0)


def test_shutdown_timeout_bounds_the_flush_at_exit(build: Build, collector: Collector) -> None:
    """shutdown_timeout=0: close() at exit gives up at once, the entry left unsent."""
    build(shutdown_timeout=0.0, delay=60.0).send()
    assert alf_analytics.close() is False  # no timeout given: the options' shutdown_timeout
    left = stats()
    assert left["queued"] + left["dropped"]["shutdown"] == 1  # not delivered: the bound held
    assert collector.count() == 0


def test_shutdown_timeout_default_flushes_at_exit(build: Build, collector: Collector) -> None:
    build(delay=60.0).send()
    assert alf_analytics.close() is True
    assert collector.count() == 1


# -- debug ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [True, False])
def test_debug_logs_each_batch_and_its_answer(
    build: Build, collector: Collector, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    caplog.set_level(logging.DEBUG, logger="alf_analytics")
    build(debug=debug).send()
    received_entries(collector, 1)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "alf_analytics" and r.levelno == logging.DEBUG and "batch " in r.getMessage()
    ]
    if debug:
        assert len(lines) == 1 and "1 entries" in lines[0] and "-> 200" in lines[0], lines
        assert TOKEN not in lines[0]
    else:
        assert lines == []


_DEBUG_SCRIPT = """
import io, logging, sys
import alf_analytics
if sys.argv[3] == "configured":
    logging.basicConfig(level=logging.WARNING)
from alf_analytics import AnalyticsWSGIMiddleware

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

middleware = AnalyticsWSGIMiddleware(
    app, service_token="debug-token-0123456789", collector_url=sys.argv[1], debug=sys.argv[2] == "1"
)
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "x", "SERVER_PORT": "80",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "HTTP_HOST": "x",
           "REMOTE_ADDR": "127.0.0.1"}
result = middleware(environ, lambda status, headers, exc_info=None: None)
b"".join(result)
result.close()
assert alf_analytics.flush(10.0)
"""


@pytest.mark.parametrize("debug", ["1", "0"])
def test_debug_lines_show_without_any_logging_setup(collector: Collector, debug: str) -> None:
    """A fresh process that configured no logging: debug=True prints its lines on stderr."""
    stderr = _run_debug_script(collector, debug, "plain")
    shown = [line for line in stderr.splitlines() if "DEBUG" in line and "batch " in line]
    if debug == "1":
        assert len(shown) == 1 and "-> 200" in shown[0], stderr
        assert "debug-token-0123456789" not in stderr
    else:
        assert stderr == ""


def test_debug_with_logging_configured_keeps_the_apps_levels(collector: Collector) -> None:
    """basicConfig(level=WARNING): no debug line, but one warning saying how to see them."""
    stderr = _run_debug_script(collector, "1", "configured")
    assert "batch " not in stderr
    hints = [line for line in stderr.splitlines() if "set it to DEBUG" in line]
    assert len(hints) == 1 and "WARNING" in hints[0], stderr


def _run_debug_script(collector: Collector, debug: str, logging_setup: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALF_")}
    done = subprocess.run(
        [sys.executable, "-c", _DEBUG_SCRIPT, collector.url, debug, logging_setup],
        capture_output=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    return done.stderr.decode()


# -- "What leaves your process by default" (README), claim by claim -------------------------------


def test_by_default_an_entry_holds_only_what_the_readme_lists(
    build: Build, collector: Collector
) -> None:
    """Method, URL with redacted query values, headers with the default redactions, status,
    sizes and timings, the socket peer (a forwarding header is not believed), the server's
    address; no body; the token and environment on the batch."""
    stack = build(environment="prod")
    stack.send(
        "POST",
        "/echo",
        query="token=t-1&page=2",
        headers=[
            ("authorization", "Bearer b-1"),
            ("x-forwarded-for", "6.6.6.6"),
            ("content-type", "application/json"),
        ],
        body=JSON_BODY,
    )
    (entry,) = received_entries(collector, 1)
    assert set(entry) == {
        "startedDateTime",
        "time",
        "request",
        "response",
        "timings",
        "clientIPAddress",
        "serverIPAddress",
    }
    assert (entry["clientIPAddress"], entry["serverIPAddress"]) == (PEER, SERVER[0])
    request, response = entry["request"], entry["response"]
    assert set(request) == {
        "method",
        "url",
        "httpVersion",
        "queryString",
        "headers",
        "headersSize",
        "bodyCaptured",
        "bodySize",
    }
    assert request["url"] == f"http://{HOST}/echo?token=%5BREDACTED%5D&page=2"
    assert header(request, "authorization") == [f"Bearer {REDACTED}"]
    assert (request["bodyCaptured"], request["bodySize"]) == (False, len(JSON_BODY))
    assert "content" not in response and response["bodyCaptured"] is False
    assert response["bodySize"] == len(JSON_BODY) and response["status"] == 200
    (alf,) = collector.alfs()
    assert_valid_alf(alf)
    assert (alf["serviceToken"], alf["environment"]) == (TOKEN, "prod")


def plain_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_by_default_entries_go_to_a_local_collector_only() -> None:
    """The default collector_url is the local collector's address (never a third party)."""
    assert DEFAULT_COLLECTOR_URL == "http://127.0.0.1:8700"
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8700))
        except OSError:
            pytest.skip("port 8700 is in use on this machine")
    with Collector(port=8700) as local:
        middleware = AnalyticsWSGIMiddleware(plain_app, service_token=TOKEN)
        assert middleware.config.collector_url == DEFAULT_COLLECTOR_URL
        call_wsgi(middleware, wsgi_environ("GET", "/", client=(PEER, 50123)))
        assert len(received_entries(local, 1)) == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"password=not-rewritten"),
        ("application/xml", b"<login><password>not-rewritten</password></login>"),
    ],
)
def test_with_log_body_text_and_xml_bodies_are_sent_as_they_are(
    build: Build, collector: Collector, content_type: str, body: bytes
) -> None:
    """log_body=True captures text and XML (allowed by default) without rewriting them: only
    JSON and form bodies are redacted (README, "What an entry holds")."""
    build(log_body=True).send("POST", "/echo", headers=[("content-type", content_type)], body=body)
    (entry,) = received_entries(collector, 1)
    assert body_of(entry["request"], "postData") == body
    assert body_of(entry["response"], "content") == body
