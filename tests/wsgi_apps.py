"""Tiny WSGI applications for the WSGI adapter tests, and the Flask app gunicorn serves.

Each app is a plain module-level function (or a small class) so a test can wrap it with
``wsgiref.validate.validator`` and with the middleware, and compare what a client receives.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, send_file

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

#: Repeated headers on purpose: they must reach the client (and the entry) as separate pairs.
HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Set-Cookie", "a=1; Path=/"),
    ("Set-Cookie", "b=2; Path=/"),
    ("X-Multi", "one"),
    ("X-Multi", "two"),
]
FILE_BYTES = bytes(range(256)) * 4


def list_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", list(HEADERS))
    return [b"hello ", b"world"]


def _chunks() -> Iterator[bytes]:
    yield b""  # PEP 3333: an empty chunk must not start the response by itself
    yield b"first,"
    yield b"second,"
    yield b"\x00\xff\xfe binary"


def generator_app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("201 Created", list(HEADERS))
    return _chunks()


def lazy_generator_app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    # start_response is called on the first next(), as generator-function apps do.
    start_response("202 Accepted", list(HEADERS))
    yield from _chunks()


def write_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    write = start_response("200 OK", list(HEADERS))
    write(b"written by write(), ")
    write(b"")
    return [b"then returned"]


def exc_info_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", list(HEADERS))
    try:
        raise ValueError("app-level failure handled by the app")
    except ValueError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"sorry, try later"]


def file_wrapper_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(FILE_BYTES)))],
    )
    wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](io.BytesIO(FILE_BYTES), 100)
    return wrapper


def status_only_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("204 No Content", [])
    return []


class ClosingBody:
    """An app iterable that counts its ``close()`` calls and can raise while iterating."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = 0
        self.failure = RuntimeError("iteration failed")

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_after:
                raise self.failure
            yield chunk

    def close(self) -> None:
        self.closed += 1


class ClosingApp:
    """A WSGI app returning one :class:`ClosingBody`, kept for the test to inspect."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.body = ClosingBody(chunks, fail_after)

    def __call__(self, environ: Environ, start_response: StartResponse) -> ClosingBody:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return self.body


def make_flask_app() -> Flask:
    """A Flask app with the endpoints a real service has: JSON, echo, stream, file."""
    app = Flask("alf_wsgi_test_app")

    @app.post("/json")
    def post_json() -> Any:
        payload = request.get_json()
        return jsonify(received=payload, count=len(payload["items"])), 201

    @app.post("/echo")
    def echo() -> Response:
        data = request.get_data()
        return Response(data, mimetype=request.mimetype or "application/octet-stream")

    @app.get("/stream")
    def stream() -> Response:
        count = int(request.args.get("n", "5"))

        def generate() -> Iterator[bytes]:
            for index in range(count):
                yield f"event {index}\n".encode()

        return Response(generate(), mimetype="text/event-stream")

    @app.get("/file")
    def file() -> Response:
        return send_file(io.BytesIO(FILE_BYTES), mimetype="application/octet-stream")

    @app.get("/boom")
    def boom() -> Response:
        raise LookupError("boom")

    return app


GUNICORN_TOKEN = "gunicorn-flask-token-0001"


def create_gunicorn_app() -> Any:
    """The Flask app gunicorn serves (``wsgi_apps:create_gunicorn_app()``).

    The collector URL comes from ``ALF_COLLECTOR_URL``. Batches are large and the delay long,
    so the entries can only reach the collector through the worker's exit-time flush.
    """
    from alf_analytics import AnalyticsWSGIMiddleware

    app = make_flask_app()
    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        service_token=GUNICORN_TOKEN,
        environment="gunicorn",
        log_body=True,
        log_body_types=["*/*", "text/event-stream"],
        batch_size=1000,
        delay=300.0,
    )
    return app


class _SeekReturnsNone:
    """A wsgi.input whose seek() returns None, as file-like objects may."""

    def __init__(self, stream: Any) -> None:
        self._data = stream.read()
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._position + size
        chunk = self._data[self._position : end]
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> None:
        self._position = offset

    def tell(self) -> int:
        return self._position


def broken_app(environ: Environ, start_response: StartResponse) -> Iterable[Any]:
    """What PEP 3333 forbids or allows at its edges: str or int chunks, a seek() giving None."""
    path = environ["PATH_INFO"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    if path == "/str":
        return ["text, not bytes"]
    if path == "/int":
        return [b"ok", 42]  # type: ignore[list-item]
    stream = environ["wsgi.input"]
    first = stream.read()
    stream.seek(0)
    return [first, stream.read()]


def _seek_none_input(app: Any) -> Any:
    def wrapper(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.input"] = _SeekReturnsNone(environ["wsgi.input"])
        result: Iterable[bytes] = app(environ, start_response)
        return result

    return wrapper


def create_broken_bare() -> Any:
    return _seek_none_input(broken_app)


def create_broken_recorded() -> Any:
    from alf_analytics import AnalyticsWSGIMiddleware

    return _seek_none_input(
        AnalyticsWSGIMiddleware(broken_app, service_token=GUNICORN_TOKEN, log_body=True)
    )
