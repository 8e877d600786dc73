"""End to end: no secret a request carried leaves the process, in any framework.

Each framework (Flask behind :class:`AnalyticsWSGIMiddleware`, Starlette and FastAPI behind
:class:`AnalyticsASGIMiddleware`, Django under its ``WSGIHandler`` and its ``ASGIHandler``) runs
with the default options plus ``log_body=True`` and ``debug=True`` and answers the same set of
requests, each carrying unique secrets in every place a secret travels: query parameters,
JSON and form bodies (nested, in arrays, cut at ``max_body_bytes``, unparsable), request and
response headers (``Authorization`` Bearer and Basic, ``Cookie``, ``X-Api-Key``, a custom
``X-My-Secret-Token``, ``Set-Cookie``, a token header), a JSON response with a secret key (also
gzip-compressed), a redirect to an OAuth callback, userinfo in the ``Host`` header, in an
absolute-form request target and in a ``Referer``.

The agent sends to a real collector over loopback. The collector's ASGI app is wrapped in
:class:`RawCapture`, which records every request exactly as uvicorn handed it over (headers
and body bytes); the bodies are decompressed and scanned byte for byte for every secret, as
sent, URL-encoded, JSON-escaped and base64-encoded at each of the three alignments (a secret
inside a base64 body or a Basic credential shows only in that form). Every log record of the
process at DEBUG (the agent's, the collector's, uvicorn's and httpx's) is scanned too.

The test can fail both ways: the same requests with ``default_redactions=False`` must show
exactly the secrets the default lists protect (proving the scan sees them), and the
non-secret values next to the secrets (other query parameters, body fields, header names)
must be there in either mode. Every ALF object received validates against the 1.1.0 schema.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import secrets
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import re_path
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from flask import Flask
from flask import Response as FlaskResponse
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

import alf_analytics
from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware
from alf_analytics._config import ENV_VARS, REDACTED, make_config
from alf_analytics._net import escape
from alf_analytics._redact import Redactor
from alf_analytics.collector import Collector

from .conftest import assert_valid_batch
from .djangoproject import project_settings, setup
from .djangoproject.harness import call_asgi, call_wsgi
from .raw import HOST, asgi_scope, wsgi_environ

setup()

TOKEN = "privacy-e2e-service-token-" + secrets.token_hex(8)
MAX_BODY = 65_536  # the default max_body_bytes


# -- the secrets -----------------------------------------------------------------------------


@dataclass
class Secret:
    """One secret value a request carries, and what protects it."""

    label: str
    value: str
    #: True: only a default redaction list hides it (seen with default_redactions=False).
    #: False: it is left out whatever the lists say (a body cut at max_body_bytes or that
    #: does not parse, userinfo in a URL or in the Host header).
    by_default_list: bool = True


@dataclass
class Secrets:
    items: dict[str, Secret] = field(default_factory=dict)

    def new(self, label: str, *, by_default_list: bool = True, extra: str = "") -> str:
        """A unique value (letters and digits, then ``extra`` to exercise encodings)."""
        value = f"SeCrEt{label.replace('_', '').replace('-', '')}{secrets.token_hex(6)}{extra}"
        self.items[label] = Secret(label, value, by_default_list)
        return value


def forms(value: str) -> set[bytes]:
    """Every way the secret could show in a JSON body or a log line."""
    raw = value.encode("utf-8")
    shown = {
        raw,
        quote(value, safe="").encode(),
        quote_plus(value).encode(),
        json.dumps(value)[1:-1].encode(),  # \u escapes of non-ASCII
        json.dumps(value, ensure_ascii=False)[1:-1].encode(),
    }
    for offset in range(3):
        # Base64 of the secret at each alignment inside a longer base64 text: the groups
        # that mix in neighbouring bytes are cut off at both ends.
        encoded = base64.b64encode(b"\0" * offset + raw)
        shown.add(encoded[4 if offset else 0 : -4])
    return {form for form in shown if len(form) >= 12}


def found(secret: str, haystack: bytes) -> bool:
    return any(form in haystack for form in forms(secret))


# -- what the apps answer (the same everywhere) ------------------------------------------------


@dataclass
class Plan:
    """The requests sent and the responses given, with their secrets."""

    secrets: Secrets
    responses: dict[str, tuple[int, list[tuple[str, str]], bytes]]
    requests: list[dict[str, Any]]


def make_plan() -> Plan:
    s = Secrets()
    big_filler = "x" * (MAX_BODY + 4096)
    gzip_body = gzip.compress(
        json.dumps({"password": s.new("gzip-response-password"), "kept": "visible-gz"}).encode()
    )
    responses: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
        "/items": (
            200,
            [
                ("Content-Type", "application/json"),
                ("Set-Cookie", f"sid={s.new('set-cookie')}; Path=/; HttpOnly"),
                ("X-Refresh-Token", s.new("response-token-header")),
                ("X-Visible-Response", "visible-response-header"),
            ],
            json.dumps(
                {"access_token": s.new("response-access-token"), "user": "visible-user"}
            ).encode(),
        ),
        "/login": (
            200,
            [("Content-Type", "application/json")],
            json.dumps(
                {
                    "id_token": s.new("response-id-token"),
                    "sessions": [{"refresh_token": s.new("response-nested-refresh")}],
                    "status": "visible-ok",
                }
            ).encode(),
        ),
        "/form": (200, [("Content-Type", "text/plain")], b"visible-form-reply"),
        "/big": (
            200,
            [("Content-Type", "application/json")],
            json.dumps(
                {"secret": s.new("big-response", by_default_list=False), "filler": big_filler}
            ).encode(),
        ),
        "/broken": (
            200,
            [("Content-Type", "application/json")],
            b'{"note": "' + s.new("broken-response", by_default_list=False).encode() + b'", oops',
        ),
        "/redirect": (
            302,
            [
                (
                    "Location",
                    "https://app.example.test/callback?code="
                    + s.new("location-code")
                    + "&state=visible-state#access_token="
                    + s.new("location-fragment-token")
                    + "&expires_in=visible-3600",
                ),
                ("Content-Type", "text/plain"),
            ],
            b"",
        ),
        "/gzip": (
            200,
            [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            gzip_body,
        ),
    }
    basic = base64.b64encode(f"visible-basic-user:{s.new('basic-password')}".encode()).decode()
    query = "&".join(
        [
            f"api_key={s.new('query-api_key')}",
            f"token={s.new('query-token')}",
            # '+', '/' and a non-ASCII letter, percent-encoded as a client sends them.
            f"password={quote(s.new('query-password', extra='+/=ö'), safe='')}",
            f"access_token={s.new('query-access_token')}",
            f"sig={s.new('query-sig')}",
            f"API-KEY={s.new('query-api-key-spelling')}",
            f"refresh_token={s.new('query-refresh_token')}",
            f"client_secret={s.new('query-client_secret')}",
            f"X-Amz-Signature={s.new('query-x-amz-signature')}",
            f"X-Amz-Security-Token={s.new('query-x-amz-security-token')}",
            f"user%5Bpassword%5D={s.new('query-bracketed-password')}",
            f"api_key[]={s.new('query-bracketed-list')}",
            # Not in the key list, but named like a secret (substrings of the names).
            f"auth_token={s.new('query-auth_token')}",
            f"session_id={s.new('query-session_id')}",
            "page=2",
            "q=visible-query-value",
        ]
    )
    login = {
        "user": "visible-login-user",
        "password": s.new("json-password", extra=' "quoted" ö'),
        "items": [{"id": 1, "token": s.new("json-nested-token")}, {"id": 2, "label": "visible-2"}],
        "payment": {"card_number": s.new("json-card-number"), "currency": "visible-eur"},
        "new_password": s.new("json-new-password"),
        "settings": {"x-api-key": s.new("json-x-api-key"), "max_tokens": 512},
        "apiTokens": [s.new("json-api-tokens-0"), s.new("json-api-tokens-1")],
    }
    form_password = s.new("form-password", extra="+&=ö")
    requests = [
        {
            "method": "GET",
            "path": "/items",
            "query": query,
            "headers": [
                ("authorization", f"Bearer {s.new('bearer')}"),
                ("cookie", f"session={s.new('cookie')}; theme=visible-theme"),
                ("x-api-key", s.new("x-api-key")),
                ("x-auth-token", s.new("x-auth-token")),
                ("x-my-secret-token", s.new("x-my-secret-token")),
                ("x-request-id", "visible-request-id"),
                (
                    "referer",
                    f"https://visible-ref-user:{s.new('referer-userinfo', by_default_list=False)}"
                    f"@app.example.test/page?token={s.new('referer-query-token')}"
                    "&tab=visible-tab",
                ),
            ],
            "body": b"",
        },
        {
            "method": "POST",
            "path": "/login",
            "query": "",
            "headers": [
                ("authorization", f"Basic {basic}"),
                ("content-type", "application/json"),
            ],
            "body": json.dumps(login).encode(),
        },
        {
            "method": "POST",
            "path": "/form",
            "query": "",
            "headers": [("content-type", "application/x-www-form-urlencoded")],
            "body": (
                f"user=visible-form-user&password={quote_plus(form_password)}&remember=1"
                f"&user[token]={s.new('form-bracketed-token')}"
            ).encode(),
        },
        {
            "method": "POST",
            "path": "/big",
            "query": "",
            "headers": [("content-type", "application/json")],
            "body": json.dumps(
                {"password": s.new("big-request", by_default_list=False), "filler": big_filler}
            ).encode(),
        },
        {
            "method": "POST",
            "path": "/broken",
            "query": "",
            "headers": [("content-type", "application/json")],
            "body": b'{"password": "'
            + s.new("broken-request", by_default_list=False).encode()
            + b'", "a": ',
        },
        {"method": "GET", "path": "/redirect", "query": "", "headers": [], "body": b""},
        {"method": "GET", "path": "/gzip", "query": "", "headers": [], "body": b""},
        {
            # Userinfo in an absolute-form request target (RFC 9112 3.2.2), as uvicorn's h11
            # protocol passes it on in raw_path and path, and gunicorn in RAW_URI.
            "method": "GET",
            "path": "/abs/path",
            "target": f"http://visible-abs-user:{s.new('target-userinfo', by_default_list=False)}"
            f"@{HOST}/abs/path",
            "query": "page=3",
            "headers": [],
            "body": b"",
        },
        {
            "method": "GET",
            "path": "/",
            "query": "",
            "host": f"visible-host-user:{s.new('host-userinfo', by_default_list=False)}@{HOST}",
            "headers": [],
            "body": b"",
        },
    ]
    return Plan(s, responses, requests)


PLAN = make_plan()


def answer(path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return PLAN.responses.get(path, (200, [("Content-Type", "text/plain")], b"ok"))


# -- the apps ----------------------------------------------------------------------------------


def flask_app() -> Flask:
    app = Flask("privacy")

    @app.route("/", defaults={"rest": ""}, methods=["GET", "POST"])
    @app.route("/<path:rest>", methods=["GET", "POST"])
    def view(rest: str) -> FlaskResponse:
        flask_request.get_data()
        status, headers, body = answer(flask_request.path)
        return FlaskResponse(body, status=status, headers=headers)

    return app


async def _starlette_view(request: StarletteRequest) -> StarletteResponse:
    await request.body()
    status, headers, body = answer(request.url.path)
    response = StarletteResponse(body, status_code=status)
    response.raw_headers = [
        *[(n.lower().encode(), v.encode()) for n, v in headers],
        (b"content-length", str(len(body)).encode()),
    ]
    return response


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/{rest:path}", _starlette_view, methods=["GET", "POST"])])


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.api_route("/{rest:path}", methods=["GET", "POST"])
    async def view(request: FastAPIRequest, rest: str) -> StarletteResponse:
        return await _starlette_view(request)

    return app


def _django_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    request.body  # noqa: B018 - read it, as a view does
    status, headers, body = answer(request.path)
    response = HttpResponse(body, status=status)
    for name, value in headers:
        if name == "Set-Cookie":
            response.cookies.load(value)  # as set_cookie() does: sent from response.cookies
        else:
            response[name] = value
    return response


class DjangoURLs:
    """The URLconf (``ROOT_URLCONF`` may be any object with ``urlpatterns``)."""

    urlpatterns = [re_path(r"^(?P<rest>.*)$", _django_view)]


# -- raw requests, one form per interface ------------------------------------------------------


def environ_of(request: dict[str, Any]) -> dict[str, Any]:
    """The request as a WSGI server (gunicorn) presents it."""
    return wsgi_environ(request["method"], request["path"], **_parts(request))


def scope_of(request: dict[str, Any]) -> dict[str, Any]:
    """The request as uvicorn (h11) presents it: an absolute-form target stays in the path."""
    return asgi_scope(request["method"], request["path"], **_parts(request))


def _parts(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": request["query"],
        "headers": request["headers"],
        "body": request["body"],
        "host": request.get("host", HOST),
        "target": request.get("target"),
    }


def run_wsgi(app: Any) -> None:
    for request in PLAN.requests:
        status, _, body = call_wsgi(app, environ_of(request))
        expected = answer(request["path"])
        assert int(status.split()[0]) == expected[0], (request["path"], status)


def run_asgi(app: Any) -> None:
    async def all_requests() -> None:
        for request in PLAN.requests:
            body = request["body"]
            parts = [body[: len(body) // 2], body[len(body) // 2 :]] if body else [b""]
            status, _, _ = await call_asgi(app, scope_of(request), parts)
            if not request.get("target"):
                assert status == answer(request["path"])[0], (request["path"], status)

    asyncio.run(all_requests())


Sender = Callable[[dict[str, Any]], None]


def send_flask(options: dict[str, Any]) -> None:
    app = flask_app()
    app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    run_wsgi(app)


def send_starlette(options: dict[str, Any]) -> None:
    run_asgi(AnalyticsASGIMiddleware(starlette_app(), **options))


def send_fastapi(options: dict[str, Any]) -> None:
    app = fastapi_app()
    app.add_middleware(AnalyticsASGIMiddleware, **options)
    run_asgi(app)


def send_django_wsgi(options: dict[str, Any]) -> None:
    with override_settings(ALF_ANALYTICS=options, ROOT_URLCONF=DjangoURLs):
        run_wsgi(WSGIHandler())


def send_django_asgi(options: dict[str, Any]) -> None:
    with override_settings(ALF_ANALYTICS=options, ROOT_URLCONF=DjangoURLs):
        run_asgi(ASGIHandler())


SENDERS: dict[str, Sender] = {
    "flask": send_flask,
    "starlette": send_starlette,
    "fastapi": send_fastapi,
    "django-wsgi": send_django_wsgi,
    "django-asgi": send_django_asgi,
}


# -- what the collector received, as it arrived ------------------------------------------------


@dataclass
class RawRequest:
    path: str
    headers: list[tuple[bytes, bytes]]
    wire: bytes

    def body(self) -> bytes:
        """The body decompressed (gzip, deflate), as the collector reads it."""
        coding = b""
        for name, value in self.headers:
            if name.lower() == b"content-encoding":
                coding = value.strip().lower()
        if coding in (b"", b"identity"):
            return self.wire
        if coding in (b"gzip", b"x-gzip"):
            return gzip.decompress(self.wire)
        if coding == b"deflate":
            return zlib.decompress(self.wire)
        raise AssertionError(f"unexpected Content-Encoding {coding!r}")

    def raw(self) -> bytes:
        """Everything scanned: the header lines and the decompressed body."""
        lines = b"".join(n + b": " + v + b"\r\n" for n, v in self.headers)
        return lines + b"\r\n" + self.body()


class RawCapture:
    """An ASGI wrapper of the collector's app that records every request exactly as received."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received: list[RawRequest] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # Recorded before the app answers: once the agent has its answer, the
                    # request is in the list.
                    with self._lock:
                        self.received.append(
                            RawRequest(scope["path"], list(scope["headers"]), b"".join(chunks))
                        )
            return message

        await self.app(scope, recording, send)


@pytest.fixture
def capture() -> Iterator[tuple[Collector, RawCapture]]:
    """A real collector under uvicorn (its own logs at DEBUG too) behind a raw recorder."""
    collector = Collector(
        server_options={"log_config": None, "log_level": "trace", "access_log": True}
    )
    recorder = RawCapture(collector.app)
    # Collector.start() serves collector.app: the recorder sits between uvicorn and the app.
    collector.app = recorder  # type: ignore[assignment]
    with collector:
        yield collector, recorder


# -- every log record at DEBUG -----------------------------------------------------------------


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self._seen: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self._seen:  # the same record reaches several of our handlers
            return
        self._seen.add(id(record))
        self.records.append(record)
        # The formatted line (traceback included) and the raw arguments, in case a handler
        # of the user's prints them differently.
        self.lines.append(f"{self.format(record)} {record.args!r} {record.msg!r}")


#: Loggers whose propagation uvicorn may have turned off (its dictConfig, from other tests).
_LOGGERS = ("", "alf_analytics", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore")
#: The host framework's own lines, not ours: Django logs the path of each 4xx (an
#: absolute-form target is no path it can route), as it would without us.
_NOT_OURS = ("django.request",)


@contextmanager
def every_log_record() -> Iterator[_Everything]:
    handler = _Everything()
    previous = {}
    for name in _LOGGERS:
        log = logging.getLogger(name)
        previous[name] = log.level
        log.setLevel(logging.DEBUG)
        log.addHandler(handler)
    try:
        yield handler
    finally:
        for name in _LOGGERS:
            log = logging.getLogger(name)
            log.removeHandler(handler)
            log.setLevel(previous[name])


@pytest.fixture(autouse=True)
def _no_alf_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    with override_settings(**project_settings()):
        yield


# -- the scan ----------------------------------------------------------------------------------


@dataclass
class Seen:
    """What left the process: the collector's raw requests, the entries, the log lines."""

    raw: list[bytes]
    alfs: list[dict[str, Any]]
    logs: list[str]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [e for alf in self.alfs for e in alf["har"]["log"]["entries"]]

    def outside_service_token_field(self) -> bytes:
        """The raw bodies with each ALF's ``"serviceToken":"..."`` member taken out."""
        member = b'"serviceToken":' + json.dumps(TOKEN).encode()
        return b"\n".join(raw.replace(member, b"") for raw in self.raw)

    def decoded_bodies(self) -> bytes:
        """Every captured body decoded from base64 (a second, independent look)."""
        out = []
        for entry in self.entries:
            for side, key in ((entry["request"], "postData"), (entry["response"], "content")):
                if key in side:
                    out.append(base64.b64decode(side[key]["text"]))
        return b"\n".join(out)


def send_and_capture(framework: str, capture: tuple[Collector, RawCapture], **extra: Any) -> Seen:
    collector, recorder = capture
    options = {
        "service_token": TOKEN,
        "collector_url": collector.url,
        "log_body": True,
        "debug": True,
        **extra,
    }
    with every_log_record() as logs:
        SENDERS[framework](options)
        assert alf_analytics.flush(10.0)
        assert collector.wait_for_entries(len(PLAN.requests))
        alf_analytics.close(5.0)
    raw: list[bytes] = []
    alfs: list[dict[str, Any]] = []
    batches = [r for r in recorder.received if r.path.endswith("/batch")]
    assert batches and len(batches) == len(recorder.received), [r.path for r in recorder.received]
    for request in batches:
        raw.append(request.raw())
        payload = json.loads(request.body())
        assert_valid_batch(payload)
        alfs.extend(payload)
    lines = [
        line
        for record, line in zip(logs.records, logs.lines, strict=True)
        if record.name not in _NOT_OURS
    ]
    # debug=True was in force: the batches and the collector's answers were logged.
    assert any("batch" in line and "-> 200" in line for line in lines), lines
    return Seen(raw, alfs, lines)


def leaked(seen: Seen) -> dict[str, list[str]]:
    """Secret label -> where it was found."""
    raw = seen.outside_service_token_field()
    bodies = seen.decoded_bodies()
    logs = "\n".join(seen.logs).encode("utf-8", "backslashreplace")
    where: dict[str, list[str]] = {}
    for secret in PLAN.secrets.items.values():
        places = [
            name
            for name, haystack in (("collector", raw), ("bodies", bodies), ("logs", logs))
            if found(secret.value, haystack)
        ]
        if places:
            where[secret.label] = places
    return where


def header_values(message: dict[str, Any], name: str) -> list[str]:
    return [h["value"] for h in message["headers"] if h["name"] == name]


def entry_for(seen: Seen, path: str) -> dict[str, Any]:
    matches = [e for e in seen.entries if e["request"]["url"].split("?")[0].endswith(path)]
    assert len(matches) == 1, [e["request"]["url"] for e in seen.entries]
    return matches[0]


def body_of(message: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(message[key]["text"])


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", list(SENDERS))
def test_no_secret_leaves_the_process(
    framework: str, capture: tuple[Collector, RawCapture]
) -> None:
    seen = send_and_capture(framework, capture)
    assert leaked(seen) == {}
    # The service token: in each ALF's serviceToken and nowhere else, never in a log line.
    assert TOKEN.encode() not in seen.outside_service_token_field()
    assert all(alf["serviceToken"] == TOKEN for alf in seen.alfs)
    assert not [line for line in seen.logs if TOKEN in line]
    assert len(seen.entries) == len(PLAN.requests)

    # What is not secret is still there, so the test fails if redaction took too much.
    items = entry_for(seen, "/items")
    request = items["request"]
    assert request["url"].startswith(f"http://{HOST}/items?api_key=%5BREDACTED%5D&token=")
    assert request["url"].endswith("&page=2&q=visible-query-value")
    pairs = {p["name"]: p["value"] for p in request["queryString"]}
    assert pairs["page"] == "2" and pairs["q"] == "visible-query-value"
    assert pairs["api_key"] == pairs["API-KEY"] == pairs["password"] == REDACTED
    assert pairs["auth_token"] == pairs["session_id"] == REDACTED
    assert header_values(request, "authorization") == [f"Bearer {REDACTED}"]
    for name in ("cookie", "x-api-key", "x-auth-token", "x-my-secret-token"):
        assert header_values(request, name) == [REDACTED], name
    assert header_values(request, "x-request-id") == ["visible-request-id"]
    (referer,) = header_values(request, "referer")
    assert "app.example.test/page?" in referer and referer.endswith("&tab=visible-tab")
    response = items["response"]
    assert header_values(response, "set-cookie") == [REDACTED]
    assert header_values(response, "x-refresh-token") == [REDACTED]
    assert header_values(response, "x-visible-response") == ["visible-response-header"]
    assert json.loads(body_of(response, "content")) == {
        "access_token": REDACTED,
        "user": "visible-user",
    }

    login = entry_for(seen, "/login")["request"]
    assert header_values(login, "authorization") == [f"Basic {REDACTED}"]
    document = json.loads(body_of(login, "postData"))
    assert document["user"] == "visible-login-user" and document["password"] == REDACTED
    assert document["items"] == [{"id": 1, "token": REDACTED}, {"id": 2, "label": "visible-2"}]
    assert document["payment"] == {"card_number": REDACTED, "currency": "visible-eur"}
    # Keys named like secrets lose a string or array value; a count is kept.
    assert document["new_password"] == document["apiTokens"] == REDACTED
    assert document["settings"] == {"x-api-key": REDACTED, "max_tokens": 512}
    assert login["bodySize"] == len(PLAN.requests[1]["body"])  # the real size

    form = entry_for(seen, "/form")["request"]
    assert body_of(form, "postData") == (
        b"user=visible-form-user&password=%5BREDACTED%5D&remember=1&user[token]=%5BREDACTED%5D"
    )

    for path in ("/big", "/broken"):
        entry = entry_for(seen, path)
        for side, key in ((entry["request"], "postData"), (entry["response"], "content")):
            assert key not in side and side["bodyCaptured"] is False, (path, key)
            assert side["bodySize"] > 0

    redirect = entry_for(seen, "/redirect")["response"]
    (location,) = header_values(redirect, "location")
    assert location.startswith("https://app.example.test/callback?code=")
    assert location.endswith(
        "&state=visible-state#access_token=%5BREDACTED%5D&expires_in=visible-3600"
    )

    gzipped = entry_for(seen, "/gzip")["response"]
    assert json.loads(body_of(gzipped, "content")) == {"password": REDACTED, "kept": "visible-gz"}

    absolute = entry_for(seen, "/abs/path")["request"]
    assert absolute["url"] == f"http://{HOST}/abs/path?page=3"

    host = next(e for e in seen.entries if header_values(e["request"], "host") != [HOST])
    (host_value,) = header_values(host["request"], "host")
    assert host_value.endswith(f"@{HOST}") and host["request"]["url"] == "http://invalid/"


@pytest.mark.parametrize("framework", list(SENDERS))
def test_the_scan_finds_what_the_default_lists_protect(
    framework: str, capture: tuple[Collector, RawCapture]
) -> None:
    """With default_redactions=False the same requests show exactly the secrets the default
    lists hide: the scan sees them (in each of their encodings), and what is left out for
    other reasons (a body cut or unparsable, userinfo, URLs in headers) stays out."""
    seen = send_and_capture(framework, capture, default_redactions=False)
    expected = {s.label for s in PLAN.secrets.items.values() if s.by_default_list}
    assert set(leaked(seen)) == expected
    assert TOKEN.encode() not in seen.outside_service_token_field()
    assert not [line for line in seen.logs if TOKEN in line]


def test_forms_cover_every_encoding() -> None:
    """The scan's own check: each encoding of a secret is found inside a larger text."""
    value = "SeCrEtxyz0123456789+/=ö"
    around = b"prefix-" + b"%s" + b"-suffix"
    for form in (
        value.encode(),
        quote(value, safe="").encode(),
        quote_plus(value).encode(),
        json.dumps(value).encode(),
    ):
        assert found(value, around.replace(b"%s", form)), form
    for pad in range(3):
        text = base64.b64encode(b"x" * pad + b"user:" + value.encode() + b"!" * pad)
        assert found(value, text), pad
    assert not found(value, b"SeCrEtxyz012345 and nothing else")


# -- the rules behind the fixes, one value at a time --------------------------------------------

_IN_URL = "%5BREDACTED%5D"


@pytest.mark.parametrize(
    ("name", "value", "recorded"),
    [
        pytest.param(
            "referer",
            "https://u:p@ss@app.test/x?token=a&tab=1#frag",
            f"https://{_IN_URL}@app.test/x?token={_IN_URL}&tab=1#frag",
            id="userinfo-with-a-raw-at-query-and-fragment",
        ),
        pytest.param(
            "location",
            "/callback?code=abc&state=s&code=def",
            f"/callback?code={_IN_URL}&state=s&code={_IN_URL}",
            id="relative-redirect-repeats",
        ),
        pytest.param(
            "location", "/cb?Refresh%5FToken=abc", f"/cb?Refresh%5FToken={_IN_URL}", id="escaped"
        ),
        pytest.param(
            "location",
            "https://app.test/cb#access_token=abc&expires_in=3600&state=s",
            f"https://app.test/cb#access_token={_IN_URL}&expires_in=3600&state=s",
            id="implicit-grant-fragment",
        ),
        pytest.param("referer", "https://app.test/docs#section-2", None, id="plain-fragment"),
        pytest.param(
            "referer", "https://app.test/p?x=1#token=a", f"https://app.test/p?x=1#token={_IN_URL}"
        ),
        pytest.param("referer", "https://app.test/page?tab=1", None, id="nothing-to-redact"),
        pytest.param("referer", "https://app.test/a@b", None, id="at-in-the-path"),
        pytest.param(
            "referer",
            "//bob:pw@app.test/page?token=a",
            f"//{_IN_URL}@app.test/page?token={_IN_URL}",
            id="scheme-relative-userinfo",
        ),
        pytest.param(
            "location", " //alice:pw@files.test/x", f" //{_IN_URL}@files.test/x", id="relative-loc"
        ),
        pytest.param("location", "/a//b@c", None, id="double-slash-in-a-path"),
        pytest.param("origin", "http://u:pw@o.test", f"http://{_IN_URL}@o.test", id="origin"),
        pytest.param("content-location", "mailto:someone@app.test", None, id="no-authority"),
        pytest.param("host", "u:p@api.test:8080", f"{_IN_URL}@api.test:8080", id="host"),
        pytest.param("host", "api.test:8080", None, id="plain-host"),
        pytest.param("x-forwarded-uri", "/p?api_key=k", f"/p?api_key={_IN_URL}", id="proxy-uri"),
        pytest.param("x-other", "https://u:p@app.test/?token=a", None, id="other-headers-kept"),
    ],
)
def test_url_valued_headers(name: str, value: str, recorded: str | None) -> None:
    redactor = Redactor(make_config({"service_token": TOKEN}, environ={}))
    assert redactor.header(name, value) == (value if recorded is None else recorded)


@pytest.mark.parametrize(
    ("path", "written"),
    [
        ("http://user:pw@api.test/a/b", "/a/b"),
        ("HTTPS://api.test", ""),
        ("http://api.test:8080/a%20b", "/a%20b"),
        ("/a/http://x@y/", "/a/http://x@y/"),
        ("*", "*"),
    ],
)
def test_absolute_form_targets_keep_only_their_path(path: str, written: str) -> None:
    assert escape(path) == written


@pytest.mark.parametrize(
    ("name", "redacted"),
    [
        ("user[password]", True),
        ("password[]", True),
        ("a[b][Access-Token]", True),
        ("user[name]", False),
        ("[]", False),
        ("tokens", True),  # names holding token, secret, password, passwd, apikey or session
        ("user_token", True),
        ("new-Password", True),
        ("x_api_key", True),
        ("a[sessionId]", True),
        ("keyboard", False),
        ("page", False),
    ],
)
def test_bracketed_query_and_form_names(name: str, redacted: bool) -> None:
    redactor = Redactor(make_config({"service_token": TOKEN}, environ={}))
    assert redactor.query_key(name) is redacted
    form = f"a=1&{name}=v&b=2".encode()
    expected = f"a=1&{name}=%5BREDACTED%5D&b=2".encode() if redacted else form
    assert redactor.body(form, "form") == expected
