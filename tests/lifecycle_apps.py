"""Apps served by real servers (gunicorn, uvicorn) in the lifecycle tests and the soak.

Not a test module. Servers import it with ``--pythonpath tests`` (or ``--app-dir tests``)::

    gunicorn --preload lifecycle_apps:flask_app
    uvicorn --workers 2 lifecycle_apps:starlette_app
    gunicorn lifecycle_apps:make_django_app()

The apps are built on first attribute access, so importing this module has no side effect
(gunicorn ``--preload`` builds the app in the master, before forking). Configuration comes
from the environment:

- ``ALF_COLLECTOR_URL``, ``ALF_SERVICE_TOKEN``: the middleware's own environment fallbacks;
- ``ALF_TEST_OPTIONS``: a JSON object of further middleware options
  (``{"shutdown_timeout": 2, "delay": 60, "log_body": true}``);
- ``ALF_TEST_STATS_DIR``: if set, each process writes ``<pid>.json`` there with
  ``alf_analytics.stats()`` when it exits, after the agent's own exit flush.

Every app serves ``/echo?id=...`` (GET or POST) through the middleware: the status and the
body length depend on the id, the body starts with the id and the serving pid and repeats the
request body, and ``X-Pid`` names the serving process. ``/_alf_stats`` bypasses the middleware
and answers this process's ``alf_analytics.stats()`` as JSON.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import zlib
from typing import Any

STATUSES = (200, 200, 201, 202, 404, 418, 500)
STATS_PATH = "/_alf_stats"


def _write_stats_at_exit() -> None:
    """Registered before ``alf_analytics`` is imported, so it runs after the agent's atexit.

    uvicorn re-raises SIGTERM once its server has shut down, so its processes end without
    running atexit handlers: the Starlette app also writes its file at lifespan shutdown.
    """
    directory = os.environ.get("ALF_TEST_STATS_DIR")
    if not directory:
        return
    import alf_analytics

    path = os.path.join(directory, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as out:
        json.dump(stats_document(alf_analytics.stats()), out)
    os.replace(path + ".tmp", path)


atexit.register(_write_stats_at_exit)


def options() -> dict[str, Any]:
    """Middleware options from ``ALF_TEST_OPTIONS`` (token and URL come from ``ALF_*``)."""
    value = json.loads(os.environ.get("ALF_TEST_OPTIONS") or "{}")
    assert isinstance(value, dict)
    return value


_served = [0]
_served_lock = threading.Lock()


def answer(request_id: str, body: bytes) -> tuple[int, bytes]:
    """The status and body ``/echo`` answers: both depend on the id, so no two look alike."""
    with _served_lock:
        _served[0] += 1
    code = zlib.crc32(request_id.encode())
    status = STATUSES[code % len(STATUSES)]
    text = f"{request_id}|{os.getpid()}|".encode() + body + b"." * (code % 257)
    return status, text


def stats_document(stats: dict[str, Any]) -> dict[str, Any]:
    """This process's agent statistics, and how many ``/echo`` requests it answered."""
    return {
        "pid": os.getpid(),
        "threads": threading.active_count(),
        "served": _served[0],
        "stats": stats,
    }


def _stats_body() -> bytes:
    import alf_analytics

    return json.dumps(stats_document(alf_analytics.stats())).encode()


# -- Flask under WSGI ---------------------------------------------------------------------------


def _build_flask() -> Any:
    return build_flask(**options())


def build_flask(**middleware_options: Any) -> Any:
    """The Flask echo app wrapped in the middleware, behind the ``/_alf_stats`` dispatcher."""
    from flask import Flask, Response, request

    from alf_analytics import AnalyticsWSGIMiddleware

    app = Flask("lifecycle_apps")

    @app.route("/echo", methods=["GET", "POST"])
    def echo() -> Response:
        status, text = answer(request.args.get("id", ""), request.get_data())
        return Response(text, status=status, mimetype="text/plain", headers=_pid_header())

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, **middleware_options
    )
    return _wsgi_with_stats(app)


def _pid_header() -> dict[str, str]:
    return {"X-Pid": str(os.getpid())}


def _wsgi_with_stats(app: Any) -> Any:
    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == STATS_PATH:
            body = _stats_body()
            start_response(
                "200 OK",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    return dispatch


# -- Starlette under ASGI -----------------------------------------------------------------------


def _build_starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from alf_analytics import AnalyticsASGIMiddleware

    async def echo(request: Request) -> Response:
        status, text = answer(request.query_params.get("id", ""), await request.body())
        return Response(text, status_code=status, media_type="text/plain", headers=_pid_header())

    app = AnalyticsASGIMiddleware(
        Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])]), **options()
    )

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STATS_PATH:
            body = _stats_body()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "lifespan":
            await app(scope, receive, _dump_after_shutdown(send))
            return
        await app(scope, receive, send)

    return dispatch


def _dump_after_shutdown(send: Any) -> Any:
    # The middleware flushes before it forwards lifespan.shutdown.complete to this send.
    async def send_and_dump(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            _write_stats_at_exit()
        await send(message)

    return send_and_dump


# -- Django under WSGI (settings configured here: a one-module project) -------------------------


def _django_echo(request: Any) -> Any:
    from django.http import HttpResponse

    status, text = answer(request.GET.get("id", ""), request.body)
    return HttpResponse(text, status=status, content_type="text/plain", headers=_pid_header())


def _django_urls() -> list[Any]:
    from django.urls import path

    return [path("echo", _django_echo)]


def make_django_app() -> Any:
    """A Django WSGI app with ``alf_analytics.django.AnalyticsMiddleware`` first."""
    import django
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="lifecycle-tests-only",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=["alf_analytics.django.AnalyticsMiddleware"],
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
            ALF_ANALYTICS=options(),
        )
        django.setup()
    return _wsgi_with_stats(get_wsgi_application())


_BUILDERS = {"flask_app": _build_flask, "starlette_app": _build_starlette}
_built: dict[str, Any] = {}
_build_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":
        return _django_urls()
    builder = _BUILDERS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _build_lock:
        if name not in _built:
            _built[name] = builder()
        return _built[name]
