"""Django capture: one middleware class, sync- and async-capable.

Usage, in ``settings.py``::

    MIDDLEWARE = ["alf_analytics.django.AnalyticsMiddleware", ...]  # first in the list
    ALF_ANALYTICS = {"service_token": "...", "environment": "prod", "log_body": True}

Under WSGI the stack stays sync, under ASGI with an async stack it stays async: Django picks the
mode from ``get_response``. The request body is counted (and captured up to the cap) as the view
reads it, so ``request.body``, ``request.POST``, uploads and ``request.read()`` all keep working.
Streaming responses are observed by wrapping their iterators; the entry is finished when Django
closes the response, after the last byte went out.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from time import perf_counter
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import FileResponse, HttpRequest
from django.http.response import HttpResponseBase, StreamingHttpResponse

from ._config import Config, make_config
from ._record import Exchange, InputTee
from ._worker import Worker, get_worker, hand_over
from .wsgi import read_environ

__all__ = ["AnalyticsMiddleware"]

logger = logging.getLogger("alf_analytics")


def _config_from_settings() -> Config:
    options = getattr(settings, "ALF_ANALYTICS", None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"settings.ALF_ANALYTICS must be a dict of options, got {type(options).__name__}"
        )
    try:
        return make_config(options)
    except (TypeError, ValueError) as exc:
        message = str(exc).removeprefix("alf_analytics: ")
        raise ImproperlyConfigured(f"settings.ALF_ANALYTICS: {message}") from None


class AnalyticsMiddleware:
    """Record every exchange Django serves as an ALF entry (options in ``ALF_ANALYTICS``)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.config = _config_from_settings()
        self._worker: Worker = get_worker(self.config)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        exchange = self._begin(request)
        try:
            response = self.get_response(request)
        except BaseException:
            self._fail(exchange)
            raise
        self._observe(exchange, response, is_async=False)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        exchange = self._begin(request)
        try:
            response = await self.get_response(request)
        except BaseException:
            self._fail(exchange)
            raise
        self._observe(exchange, response, is_async=True)
        return response

    def _begin(self, request: HttpRequest) -> Exchange:
        meta = request.META.copy()
        scope = getattr(request, "scope", None)
        if scope is not None:
            # ASGIRequest's META is WSGI-shaped but lacks these; take them from the scope.
            meta["wsgi.url_scheme"] = scope.get("scheme", "http")
            meta["SERVER_PROTOCOL"] = "HTTP/" + str(scope.get("http_version", "1.1"))
            raw_path = scope.get("raw_path")
            if raw_path:
                meta["RAW_URI"] = raw_path.decode("latin-1")
            server = scope.get("server")
            if server and server[0]:
                meta.setdefault("SERVER_ADDR", server[0])
        exchange = Exchange(self.config, meta, read_environ)
        stream = getattr(request, "_stream", None)
        if stream is not None:
            # HttpRequest.read(), .body, .POST and the upload handlers all read _stream.
            request._stream = InputTee(stream, exchange)  # type: ignore[assignment]
        return exchange

    def _fail(self, exchange: Exchange) -> None:
        exchange.status = 500
        self._finish(exchange)

    def _observe(self, exchange: Exchange, response: HttpResponseBase, *, is_async: bool) -> None:
        try:
            exchange.status = response.status_code
            exchange.reason = response.reason_phrase
            headers = [*response.items()]
            # As Django's handlers send them; Morsel.output(header="") has a leading space.
            headers.extend(("Set-Cookie", c.OutputString()) for c in response.cookies.values())
            exchange.response_headers = headers
            if isinstance(response, StreamingHttpResponse):
                self._observe_stream(exchange, response)
            else:
                exchange.t_response = perf_counter()
                content = response.content  # type: ignore[attr-defined]
                exchange.response_data(content)
            # Django calls these from response.close(), after the server sent the last byte.
            response._resource_closers.append(  # type: ignore[attr-defined]
                lambda: self._finish(exchange)
            )
        except Exception:  # pragma: no cover - defensive: never break the host app
            logger.exception("alf_analytics: could not observe a response")
            self._finish(exchange)

    def _observe_stream(self, exchange: Exchange, response: StreamingHttpResponse) -> None:
        if isinstance(response, FileResponse) and not exchange.config.log_body:
            # Keep file_to_stream so WSGI servers can use sendfile; the size comes from
            # Content-Length, set by FileResponse.
            exchange.length_from_headers()
            exchange.t_response = perf_counter()
            return
        content = response.streaming_content
        if isinstance(content, AsyncIterator):
            response.streaming_content = _observe_async(content, exchange)
        else:
            response.streaming_content = _observe_sync(content, exchange)

    def _finish(self, exchange: Exchange) -> None:
        if not exchange.t_end:  # Django may close a response twice
            hand_over(self._worker, exchange)


def _observe_sync(chunks: Iterator[bytes], exchange: Exchange) -> Iterator[bytes]:
    for chunk in chunks:
        if not exchange.t_response:
            exchange.t_response = perf_counter()
        exchange.response_data(chunk)
        yield chunk


async def _observe_async(chunks: AsyncIterator[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if not exchange.t_response:
            exchange.t_response = perf_counter()
        exchange.response_data(chunk)
        yield chunk
