"""The Django middleware: settings, sync/async modes, bodies, streaming, errors, real servers.

Requests go through Django's own test clients (``Client`` runs the WSGI-style handler and
``AsyncClient`` the ASGI-style one), through ``WSGIHandler``/``ASGIHandler`` with hand-built
requests, and through gunicorn and uvicorn; every entry is read back from the real collector.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from wsgiref.util import FileWrapper

import httpx
import pytest
from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, RequestFactory, override_settings

import alf_analytics
from alf_analytics._config import ENV_VARS
from alf_analytics.collector import Collector
from alf_analytics.django import AnalyticsMiddleware

from .conftest import received_entries
from .djangoproject import project_settings, setup, views
from .djangoproject.harness import Server, call_asgi, call_wsgi, server_env
from .djangoproject.middleware import AsyncOnlyMiddleware
from .raw import HOST, asgi_scope, wsgi_environ

setup()

OURS = "alf_analytics.django.AnalyticsMiddleware"
ASYNC_ONLY = f"{AsyncOnlyMiddleware.__module__}.AsyncOnlyMiddleware"
TOKEN = "django-secret-token-0123456789"
Configure = Callable[..., None]


@pytest.fixture
def configure(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """The test project's settings, ``ALF_ANALYTICS`` aimed at the collector; call to change."""
    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    with ExitStack() as stack:

        def apply(middleware: list[str] | None = None, **options: Any) -> None:
            merged = {
                "service_token": TOKEN,
                "environment": "django-tests",
                "collector_url": collector.url,
                "log_body": True,
                # Every body, so byte-faithfulness shows; the default allow-list has its tests.
                "log_body_types": ["*/*", "text/event-stream"],
                **options,
            }
            extra = {} if middleware is None else {"MIDDLEWARE": middleware}
            stack.enter_context(override_settings(ALF_ANALYTICS=merged, **extra))

        stack.enter_context(override_settings(**project_settings()))
        views.PRODUCED.clear()
        apply()
        yield apply


def one_entry(collector: Collector) -> dict[str, Any]:
    entries = received_entries(collector, 1)
    assert len(entries) == 1, entries
    return entries[0]


def decoded(body: dict[str, Any]) -> bytes:
    assert body["encoding"] == "base64"
    return base64.b64decode(body["text"])


def headers_of(message: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["name"], h["value"]) for h in message["headers"]]


def our_instance(handler: Any) -> AnalyticsMiddleware:
    """Our middleware instance in a loaded handler's chain (Django wraps each in a function)."""
    link = handler._middleware_chain
    while link is not None:
        if isinstance(link, AnalyticsMiddleware):
            return link
        # convert_exception_to_response sets __wrapped__; asgiref adapters keep the callable.
        for attribute in ("__wrapped__", "awaitable", "func", "get_response"):
            if hasattr(link, attribute):
                link = getattr(link, attribute)
                break
        else:
            link = None
    raise AssertionError("AnalyticsMiddleware not in the chain")


def get_ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"direct", content_type="text/plain")


# -- configuration -------------------------------------------------------------------------------


def test_options_come_from_settings(collector: Collector, configure: Configure) -> None:
    """Every ALF_ANALYTICS option reaches the entry: token, environment, body cap."""
    configure(service_token="settings-token-abcdef", environment="staging", max_body_bytes=4)
    Client().post("/body", b"0123456789", content_type="application/octet-stream")
    entry = one_entry(collector)
    stored = collector.entries()[0]
    assert (stored.service_token, stored.environment) == ("settings-token-abcdef", "staging")
    assert decoded(entry["request"]["postData"]) == b"0123"
    assert decoded(entry["response"]["content"]) == b"0123"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        pytest.param({"service_token": TOKEN, "batchsize": 5}, "batchsize", id="unknown-key"),
        pytest.param({"service_token": TOKEN, "batch_size": 0}, "batch_size", id="batch-size-0"),
        pytest.param({"service_token": TOKEN, "log_body": "yes"}, "log_body", id="log-body-str"),
        pytest.param({"service_token": TOKEN, "delay": -1}, "delay", id="negative-delay"),
        pytest.param(
            {"service_token": TOKEN, "collector_url": "ftp://x"}, "collector_url", id="url-scheme"
        ),
        pytest.param(
            {"service_token": TOKEN, "redact_headers": "cookie"}, "redact_headers", id="redact-str"
        ),
        pytest.param({"service_token": TOKEN, "environment": 5}, "environment", id="env-int"),
        pytest.param({"environment": "prod"}, "service_token", id="token-missing"),
        pytest.param({"service_token": "   "}, "service_token", id="token-blank"),
        pytest.param({"service_token": 12345}, "service_token", id="token-int"),
        pytest.param(TOKEN, "ALF_ANALYTICS", id="not-a-dict"),
    ],
)
def test_bad_setting_raises_improperly_configured(
    configure: Configure, options: Any, key: str
) -> None:
    """A bad ALF_ANALYTICS raises ImproperlyConfigured naming the key, never showing the token."""
    with override_settings(ALF_ANALYTICS=options), pytest.raises(ImproperlyConfigured) as caught:
        AnalyticsMiddleware(get_ok)
    message = str(caught.value)
    assert key in message
    assert TOKEN not in message


def test_bad_setting_fails_when_handler_loads(configure: Configure) -> None:
    """Django's handler raises at construction (server start), not on a later request."""
    with override_settings(ALF_ANALYTICS={"service_token": TOKEN, "queue_size": 0}):
        with pytest.raises(ImproperlyConfigured, match="queue_size"):
            WSGIHandler()


def test_env_vars_fill_missing_settings(
    collector: Collector, configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ALF_ANALYTICS empty, token, environment, collector and log_body come from ALF_*."""
    monkeypatch.setenv("ALF_SERVICE_TOKEN", "env-token-0123456789")
    monkeypatch.setenv("ALF_ENVIRONMENT", "from-env")
    monkeypatch.setenv("ALF_COLLECTOR_URL", collector.url)
    monkeypatch.setenv("ALF_LOG_BODY", "true")
    with override_settings(ALF_ANALYTICS={}):
        Client().post("/body", b"env body", content_type="text/plain")
    entry = one_entry(collector)
    stored = collector.entries()[0]
    assert (stored.service_token, stored.environment) == ("env-token-0123456789", "from-env")
    assert decoded(entry["request"]["postData"]) == b"env body"


def test_settings_win_over_env_vars(
    collector: Collector, configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An option present in ALF_ANALYTICS is used even when its ALF_* variable is set."""
    monkeypatch.setenv("ALF_SERVICE_TOKEN", "env-token-0123456789")
    monkeypatch.setenv("ALF_ENVIRONMENT", "from-env")
    configure(service_token="settings-token-abcdef", environment="from-settings")
    Client().get("/sync")
    one_entry(collector)
    stored = collector.entries()[0]
    assert (stored.service_token, stored.environment) == ("settings-token-abcdef", "from-settings")


# -- sync and async capability -------------------------------------------------------------------


def test_sync_client_keeps_middleware_sync(collector: Collector, configure: Configure) -> None:
    """Under the sync handler the instance is sync: no coroutine marking, no adaptation."""
    client = Client()
    response = client.get("/sync")
    instance = our_instance(client.handler)
    assert instance.async_mode is False
    assert not iscoroutinefunction(instance)
    assert not iscoroutinefunction(instance.get_response)
    assert response.json() == {"view": "sync", "method": "GET"}
    assert one_entry(collector)["response"]["status"] == 200


@pytest.mark.parametrize(
    "middleware",
    [
        pytest.param([OURS], id="ours-alone"),
        pytest.param([OURS, ASYNC_ONLY], id="ours-outside-async-only"),
        pytest.param([ASYNC_ONLY, OURS], id="async-only-outside-ours"),
    ],
)
def test_async_client_runs_middleware_async(
    collector: Collector, configure: Configure, middleware: list[str]
) -> None:
    """Under the async handler, next to an async-only middleware too, ours runs async."""
    configure(middleware=middleware)
    client = AsyncClient()
    response = asyncio.run(client.get("/async"))
    instance = our_instance(client.handler)
    assert instance.async_mode is True
    assert iscoroutinefunction(instance)  # markcoroutinefunction took effect
    assert iscoroutinefunction(instance.get_response)
    assert response.json() == {"view": "async", "method": "GET"}
    entry = one_entry(collector)
    assert entry["response"]["status"] == 200
    names = [name for name, _ in headers_of(entry["response"])]
    # Ours sees the async-only middleware's header only when that one is inside ours.
    assert ("x-async-only" in names) == (middleware == [OURS, ASYNC_ONLY])


def test_sync_client_next_to_async_only_middleware(
    collector: Collector, configure: Configure
) -> None:
    """Below an async-only middleware Django hands ours an async handler; it goes async."""
    configure(middleware=[OURS, ASYNC_ONLY])
    client = Client()
    response = client.get("/sync")
    instance = our_instance(client.handler)
    assert instance.async_mode is True
    assert response["X-Async-Only"] == "seen"
    assert ("x-async-only", "seen") in headers_of(one_entry(collector)["response"])


async def _get_with_httpx(application: Any, count: int) -> list[int]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        requests = (client.get("/async", params={"sleep": "0.5"}) for _ in range(count))
        return [r.status_code for r in await asyncio.gather(*requests)]


async def _get_with_async_client(client: AsyncClient, count: int) -> list[int]:
    requests = (client.get("/async", {"sleep": "0.5"}) for _ in range(count))
    return [r.status_code for r in await asyncio.gather(*requests)]


@pytest.mark.parametrize("handler", ["ASGIHandler", "AsyncClient"])
def test_async_views_stay_concurrent(
    collector: Collector, configure: Configure, handler: str
) -> None:
    """Two concurrent requests to a 0.5 s async view take well under twice one (PITFALLS #25)."""
    if handler == "ASGIHandler":
        application = ASGIHandler()

        def run(count: int) -> list[int]:
            return asyncio.run(_get_with_httpx(application, count))

    else:
        # No per-request thread context here: a sync-only middleware would serialize requests.
        client = AsyncClient()

        def run(count: int) -> list[int]:
            return asyncio.run(_get_with_async_client(client, count))

    def timed(count: int) -> float:
        started = time.perf_counter()
        assert run(count) == [200] * count
        return time.perf_counter() - started

    timed(1)  # warm-up: URL resolver, middleware chain, thread pools
    single = timed(1)
    pair = timed(2)
    assert pair < 1.5 * single, (single, pair)
    assert len(received_entries(collector, 4)) == 4


# -- request bodies ------------------------------------------------------------------------------

MULTIPART = (
    b"--BoUnDaRy\r\n"
    b'Content-Disposition: form-data; name="title"\r\n\r\n'
    b"hello\r\n"
    b"--BoUnDaRy\r\n"
    b'Content-Disposition: form-data; name="doc"; filename="doc.bin"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
    b"\x00\x01binary\xffpayload\r\n"
    b"--BoUnDaRy--\r\n"
)
BODY_CASES = [
    pytest.param(
        "/body",
        b"raw \x00\xff bytes " * 20,
        "application/octet-stream",
        b"raw \x00\xff bytes " * 20,
        id="request.body",
    ),
    pytest.param(
        "/post",
        b"a=1&a=2&b=x+y",
        "application/x-www-form-urlencoded",
        {"a": ["1", "2"], "b": ["x y"]},
        id="request.POST",
    ),
    pytest.param(
        "/upload",
        MULTIPART,
        "multipart/form-data; boundary=BoUnDaRy",
        {"files": {"doc": "\x00\x01binary\xffpayload"}, "fields": {"title": ["hello"]}},
        id="request.FILES",
    ),
    pytest.param(
        "/read",
        b"read in chunks of seven bytes " * 10,
        "text/plain",
        b"read in chunks of seven bytes " * 10,
        id="request.read",
    ),
]


def _check_body_view(response: Any, expected: bytes | dict[str, Any]) -> None:
    assert response.status_code == 200
    if isinstance(expected, bytes):
        assert response.content == expected
    else:
        assert response.json() == expected


@pytest.mark.parametrize(("path", "raw", "content_type", "expected"), BODY_CASES)
def test_request_body_reads_work_with_capture_sync(
    collector: Collector,
    configure: Configure,
    path: str,
    raw: bytes,
    content_type: str,
    expected: Any,
) -> None:
    """Under the sync client the view reads the body its own way; the entry has the raw bytes."""
    _check_body_view(Client().post(path, raw, content_type=content_type), expected)
    request = one_entry(collector)["request"]
    assert decoded(request["postData"]) == raw
    assert request["postData"]["mimeType"] == content_type
    assert (request["bodySize"], request["bodyCaptured"]) == (len(raw), True)


@pytest.mark.parametrize(("path", "raw", "content_type", "expected"), BODY_CASES)
def test_request_body_reads_work_with_capture_async(
    collector: Collector,
    configure: Configure,
    path: str,
    raw: bytes,
    content_type: str,
    expected: Any,
) -> None:
    """Under the async client (ASGIRequest) the same reads work and the same bytes are captured."""
    response = asyncio.run(AsyncClient().post(path, raw, content_type=content_type))
    _check_body_view(response, expected)
    request = one_entry(collector)["request"]
    assert decoded(request["postData"]) == raw
    assert (request["bodySize"], request["bodyCaptured"]) == (len(raw), True)


def test_request_body_capture_is_capped(collector: Collector, configure: Configure) -> None:
    """Beyond max_body_bytes only the prefix is kept, bodySize stays exact, the view gets all."""
    configure(max_body_bytes=10)
    response = Client().post(
        "/upload", MULTIPART, content_type="multipart/form-data; boundary=BoUnDaRy"
    )
    assert response.json()["fields"] == {"title": ["hello"]}
    request = one_entry(collector)["request"]
    assert decoded(request["postData"]) == MULTIPART[:10]
    assert (request["bodySize"], request["bodyCaptured"]) == (len(MULTIPART), False)


def test_wsgi_request_without_content_length(collector: Collector, configure: Configure) -> None:
    """A WSGI POST without CONTENT_LENGTH (chunked) does not crash (PITFALLS #14)."""
    environ = wsgi_environ(
        "POST",
        "/body",
        body=b"no length given",
        headers=[("content-type", "text/plain"), ("transfer-encoding", "chunked")],
        length=False,
    )
    status, _, body = call_wsgi(WSGIHandler(), environ)
    assert status == "200 OK"
    request = one_entry(collector)["request"]
    # Django reads nothing without a length under WSGI; the entry counts what was read, and
    # an empty read is not the end of a chunked body: it was not captured.
    assert request["bodySize"] == len(body) == 0
    assert request["bodyCaptured"] is False and "postData" not in request
    assert ("content-length" not in [h["name"] for h in request["headers"]]) is True


def test_wsgi_request_body_cut_short_counts_what_crossed(
    collector: Collector, configure: Configure
) -> None:
    """A client that leaves mid-upload under WSGI (gunicorn then ends wsgi.input early):
    Django reads ``request.body`` with one sized read, which comes back short. The entry
    counts the bytes that crossed, not the Content-Length, as for a plain WSGI app."""
    environ = wsgi_environ(
        "POST",
        "/body",
        body=b"partial",
        headers=[("content-type", "text/plain"), ("content-length", "1000")],
    )
    status, _, body = call_wsgi(WSGIHandler(), environ)
    assert (status, body) == ("200 OK", b"partial")
    request = one_entry(collector)["request"]
    assert (request["bodySize"], request["bodyCaptured"]) == (7, False)


def test_asgi_client_leaving_mid_upload_is_not_recorded(
    collector: Collector, configure: Configure
) -> None:
    """Django's ASGI handler reads the whole request body before any middleware runs and
    gives up on a client that left mid-upload: such a request never reaches ours, so it
    builds no entry (README, "What an entry holds"), and the books are untouched."""
    scope = asgi_scope(
        "POST", "/body", headers=[("content-type", "text/plain"), ("content-length", "1000")]
    )
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"partial", "more_body": True},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    captured = alf_analytics.stats()["captured"]
    asyncio.run(ASGIHandler()(scope, receive, send))
    assert sent == []
    assert alf_analytics.flush(5.0) is True
    assert alf_analytics.stats()["captured"] == captured
    assert collector.count() == 0


def test_asgi_request_without_content_length(collector: Collector, configure: Configure) -> None:
    """An ASGI POST without content-length, in several body messages, is captured exactly."""
    scope = asgi_scope("POST", "/body", headers=[("content-type", "text/plain")])
    parts = [b"first part, ", b"second part, ", b"last part"]
    status, _, body = asyncio.run(call_asgi(ASGIHandler(), scope, parts))
    assert (status, body) == (200, b"".join(parts))
    request = one_entry(collector)["request"]
    assert decoded(request["postData"]) == b"".join(parts)
    assert request["bodySize"] == len(b"".join(parts))


# -- responses -----------------------------------------------------------------------------------


def test_http_response_content_captured(collector: Collector, configure: Configure) -> None:
    """An HttpResponse's content, size, status and headers are what the entry holds."""
    response = Client().get("/sync")
    entry = one_entry(collector)["response"]
    assert decoded(entry["content"]) == response.content
    assert entry["bodySize"] == len(response.content)
    assert (entry["status"], entry["statusText"]) == (200, "OK")
    assert ("content-type", "application/json") in headers_of(entry)


def test_entry_finished_at_response_close(collector: Collector, configure: Configure) -> None:
    """The entry is handed over when Django closes the response, not when the view returns."""
    middleware = AnalyticsMiddleware(get_ok)
    response = middleware(RequestFactory().get("/direct"))
    alf_analytics.flush()
    assert collector.count() == 0
    response.close()
    assert decoded(one_entry(collector)["response"]["content"]) == b"direct"


def test_streaming_response_sync_is_lazy(collector: Collector, configure: Configure) -> None:
    """A sync StreamingHttpResponse is wrapped, not read: chunks are produced as consumed."""
    response = Client().get("/stream")
    assert response.streaming and views.PRODUCED == []
    chunks = iter(response.streaming_content)
    assert next(chunks) == views.STREAM_CHUNKS[0]
    assert views.PRODUCED == views.STREAM_CHUNKS[:1]
    alf_analytics.flush()
    assert collector.count() == 0  # not finished before the response is closed
    rest = list(chunks)  # the test client closes the response after the last chunk
    assert [views.STREAM_CHUNKS[0], *rest] == views.STREAM_CHUNKS
    entry = one_entry(collector)["response"]
    assert decoded(entry["content"]) == b"".join(views.STREAM_CHUNKS)
    assert entry["bodySize"] == len(b"".join(views.STREAM_CHUNKS))


def test_streaming_response_async_is_lazy(collector: Collector, configure: Configure) -> None:
    """An async StreamingHttpResponse is wrapped by an async iterator and consumed lazily."""

    async def scenario() -> list[bytes]:
        response = await AsyncClient().get("/astream")
        assert response.streaming and response.is_async and views.PRODUCED == []
        chunks = aiter(response.streaming_content)
        first = await anext(chunks)
        assert views.PRODUCED == views.STREAM_CHUNKS[:1]
        alf_analytics.flush()
        assert collector.count() == 0
        return [first] + [chunk async for chunk in chunks]

    assert asyncio.run(scenario()) == views.STREAM_CHUNKS
    entry = one_entry(collector)["response"]
    assert decoded(entry["content"]) == b"".join(views.STREAM_CHUNKS)
    assert entry["bodySize"] == len(b"".join(views.STREAM_CHUNKS))


@pytest.mark.parametrize("log_body", [True, False])
def test_file_response_under_wsgi_handler(
    collector: Collector, configure: Configure, log_body: bool
) -> None:
    """FileResponse: wrapped and captured with log_body; else left to wsgi.file_wrapper."""
    configure(log_body=log_body)
    result = WSGIHandler()(
        wsgi_environ("GET", "/file", **{"wsgi.file_wrapper": FileWrapper}),
        lambda status, headers: None,
    )
    # Django hands file_to_stream to the server's file wrapper only if we left it in place.
    assert isinstance(result, FileWrapper) is not log_body
    try:
        body = b"".join(result)
    finally:
        result.close()
    data = views.FILE_PATH.read_bytes()
    assert body == data
    entry = one_entry(collector)["response"]
    assert entry["bodySize"] == len(data)
    if log_body:
        assert (decoded(entry["content"]), entry["bodyCaptured"]) == (data, True)
    else:
        assert ("content" not in entry, entry["bodyCaptured"]) == (True, False)


@pytest.mark.parametrize(
    ("redact", "values"),
    [
        pytest.param(None, ["[REDACTED]", "[REDACTED]"], id="redacted-by-default"),
        pytest.param(
            ["authorization"],
            ["session=s3cr3t; HttpOnly; Path=/", "theme=dark; Path=/; SameSite=Lax"],
            id="not-redacted",
        ),
    ],
)
def test_cookies_are_set_cookie_headers(
    collector: Collector, configure: Configure, redact: list[str] | None, values: list[str]
) -> None:
    """Cookies from response.set_cookie are one set-cookie header each, as Django sends them."""
    if redact is not None:
        # Only the given names: the defaults (Set-Cookie among them) switched off explicitly.
        configure(redact_headers=redact, default_redactions=False)
    Client().get("/cookies")
    headers = headers_of(one_entry(collector)["response"])
    assert [value for name, value in headers if name == "set-cookie"] == values


# -- exceptions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_view_exception_reaches_django_and_is_recorded(
    collector: Collector, configure: Configure, kind: str
) -> None:
    """A view's exception goes to Django's handling (the client re-raises it); entry is 500."""
    if kind == "sync":
        with pytest.raises(RuntimeError, match="boom from the view"):
            Client().get("/raise")
    else:
        with pytest.raises(RuntimeError, match="boom from the view"):
            asyncio.run(AsyncClient().get("/raise"))
    assert one_entry(collector)["response"]["status"] == 500


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_view_exception_becomes_django_500(
    collector: Collector, configure: Configure, kind: str
) -> None:
    """Without re-raising, Django answers 500 and the entry records that response."""
    if kind == "sync":
        response = Client(raise_request_exception=False).get("/raise")
    else:
        response = asyncio.run(AsyncClient(raise_request_exception=False).get("/raise"))
    assert response.status_code == 500
    entry = one_entry(collector)["response"]
    assert (entry["status"], decoded(entry["content"])) == (500, response.content)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_exception_through_middleware_is_reraised_unchanged(
    collector: Collector, configure: Configure, kind: str
) -> None:
    """An exception reaching our middleware itself propagates as the same object; entry is 500."""
    error = ValueError("from below")

    def raise_sync(request: HttpRequest) -> HttpResponse:
        raise error

    async def raise_async(request: HttpRequest) -> HttpResponse:
        raise error

    request = RequestFactory().get("/below")
    with pytest.raises(ValueError) as caught:
        if kind == "sync":
            AnalyticsMiddleware(raise_sync)(request)
        else:
            asyncio.run(AnalyticsMiddleware(raise_async)(request))
    assert caught.value is error
    assert one_entry(collector)["response"]["status"] == 500


def test_client_leaving_during_async_view_yields_entry(
    collector: Collector, configure: Configure
) -> None:
    """A disconnect while the async view awaits cancels it; the entry is still recorded, with
    no status (0): nothing was answered, and a 500 would count a failure the app never had."""
    scope = asgi_scope("GET", "/async", query="sleep=30")
    status, _, _ = asyncio.run(
        asyncio.wait_for(call_asgi(ASGIHandler(), scope, [b""], leave_at="request"), 10)
    )
    assert status == 0  # nothing was sent: Django cancelled the view
    entry = one_entry(collector)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (0, 0)


def test_client_leaving_mid_stream_yields_entry(collector: Collector, configure: Configure) -> None:
    """A disconnect during an endless async stream ends it; the entry counts what was sent."""
    scope = asgi_scope("GET", "/endless")
    status, _, body = asyncio.run(
        asyncio.wait_for(call_asgi(ASGIHandler(), scope, [b""], leave_at="body"), 10)
    )
    assert status == 200 and body.startswith(b"tick\n")
    response = one_entry(collector)["response"]
    assert response["status"] == 200
    assert (response["bodySize"], decoded(response["content"])) == (len(body), body)


# -- what crossed --------------------------------------------------------------------------------


async def _serve_asgi(scope: dict[str, Any], send: Callable[[dict[str, Any]], Any]) -> None:
    """Serve one request whose client never leaves (``call_asgi`` expects no failure)."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    await ASGIHandler()(scope, receive, send)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_asgi_stream_that_raises_is_recorded(
    collector: Collector, configure: Configure, kind: str
) -> None:
    """Django's ASGI handler does not close a response whose stream raised: the entry ends
    when the response is collected, with the chunk that was sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = asgi_scope("GET", "/stream-boom", query=f"kind={kind}")
    with pytest.raises(RuntimeError, match="boom mid-stream"), warnings.catch_warnings():
        # Django warns that it consumes a sync iterator under ASGI: that is the case tested.
        warnings.simplefilter("ignore")
        asyncio.run(_serve_asgi(scope, send))
    gc.collect()
    response = one_entry(collector)["response"]
    assert response["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    # Django reads a sync iterator to its end before sending: then nothing went out.
    assert body == (views.STREAM_CHUNKS[0] if kind == "async" else b"")
    assert response["bodySize"] == len(body)
    assert response["bodyCaptured"] is False  # cut mid-stream: not the whole body
    if body:
        assert decoded(response["content"]) == body
    assert alf_analytics.stats()["captured"] == 1


@pytest.mark.parametrize("path", ["/sync", "/astream"])
def test_asgi_response_the_server_refused_is_recorded_without_its_body(
    collector: Collector, configure: Configure, path: str
) -> None:
    """A server whose ``send`` raises (h11 refusing a body, a client gone): the entry is
    still made, and the body that did not go out is not counted as sent."""

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the server refused the body")

    with pytest.raises(OSError, match="refused"):
        asyncio.run(_serve_asgi(asgi_scope("GET", path), send))
    gc.collect()
    response = one_entry(collector)["response"]
    assert (response["status"], response["bodySize"]) == (200, 0)
    assert response["bodyCaptured"] is False  # not an empty body: one that did not go out
    assert "content" not in response or response["content"].get("text") in (None, "")


class _FailingWrite:
    """A WSGI server whose socket write fails at the ``fail_at``-th chunk, closing the
    iterable in a ``finally`` as gunicorn does."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.written: list[bytes] = []

    def serve(self, environ: dict[str, Any]) -> None:
        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            return self.written.append

        result = WSGIHandler()(environ, start_response)
        try:
            for index, chunk in enumerate(result):
                if index + 1 == self.fail_at:
                    raise BrokenPipeError("the client left")
                self.written.append(chunk)
        finally:
            result.close()


@pytest.mark.parametrize(("path", "fail_at"), [("/stream", 2), ("/stream", 1), ("/sync", 1)])
def test_wsgi_chunk_whose_write_failed_is_not_counted(
    collector: Collector, configure: Configure, path: str, fail_at: int
) -> None:
    server = _FailingWrite(fail_at)
    with pytest.raises(BrokenPipeError):
        server.serve(wsgi_environ("GET", path))
    response = one_entry(collector)["response"]
    sent = b"".join(server.written)
    assert response["bodySize"] == len(sent)
    assert response["bodyCaptured"] is False
    if sent:
        assert decoded(response["content"]) == sent


@pytest.mark.parametrize("fail_at", [1, 2])
def test_wsgi_async_stream_whose_write_failed_is_not_counted(
    collector: Collector, configure: Configure, fail_at: int
) -> None:
    """Under WSGI Django reads an async iterator to its end before the server writes any of
    it: a write that then fails must not leave every chunk counted as sent (and the body as
    captured whole). Which chunks crossed cannot be told, so none is counted."""
    server = _FailingWrite(fail_at)
    with pytest.raises(BrokenPipeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Django warns that it consumes the iterator whole
        server.serve(wsgi_environ("GET", "/astream"))
    response = one_entry(collector)["response"]
    assert response["bodyCaptured"] is False
    assert response["bodySize"] <= len(b"".join(server.written))


def test_wsgi_async_stream_that_went_out_is_counted_whole(
    collector: Collector, configure: Configure
) -> None:
    server = _FailingWrite(fail_at=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server.serve(wsgi_environ("GET", "/astream"))
    response = one_entry(collector)["response"]
    body = b"".join(views.STREAM_CHUNKS)
    assert b"".join(server.written) == body
    assert (response["bodySize"], response["bodyCaptured"]) == (len(body), True)
    assert decoded(response["content"]) == body


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_set_consumer_inside_a_streamed_body_names_the_consumer(
    collector: Collector, configure: Configure, server: str, kind: str
) -> None:
    """Django's handler iterates a StreamingHttpResponse after the middleware returned: a
    set_consumer() in the stream is still the request's (it used to return False)."""
    query = f"user=streamer-{kind}&kind={kind}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Django warns when it consumes an iterator whole
        if server == "wsgi":
            status, _, body = call_wsgi(
                WSGIHandler(), wsgi_environ("GET", "/stream-consumer", query=query)
            )
            assert status.startswith("200")
        else:
            scope = asgi_scope("GET", "/stream-consumer", query=query)
            code, _, body = asyncio.run(call_asgi(ASGIHandler(), scope, [b""]))
            assert code == 200
    assert body == f"{kind} stream".encode()
    headers = one_entry(collector)["request"]["headers"]
    assert {"name": "x-alf-consumer", "value": f"streamer-{kind}"} in headers


@pytest.mark.parametrize(("kind", "status", "sent"), [("sync", 200, 1), ("early", 500, 0)])
def test_wsgi_stream_that_raises_is_recorded_as_the_server_answers(
    collector: Collector, configure: Configure, kind: str, status: int, sent: int
) -> None:
    """Before its first chunk no header went out, and the server answers 500 itself."""
    server = _FailingWrite(fail_at=0)
    with pytest.raises(RuntimeError, match="boom mid-stream"):
        server.serve(wsgi_environ("GET", "/stream-boom", query=f"kind={kind}"))
    response = one_entry(collector)["response"]
    assert (response["status"], response["bodySize"]) == (status, sent * 12)


def test_stream_chunks_are_recorded_as_the_client_gets_them(
    collector: Collector, configure: Configure
) -> None:
    """Text and memoryview chunks are made bytes as Django makes them, for the count and the
    capture alike (text once broke the capture)."""
    status, _, body = call_wsgi(WSGIHandler(), wsgi_environ("GET", "/stream-mixed"))
    assert (status, body) == ("200 OK", "caf\u00e9 view bytes".encode())
    response = one_entry(collector)["response"]
    assert (response["bodySize"], decoded(response["content"])) == (len(body), body)


def test_wsgi_path_without_raw_uri_keeps_its_utf8_bytes(
    collector: Collector, configure: Configure
) -> None:
    """runserver and wsgiref give no RAW_URI; WSGIRequest replaces PATH_INFO with decoded
    text, which must not be read back as Latin-1."""
    environ = wsgi_environ("GET", "/caf\u00c3\u00a9", query="t=1")  # PEP 3333: UTF-8 as Latin-1
    del environ["RAW_URI"]
    call_wsgi(WSGIHandler(), environ)
    assert one_entry(collector)["request"]["url"] == "http://api.example.test/caf%C3%A9?t=1"


def test_asgi_headers_are_the_wire_headers(collector: Collector, configure: Configure) -> None:
    """Under ASGI the entry's headers come from the scope, as sent: repeats kept apart, and an
    underscore name (which Django's META leaves out) recorded and redacted."""
    headers = [("x-rep", "a"), ("x-rep", "b"), ("x-api_key", "SECRETU"), ("accept", "x/y")]
    scope = asgi_scope("GET", "/sync", headers=headers)
    status, _, _ = asyncio.run(call_asgi(ASGIHandler(), scope, [b""]))
    assert status == 200
    request = one_entry(collector)["request"]
    pairs = headers_of(request)
    assert [v for n, v in pairs if n == "x-rep"] == ["a", "b"]
    assert ("x-api_key", "[REDACTED]") in pairs
    wire = sum(len(n) + len(v) + 4 for n, v in [("host", HOST), *headers])
    request_line = len("GET /sync HTTP/1.1\r\n")
    assert request["headersSize"] == request_line + wire + 2


# -- real servers --------------------------------------------------------------------------------


def _exercise(server: Server, stream_path: str) -> dict[str, httpx.Response]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return {
            "/sync": client.get("/sync"),
            "/async": client.get("/async"),
            stream_path: client.get(stream_path),
            "/upload": client.post(
                "/upload",
                content=MULTIPART,
                headers={"content-type": "multipart/form-data; boundary=BoUnDaRy"},
            ),
            "/file": client.get("/file"),
            # A generator body goes out chunked, without Content-Length (PITFALLS #14).
            "/body": client.post("/body", content=iter([b"chunked ", b"body"])),
        }


def _check_server_entries(collector: Collector, responses: dict[str, httpx.Response]) -> None:
    entries = received_entries(collector, len(responses) + 1)
    assert len(entries) == len(responses) + 1  # and the readiness probe, first
    by_path = {httpx.URL(e["request"]["url"]).path: e for e in entries[1:]}
    assert sorted(by_path) == sorted(responses)
    for path, response in responses.items():
        assert response.status_code == 200, (path, response.text)
        recorded = by_path[path]["response"]
        assert (recorded["status"], recorded["bodySize"]) == (200, len(response.content)), path
        content = decoded(recorded["content"]) if "content" in recorded else b""
        assert content == response.content, path
    assert responses["/file"].content == views.FILE_PATH.read_bytes()
    assert responses["/upload"].json() == {
        "files": {"doc": "\x00\x01binary\xffpayload"},
        "fields": {"title": ["hello"]},
    }
    upload = by_path["/upload"]["request"]
    assert (upload["bodySize"], decoded(upload["postData"])) == (len(MULTIPART), MULTIPART)
    # Chunked: the entry counts exactly what Django read, which the view echoes.
    assert by_path["/body"]["request"]["bodySize"] == len(responses["/body"].content)
    groups = {(s.service_token, s.environment) for s in collector.entries()}
    assert groups == {("django-project-token", "django-project")}


GUNICORN = ["gunicorn", "--bind", "fd://{fd}", "--workers", "1", "--graceful-timeout", "10"]
UVICORN = ["uvicorn", "--fd", "{fd}", "--lifespan", "on", "--no-access-log"]


@pytest.mark.slow
def test_django_under_gunicorn(collector: Collector) -> None:
    """Django under gunicorn (WSGI): every exchange arrives, schema-valid, flushed at SIGTERM."""
    server = Server([*GUNICORN, "tests.djangoproject.wsgi:application"], server_env(collector.url))
    try:
        server.wait_ready()
        responses = _exercise(server, "/stream")
        assert collector.count() == 0  # delay=60: only the exit flush can deliver them
        assert server.stop() == 0, server.output()
        _check_server_entries(collector, responses)
        assert responses["/stream"].content == b"".join(views.STREAM_CHUNKS)
    finally:
        server.close()


@contextmanager
def _under_uvicorn(collector: Collector) -> Iterator[Server]:
    """The test project under uvicorn, ready, its batches sent after 0.1 s; stopped after."""
    env = {**server_env(collector.url), "DJANGOPROJECT_ALF_DELAY": "0.1"}
    server = Server([*UVICORN, "tests.djangoproject.asgi:application"], env)
    try:
        server.wait_ready()
        yield server
        server.stop()  # uvicorn re-raises SIGTERM after its graceful shutdown
    finally:
        server.close()


@pytest.mark.slow
def test_django_under_uvicorn(collector: Collector) -> None:
    """Django under uvicorn (ASGI): every exchange arrives schema-valid while it serves."""
    with _under_uvicorn(collector) as server:
        responses = _exercise(server, "/astream")
        _check_server_entries(collector, responses)
        assert responses["/astream"].content == b"".join(views.STREAM_CHUNKS)
        assert responses["/body"].content == b"chunked body"


@pytest.mark.slow
def test_django_under_uvicorn_records_a_stream_that_raised(collector: Collector) -> None:
    """Under a real server, the response Django never closed is still recorded, soon."""
    with _under_uvicorn(collector) as server, httpx.Client(timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # uvicorn cuts the stream
            client.get(server.url + "/stream-boom", params={"kind": "async"})
        client.get(server.url + "/sync")
        entries = received_entries(collector, 3, timeout=15)  # wait_ready's /sync too
        [boom] = [e for e in entries if "/stream-boom" in e["request"]["url"]]
        assert boom["response"]["status"] == 200
        assert boom["response"]["bodySize"] == len(views.STREAM_CHUNKS[0])


@pytest.mark.slow
def test_django_under_uvicorn_flushes_at_sigterm(collector: Collector) -> None:
    """Entries still queued when uvicorn gets SIGTERM reach the collector (FlushOnShutdown)."""
    server = Server([*UVICORN, "tests.djangoproject.asgi:application"], server_env(collector.url))
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/sync").status_code == 200
        server.stop()
        assert len(received_entries(collector, 2, timeout=3.0)) == 2
    finally:
        server.close()
