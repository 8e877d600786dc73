"""ASGI capture: Starlette, FastAPI, any ASGI 3 application. Pure ASGI, no framework import.

Usage::

    app.add_middleware(AnalyticsASGIMiddleware, service_token="...")
    # or: app = AnalyticsASGIMiddleware(app, service_token="...")

Every ``receive`` and ``send`` message is forwarded unchanged and at once; the middleware only
counts body bytes (capturing up to ``max_body_bytes``) and stamps times. ``websocket`` and any
unknown scope pass straight through. On ``lifespan.shutdown.complete`` the queued entries are
flushed, off the event loop and with a bounded wait, before the message is forwarded. Lifespan
messages and failures pass through exactly as without the middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from . import _signals
from ._config import Config, make_config, validate_option
from ._consumer import enter, leave_quietly
from ._gate import Gate, is_async_callable, made_with, takes_two_arguments
from ._record import NO_RESPONSE, Exchange, RequestInfo, log_internal_error
from ._signals import check_exit_flush_asgi
from ._worker import Worker, flush, get_worker, hand_over, shutdown_bound, warn_unsent

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._options import Options

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
    :param options: every option, keyword-only (:class:`alf_analytics.Options`; the README's
        table). Invalid options raise ``ValueError``/``TypeError`` here, never at request time.

    Callables among the options (``skip``, ``identify``, a per-request ``service_token`` or
    ``environment``) receive a ``starlette.requests.Request`` when the app is a Starlette or
    FastAPI app (or part of one, as ``add_middleware`` passes it), and the ASGI scope
    otherwise.
    """

    __slots__ = ("app", "config", "_worker", "_gate", "_request_of", "_first")

    def __init__(self, app: ASGIApp, **options: Unpack[Options]) -> None:
        if not is_async_callable(app) and takes_two_arguments(app):
            raise TypeError(
                "alf_analytics: AnalyticsASGIMiddleware was given a WSGI app (a callable of "
                "environ and start_response); wrap WSGI apps (Flask, ...) with "
                "AnalyticsWSGIMiddleware"
            )
        self.app = app
        try:
            self.config: Config = make_config(options)
        except (ValueError, TypeError) as error:
            # add_middleware builds us at the app's first call, its lifespan startup, and
            # uvicorn's default --lifespan auto takes a failing startup for "no lifespan" and
            # goes on silently: say it here too, or it only shows as 500s.
            logging.getLogger("alf_analytics.config").error("%s", error)
            raise
        self._worker: Worker | None = get_worker(self.config) if self.config.active else None
        self._request_of = _request_maker(app)
        self._gate = Gate(
            self.config, method_of=_method, path_of=_path, request_of=self._request_of
        )
        self._first = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http" and self._worker is not None:
            await self._http(scope, receive, send, self._worker)
        elif scope_type == "lifespan" and self._worker is not None:
            # The worker's shutdown_timeout: the one in force (the first middleware's).
            await _lifespan_with_flush(
                self.app, scope, receive, send, self._worker.flush, self._worker.shutdown_timeout
            )
        else:
            await self.app(scope, receive, send)

    def _admit(self, scope: Scope) -> Exchange | None:
        if self._first:
            self._first = False
            check_exit_flush_asgi()
        gate = self._gate
        if gate.simple:
            group = self.config.group
        else:
            admitted = gate.admit(scope)
            if admitted is None:
                return None  # skipped or sampled out: counted, nothing built
            group = admitted[0]
        exchange = Exchange(self.config, scope_snapshot(scope), read_scope, group)
        if exchange.request_body is not None:
            exchange.decide_request_capture(_header(scope, b"content-type"))
        return exchange

    async def _http(self, scope: Scope, receive: Receive, send: Send, worker: Worker) -> None:
        try:
            exchange = self._admit(scope)
            entered = enter() if exchange is not None else None
        except Exception:  # never break the host app (PITFALLS #20)
            log_internal_error("capture")
            exchange = entered = None
        if exchange is None or entered is None:
            await self.app(scope, receive, send)
            return
        holder, token = entered
        gate = self._gate
        request_of = self._request_of
        # True once the entry is handed over, or abandoned after an internal error of ours:
        # from then on every message passes through untouched.
        done = False
        # True once the server said the client left (http.disconnect before the response
        # was complete): what is sent after it does not reach anyone.
        gone = False

        def finish() -> None:
            if holder.value is not None:
                exchange.consumer = holder.value
            elif gate.config.identify is not None:
                exchange.consumer = gate.identify(request_of(scope))
            hand_over(worker, exchange)

        def unfinished() -> None:
            # The app raised or returned before its response was complete.
            if exchange.t_response:
                exchange.cut_response()  # a started body is cut
            elif gone:
                exchange.status = NO_RESPONSE  # nobody was there to get the server's 500
                exchange.response_body = None
            else:
                exchange.answered_by_server()

        def abandon(where: str) -> None:
            # Our own failure: the app and the server carry on exactly as without us, and
            # this request is not recorded (an entry built from half a capture would lie).
            nonlocal done
            done = True
            log_internal_error(where)

        async def receive_with_capture() -> Message:
            nonlocal gone
            message = await receive()
            # Once the entry is handed to the worker thread it is no longer ours to change
            # (an app may still read the body after it has answered).
            if not done:
                try:
                    message_type = message["type"]
                    if message_type == "http.request":
                        body = message.get("body")
                        if body:
                            exchange.request_data(body)
                        if not message.get("more_body", False):
                            exchange.request_complete = True
                    elif message_type == "http.disconnect":
                        gone = True
                        if not exchange.request_complete:
                            # The client left mid-body: what crossed is what was counted (not
                            # the Content-Length it announced), and a cut body is not captured.
                            exchange.request_complete = True
                            exchange.request_body = None
                except Exception:
                    abandon("request capture")
            return message

        async def send_with_capture(message: Message) -> None:
            nonlocal done
            if done:  # trailers, an app sending past the end, or a capture abandoned
                await send(message)
                return
            try:
                message_type = message["type"]
                if message_type == "http.response.start":
                    exchange.t_response = perf_counter()
                    exchange.status = message.get("status", 0)
                    exchange.response_headers = message.get("headers") or ()
                    exchange.decide_response_capture()
                    if gone:
                        # The client left before any answer (PITFALLS #22): none was given.
                        exchange.status = NO_RESPONSE
                        exchange.response_headers = ()
                        exchange.response_body = None
            except Exception:
                abandon("response capture")
                message_type = None
            # Forward first, count after: the chunk reaches the client without waiting for
            # its capture, and a chunk the server could not send is not counted as sent.
            try:
                await send(message)
            except BaseException:
                if message_type == "http.response.start" and not done:
                    # The server refused the start (uvicorn raises for status 99): nothing
                    # was answered, so no status or headers of the app's are recorded.
                    exchange.status = NO_RESPONSE
                    exchange.response_headers = ()
                    exchange.response_body = None
                elif message_type == "http.response.body" and not done:
                    exchange.cut_response()  # that chunk did not cross
                raise
            if done:
                return
            try:
                if message_type == "http.response.body":
                    body = message.get("body")
                    if body:
                        if gone:  # after a disconnect nothing crosses: the body is cut
                            exchange.cut_response()
                        else:
                            exchange.response_data(body)
                    if not message.get("more_body", False):
                        if gone:
                            # Ended after the client left (BaseHTTPMiddleware closes a stream
                            # it cancelled with an empty last message): the body was cut.
                            exchange.cut_response()
                        # The response is complete: background tasks that run after this
                        # point must not count as response time.
                        done = True
                        finish()
                elif message_type == "http.response.pathsend":
                    done = True
                    exchange.response_body = None
                    exchange.length_from_headers()
                    finish()
            except Exception:
                abandon("response capture")

        try:
            call = self.app(scope, receive_with_capture, send_with_capture)
            if not hasattr(call, "__await__"):
                raise TypeError(
                    "alf_analytics: the app wrapped by AnalyticsASGIMiddleware returned "
                    f"{type(call).__name__}, not an awaitable: it is not an ASGI app (a WSGI "
                    "app? wrap it with AnalyticsWSGIMiddleware)"
                )
            await call
        except BaseException:
            if not done:
                done = True
                try:
                    unfinished()
                    finish()
                except Exception:
                    log_internal_error("capture")
            raise
        finally:
            leave_quietly(token)
        if not done:
            # The app returned without completing its response (client gone, or a bug).
            try:
                unfinished()
                finish()
            except Exception:
                log_internal_error("capture")


class FlushOnShutdown:
    """Flush every queued entry at ASGI lifespan shutdown, for apps recorded by other means.

    Django's ASGI handler refuses the lifespan protocol, and uvicorn ends a SIGTERM shutdown by
    re-raising the signal, which skips ``atexit``: wrap Django's ASGI application so the
    entries its :class:`~alf_analytics.django.AnalyticsMiddleware` queued are sent first::

        application = FlushOnShutdown(get_asgi_application())

    The wait is bounded by ``timeout``, by default ``ALF_ANALYTICS["shutdown_timeout"]`` when
    Django is configured (else ``ALF_SHUTDOWN_TIMEOUT``, else 5 s). HTTP and websocket scopes
    pass through untouched; nothing is recorded here. When the wrapped app refuses the
    lifespan protocol (Django does), this wrapper answers the lifespan events itself so the
    flush still happens.
    """

    __slots__ = ("app", "_timeout")

    def __init__(self, app: ASGIApp, *, timeout: float | None = None) -> None:
        self.app = app
        if timeout is not None:
            timeout = validate_option("shutdown_timeout", timeout)
        self._timeout = timeout

    @property
    def timeout(self) -> float:
        """The bound of the flush at shutdown, in seconds."""
        return self._timeout if self._timeout is not None else _configured_shutdown_timeout()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _signals.flush_wrapper_seen = True
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await _lifespan_with_flush(
            self.app, scope, receive, send, flush, self.timeout, run_if_refused=True
        )


def _configured_shutdown_timeout() -> float:
    options: Any = None
    try:
        from django.conf import settings

        if settings.configured:
            options = getattr(settings, "ALF_ANALYTICS", None)
    except ImportError:
        pass
    value = options.get("shutdown_timeout") if isinstance(options, dict) else None
    try:
        timeout: float = validate_option("shutdown_timeout", value)
        return timeout
    except (TypeError, ValueError):
        return 5.0  # the Django check reports the bad value; shutdown still flushes


async def _lifespan_with_flush(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    flush_queued: Callable[[float], bool],
    timeout: float,
    *,
    run_if_refused: bool = False,
) -> None:
    """Forward the lifespan protocol, flushing before ``lifespan.shutdown.complete`` goes out.

    Every message and every exception passes through unchanged, so a failing startup fails
    exactly as it would without us (uvicorn: "Application startup failed", exit code 3).
    With ``run_if_refused`` (FlushOnShutdown only), an app that raises before taking any
    lifespan event, as Django's ASGI handler does, gets the protocol run for it.
    """
    took_part = False

    async def receive_seen() -> Message:
        nonlocal took_part
        took_part = True
        return await receive()

    async def send_with_flush(message: Message) -> None:
        nonlocal took_part
        took_part = True
        message_type = message["type"]
        if message_type == "lifespan.startup.complete":
            _signals.lifespan_seen = True
        elif message_type in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await _flush_off_loop(flush_queued, timeout)
        await send(message)

    if not run_if_refused:
        await app(scope, receive_seen, send_with_flush)
        return
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
            _signals.lifespan_seen = True
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _flush_off_loop(flush_queued, timeout)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _flush_off_loop(flush_queued: Callable[[float], bool], timeout: float) -> None:
    try:
        import anyio.to_thread

        # Shared with the other shutdown hooks: nested middlewares, the SIGTERM helper and
        # atexit do not each wait a full shutdown_timeout for the same unsent entries.
        done = await anyio.to_thread.run_sync(flush_queued, shutdown_bound(timeout))
        if not done:
            # uvicorn then exits without atexit: this is the last word on what was not sent.
            warn_unsent("lifespan shutdown")
    except Exception:  # never let our flush break the server's shutdown
        logger.warning("alf_analytics: flush at lifespan shutdown failed", exc_info=True)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


def _method(scope: Scope) -> str:
    return str(scope.get("method", "GET"))


def _path(scope: Scope) -> str:
    """The full request path as text (``root_path`` included), for ``skip_paths``."""
    path = str(scope.get("path") or "")
    root = str(scope.get("root_path") or "").rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        path = root + path  # a server that leaves root_path out of path
    return path


def _identity(scope: Scope) -> Any:
    return scope


def _request_maker(app: Any) -> Callable[[Scope], Any]:
    """What the option callables receive for this app: a Starlette request, or the scope."""
    if not made_with(app, ("starlette", "fastapi")):
        return _identity
    try:
        from starlette.requests import Request
    except ImportError:  # pragma: no cover - a Starlette app always has Starlette
        return _identity

    def make(scope: Scope) -> Any:
        # No receive: the request cannot consume the body the app is about to read.
        return Request(scope)

    return make


def _latin1(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def as_wire_text(text: str) -> str:
    """Decoded text back to its UTF-8 bytes, shown as Latin-1. A lone surrogate that is not
    an escaped byte ("/\\ud800") is kept as its UTF-8 form."""
    try:
        encoded = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", "surrogatepass")
    return encoded.decode("latin-1")


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
        path = as_wire_text(str(scope.get("path") or ""))
    root = str(scope.get("root_path") or "").rstrip("/")
    if root:
        root = as_wire_text(root)
        quoted = quote(root, safe="/:@!$&'()*+,;=-._~", encoding="latin-1")
        if not any(path == r or path.startswith(r + "/") for r in (root, quoted)):
            path = root + path
    return path


def scope_snapshot(scope: Scope) -> Scope:
    """What the worker thread reads later: a copy, since routers add keys and rewrite
    root_path/path in the scope as they dispatch, and some middlewares append to its header
    list in place."""
    source = dict(scope)
    headers = source.get("headers")
    if type(headers) is list:
        source["headers"] = headers.copy()
    return source


def read_scope(scope: Scope) -> RequestInfo:
    """Request facts from an ASGI ``http`` scope snapshot (runs on the worker thread)."""
    get = scope.get
    scheme = get("scheme") or "http"
    if type(scheme) is not str:
        scheme = str(scheme)
    headers = get("headers") or []
    host, content_length, chunked = _host_and_length(headers)
    server = get("server")
    server_ip = None
    if server:
        server_ip = str(server[0])
        if not host:
            name = f"[{server_ip}]" if ":" in server_ip else server_ip
            port = server[1] if len(server) > 1 else None
            host = name if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{name}:{port}"
    raw_path = get("raw_path")
    root_path = get("root_path")
    if raw_path and type(raw_path) is bytes and (root_path is None or type(root_path) is str):
        # With raw_path, the path depends on nothing else: cached (paths repeat).
        key = (raw_path, root_path)
        path = _PATHS.get(key)
        if path is None:
            path = _wire_path(scope)
            if len(_PATHS) >= 512:  # bounded: clients choose paths
                _PATHS.clear()
            _PATHS[key] = path
    else:
        path = _wire_path(scope)
    client = get("client")
    query = get("query_string", b"")
    method = get("method", "GET")
    version = get("http_version", "1.1")
    return RequestInfo(
        method if type(method) is str else str(method),
        _SCHEMES.get(scheme, scheme),
        host,
        path,
        query.decode("latin-1") if type(query) is bytes else _latin1(query),
        version if type(version) is str else str(version),
        headers,
        str(client[0]) if client else None,
        server_ip,
        content_length if content_length is None or content_length >= 0 else None,
        chunked,
    )


_SCHEMES = {"ws": "http", "wss": "https"}
#: (raw_path, root_path) -> the path as the client sent it (see _wire_path).
_PATHS: dict[tuple[Any, Any], str] = {}


def _host_and_length(headers: Any) -> tuple[str, int | None, bool]:
    """The first ``Host`` header (as Latin-1 text), ``Content-Length`` (None: none), and
    whether the body is chunked (``Transfer-Encoding: chunked``, no ``Content-Length``)."""
    try:
        # The common case in C: lower-case names (servers send them so), no repeats.
        found = dict(headers)
        names = b"".join(found)
    except (TypeError, ValueError):
        pass
    else:
        if len(found) == len(headers) and names.lower() == names:
            raw_host = found.get(b"host")
            host = _latin1(raw_host) if raw_host else ""
            raw_length = found.get(b"content-length")
            if raw_length is None:
                coding = found.get(b"transfer-encoding")
                return host, None, coding is not None and _is_chunked(coding)
            try:
                return host, int(raw_length), False
            except ValueError:
                return host, None, False
    host = ""
    content_length: int | None = None
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host" and not host:
            host = _latin1(value)
        elif lowered == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                content_length = None
        elif lowered == b"transfer-encoding":
            chunked = chunked or _is_chunked(value)
    return host, content_length, chunked and content_length is None


def _is_chunked(value: Any) -> bool:
    try:
        return b"chunked" in bytes(value).lower()
    except (TypeError, ValueError):
        return False
