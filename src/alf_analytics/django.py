"""Django capture: one middleware class, sync- and async-capable.

Usage, in ``settings.py``::

    MIDDLEWARE = ["alf_analytics.django.AnalyticsMiddleware", ...]  # first in the list
    ALF_ANALYTICS = {"service_token": "...", "environment": "prod", "log_body": True}
    INSTALLED_APPS = [..., "alf_analytics"]  # optional: system checks in manage.py check

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

from . import _checks
from ._checks import django_terms
from ._config import Config, make_config
from ._consumer import ConsumerHolder, enter, leave
from ._gate import Gate
from ._record import Exchange, InputTee
from ._signals import check_django_asgi, check_exit_flush_wsgi
from ._worker import Worker, get_worker, hand_over
from .wsgi import read_environ

_checks.register()

__all__ = ["AnalyticsMiddleware"]

logger = logging.getLogger("alf_analytics")


SETTING = "ALF_ANALYTICS"


def _config_from_settings() -> Config:
    options = getattr(settings, SETTING, None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"settings.ALF_ANALYTICS must be a dict of options, got {type(options).__name__}"
        )
    try:
        return make_config(options)
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(django_terms(str(exc))) from None


def _method(request: HttpRequest) -> str:
    return request.method or "GET"


def _path(request: HttpRequest) -> str:
    return request.path


def _identity(request: HttpRequest) -> HttpRequest:
    return request


class AnalyticsMiddleware:
    """Record every exchange Django serves as an ALF entry (options in ``ALF_ANALYTICS``).

    Callables among the options (``skip``, ``identify``, a per-request ``service_token`` or
    ``environment``) receive the ``HttpRequest``; ``identify`` runs after the view, so
    ``request.user`` is set.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.config = _config_from_settings()
        self._worker: Worker | None = get_worker(self.config) if self.config.active else None
        self._gate = Gate(self.config, method_of=_method, path_of=_path, request_of=_identity)
        self._first = True
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        exchange = self._begin(request)
        if exchange is None:
            return self.get_response(request)
        holder, token = enter()
        try:
            response = self.get_response(request)
        except BaseException:
            self._fail(exchange, holder, request)
            raise
        finally:
            leave(token)
        self._observe(exchange, response, holder, request, is_async=False)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        exchange = self._begin(request)
        if exchange is None:
            return await self.get_response(request)
        holder, token = enter()
        try:
            response = await self.get_response(request)
        except BaseException:
            self._fail(exchange, holder, request)
            raise
        finally:
            leave(token)
        self._observe(exchange, response, holder, request, is_async=True)
        return response

    def _begin(self, request: HttpRequest) -> Exchange | None:
        if self._worker is None:
            return None
        try:
            return self._admit(request)
        except Exception:  # pragma: no cover - defensive: never break the host app
            logger.exception("alf_analytics: capture failed; request passed through")
            return None

    def _admit(self, request: HttpRequest) -> Exchange | None:
        scope = getattr(request, "scope", None)
        if self._first:
            self._first = False
            if scope is not None:
                check_django_asgi()
            else:
                check_exit_flush_wsgi(request.META.get("SERVER_SOFTWARE"))
        gate = self._gate
        if gate.simple:
            group = self.config.group
        else:
            admitted = gate.admit(request)
            if admitted is None:
                return None  # skipped or sampled out: counted, nothing built
            group = admitted[0]
        meta = request.META.copy()
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
        exchange = Exchange(self.config, meta, read_environ, group)
        if exchange.request_body is not None:
            exchange.decide_request_capture(meta.get("CONTENT_TYPE"))
        stream = getattr(request, "_stream", None)
        if stream is not None:
            # HttpRequest.read(), .body, .POST and the upload handlers all read _stream.
            request._stream = InputTee(stream, exchange)  # type: ignore[assignment]
        return exchange

    def _fail(self, exchange: Exchange, holder: ConsumerHolder, request: HttpRequest) -> None:
        exchange.status = 500
        self._finish(exchange, holder, request)

    def _observe(
        self,
        exchange: Exchange,
        response: HttpResponseBase,
        holder: ConsumerHolder,
        request: HttpRequest,
        *,
        is_async: bool,
    ) -> None:
        try:
            exchange.status = response.status_code
            exchange.reason = response.reason_phrase
            headers = [*response.items()]
            # As Django's handlers send them; Morsel.output(header="") has a leading space.
            headers.extend(("Set-Cookie", c.OutputString()) for c in response.cookies.values())
            exchange.response_headers = headers
            exchange.decide_response_capture()
            if isinstance(response, StreamingHttpResponse):
                self._observe_stream(exchange, response)
            else:
                exchange.t_response = perf_counter()
                content = response.content  # type: ignore[attr-defined]
                exchange.response_data(content)
            # Django calls these from response.close(), after the server sent the last byte.
            response._resource_closers.append(  # type: ignore[attr-defined]
                lambda: self._finish(exchange, holder, request)
            )
        except Exception:  # pragma: no cover - defensive: never break the host app
            logger.exception("alf_analytics: could not observe a response")
            self._finish(exchange, holder, request)

    def _observe_stream(self, exchange: Exchange, response: StreamingHttpResponse) -> None:
        if isinstance(response, FileResponse) and exchange.response_body is None:
            # Not captured: keep file_to_stream so WSGI servers can use sendfile; the size
            # comes from Content-Length, set by FileResponse.
            exchange.length_from_headers()
            exchange.t_response = perf_counter()
            return
        content = response.streaming_content
        if isinstance(content, AsyncIterator):
            response.streaming_content = _observe_async(content, exchange)
        else:
            response.streaming_content = _observe_sync(content, exchange)

    def _finish(self, exchange: Exchange, holder: ConsumerHolder, request: HttpRequest) -> None:
        if exchange.t_end:  # Django may close a response twice
            return
        if holder.value is not None:
            exchange.consumer = holder.value
        elif self.config.identify is not None:
            exchange.consumer = self._gate.identify(request)
        assert self._worker is not None
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
