"""ASGI applications the ASGI tests drive: raw ASGI 3 callables and small Starlette/FastAPI apps.

``create_uvicorn_app`` is the factory a real uvicorn runs
(``uvicorn --factory --app-dir tests asgi_apps:create_uvicorn_app``); it reads the collector URL
from ``ALF_COLLECTOR_URL``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from alf_analytics import AnalyticsASGIMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Set by :class:`ContextMiddleware`, read by the endpoint and its background task.
request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


# -- raw ASGI ---------------------------------------------------------------------------------


async def read_body(receive: Receive) -> bytes:
    """Read an ``http.request`` body to its end, straight from ``receive``."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: answer 200 with the request body it read itself."""
    body = await read_body(receive)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def raw_service(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI without lifespan support: ``/json`` (echo, 201), ``/stream``, anything else 200."""
    assert scope["type"] == "http", "this app does not support lifespan"
    if scope["path"] == "/stream":
        params = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        count, size = int(params.get("count", "4")), int(params.get("size", "1000"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for index in range(count):
            chunk = bytes([65 + index % 26]) * size
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = await read_body(receive)
    status, out, media = 200, b"ok", b"text/plain"
    if scope["path"] == "/json":
        status, media = 201, b"application/json"
        out = json.dumps({"received": json.loads(body)}).encode()
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", media)]}
    )
    await send({"type": "http.response.body", "body": out})


class BodyReadingMiddleware:
    """A user's pure ASGI middleware that reads the whole body first, then replays it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        scope.setdefault("state", {})["body_seen_by_user_middleware"] = b"".join(
            m.get("body", b"") for m in messages
        )
        replay = iter(messages)

        async def replay_receive() -> Message:
            for message in replay:
                return message
            return await receive()

        await self.app(scope, replay_receive, send)


class ContextMiddleware:
    """An outer pure ASGI middleware that sets :data:`request_var` for the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = request_var.set(f"set-by-outer:{scope.get('path', '')}")
        try:
            await self.app(scope, receive, send)
        finally:
            request_var.reset(token)


# -- Starlette --------------------------------------------------------------------------------


async def _json_echo(request: Request) -> Response:
    data = await request.json()
    return JSONResponse({"received": data}, status_code=201)


async def _body_echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for index in range(count):
        yield bytes([65 + index % 26]) * size
        await anyio.sleep(0)


async def _stream(request: Request) -> Response:
    count = int(request.query_params.get("count", "4"))
    size = int(request.query_params.get("size", "1000"))
    return StreamingResponse(_chunks(count, size), media_type="text/plain")


async def _sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


async def _background(request: Request) -> Response:
    seconds = float(request.query_params.get("seconds", "1"))
    return PlainTextResponse("done", background=BackgroundTask(_sleep, seconds))


def _fail_after_response() -> None:
    raise RuntimeError("background task failed after a 200")


async def _background_error(request: Request) -> Response:
    return PlainTextResponse("ok", background=BackgroundTask(_fail_after_response))


async def _error(request: Request) -> Response:
    raise ValueError("endpoint failed")


async def _cookies(request: Request) -> Response:
    response = PlainTextResponse("cookies")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2")
    return response


async def _health(request: Request) -> Response:
    return PlainTextResponse("ok")


def starlette_routes(*, observed: list[str] | None = None) -> list[Any]:
    """Routes shared by the Starlette apps; ``observed`` collects what ``/context`` sees."""
    seen = observed if observed is not None else []

    def remember(where: str) -> None:
        seen.append(f"{where}:{request_var.get()}")

    async def context(request: Request) -> Response:
        remember("endpoint")
        return PlainTextResponse("context", background=BackgroundTask(remember, "background"))

    return [
        Route("/json", _json_echo, methods=["POST"]),
        Route("/body", _body_echo, methods=["POST"]),
        Route("/stream", _stream),
        Route("/background", _background),
        Route("/background-error", _background_error),
        Route("/error", _error),
        Route("/cookies", _cookies),
        Route("/context", context),
        Route("/health", _health),
        Mount("/raw", app=echo_app),
    ]


def starlette_app(*, observed: list[str] | None = None) -> Starlette:
    """A plain Starlette app (no analytics: tests add or wrap the middleware)."""
    return Starlette(routes=starlette_routes(observed=observed))


def fastapi_app() -> FastAPI:
    """A FastAPI app whose ``/boom`` endpoint raises an unhandled exception."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise ValueError("unhandled in FastAPI")

    @app.post("/items", status_code=201)
    async def items(item: dict[str, Any]) -> dict[str, Any]:
        return {"item": item}

    return app


def create_uvicorn_app() -> Any:
    """The app a real uvicorn serves: Starlette wrapped in the analytics middleware.

    A long ``delay`` keeps entries queued until the lifespan shutdown flush sends them.
    """
    return _for_uvicorn(starlette_app())


def create_fastapi_with_a_bad_option() -> Any:
    """The README's FastAPI snippet with an invalid option: Starlette builds it lazily."""
    app = FastAPI()
    app.add_middleware(AnalyticsASGIMiddleware, sample_rate=5)
    return app


def create_uvicorn_raw_app() -> Any:
    """Like :func:`create_uvicorn_app`, around a raw ASGI app that refuses the lifespan scope."""
    return _for_uvicorn(raw_service)


def create_uvicorn_raw_app_flushing_at_sigterm() -> Any:
    """The raw app (no lifespan, so no lifespan flush), with the opt-in SIGTERM flush."""
    import alf_analytics

    alf_analytics.install_sigterm_flush()
    return _for_uvicorn(raw_service)


class StartupFailed(Exception):
    """Raised by the lifespan of the apps below."""


def _failing_lifespan_starlette() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        raise StartupFailed("database unreachable")
        yield  # pragma: no cover

    return Starlette(routes=starlette_routes(), lifespan=lifespan)


async def raises_before_taking_startup(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw app whose lifespan fails before it even takes the startup event."""
    if scope["type"] == "lifespan":
        raise StartupFailed("config missing")
    await raw_service(scope, receive, send)


def create_failing_starlette_bare() -> Any:
    return _failing_lifespan_starlette()


def create_failing_starlette_recorded() -> Any:
    return _for_uvicorn(_failing_lifespan_starlette())


def create_raises_before_startup_bare() -> Any:
    return raises_before_taking_startup


def create_raises_before_startup_recorded() -> Any:
    return _for_uvicorn(raises_before_taking_startup)


def _for_uvicorn(app: Any) -> Any:
    return AnalyticsASGIMiddleware(
        app,
        service_token=os.environ.get("ALF_SERVICE_TOKEN", "uvicorn-token"),
        collector_url=os.environ["ALF_COLLECTOR_URL"],
        environment="uvicorn",
        log_body=True,
        delay=60.0,
    )
