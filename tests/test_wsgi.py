"""The WSGI adapter (PEP 3333): the app and its client see exactly what they would without it.

Apps run under ``werkzeug.test.Client`` with ``wsgiref.validate.validator`` around the app and
around the middleware (so any PEP 3333 slip on either side fails loudly), under wsgiref's own
server logic where a real server's handling matters (``exc_info``), and under gunicorn for the
end-to-end check. Every entry goes to the real collector over loopback HTTP.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.handlers import BaseCGIHandler
from wsgiref.util import FileWrapper
from wsgiref.validate import validator

import httpx
import pytest
from gunicorn import version_info as gunicorn_version
from werkzeug.test import Client, create_environ, run_wsgi_app

import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware
from alf_analytics._net import INVALID_HOST
from alf_analytics.collector import Collector
from alf_analytics.wsgi import read_environ

from . import wsgi_apps
from .conftest import assert_valid_alf, received_entries
from .servers import free_port, reaped, sigterm

TOKEN = "wsgi-adapter-token-0001"
BODY = b"line one\nline two\r\n\x00\xff binary tail without newline"

App = Callable[..., Iterable[bytes]]


def middleware(app: App, collector: Collector, **options: Any) -> AnalyticsWSGIMiddleware:
    options.setdefault("log_body", True)
    # Every body, so byte-faithfulness shows; the default allow-list has its own tests.
    options.setdefault("log_body_types", ["*/*", "text/event-stream"])
    return AnalyticsWSGIMiddleware(app, service_token=TOKEN, collector_url=collector.url, **options)


def validated(app: App, collector: Collector, **options: Any) -> App:
    """``validator(middleware(validator(app)))``: both sides are checked against PEP 3333."""
    return validator(middleware(validator(app), collector, **options))


def fetch(app: App, path: str = "/", **kwargs: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body a client of ``app`` receives (the response is closed)."""
    response = Client(app).open(path, **kwargs)
    try:
        return response.status, response.headers.to_wsgi_list(), response.get_data()
    finally:
        response.close()


def run(app: App, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Like :func:`fetch`, for a hand-made environ (odd values werkzeug would not build)."""
    app_iter, status, headers = run_wsgi_app(app, environ)
    try:
        return status, headers.to_wsgi_list(), b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()


def cgi(app: App, **environ: Any) -> tuple[bytes, str]:
    """Run ``app`` under wsgiref's own server logic (CGI mode: no Date header); raw output."""
    base = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "REMOTE_ADDR": "192.0.2.10",
        **environ,
    }
    out, errors = io.BytesIO(), io.StringIO()
    handler = BaseCGIHandler(io.BytesIO(), out, errors, base, multithread=False)
    handler.os_environ = {}  # not the test process's variables
    handler.run(app)
    return out.getvalue(), errors.getvalue()


def body_of(message: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(message[key]["text"])


# -- byte-identical responses ------------------------------------------------------------------

FLASK = wsgi_apps.make_flask_app()

RESPONSES = [
    pytest.param(wsgi_apps.list_app, "/", {}, id="list"),
    pytest.param(wsgi_apps.generator_app, "/", {}, id="generator"),
    pytest.param(wsgi_apps.lazy_generator_app, "/", {}, id="generator-function"),
    pytest.param(wsgi_apps.write_app, "/", {}, id="write-callable"),
    pytest.param(
        wsgi_apps.file_wrapper_app,
        "/",
        {"environ_overrides": {"wsgi.file_wrapper": FileWrapper}},
        id="file-wrapper",
    ),
    pytest.param(wsgi_apps.status_only_app, "/", {}, id="no-content"),
    pytest.param(FLASK.wsgi_app, "/stream?n=7", {}, id="flask-response-stream"),
    pytest.param(
        FLASK.wsgi_app,
        "/file",
        {"environ_overrides": {"wsgi.file_wrapper": FileWrapper}},
        id="flask-send-file",
    ),
]


@pytest.mark.parametrize(("app", "path", "kwargs"), RESPONSES)
def test_client_receives_exactly_what_the_app_produced(
    collector: Collector, app: App, path: str, kwargs: dict[str, Any]
) -> None:
    """Status, headers (repeats included) and body bytes are identical with the middleware."""
    bare = fetch(validator(app), path, **kwargs)
    observed = fetch(validated(app, collector), path, **kwargs)
    assert observed == bare
    status, headers, body = bare
    (entry,) = received_entries(collector, 1)
    response = entry["response"]
    assert f"{response['status']} {response['statusText']}" == status
    assert [(pair["name"], pair["value"]) for pair in response["headers"]] == [
        (name.lower(), "[REDACTED]" if name == "Set-Cookie" else value) for name, value in headers
    ]
    assert response["bodySize"] == len(body)
    if body:
        assert body_of(response, "content") == body
    assert response["bodyCaptured"] is True


@pytest.mark.parametrize(("app", "path", "kwargs"), RESPONSES)
def test_wsgiref_server_sends_the_same_bytes(
    collector: Collector, app: App, path: str, kwargs: dict[str, Any]
) -> None:
    """Under wsgiref's server logic (Content-Length inference, sendfile check) output is equal."""
    path_info, _, query = path.partition("?")
    bare, bare_errors = cgi(validator(app), PATH_INFO=path_info, QUERY_STRING=query)
    observed, errors = cgi(validated(app, collector), PATH_INFO=path_info, QUERY_STRING=query)
    assert observed == bare
    assert errors == bare_errors == ""
    status = int(observed.split(b"\r\n", 1)[0].split()[1])
    assert received_entries(collector, 1)[0]["response"]["status"] == status


def test_one_chunk_list_keeps_the_server_content_length(collector: Collector) -> None:
    """wsgiref adds Content-Length to a one-item list response, with the middleware too."""

    def one_chunk_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"exactly one"]

    bare, _ = cgi(one_chunk_app)
    observed, _ = cgi(middleware(one_chunk_app, collector))
    assert observed == bare
    assert b"\r\nContent-Length: 11\r\n" in observed
    received_entries(collector, 1)


def waitress_style_serve(app: App, path: str) -> tuple[int | None, bytes]:
    """waitress's response loop (WSGITask.execute), reduced to what it does with the iterable.

    It infers Content-Length from ``len(app_iter) == 1`` and calls ``len()`` whenever the
    iterable has ``__len__``: a wrapper claiming a length it cannot give breaks every response.
    """
    headers: list[tuple[str, str]] = []

    def start_response(status: str, response_headers: list[Any], exc_info: Any = None) -> Any:
        headers[:] = response_headers
        return lambda data: None

    app_iter = app(create_environ(path), start_response)
    declared = [int(value) for name, value in headers if name.lower() == "content-length"]
    content_length = declared[0] if declared else None
    chunks = []
    try:
        for chunk in app_iter:
            if not chunks and content_length is None:
                app_iter_len = len(app_iter) if hasattr(app_iter, "__len__") else None  # type: ignore[arg-type]
                if app_iter_len == 1:
                    content_length = len(chunk)
            chunks.append(chunk)
    finally:
        if hasattr(app_iter, "close"):
            app_iter.close()
    return content_length, b"".join(chunks)


def _one_chunk_app(environ: dict[str, Any], start_response: Any) -> tuple[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (b"exactly one",)


@pytest.mark.parametrize(
    ("app", "path", "content_length"),
    [
        pytest.param(_one_chunk_app, "/", 11, id="one-chunk-tuple"),
        pytest.param(wsgi_apps.list_app, "/", None, id="two-chunk-list"),
        pytest.param(wsgi_apps.generator_app, "/", None, id="generator"),
        pytest.param(wsgi_apps.lazy_generator_app, "/", None, id="generator-function"),
        pytest.param(FLASK.wsgi_app, "/stream?n=3", None, id="flask-closing-iterator"),
    ],
)
def test_response_length_is_what_the_app_returned(
    collector: Collector, app: App, path: str, content_length: int | None
) -> None:
    """The wrapper has a len() exactly when the app's iterable has one (waitress relies on it)."""
    bare = waitress_style_serve(app, path)
    observed = waitress_style_serve(middleware(app, collector), path)
    assert observed == bare
    assert observed[0] == content_length
    received_entries(collector, 1)


def test_exc_info_before_output_replaces_the_response(collector: Collector) -> None:
    """start_response with exc_info before any output: same bytes from the server, 503 logged."""
    bare, bare_errors = cgi(validator(wsgi_apps.exc_info_app))
    observed, errors = cgi(validated(wsgi_apps.exc_info_app, collector))
    assert observed == bare
    assert observed.startswith(b"Status: 503 Service Unavailable\r\n")
    assert observed.endswith(b"\r\n\r\nsorry, try later")
    assert errors == bare_errors == ""
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["statusText"]) == (
        503,
        "Service Unavailable",
    )
    assert body_of(entry["response"], "content") == b"sorry, try later"


def exc_info_after_output_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"partial body"
    try:
        raise OSError("disk went away mid-stream")
    except OSError:
        # Headers are already sent: the server must re-raise; the status on the wire stays 200.
        start_response(
            "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
        )
    yield b"never sent"


def test_exc_info_after_output_keeps_the_real_status(collector: Collector) -> None:
    """A late exc_info makes the server re-raise; the entry keeps the 200 that was sent."""
    bare, bare_errors = cgi(validator(exc_info_after_output_app))
    observed, errors = cgi(validated(exc_info_after_output_app, collector))
    assert observed == bare
    assert observed.startswith(b"Status: 200 OK\r\n") and observed.endswith(b"partial body")
    assert "disk went away" in errors and "disk went away" in bare_errors
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodySize"] == len(b"partial body")


@pytest.mark.parametrize(
    ("status_line", "status", "text"),
    [
        pytest.param("200 OK", 200, "OK", id="plain"),
        pytest.param("404 Not  Found ", 404, "Not  Found ", id="reason-as-written"),
        pytest.param("200", 200, "", id="no-reason-stays-empty"),
        pytest.param("20 OK", 20, "OK", id="two-digits"),
        pytest.param("2000000 OK", 0, "OK", id="too-long"),
        pytest.param("1000 Big", 0, "Big", id="four-digits"),
        pytest.param(" 200 OK", 0, "200 OK", id="leading-space"),
        pytest.param("２００ OK", 0, "OK", id="not-ascii-digits"),
        pytest.param("abc Bad", 0, "Bad", id="not-a-number"),
    ],
)
def test_the_status_line_is_read_as_the_server_writes_it(
    collector: Collector, status_line: str, status: int, text: str
) -> None:
    """The code is the digits before the first space (1 to 3 of them, else 0, unknown: never
    the digits it starts with), the reason everything after it, even empty."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status_line, [("Content-Type", "text/plain")])
        return [b"x"]

    result = middleware(app, collector)(create_environ("/"), lambda *args: None)
    assert b"".join(result) == b"x"
    result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["statusText"]) == (status, text)


def test_generator_response_is_not_buffered(collector: Collector) -> None:
    """Each chunk reaches the client before the app is asked for the next one."""
    events: list[str] = []

    def streaming_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for index in range(3):
            events.append(f"produce {index}")
            yield f"data: {index}\n\n".encode()
        events.append("app done")

    response = Client(validated(streaming_app, collector)).get("/")
    try:
        for index, chunk in enumerate(response.response):
            assert chunk == f"data: {index}\n\n".encode()
            events.append(f"receive {index}")
    finally:
        response.close()
    assert events == [
        "produce 0",
        "receive 0",
        "produce 1",
        "receive 1",
        "produce 2",
        "receive 2",
        "app done",
    ]
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == 3 * len(b"data: 0\n\n")


def test_flask_stream_first_chunk_before_the_second_is_produced(collector: Collector) -> None:
    """A Flask Response(generator) is streamed chunk by chunk through the middleware."""
    from flask import Flask, Response

    events: list[str] = []
    app = Flask("stream_order")

    @app.get("/")
    def stream() -> Response:
        def generate() -> Iterator[bytes]:
            for index in range(3):
                events.append(f"produce {index}")
                yield b"x" * (index + 1)

        return Response(generate(), mimetype="text/plain")

    response = Client(validated(app.wsgi_app, collector)).get("/")
    try:
        iterator = iter(response.response)
        assert next(iterator) == b"x"
        assert events == ["produce 0"]
        assert next(iterator) == b"xx"
        assert events == ["produce 0", "produce 1"]
        assert list(iterator) == [b"xxx"]
    finally:
        response.close()
    assert received_entries(collector, 1)[0]["response"]["bodySize"] == 6


# -- request bodies ----------------------------------------------------------------------------


def _read_all(stream: Any, length: int) -> bytes:
    return stream.read(length)


def _read_small_pieces(stream: Any, length: int) -> bytes:
    data = b""
    while len(data) < length:
        piece = stream.read(min(5, length - len(data)))
        if not piece:
            break
        data += piece
    return data


def _readline_loop(stream: Any, length: int) -> bytes:
    lines = []
    while line := stream.readline():
        lines.append(line)
    return b"".join(lines)


def _readline_with_limit(stream: Any, length: int) -> bytes:
    lines = []
    while line := stream.readline(4):
        lines.append(line)
    return b"".join(lines)


def _readlines(stream: Any, length: int) -> bytes:
    return b"".join(stream.readlines())


def _iterate(stream: Any, length: int) -> bytes:
    return b"".join(stream)


READERS = [
    pytest.param(_read_all, id="read-n"),
    pytest.param(_read_small_pieces, id="read-n-loop"),
    pytest.param(_readline_loop, id="readline"),
    pytest.param(_readline_with_limit, id="readline-limit"),
    pytest.param(_readlines, id="readlines"),
    pytest.param(_iterate, id="iteration"),
]


def echo_app(reader: Callable[[Any, int], bytes]) -> App:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        data = reader(environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [data]

    return app


@pytest.mark.parametrize("reader", READERS)
def test_request_body_is_captured_as_the_app_reads_it(
    collector: Collector, reader: Callable[[Any, int], bytes]
) -> None:
    """However the app reads wsgi.input, it gets every byte and the entry has the same bytes."""
    status, _, echoed = fetch(
        validated(echo_app(reader), collector),
        method="POST",
        data=BODY,
        content_type="application/x-test",
    )
    assert (status, echoed) == ("200 OK", BODY)
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert request["bodySize"] == len(BODY)
    assert request["bodyCaptured"] is True
    assert request["postData"]["mimeType"] == "application/x-test"
    assert body_of(request, "postData") == BODY


def test_read_without_a_size_gets_the_whole_body(collector: Collector) -> None:
    """read() with no size (allowed by gunicorn, uWSGI, werkzeug) returns and records it all."""

    def read_all_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [data, environ["wsgi.input"].read()]

    # wsgiref's validator forbids read() without a size, so this app runs unvalidated.
    status, _, echoed = fetch(middleware(read_all_app, collector), method="POST", data=BODY)
    assert (status, echoed) == ("200 OK", BODY)
    (entry,) = received_entries(collector, 1)
    assert (entry["request"]["bodySize"], entry["request"]["bodyCaptured"]) == (len(BODY), True)
    assert body_of(entry["request"], "postData") == BODY


def test_sized_read_cut_short_counts_what_crossed(collector: Collector) -> None:
    """The client left mid-upload: gunicorn's wsgi.input then returns fewer bytes than a
    read(Content-Length) asked for. The entry counts the bytes that crossed (not the
    declared length) and says the body is not whole."""

    def read_declared_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        data = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [data]

    environ = create_environ("/", method="POST", input_stream=io.BytesIO(b"partial"))
    environ["CONTENT_LENGTH"] = "1000"
    status, _, echoed = run(middleware(read_declared_app, collector), environ)
    assert (status, echoed) == ("200 OK", b"partial")
    (entry,) = received_entries(collector, 1)
    assert (entry["request"]["bodySize"], entry["request"]["bodyCaptured"]) == (7, False)
    assert body_of(entry["request"], "postData") == b"partial"


@pytest.mark.parametrize(
    "path",
    [pytest.param("/echo", id="get-data"), pytest.param("/json", id="get-json")],
)
def test_flask_reads_the_body_through_limited_stream_readinto(
    collector: Collector, path: str
) -> None:
    """Flask's request.get_data()/get_json() (LimitedStream.readinto) get the whole body."""
    payload = json.dumps({"items": list(range(2000)), "name": "caf\u00e9"}).encode()
    app = middleware(wsgi_apps.make_flask_app().wsgi_app, collector)
    status, _, body = fetch(app, path, method="POST", data=payload, content_type="application/json")
    assert status.split()[0] in ("200", "201")
    if path == "/echo":
        assert body == payload
    else:
        assert json.loads(body)["count"] == 2000
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["bodySize"] == len(payload)
    assert body_of(entry["request"], "postData") == payload


def test_flask_reads_a_server_stream_without_readinto(collector: Collector) -> None:
    """Flask get_data() works on a wsgi.input with only the PEP 3333 methods (no readinto)."""
    app = validator(middleware(wsgi_apps.make_flask_app().wsgi_app, collector))
    status, _, body = fetch(app, "/echo", method="POST", data=BODY)
    (entry,) = received_entries(collector, 1)
    assert (status, body) == ("200 OK", BODY)
    assert body_of(entry["request"], "postData") == BODY


def chunked_environ(body: bytes) -> dict[str, Any]:
    environ = create_environ("/echo", method="POST", input_stream=io.BytesIO(body))
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    return environ


def test_chunked_body_with_input_terminated_is_read_whole(collector: Collector) -> None:
    """A chunked upload (no Content-Length, wsgi.input_terminated) reaches Flask whole."""
    app = middleware(wsgi_apps.make_flask_app().wsgi_app, collector)
    status, _, echoed = run(app, chunked_environ(BODY * 100))
    assert (status, echoed) == ("200 OK", BODY * 100)
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["bodySize"] == len(BODY) * 100
    assert entry["request"]["bodyCaptured"] is True
    assert body_of(entry["request"], "postData") == BODY * 100
    assert "content-length" not in {pair["name"] for pair in entry["request"]["headers"]}


def test_chunked_body_is_captured_up_to_the_cap(collector: Collector) -> None:
    """A chunked body longer than max_body_bytes is read whole by the app, captured to the cap."""
    app = middleware(wsgi_apps.make_flask_app().wsgi_app, collector, max_body_bytes=10)
    status, _, echoed = run(app, chunked_environ(BODY))
    assert (status, echoed) == ("200 OK", BODY)
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert (request["bodySize"], request["bodyCaptured"]) == (len(BODY), False)
    assert body_of(request, "postData") == BODY[:10]
    assert entry["response"]["bodySize"] == len(BODY)
    assert body_of(entry["response"], "content") == BODY[:10]


def test_chunked_body_the_app_never_read_is_not_captured(collector: Collector) -> None:
    """An app that reads none of a chunked body did not see its end: not an empty body."""

    def ignoring(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("204 No Content", [])
        return []

    status, _, _ = run(middleware(ignoring, collector, log_body=True), chunked_environ(BODY))
    assert status == "204 No Content"
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert (request["bodySize"], request["bodyCaptured"]) == (0, False)
    assert "postData" not in request


def test_unread_body_size_comes_from_content_length(collector: Collector) -> None:
    """A body the app never reads is not consumed by the middleware; its size is declared."""
    seen: list[int] = []

    def ignoring_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].tell())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ignored"]

    fetch(middleware(ignoring_app, collector), method="PUT", data=BODY)
    assert seen == [0]
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["bodySize"] == len(BODY)
    assert entry["request"]["bodyCaptured"] is False
    assert "postData" not in entry["request"]


@pytest.mark.parametrize(
    "content_length",
    [
        pytest.param("", id="empty"),
        pytest.param(None, id="missing"),
        pytest.param("-1", id="negative"),
        pytest.param("abc", id="garbage"),
        pytest.param("1e3", id="float-like"),
        pytest.param([12], id="not-a-string"),
    ],
)
def test_odd_content_length_is_tolerated(collector: Collector, content_length: str | None) -> None:
    """An empty, missing, negative or garbage CONTENT_LENGTH never breaks the request."""
    environ = create_environ("/", method="POST")
    environ.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    status, _, body = run(middleware(wsgi_apps.list_app, collector), environ)
    assert (status, body) == ("200 OK", b"hello world")
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["bodySize"] == 0


# -- close() and the end of the entry ----------------------------------------------------------


def test_close_called_once_after_full_iteration(collector: Collector) -> None:
    """A fully read response closes the app iterable exactly once."""
    app = wsgi_apps.ClosingApp([b"a", b"b", b"c"])
    assert fetch(validated(app, collector))[2] == b"abc"
    assert app.body.closed == 1
    assert received_entries(collector, 1)[0]["response"]["bodySize"] == 3


def test_close_called_once_when_the_client_stops_early(collector: Collector) -> None:
    """A client that stops after the first chunk still gets the app iterable closed once."""
    app = wsgi_apps.ClosingApp([b"first", b"second", b"third"])
    response = Client(validated(app, collector)).get("/")
    assert next(iter(response.response)) == b"first"
    response.close()
    assert app.body.closed == 1
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (200, 5)


def test_close_called_once_when_iteration_raises(collector: Collector) -> None:
    """An iterable that raises mid-stream is still closed once; the sent status is kept."""
    app = wsgi_apps.ClosingApp([b"first", b"second"], fail_after=1)
    response = Client(validated(app, collector)).get("/")
    with pytest.raises(RuntimeError) as caught:
        response.get_data()
    response.close()
    assert caught.value is app.body.failure
    assert app.body.closed == 1
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (200, 5)


def test_a_second_close_is_ignored(collector: Collector) -> None:
    """A server calling close() twice does not close the app twice nor record twice."""
    app = wsgi_apps.ClosingApp([b"x"])
    result = middleware(app, collector)(create_environ("/"), lambda *args: None)
    assert list(result) == [b"x"]
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert app.body.closed == 1
    received_entries(collector, 1)
    assert alf_analytics.flush(5.0)
    assert collector.count() == 1


def test_entry_is_finished_at_close(collector: Collector) -> None:
    """Nothing is recorded while the body is still being sent; the entry appears at close()."""
    wrapped = middleware(wsgi_apps.generator_app, collector)
    result = wrapped(create_environ("/"), lambda *args: None)
    assert b"".join(result) == b"first,second,\x00\xff\xfe binary"
    assert alf_analytics.flush(5.0)
    assert collector.count() == 0
    result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 201


def test_a_chunk_is_captured_after_the_server_has_it(collector: Collector) -> None:
    """The copy into the capture buffer never delays a chunk: the server gets each one
    first, and it is counted when the server asks for the next one (or closes)."""
    wrapped = middleware(wsgi_apps.ClosingApp([b"first", b"second"]), collector)
    result = wrapped(create_environ("/"), lambda *args: None)
    exchange = result.exchange  # type: ignore[attr-defined]
    chunks = iter(result)
    assert next(chunks) == b"first"
    assert exchange.response_body_size == 0 and bytes(exchange.response_body) == b""
    assert next(chunks) == b"second"
    assert (exchange.response_body_size, bytes(exchange.response_body)) == (5, b"first")
    result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == 11
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"firstsecond"


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_a_chunk_the_server_failed_to_write_is_not_counted(
    collector: Collector, kind: type
) -> None:
    """gunicorn writes each chunk and closes the response in a ``finally``: when a write
    raises (the client left, a chunk that is not bytes: gunicorn refuses a bytearray) that
    chunk did not cross, and the entry counts only what did."""
    chunks = [kind(b"first"), kind(b"second"), kind(b"third")]
    wrapped = middleware(wsgi_apps.ClosingApp(chunks), collector)
    result = wrapped(create_environ("/"), lambda *args: None)

    def serve() -> None:  # gunicorn's handle_request, in short
        try:
            for chunk in result:
                if chunk == b"second":
                    raise BrokenPipeError(32, "Broken pipe")
        finally:
            result.close()  # type: ignore[attr-defined]

    with pytest.raises(BrokenPipeError):
        serve()
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (200, 5)
    # What crossed is kept, but it is not the whole body.
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"first"
    assert entry["response"]["bodyCaptured"] is False


@pytest.mark.parametrize("log_body", [True, False])
def test_a_body_the_app_broke_off_is_not_called_captured(
    collector: Collector, log_body: bool
) -> None:
    """An app whose iterable raises after its first chunk: the client got a cut body, so the
    entry keeps what crossed but does not claim the whole body (bodyCaptured false)."""

    def breaks_off(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        raise RuntimeError("the database went away")

    result = middleware(breaks_off, collector, log_body=log_body)(
        create_environ("/"), lambda *args: None
    )
    with pytest.raises(RuntimeError, match="database"):
        try:
            for _chunk in result:
                pass
        finally:
            result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    response = entry["response"]
    assert (response["status"], response["bodySize"], response["bodyCaptured"]) == (200, 5, False)
    if log_body:
        assert base64.b64decode(response["content"]["text"]) == b"first"
    else:
        assert "content" not in response


def test_a_complete_streamed_body_is_captured(collector: Collector) -> None:
    """The counterpart: every chunk crossed, the iterable ended, the body is whole."""

    def streams(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        yield b"second"

    result = middleware(streams, collector, log_body=True)(create_environ("/"), lambda *a: None)
    assert b"".join(result) == b"firstsecond"
    result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodyCaptured"] is True
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"firstsecond"


def test_a_bytearray_chunk_changed_after_it_is_sent_is_captured_as_sent(
    collector: Collector,
) -> None:
    """An app may reuse its buffer once the server has a chunk: mutable chunks are copied
    at once, so the entry holds the bytes the client got."""

    def reusing(environ: dict[str, Any], start_response: Any) -> Iterator[bytearray]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        buffer = bytearray(b"abc")
        yield buffer
        buffer[:] = b"xyz"
        yield buffer

    sent: list[bytes] = []
    result = middleware(reusing, collector)(create_environ("/"), lambda *args: None)
    for chunk in result:
        sent.append(bytes(chunk))
    result.close()  # type: ignore[attr-defined]
    assert sent == [b"abc", b"xyz"]
    (entry,) = received_entries(collector, 1)
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"abcxyz"


def test_a_write_the_server_refused_is_not_counted(collector: Collector) -> None:
    """``write()`` hands the bytes to the server first; when the server raises (the client
    is gone), the error reaches the app unchanged and the bytes are not counted as sent."""
    gone = BrokenPipeError("client gone")

    def refusing_write(data: bytes) -> None:
        raise gone

    def writer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"never sent")
        return []

    with pytest.raises(BrokenPipeError) as caught:
        middleware(writer, collector)(create_environ("/"), lambda *args: refusing_write)
    assert caught.value is gone
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == 0
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodyCaptured"] is False  # not an empty body: a cut one


def _paced_app(before_first: float, before_last: float) -> App:
    def paced(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        time.sleep(before_first)
        yield b"first"
        time.sleep(before_last)
        yield b"last"

    return paced


@pytest.mark.parametrize(
    ("before_first", "before_last", "slower"),
    [
        pytest.param(0.2, 0.0, "wait", id="slow-to-start"),
        pytest.param(0.0, 0.2, "receive", id="slow-to-stream"),
    ],
)
def test_wait_is_time_to_first_byte_and_receive_the_rest(
    collector: Collector, before_first: float, before_last: float, slower: str
) -> None:
    """wait ends at the first body byte, receive runs to close(); time is their sum."""
    fetch(validated(_paced_app(before_first, before_last), collector))
    (entry,) = received_entries(collector, 1)
    timings = entry["timings"]
    faster = "receive" if slower == "wait" else "wait"
    assert timings[slower] > 2 * timings[faster]
    assert timings[slower] >= 150.0  # the app's own sleep of 200 ms, with a wide margin
    assert entry["time"] == pytest.approx(timings["send"] + timings["wait"] + timings["receive"])


# -- exceptions --------------------------------------------------------------------------------


def _raise_from_app() -> Callable[..., Any]:
    def failing_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            {}["missing"]
        except KeyError as cause:
            raise RuntimeError("app failed") from cause
        return []

    return failing_app


def _tail(error: BaseException) -> list[tuple[str, int | None, str | None]]:
    frames = traceback.extract_tb(error.__traceback__)
    return [(frame.name, frame.lineno, frame.line) for frame in frames][-1:]


def test_app_exception_propagates_unchanged(collector: Collector) -> None:
    """The exception object, its traceback tail and __cause__ reach the server unchanged."""
    app = _raise_from_app()
    with pytest.raises(RuntimeError) as bare:
        fetch(validator(app))
    seen: list[BaseException] = []

    def recording_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except BaseException as error:
            seen.append(error)
            raise

    with pytest.raises(RuntimeError) as observed:
        fetch(validated(recording_app, collector))
    assert observed.value is seen[0]
    assert isinstance(observed.value.__cause__, KeyError)
    assert observed.value.__cause__.args == ("missing",)
    assert observed.value.__suppress_context__ is True
    assert _tail(observed.value) == _tail(bare.value)
    assert _tail(observed.value)[0][0] == "failing_app"
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 500
    assert entry["response"]["statusText"] == "Internal Server Error"


def test_exception_before_the_first_chunk_is_a_500(collector: Collector) -> None:
    """A generator that fails before its first chunk is recorded as the server's 500."""

    def failing_stream(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise ValueError("before any chunk")
        yield b""  # pragma: no cover - a generator

    result = middleware(failing_stream, collector)(create_environ("/"), lambda *args: None)
    try:
        with pytest.raises(ValueError):
            next(iter(result))  # the server asks for the first chunk
    finally:
        result.close()  # type: ignore[attr-defined]
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 500
    assert entry["response"]["headers"] == []


def test_exception_after_an_empty_first_chunk_keeps_the_status(collector: Collector) -> None:
    """``yield b""`` flushes the headers early: gunicorn, Werkzeug and wsgiref send the status
    line with that empty chunk, so the client got a 200, not the server's 500 (audit)."""

    def failing_stream(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b""
        raise ValueError("after the headers")

    response = Client(validated(failing_stream, collector)).get("/")
    with pytest.raises(ValueError):
        response.get_data()
    response.close()
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (200, 0)
    assert ["content-type"] == [h["name"] for h in entry["response"]["headers"]]


def test_exception_after_the_first_chunk_keeps_the_status(collector: Collector) -> None:
    """Once a byte was sent, a failing generator keeps the status that reached the client."""

    def failing_stream(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("206 Partial Content", [("Content-Type", "text/plain")])
        yield b"some"
        raise ValueError("after a byte")

    response = Client(validated(failing_stream, collector)).get("/")
    with pytest.raises(ValueError):
        response.get_data()
    response.close()
    (entry,) = received_entries(collector, 1)
    assert (entry["response"]["status"], entry["response"]["bodySize"]) == (206, 4)


def test_flask_handled_error_is_recorded_as_its_500(collector: Collector) -> None:
    """A view error Flask turns into its own 500 page is recorded with that page."""
    status, _, body = fetch(middleware(FLASK.wsgi_app, collector), "/boom")
    assert status == "500 INTERNAL SERVER ERROR"
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["status"] == 500
    assert body_of(entry["response"], "content") == body


def _broken(*args: Any, **kwargs: Any) -> Any:
    raise ZeroDivisionError("agent bug")


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("alf_analytics.wsgi.Exchange", id="capture-setup"),
        pytest.param("alf_analytics._worker.Worker.submit", id="hand-over"),
    ],
)
def test_an_agent_failure_never_changes_the_response(
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[Any],
    target: str,
) -> None:
    """If the agent itself fails, the client still gets the app's response; the error is logged."""
    monkeypatch.setattr(target, _broken)
    bare = fetch(validator(wsgi_apps.generator_app))
    assert fetch(validated(wsgi_apps.generator_app, collector)) == bare
    assert [record.exc_info[0] for record in internal_errors] == [ZeroDivisionError]
    internal_errors.clear()


# -- the request as the server described it ----------------------------------------------------


def test_script_name_is_part_of_the_url(collector: Collector) -> None:
    """An app mounted under SCRIPT_NAME is recorded with its full path."""
    fetch(
        validated(wsgi_apps.list_app, collector),
        "/users/7",
        base_url="https://api.example.com:8443/mount",
        query_string="a=1&a=2&b=",
    )
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert request["url"] == "https://api.example.com:8443/mount/users/7?a=1&a=2&b="
    assert request["queryString"] == [
        {"name": "a", "value": "1"},
        {"name": "a", "value": "2"},
        {"name": "b", "value": ""},
    ]


@pytest.mark.parametrize("key", ["RAW_URI", "REQUEST_URI"])
def test_raw_request_uri_is_preferred(collector: Collector, key: str) -> None:
    """The server's raw request target (gunicorn RAW_URI, uWSGI REQUEST_URI) gives the path."""
    fetch(
        validated(wsgi_apps.list_app, collector),
        "/caf\u00e9 menu",
        query_string="q=%2F",
        environ_overrides={key: "/caf%C3%A9%20menu?q=%2F"},
    )
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["url"] == "http://localhost/caf%C3%A9%20menu?q=%2F"


@pytest.mark.parametrize(
    ("environ", "path"),
    [
        pytest.param(
            {"SCRIPT_NAME": "/mount", "PATH_INFO": "/caf\xc3\xa9", "RAW_URI": "/mount/caf%C3%A9"},
            "/mount/caf%C3%A9",
            id="raw-uri-with-mount",
        ),
        pytest.param(
            {"SCRIPT_NAME": "/mount", "PATH_INFO": "/a b", "RAW_URI": "/a%20b"},
            "/mount/a b",
            id="raw-uri-without-mount",
        ),
        pytest.param(
            {"SCRIPT_NAME": "", "PATH_INFO": "/x", "REQUEST_URI": "/x%2Fy?z=1"},
            "/x%2Fy",
            id="request-uri",
        ),
        pytest.param(
            {"SCRIPT_NAME": "/m", "PATH_INFO": "/x", "RAW_URI": "http://h/m/x"},
            "/m/x",
            id="absolute-form-target",
        ),
        pytest.param({"SCRIPT_NAME": "/m", "PATH_INFO": "/x"}, "/m/x", id="no-raw-uri"),
    ],
)
def test_path_from_raw_uri_or_script_name(environ: dict[str, str], path: str) -> None:
    """The raw target is used when it includes the mount point, else SCRIPT_NAME + PATH_INFO."""
    base = create_environ("/")
    del base["RAW_URI"], base["REQUEST_URI"]
    base.update(environ)
    assert read_environ(base).path == path


def test_headers_are_read_in_environ_order_whatever_the_layout() -> None:
    """Header keys come out in environ order, for each of many layouts, and the cache of
    layouts stays bounded; non-text values (and non-text keys) are left out, not fatal."""
    from alf_analytics import wsgi

    base = create_environ("/")
    for index in range(wsgi._LAYOUTS_SIZE * 3):
        environ = dict(base)
        environ[f"HTTP_X_CLIENT_{index}"] = str(index)
        environ["HTTP_ACCEPT"] = "*/*"
        environ["HTTP_X_NUMBER"] = 7  # type: ignore[assignment]
        environ[42] = "a non-text key"  # type: ignore[index]
        environ["HTTPS"] = "on"
        headers = read_environ(environ).headers
        expected = [("host", "localhost"), (f"x-client-{index}", str(index)), ("accept", "*/*")]
        assert headers == expected
        assert read_environ(environ).headers == expected  # the cached layout gives the same
        assert len(wsgi._LAYOUTS) <= wsgi._LAYOUTS_SIZE


@pytest.mark.parametrize(
    ("scheme", "name", "port", "host"),
    [
        pytest.param("http", "srv.example", "80", "srv.example", id="http-default"),
        pytest.param("https", "srv.example", "443", "srv.example", id="https-default"),
        pytest.param("http", "srv.example", "8080", "srv.example:8080", id="http-other"),
        pytest.param("https", "srv.example", "80", "srv.example:80", id="https-on-80"),
        pytest.param("http", "::1", "8080", "[::1]:8080", id="ipv6"),
        pytest.param("http", "10.0.0.5", "80", "10.0.0.5", id="ipv4"),
    ],
)
def test_host_from_server_name_without_a_host_header(
    collector: Collector, scheme: str, name: str, port: str, host: str
) -> None:
    """Without a Host header the URL uses SERVER_NAME, and SERVER_PORT unless it is the default."""
    environ = create_environ("/x", f"{scheme}://ignored/")
    del environ["HTTP_HOST"]
    environ.update(SERVER_NAME=name, SERVER_PORT=port, SERVER_PROTOCOL="HTTP/1.0")
    assert run(middleware(wsgi_apps.list_app, collector), environ)[0] == "200 OK"
    (entry,) = received_entries(collector, 1)
    assert entry["request"]["url"] == f"{scheme}://{host}/x"
    assert entry["request"]["httpVersion"] == "HTTP/1.0"


def test_request_facts_come_from_the_environ(collector: Collector) -> None:
    """Method, headers (content type and length included), peer and server address are kept."""
    fetch(
        validated(echo_app(_read_all), collector),
        "/upload",
        method="PATCH",
        data=b"12345",
        content_type="text/csv",
        headers=[("X-Forwarded-For", "6.6.6.6"), ("Accept", "text/csv")],
        environ_overrides={"REMOTE_ADDR": "192.0.2.44", "SERVER_NAME": "10.1.2.3"},
    )
    (entry,) = received_entries(collector, 1)
    request = entry["request"]
    assert request["method"] == "PATCH"
    assert request["httpVersion"] == "HTTP/1.1"
    names = [(pair["name"], pair["value"]) for pair in request["headers"]]
    assert ("content-type", "text/csv") in names and ("content-length", "5") in names
    assert ("accept", "text/csv") in names and ("host", "localhost") in names
    assert entry["clientIPAddress"] == "192.0.2.44"  # the forged header is ignored
    assert entry["serverIPAddress"] == "10.1.2.3"


def test_trusted_proxy_headers_are_honoured_through_wsgi(collector: Collector) -> None:
    """Behind a configured proxy, the right-most untrusted X-Forwarded-For hop is the client."""
    fetch(
        validated(wsgi_apps.list_app, collector, trusted_proxies=["127.0.0.1"]),
        headers=[("X-Forwarded-For", "6.6.6.6, 198.51.100.9")],
        environ_overrides={"REMOTE_ADDR": "127.0.0.1"},
    )
    (entry,) = received_entries(collector, 1)
    assert entry["clientIPAddress"] == "198.51.100.9"


def test_odd_request_through_wsgi_is_schema_valid(collector: Collector) -> None:
    """A bad Host, spaces and non-ASCII in path and query, non-UTF-8 header bytes: still valid."""
    environ = create_environ("/", method="GET")
    del environ["RAW_URI"], environ["REQUEST_URI"]
    environ.update(
        PATH_INFO="/caf\xc3\xa9 menu/\xff",
        QUERY_STRING="q=a b&x=\xe9&&=",
        HTTP_HOST="bad host name!",
        HTTP_X_BIN="\xff\xfe\x80",
        SERVER_PROTOCOL="HTTP/3",
    )
    status, _, _ = run(middleware(wsgi_apps.list_app, collector), environ)
    assert status == "200 OK"
    (entry,) = received_entries(collector, 1)
    # The builder's documented placeholder for a host it cannot represent.
    assert entry["request"]["url"].startswith(f"http://{INVALID_HOST}/caf%C3%A9%20menu/")
    assert entry["request"]["httpVersion"] == "unknown"
    assert {"name": "x-bin", "value": "\xff\xfe\x80"} in entry["request"]["headers"]


# -- server integration ------------------------------------------------------------------------


def uwsgi_style_file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
    """uWSGI's wsgi.file_wrapper is a function returning the file itself (offload by identity)."""
    return filelike


class _FileWithNo(io.BytesIO):
    def fileno(self) -> int:  # a real file would have one; uWSGI offloads only those
        return 99


@pytest.mark.parametrize(
    ("file_wrapper", "make_file"),
    [
        pytest.param(FileWrapper, io.BytesIO, id="type-wsgiref-gunicorn"),
        pytest.param(uwsgi_style_file_wrapper, _FileWithNo, id="function-uwsgi"),
    ],
)
def test_file_wrapper_response_is_returned_untouched(
    collector: Collector, file_wrapper: Any, make_file: Callable[[bytes], Any]
) -> None:
    """The server gets back the very object wsgi.file_wrapper made, so sendfile still works."""
    made: list[Any] = []

    def file_app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(
            "200 OK",
            [("Content-Type", "application/pdf"), ("Content-Length", str(len(BODY)))],
        )
        made.append(environ["wsgi.file_wrapper"](make_file(BODY), 4096))
        return made[0]

    environ = create_environ("/report.pdf")
    environ["wsgi.file_wrapper"] = file_wrapper
    result = middleware(file_app, collector)(environ, lambda *args: None)
    assert result is made[0]
    result.close()
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == len(BODY)
    assert entry["response"]["status"] == 200


def test_a_file_wrapper_response_ends_when_the_server_closes_it(collector: Collector) -> None:
    """The server sends a file response by itself (sendfile), then closes it: the entry ends
    there, so its time covers the transfer, as for an iterated response."""

    def file_app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", str(len(BODY)))])
        return environ["wsgi.file_wrapper"](io.BytesIO(BODY), 4096)

    environ = create_environ("/report.pdf")
    environ["wsgi.file_wrapper"] = FileWrapper
    result = middleware(file_app, collector)(environ, lambda *args: None)
    assert isinstance(result, FileWrapper)
    assert b"".join(result) == BODY  # the server's own sending
    assert alf_analytics.flush(5.0)
    assert collector.count() == 0  # not finished before the server is done with it
    result.close()
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == len(BODY)


def test_file_wrapper_without_content_length_is_not_claimed_as_captured(
    collector: Collector,
) -> None:
    """A file response the agent hands over unseen is marked not captured, whatever its size."""

    def file_app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(BODY))

    environ = create_environ("/")
    environ["wsgi.file_wrapper"] = FileWrapper
    result = middleware(file_app, collector)(environ, lambda *args: None)
    assert b"".join(result) == BODY
    result.close()
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodyCaptured"] is False
    assert entry["response"]["bodySize"] == 0  # ALF.md 1.6: no measure, no Content-Length
    assert "content" not in entry["response"]


def test_flask_test_client_with_the_documented_setup(collector: Collector) -> None:
    """Wrapping app.wsgi_app, as the README shows, keeps Flask's own test client working."""
    app = wsgi_apps.make_flask_app()
    app.wsgi_app = middleware(app.wsgi_app, collector)  # type: ignore[method-assign]
    client = app.test_client()
    # Werkzeug's test responses run the app iterable's close() (and so finish the entry)
    # only when closed, as a server would: use them as context managers.
    with client.post("/json", json={"items": [1, 2, 3]}) as posted:
        assert (posted.status_code, posted.get_json()["count"]) == (201, 3)
    with client.get("/stream?n=2") as streamed:
        assert streamed.data == b"event 0\nevent 1\n"
    entries = received_entries(collector, 2)
    assert [(e["request"]["method"], e["response"]["status"]) for e in entries] == [
        ("POST", 201),
        ("GET", 200),
    ]
    assert body_of(entries[0]["request"], "postData") == b'{"items": [1, 2, 3]}'


def test_flask_send_file_keeps_the_file_wrapper(collector: Collector) -> None:
    """Flask's send_file returns the server's file wrapper; the middleware hands it back as is."""
    environ = create_environ("/file")
    environ["wsgi.file_wrapper"] = FileWrapper
    result = middleware(FLASK.wsgi_app, collector)(environ, lambda *args: None)
    assert type(result) is FileWrapper
    assert b"".join(result) == wsgi_apps.FILE_BYTES
    result.close()
    (entry,) = received_entries(collector, 1)
    assert entry["response"]["bodySize"] == len(wsgi_apps.FILE_BYTES)


def test_concurrent_requests_keep_their_own_facts(collector: Collector) -> None:
    """Requests served at once on several threads each get their own status, sizes and path."""

    def sized_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        size = int(environ["PATH_INFO"].rsplit("/", 1)[1])
        received = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        start_response(
            f"{(200, 201, 202, 203, 400, 404, 500)[size % 7]} OK", [("Content-Type", "text/plain")]
        )
        for _ in range(size):
            time.sleep(0)  # let the other threads interleave
            yield b"r"
        assert len(received) == size * 3

    wrapped = middleware(sized_app, collector)
    sizes = list(range(1, 41))

    def serve(mine: list[int]) -> None:
        client = Client(wrapped)
        for size in mine:
            response = client.post(f"/size/{size}", data=b"q" * (size * 3))
            assert response.get_data() == b"r" * size
            response.close()

    threads = [threading.Thread(target=serve, args=(sizes[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = received_entries(collector, len(sizes))
    for entry in entries:
        size = int(entry["request"]["url"].rsplit("/", 1)[1])
        assert entry["request"]["bodySize"] == size * 3
        assert body_of(entry["request"], "postData") == b"q" * (size * 3)
        assert entry["response"]["bodySize"] == size
        assert entry["response"]["status"] == (200, 201, 202, 203, 400, 404, 500)[size % 7]
    assert sorted(int(e["request"]["url"].rsplit("/", 1)[1]) for e in entries) == sizes


def test_queued_entry_does_not_keep_the_request_stream_alive(collector: Collector) -> None:
    """While an entry waits for the worker, the server's body buffer can still be freed."""
    wrapped = middleware(echo_app(_read_all), collector)
    handed_over: list[Any] = []
    wrapped._worker.submit = handed_over.append  # type: ignore[method-assign]
    stream = io.BytesIO(b"u" * 1_000_000)
    environ = create_environ("/upload", method="POST", input_stream=stream)
    gone = weakref.ref(stream)
    status, _, body = run(wrapped, environ)
    assert (status, len(body)) == ("200 OK", 1_000_000)
    del stream, environ, body
    gc.collect()
    assert len(handed_over) == 1
    assert gone() is None
    assert handed_over[0].request_body_size == 1_000_000


def test_no_thread_per_request(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 requests leave the process with the same threads (one worker, started once)."""
    client = Client(middleware(wsgi_apps.list_app, collector, log_body=False))
    client.get("/").close()
    assert alf_analytics.flush(5.0)

    # The collector's threads (its own, and its AnyIO pool), and the worker's senders (at most
    # max_inflight, started as batches need them, not per request): not a per-request cost.
    ignored = ("alf-collector", "AnyIO worker thread", "alf-analytics-sender")

    def agent_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if not t.name.startswith(ignored)}

    started: list[str] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        if not thread.name.startswith(ignored):
            started.append(thread.name)
        real_start(thread)

    before = agent_threads()
    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(2000):
        client.get("/").close()
    monkeypatch.undo()
    assert started == []
    assert agent_threads() <= before  # an earlier test's worker may have ended meanwhile
    name = f"alf-analytics-worker:{collector.url}"
    assert sum(t.name == name for t in agent_threads()) == 1
    senders = [t for t in threading.enumerate() if t.name.startswith("alf-analytics-sender")]
    assert len(senders) <= client.application.config.max_inflight  # type: ignore[attr-defined]
    assert len(received_entries(collector, 2001)) == 2001


# -- gunicorn ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Wait for gunicorn's socket (a bare connect: no request, so no entry is recorded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else b""
            raise AssertionError(f"gunicorn exited early: {stderr!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gunicorn did not start listening")


@pytest.fixture(scope="module")
def gunicorn_run() -> Iterator[dict[str, Any]]:
    """Serve the Flask app under gunicorn (sync worker), send real requests, then SIGTERM."""
    with Collector() as collector:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "ALF_COLLECTOR_URL": collector.url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            str(GUNICORN),
            "--workers=1",
            "--worker-class=sync",
            f"--bind=127.0.0.1:{port}",
            "--graceful-timeout=20",
            # gunicorn 27 opens a control socket in $HOME by default: not shared between runs.
            *(["--no-control-socket"] if gunicorn_version >= (27,) else []),
            "tests.wsgi_apps:create_gunicorn_app()",
        ]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
        try:
            # Requests wait in the listen backlog until the worker has booted.
            _wait_until_listening(process, port, timeout=30.0)
            payload = {"items": list(range(300)), "note": "caf\u00e9"}

            def upload() -> Iterator[bytes]:
                for _ in range(50):
                    yield BODY

            with httpx.Client(base_url=url, timeout=10.0) as client:
                posted = client.post("/json", json=payload)
                with client.stream("GET", "/stream?n=20") as streamed:
                    chunks = list(streamed.iter_raw())
                    stream_headers = streamed.headers
                uploaded = client.post(
                    "/echo", content=upload(), headers={"Content-Type": "application/x-test"}
                )
                filed = client.get("/file")
            # Batches are large and the delay long: nothing may have been sent before exit.
            sent_before_exit = collector.count()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
            assert collector.wait_for_entries(4, timeout=10.0), stderr.decode()
            yield {
                "returncode": process.returncode,
                "sent_before_exit": sent_before_exit,
                "stderr": stderr.decode(errors="replace"),
                "payload": payload,
                "posted": posted,
                "chunks": chunks,
                "stream_headers": stream_headers,
                "uploaded": uploaded,
                "filed": filed,
                "alfs": collector.alfs(),
                "entries": {
                    (stored.method, stored.path): stored.entry for stored in collector.entries()
                },
            }
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_gunicorn_worker_flushes_schema_valid_entries_at_exit(gunicorn_run: dict[str, Any]) -> None:
    """After SIGTERM the worker's exit flush delivers every entry, each schema-valid."""
    assert gunicorn_run["sent_before_exit"] == 0
    assert gunicorn_run["returncode"] == 0, gunicorn_run["stderr"]
    assert len(gunicorn_run["alfs"]) == 1  # one group, one ALF object, all the entries
    assert "Traceback" not in gunicorn_run["stderr"]
    for alf in gunicorn_run["alfs"]:
        assert_valid_alf(alf)
        assert alf["serviceToken"] == wsgi_apps.GUNICORN_TOKEN
        assert alf["environment"] == "gunicorn"
    assert set(gunicorn_run["entries"]) == {
        ("GET", "/stream"),
        ("POST", "/json"),
        ("POST", "/echo"),
        ("GET", "/file"),
    }


def test_gunicorn_streamed_response(gunicorn_run: dict[str, Any]) -> None:
    """A streamed Flask response arrives chunked and whole; the entry has every byte."""
    expected = b"".join(f"event {index}\n".encode() for index in range(20))
    assert gunicorn_run["stream_headers"]["transfer-encoding"] == "chunked"
    assert b"".join(gunicorn_run["chunks"]) == expected
    entry = gunicorn_run["entries"][("GET", "/stream")]
    assert entry["request"]["url"].endswith("/stream?n=20")
    assert entry["response"]["bodySize"] == len(expected)
    assert body_of(entry["response"], "content") == expected
    assert entry["clientIPAddress"] == "127.0.0.1"
    assert entry["serverIPAddress"] == "127.0.0.1"


def test_gunicorn_chunked_upload(gunicorn_run: dict[str, Any]) -> None:
    """A chunked upload reaches the app whole and is recorded with its real size."""
    assert gunicorn_run["uploaded"].status_code == 200
    assert gunicorn_run["uploaded"].content == BODY * 50
    request = gunicorn_run["entries"][("POST", "/echo")]["request"]
    assert {"name": "transfer-encoding", "value": "chunked"} in request["headers"]
    assert request["bodySize"] == len(BODY) * 50
    assert body_of(request, "postData") == BODY * 50


def test_gunicorn_json_post(gunicorn_run: dict[str, Any]) -> None:
    """A JSON POST is parsed by Flask under gunicorn and recorded with both bodies."""
    posted = gunicorn_run["posted"]
    assert posted.status_code == 201, posted.text
    assert posted.json()["received"] == gunicorn_run["payload"]
    entry = gunicorn_run["entries"][("POST", "/json")]
    request, response = entry["request"], entry["response"]
    assert request["bodySize"] == len(posted.request.content)
    assert body_of(request, "postData") == posted.request.content
    assert request["postData"]["mimeType"] == "application/json"
    assert {"name": "content-length", "value": str(len(posted.request.content))} in request[
        "headers"
    ]
    assert (response["status"], response["statusText"]) == (201, "CREATED")
    assert body_of(response, "content") == posted.content
    assert response["bodySize"] == len(posted.content)
    assert entry["timings"]["wait"] > 0


def test_gunicorn_send_file_goes_through_the_file_wrapper(gunicorn_run: dict[str, Any]) -> None:
    """send_file under gunicorn (its FileWrapper, sendfile) arrives whole and is sized."""
    assert gunicorn_run["filed"].content == wsgi_apps.FILE_BYTES
    response = gunicorn_run["entries"][("GET", "/file")]["response"]
    assert response["bodySize"] == len(wsgi_apps.FILE_BYTES)
    assert response["bodyCaptured"] is False
    assert "content" not in response


def _raw_exchange(port: int, request: bytes) -> bytes:
    """The bytes a client gets for one request (until the server closes), Date header removed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return re.sub(rb"(?im)^date: [^\r\n]*\r\n", b"", received)


@pytest.mark.slow
def test_broken_apps_under_gunicorn_answer_as_without_us(collector: Collector) -> None:
    """str and int chunks, a seek() returning None: the client gets what gunicorn gives bare."""
    requests = [
        b"GET /str HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /int HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /seek HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    ]
    answers = []
    for variant in ("bare", "recorded"):
        port = free_port()
        env = {**os.environ, "ALF_COLLECTOR_URL": collector.url}
        command = [
            str(GUNICORN), "--workers=1", "--worker-class=sync", f"--bind=127.0.0.1:{port}",
            *(["--no-control-socket"] if gunicorn_version >= (27,) else []),
            f"tests.wsgi_apps:create_broken_{variant}()",
        ]  # fmt: skip
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
        with reaped(process):
            _wait_until_listening(process, port, timeout=30.0)
            answers.append([_raw_exchange(port, request) for request in requests])
            stderr = sigterm(process)
        assert b"alf_analytics" not in stderr, stderr  # no error raised inside our code
    bare, recorded = answers
    assert recorded == bare
    assert b"5\r\nhello\r\n5\r\nhello\r\n" in bare[2]  # the rewind worked for the app
    assert collector.wait_for_entries(3, 10.0)
