"""ASGI capture: Starlette, FastAPI, any ASGI 3 application. Pure ASGI, no framework import.

Usage::

    app.add_middleware(AnalyticsASGIMiddleware, service_token="...")
    # or: app = AnalyticsASGIMiddleware(app, service_token="...")

Every ``receive`` and ``send`` message is forwarded unchanged and at once; the middleware only
counts body bytes (capturing up to ``max_body_bytes``) and stamps times. ``websocket`` and any
unknown scope pass straight through. On ``lifespan.shutdown.complete`` the queued entries are
flushed, off the event loop and with a bounded wait, before the message is forwarded; for an
app that does not support lifespan at all, the middleware answers the lifespan events itself so
that this flush still happens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any
from urllib.parse import quote

from ._config import Config, make_config
from ._record import Exchange, RequestInfo
from ._worker import Worker, flush, get_worker, hand_over

__all__ = ["AnalyticsASGIMiddleware", "FlushOnShutdown"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("alf_analytics")

_DEFAULT_PORTS = {"http": 80, "https": 443}


class AnalyticsASGIMiddleware:
    """Record every HTTP exchange of an ASGI application as an ALF entry.

    :param app: the ASGI application to observe.
    :param service_token: the collector's service token (or ``ALF_SERVICE_TOKEN``).
    :param options: the other keyword-only options (``environment``, ``collector_url``,
        ``log_body``, ``batch_size``, ``delay``, ...), see the README's table. Invalid options
        raise ``ValueError``/``TypeError`` here, never at request time.
    """

    __slots__ = ("app", "config", "_worker")

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app
        self.config: Config = make_config(options)
        self._worker: Worker = get_worker(self.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            await self._http(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A copy: routers add keys and rewrite root_path/path in the scope as they dispatch,
        # and some middlewares append to its header list in place.
        source = dict(scope)
        headers = source.get("headers")
        if type(headers) is list:
            source["headers"] = headers.copy()
        exchange = Exchange(self.config, source, read_scope)
        worker = self._worker
        done = False

        async def receive_with_capture() -> Message:
            message = await receive()
            # Once the entry is handed to the worker thread it is no longer ours to change
            # (an app may still read the body after it has answered).
            if message["type"] == "http.request" and not done:
                body = message.get("body")
                if body:
                    exchange.request_data(body)
                if not message.get("more_body", False):
                    exchange.request_complete = True
            return message

        async def send_with_capture(message: Message) -> None:
            nonlocal done
            if done:  # trailers, or an app sending past the end: not ours to record
                await send(message)
                return
            message_type = message["type"]
            if message_type == "http.response.body":
                # Forward first, count after: the chunk reaches the client without waiting for
                # its capture, and a chunk the server could not send is not counted as sent.
                await send(message)
                body = message.get("body")
                if body:
                    exchange.response_data(body)
                if not message.get("more_body", False):
                    # The response is complete: background tasks that run after this point
                    # must not count as response time.
                    done = True
                    hand_over(worker, exchange)
                return
            elif message_type == "http.response.start":
                exchange.t_response = perf_counter()
                exchange.status = message.get("status", 0)
                exchange.response_headers = message.get("headers") or ()
            elif message_type == "http.response.pathsend":
                await send(message)
                done = True
                exchange.length_from_headers()
                hand_over(worker, exchange)
                return
            await send(message)

        try:
            await self.app(scope, receive_with_capture, send_with_capture)
        except BaseException:
            if not done:
                done = True
                if not exchange.t_response:
                    exchange.status = 500
                hand_over(worker, exchange)
            raise
        if not done:
            # The app returned without completing its response (client gone, or a bug).
            hand_over(worker, exchange)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _lifespan_with_flush(
            self.app, scope, receive, send, self._worker.flush, self.config.shutdown_timeout
        )


class FlushOnShutdown:
    """Flush every queued entry at ASGI lifespan shutdown, for apps recorded by other means.

    Django's ASGI handler refuses the lifespan protocol, and uvicorn ends a SIGTERM shutdown by
    re-raising the signal, which skips ``atexit``: wrap Django's ASGI application so the
    entries its :class:`~alf_analytics.django.AnalyticsMiddleware` queued are sent first::

        application = FlushOnShutdown(get_asgi_application())

    HTTP and websocket scopes pass through untouched; nothing is recorded here.
    """

    __slots__ = ("app", "timeout")

    def __init__(self, app: ASGIApp, *, timeout: float = 5.0) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await _lifespan_with_flush(self.app, scope, receive, send, flush, self.timeout)


async def _lifespan_with_flush(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    flush_queued: Callable[[float], bool],
    timeout: float,
) -> None:
    """Forward the lifespan protocol, flushing before ``lifespan.shutdown.complete`` goes out."""
    took_part = False

    async def receive_seen() -> Message:
        nonlocal took_part
        took_part = True
        return await receive()

    async def send_with_flush(message: Message) -> None:
        nonlocal took_part
        took_part = True
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await _flush_off_loop(flush_queued, timeout)
        await send(message)

    try:
        await app(scope, receive_seen, send_with_flush)
    except Exception:
        if took_part:
            raise
        # The app refused the scope before taking any event: it does not speak lifespan.
        # Run the protocol for it, or the server (uvicorn re-raises SIGTERM after its
        # shutdown, skipping atexit) would stop with entries still queued.
        logger.debug("alf_analytics: the app does not support lifespan; running it here")
    else:
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _flush_off_loop(flush_queued, timeout)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _flush_off_loop(flush_queued: Callable[[float], bool], timeout: float) -> None:
    try:
        import anyio.to_thread

        await anyio.to_thread.run_sync(flush_queued, timeout)
    except Exception:  # never let our flush break the server's shutdown
        logger.warning("alf_analytics: flush at lifespan shutdown failed", exc_info=True)


def _latin1(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _wire_path(scope: Scope) -> str:
    """The request path as the client sent it, bytes shown as Latin-1 (like ``raw_path``).

    ASGI's ``path`` includes ``root_path`` (uvicorn puts it in ``raw_path`` too); a server that
    leaves it out of either gets it put back in front, so a mounted app logs the full path.
    """
    raw_path = scope.get("raw_path")
    if raw_path:
        # Some clients/servers (older httpx) left the query string in raw_path.
        path = _latin1(raw_path).partition("?")[0]
    else:
        # ``path`` is decoded text: back to its UTF-8 bytes, the form the client sent.
        path = str(scope.get("path") or "").encode("utf-8", "surrogateescape").decode("latin-1")
    root = str(scope.get("root_path") or "").rstrip("/")
    if root:
        root = root.encode("utf-8", "surrogateescape").decode("latin-1")
        quoted = quote(root, safe="/:@!$&'()*+,;=-._~", encoding="latin-1")
        if not any(path == r or path.startswith(r + "/") for r in (root, quoted)):
            path = root + path
    return path


def read_scope(scope: Scope) -> RequestInfo:
    """Request facts from an ASGI ``http`` scope snapshot (runs on the worker thread)."""
    scheme = str(scope.get("scheme") or "http")
    headers = scope.get("headers") or []
    host = ""
    content_length: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host" and not host:
            host = _latin1(value)
        elif lowered == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                content_length = None
    server = scope.get("server")
    server_ip = None
    if server:
        server_ip = str(server[0])
        if not host:
            name = f"[{server_ip}]" if ":" in server_ip else server_ip
            port = server[1] if len(server) > 1 else None
            host = name if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{name}:{port}"
    path = _wire_path(scope)
    client = scope.get("client")
    return RequestInfo(
        method=str(scope.get("method", "GET")),
        scheme={"ws": "http", "wss": "https"}.get(scheme, scheme),
        host=host,
        path=path,
        query=_latin1(scope.get("query_string", b"")),
        http_version=str(scope.get("http_version", "1.1")),
        headers=headers,
        peer=str(client[0]) if client else None,
        server_ip=server_ip,
        content_length=content_length if content_length is None or content_length >= 0 else None,
    )
