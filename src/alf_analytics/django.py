"""Django capture: one middleware class, sync- and async-capable.

Usage, in ``settings.py``::

    MIDDLEWARE = ["alf_analytics.django.AnalyticsMiddleware", ...]  # first in the list
    ALF_ANALYTICS = {"service_token": "...", "environment": "prod", "log_body": True}
    INSTALLED_APPS = [..., "alf_analytics"]  # optional: system checks in manage.py check

Under WSGI the stack stays sync, under ASGI with an async stack it stays async: Django picks the
mode from ``get_response``. The request body is counted (and captured up to the cap) as the view
reads it, so ``request.body``, ``request.POST``, uploads and ``request.read()`` all keep working.
Streaming responses are observed by wrapping their iterators; the entry is finished when Django
closes the response, after the last byte went out. A body is counted once the server has taken
it: a chunk when the server asks for the next one, the last one (or a whole ``HttpResponse``)
when the response is closed other than while an exception propagates. Under ASGI, Django does
not close a response whose sending failed (a stream that raised, a server that refused a
message): the entry is then finished when the response is collected.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from time import perf_counter
from typing import Any

try:
    import django  # noqa: F401  (first: without Django the error names Django, not asgiref)
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        "alf_analytics.django needs Django (4.2 or newer): pip install 'alf-analytics[django]'",
        name=exc.name,
    ) from exc

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import FileResponse, HttpRequest
from django.http.response import HttpResponseBase, StreamingHttpResponse

from . import _checks
from ._checks import django_terms
from ._config import Config, make_config
from ._consumer import ConsumerHolder, enter, leave_quietly, resume
from ._gate import Gate
from ._record import NO_RESPONSE, Exchange, InputTee, log_internal_error
from ._signals import check_django_asgi, check_exit_flush_wsgi
from ._worker import Worker, get_worker, hand_over
from .asgi import as_wire_text, read_scope, scope_snapshot
from .wsgi import is_chunked, read_environ, request_content_type

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
        begun = self._begin(request)
        if begun is None:
            return self.get_response(request)
        exchange, holder, token = begun
        try:
            response = self.get_response(request)
        except BaseException:
            self._fail(exchange, holder, request)
            raise
        finally:
            leave_quietly(token)
        self._observe(exchange, response, holder, request, is_async=False)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        begun = self._begin(request)
        if begun is None:
            return await self.get_response(request)
        exchange, holder, token = begun
        try:
            response = await self.get_response(request)
        except asyncio.CancelledError:
            # Django's ASGI handler cancels the view when the client disconnects: no
            # response was sent, so no status either (0, as HAR writes it), never a 500.
            exchange.status = NO_RESPONSE
            self._finish(exchange, holder, request)
            raise
        except BaseException:
            self._fail(exchange, holder, request)
            raise
        finally:
            leave_quietly(token)
        self._observe(exchange, response, holder, request, is_async=True)
        return response

    def _begin(self, request: HttpRequest) -> tuple[Exchange, ConsumerHolder, Any] | None:
        if self._worker is None:
            return None
        try:
            exchange = self._admit(request)
            if exchange is None:
                return None
            holder, token = enter()
            return exchange, holder, token
        except Exception:  # never break the host app (PITFALLS #20)
            log_internal_error("capture")
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
        meta = request.META
        if scope is not None:
            # The ASGI scope, not META: META folds repeated headers into one and leaves out
            # names with an underscore, and headersSize is rebuilt from the headers as sent.
            exchange = Exchange(self.config, scope_snapshot(scope), read_scope, group)
        else:
            environ = meta.copy()
            # WSGIRequest replaced these with their decoded text; back to the PEP 3333 form
            # (UTF-8 bytes as Latin-1) for servers that give no RAW_URI (runserver, wsgiref).
            for key in ("PATH_INFO", "SCRIPT_NAME"):
                text = meta.get(key)
                if isinstance(text, str) and not text.isascii():
                    environ[key] = as_wire_text(text)
            exchange = Exchange(self.config, environ, read_environ, group)
        if exchange.request_body is not None:
            exchange.decide_request_capture(request_content_type(meta))
        stream = getattr(request, "_stream", None)
        if stream is not None and not _unread_chunked(scope, meta):
            # HttpRequest.read(), .body, .POST and the upload handlers all read _stream.
            request._stream = InputTee(stream, exchange)  # type: ignore[assignment]
        return exchange

    def _fail(self, exchange: Exchange, holder: ConsumerHolder, request: HttpRequest) -> None:
        exchange.status = 500
        self._finish(exchange, holder, request)

    def _finish(self, exchange: Exchange, holder: ConsumerHolder, request: HttpRequest) -> None:
        try:
            self._finish_entry(exchange, holder, request)
        except Exception:  # never break the host app (PITFALLS #20)
            log_internal_error("capture")

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
            end = _End(self, exchange, holder, request, _Sent(exchange))
            if isinstance(response, StreamingHttpResponse):
                # Django reads an iterator of the other kind (sync under ASGI, async under
                # WSGI) to its end before the server sends any of it.
                end.sent.hold_all = is_async != response.is_async
                self._observe_stream(exchange, response, end)
            else:
                exchange.t_response = perf_counter()
                end.sent.pending.append(response.content)  # type: ignore[attr-defined]
            if is_async:
                # Django's ASGI handler closes a response only when sending it succeeded; a
                # server's send() that raised leaves it to be collected.
                end.finalizer = weakref.finalize(response, end.abandoned)
            # Django calls these from response.close(), after the server sent the last byte.
            response._resource_closers.append(end.closed)  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover - defensive: never break the host app
            logger.exception("alf_analytics: could not observe a response")
            self._finish(exchange, holder, request)

    def _observe_stream(
        self, exchange: Exchange, response: StreamingHttpResponse, end: _End
    ) -> None:
        if isinstance(response, FileResponse) and exchange.response_body is None:
            # Not captured: keep file_to_stream so WSGI servers can use sendfile; the size
            # comes from Content-Length, set by FileResponse.
            exchange.length_from_headers()
            exchange.t_response = perf_counter()
            return
        content = response.streaming_content
        make_bytes = response.make_bytes
        if isinstance(content, AsyncIterator):
            response.streaming_content = _observe_async(content, end, make_bytes)
        else:
            response.streaming_content = _observe_sync(content, end, make_bytes)

    def _finish_entry(
        self, exchange: Exchange, holder: ConsumerHolder, request: HttpRequest
    ) -> None:
        if exchange.t_end:  # Django may close a response twice
            return
        if holder.value is not None:
            exchange.consumer = holder.value
        elif self.config.identify is not None:
            exchange.consumer = self._gate.identify(request)
        assert self._worker is not None
        hand_over(self._worker, exchange)


def _unread_chunked(scope: Any, meta: Any) -> bool:
    """A chunked request body under WSGI, which Django never reads (it reads only up to a
    Content-Length): its empty stream is not the body's end, so it is left unwatched and
    the entry says the body was not captured."""
    if scope is not None or meta.get("CONTENT_LENGTH"):
        return False
    return is_chunked(meta.get("HTTP_TRANSFER_ENCODING"))


class _Sent:
    """The body chunks the server has been handed but may not have sent yet: one, or all for
    an iterator Django reads to its end before sending anything (a sync one under ASGI, an
    async one under WSGI)."""

    __slots__ = ("exchange", "pending", "hold_all")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.pending: list[bytes] = []
        self.hold_all = False

    def took(self, chunk: bytes) -> None:
        try:
            if not self.exchange.t_response:
                self.exchange.t_response = perf_counter()
            self.pending.append(chunk)
        except Exception:  # never break the host app (PITFALLS #20)
            log_internal_error("response capture")

    def settle(self, crossed: bool) -> None:
        pending = self.pending
        if pending:
            self.pending = []
            if not crossed:
                self.exchange.cut_response()
            else:
                try:
                    for chunk in pending:
                        self.exchange.response_data(chunk)
                except Exception:  # never break the host app (PITFALLS #20)
                    log_internal_error("response capture")


class _End:
    """How a response's entry ends: Django closed it, or it was collected unclosed."""

    __slots__ = ("middleware", "exchange", "holder", "request", "sent", "finalizer")

    def __init__(
        self,
        middleware: AnalyticsMiddleware,
        exchange: Exchange,
        holder: ConsumerHolder,
        request: HttpRequest,
        sent: _Sent,
    ) -> None:
        self.middleware = middleware
        self.exchange = exchange
        self.holder = holder
        self.request = request
        self.sent = sent
        self.finalizer: weakref.finalize[Any, Any] | None = None

    def closed(self) -> None:
        finalizer = self.finalizer
        if finalizer is not None:
            finalizer.detach()
        # Closed while an exception propagates (gunicorn closes in a ``finally``, wsgiref
        # in an ``except``): the server's write of the last chunk failed, it did not cross.
        self.sent.settle(sys.exc_info()[0] is None)
        self.middleware._finish(self.exchange, self.holder, self.request)

    def failed(self) -> None:
        """The stream raised (or was cancelled): what Django held back did not go out."""
        finalizer = self.finalizer
        if finalizer is not None:
            finalizer.detach()
        elif not self.exchange.t_response:
            # Under WSGI before its first chunk: no header has gone out yet, so the server
            # answers 500 itself (under ASGI Django has sent the response start already).
            self.exchange.answered_by_server()
        if self.exchange.t_response:
            self.exchange.cut_response()  # the stream raised mid-body
        self.abandoned()

    def abandoned(self) -> None:
        # Never closed: sending it failed, so the chunk in hand did not cross.
        self.sent.settle(False)
        self.middleware._finish(self.exchange, self.holder, self.request)


def _observe_sync(
    chunks: Iterator[Any], end: _End, make_bytes: Callable[[Any], bytes]
) -> Iterator[bytes]:
    sent = end.sent
    holder = end.holder
    iterator = iter(chunks)
    try:
        while True:
            # Django's handler iterates after the middleware returned: the stream's code is
            # still the request's, and set_consumer() there must find its holder.
            token = resume(holder)
            try:
                chunk = next(iterator)
            except StopIteration:
                break
            finally:
                if token is not None:
                    leave_quietly(token)
            # As Django would make it (str, memoryview): the bytes the client gets.
            data = make_bytes(chunk)
            sent.took(data)
            yield data
            if not sent.hold_all:
                sent.settle(True)  # the server asks for the next chunk: it sent this one
    except GeneratorExit:
        raise  # closed: response.close() ends the entry
    except BaseException:
        end.failed()  # under ASGI Django will not close this response
        raise


async def _observe_async(
    chunks: AsyncIterator[Any], end: _End, make_bytes: Callable[[Any], bytes]
) -> AsyncIterator[bytes]:
    sent = end.sent
    holder = end.holder
    iterator = aiter(chunks)
    try:
        while True:
            token = resume(holder)  # as in _observe_sync
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            finally:
                if token is not None:
                    leave_quietly(token)
            data = make_bytes(chunk)
            sent.took(data)
            yield data
            if not sent.hold_all:
                sent.settle(True)
    except GeneratorExit:
        raise
    except BaseException:
        end.failed()
        raise
