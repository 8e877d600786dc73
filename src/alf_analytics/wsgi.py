"""WSGI capture (PEP 3333): Flask, Django under WSGI servers, any WSGI application.

Usage with Flask (wrap ``wsgi_app`` so the Flask object keeps working)::

    app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, service_token="...")

The middleware only observes: the client gets exactly the status, headers and bytes the app
produced, streamed responses stay streamed, the request body is counted (and captured up to
``max_body_bytes``) as the app reads ``wsgi.input``, the app iterable's ``close()`` is called
exactly once, and an app exception propagates unchanged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from inspect import iscoroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from ._config import Config, make_config
from ._consumer import ConsumerHolder, enter, leave_quietly, resume
from ._consumer import _current as _consumer_var
from ._gate import Gate, is_async_callable, made_with
from ._record import NO_RESPONSE, Exchange, InputTee, RequestInfo, log_internal_error
from ._signals import check_exit_flush_wsgi
from ._worker import Worker, get_worker, hand_over

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from typing_extensions import Unpack

    from ._options import Options

__all__ = ["AnalyticsWSGIMiddleware"]

logger = logging.getLogger("alf_analytics")

_DEFAULT_PORTS = {"http": "80", "https": "443"}
#: An environ's keys, in order -> its header keys with their names (``HTTP_X_REQUEST_ID``,
#: ``x-request-id``). A server builds every environ the same way, so the few layouts that
#: clients' header sets make repeat: one hash of the key tuple replaces a lookup per key.
_LAYOUTS: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {}
_LAYOUTS_SIZE = 256


class AnalyticsWSGIMiddleware:
    """Record every exchange of a WSGI application as an ALF entry.

    :param app: the WSGI application to observe.
    :param options: every option, keyword-only (:class:`alf_analytics.Options`; the README's
        table). Invalid options raise ``ValueError``/``TypeError`` here, never at request time.

    Callables among the options (``skip``, ``identify``, a per-request ``service_token`` or
    ``environment``) receive a Werkzeug ``Request`` when the app is a Flask or Werkzeug app
    (Flask's own request object once Flask made it), and the WSGI environ otherwise.
    """

    __slots__ = ("app", "config", "_worker", "_gate", "_request_of", "_first")

    def __init__(self, app: WSGIApplication, **options: Unpack[Options]) -> None:
        if is_async_callable(app):
            raise TypeError(
                "alf_analytics: AnalyticsWSGIMiddleware was given an ASGI app (an async "
                "callable); wrap ASGI apps (Starlette, FastAPI, ...) with AnalyticsASGIMiddleware"
            )
        self.app = app
        self.config: Config = make_config(options)
        self._worker: Worker | None = get_worker(self.config) if self.config.active else None
        self._request_of = _request_maker(app)
        self._gate = Gate(
            self.config, method_of=_method, path_of=_path, request_of=self._request_of
        )
        self._first = True

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        worker = self._worker
        if worker is None:
            return self.app(environ, start_response)
        responder: _Responder | None = None
        try:
            if self._first:
                self._first = False
                check_exit_flush_wsgi(environ.get("SERVER_SOFTWARE"))
            responder = self._begin(environ, start_response, worker)
            if responder is not None:
                token = responder.enter()
        except Exception:  # never break the host app (PITFALLS #20)
            log_internal_error("capture")
            responder = None
        if responder is None:
            return self.app(environ, start_response)

        try:
            result = self.app(environ, responder.start_response)
        except BaseException:
            responder.fail()
            raise
        finally:
            leave_quietly(token)
        if type(result) is not list and iscoroutine(result):
            result.close()
            responder.fail()
            raise TypeError(
                "alf_analytics: the app wrapped by AnalyticsWSGIMiddleware returned a coroutine: "
                "it is an ASGI app; wrap it with AnalyticsASGIMiddleware"
            )
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None and (
            isinstance(result, file_wrapper)
            if isinstance(file_wrapper, type)
            else hasattr(result, "fileno")
        ):
            # Servers recognise a file response to send it with sendfile: wsgiref and gunicorn
            # by their wrapper's type, uWSGI (whose file_wrapper is a function returning the
            # file itself) by identity. Hand it back untouched; its Content-Length is its size.
            responder.finish_unobserved(result)
            return result
        responder.result = result
        if hasattr(result, "__len__"):
            # Servers infer Content-Length from len() == 1 (wsgiref, waitress), and waitress
            # calls len() whenever __len__ exists: only a sized result gets a sized responder.
            responder.__class__ = _SizedResponder
        return responder

    def _begin(
        self, environ: WSGIEnvironment, start_response: StartResponse, worker: Worker
    ) -> _Responder | None:
        gate = self._gate
        if gate.simple:
            group = self.config.group
        else:
            admitted = gate.admit(environ)
            if admitted is None:
                return None  # skipped or sampled out: counted, nothing built
            group = admitted[0]
        snapshot = environ.copy()
        # The snapshot waits in the worker's queue: it must not keep the request body
        # stream (a server's buffer of the whole upload) alive after the request.
        stream = snapshot.pop("wsgi.input", None)
        exchange = Exchange(self.config, snapshot, read_environ, group)
        if exchange.request_body is not None:
            exchange.decide_request_capture(request_content_type(environ))
        if stream is not None:
            environ["wsgi.input"] = InputTee(stream, exchange)
        identify = None
        if self.config.identify is not None:
            identify = (gate, self._request_of, environ)
        return _Responder(exchange, start_response, worker, identify)


class _Responder:
    """Per-request state: wraps ``start_response``/``write`` and is the returned iterable."""

    __slots__ = (
        "exchange",
        "_start_response",
        "_worker",
        "_write",
        "result",
        "_iterator",
        "_done",
        "_holder",
        "_identify",
        "_request",
        "_consumer",
        "_pending",
        "_closed",
    )

    def __init__(
        self,
        exchange: Exchange,
        start_response: StartResponse,
        worker: Worker,
        identify: tuple[Gate, Callable[[Any], Any], WSGIEnvironment] | None,
    ) -> None:
        self.exchange = exchange
        self._holder: ConsumerHolder | None = None
        self._identify = identify
        #: What ``identify`` gets, made when the response starts (see start_response).
        self._request: Any = None
        #: What ``identify`` said while Flask's context was live (_UNSET: not asked yet).
        self._consumer: Any = _UNSET
        self._start_response = start_response
        self._worker = worker
        self._write: Any = None
        self.result: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] | None = None
        #: The last chunk handed to the server, captured when the server asks for the next
        #: one (or closes us): the copy into the capture buffer never delays its bytes.
        self._pending: bytes | None = None
        self._done = False
        self._closed = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        if exc_info:
            # Once the response has started, the server re-raises exc_info here: the status
            # the client got stays the recorded one, so record only after the server accepted.
            self._write = self._start_response(status, headers, exc_info)
        else:
            # Some servers and test clients reject an explicit third argument.
            self._write = self._start_response(status, headers)
        if self._done:
            return self._write
        exchange = self.exchange
        try:
            # A second call (with exc_info) replaces the first, as it does for the server.
            code, _, reason = (status if isinstance(status, str) else str(status)).partition(" ")
            # "NNN Reason" (PEP 3333): a code that is not 1 to 3 digits is no status the
            # entry can hold (written as 0, unknown, not read as the digits it starts with).
            valid = code.isascii() and code.isdigit() and len(code) <= 3
            exchange.status = int(code) if valid else NO_RESPONSE
            exchange.reason = reason  # as the server writes it, even empty
            exchange.response_headers = headers
            exchange.decide_response_capture()
            identify = self._identify
            if identify is not None and self._request is None:
                # Flask's own request (view_args, endpoint, g's user) is in the environ while
                # the response starts, and cleared once Flask's context ends.
                self._request = identify[1](identify[2])
                holder = self._holder
                if identify[2].get("werkzeug.request") is not None and (
                    holder is None or holder.value is None
                ):
                    # Flask's app context (flask.g, flask.request, a login extension's
                    # current_user) is live now and gone by the server's close(): ask now.
                    self._consumer = identify[0].identify(self._request)
        except Exception:
            self._abandon("response capture")
            return self._write
        return self.write

    def _abandon(self, where: str) -> None:
        """Our own failure: the request goes on as without us, and is not recorded."""
        self._done = True
        self._pending = None
        log_internal_error(where)

    def enter(self) -> Any:
        """Give the app's code this request's consumer holder (``set_consumer``)."""
        self._holder, token = enter()
        return token

    def write(self, data: bytes) -> Any:
        exchange = self.exchange
        if not exchange.t_response:
            exchange.t_response = perf_counter()
        # Written first, counted after (as the iterable's chunks): the bytes reach the client
        # without waiting for their capture, and a write the server refused is not counted.
        try:
            written = self._write(data)
        except BaseException:
            if not self._done:
                exchange.cut_response()  # the server could not send it
            raise
        if not self._done and isinstance(data, (bytes, bytearray)):
            try:
                exchange.response_data(data)
            except Exception:
                self._abandon("response capture")
        return written

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self._capture_pending()  # the server asks for the next chunk: it sent the last one
        # The server iterates after the app returned: a streamed body's code is still the
        # request's, and set_consumer() there must find its holder. Inline, not through
        # enter()/leave(): this runs for every chunk of every response.
        holder = self._holder
        token = None
        if holder is not None:
            try:
                token = _consumer_var.set(holder)
            except Exception:  # never break the host app (PITFALLS #20)
                log_internal_error("capture")
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = iter(self.result)
            chunk = next(iterator)
        except StopIteration:
            raise
        except BaseException:
            if not self.exchange.t_response:
                self._as_500()
            elif not self._done:
                self.exchange.cut_response()  # the app raised mid-body
            raise
        finally:
            if token is not None:
                try:
                    _consumer_var.reset(token)
                except Exception:  # reset in another context, or an error of ours
                    leave_quietly(token)
        if chunk.__class__ is bytes or isinstance(chunk, (bytes, bytearray)):
            # Anything else (str, int: a broken app) goes to the server untouched, which
            # answers it as it would without us.
            exchange = self.exchange
            try:
                if not exchange.t_response:
                    # Even an empty first chunk: gunicorn, Werkzeug and wsgiref send the
                    # status line and headers with it (a way to flush them early), so a
                    # failure after it is no longer the server's 500.
                    exchange.t_response = perf_counter()
                if chunk and not self._done:
                    # Captured once the server has it. A bytearray (or a bytes subclass) may
                    # be changed by the app once it is sent: copied now, as the client gets it.
                    self._pending = chunk if chunk.__class__ is bytes else bytes(chunk)
            except Exception:
                self._abandon("response capture")
        return chunk

    def _capture_pending(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            try:
                self.exchange.response_data(pending)
            except Exception:
                self._abandon("response capture")

    def __bool__(self) -> bool:
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # once, even when our capture was abandoned: the app's close()
        close = getattr(self.result, "close", None)
        if close is None:
            self._finish()
            return
        holder = self._holder  # the app's close() may name the consumer too (see __next__)
        token = resume(holder) if holder is not None else None
        try:
            close()
        finally:
            if token is not None:
                leave_quietly(token)
            self._finish()

    def _as_500(self) -> None:
        self.exchange.answered_by_server()

    def fail(self) -> None:
        """The app raised before returning its iterable."""
        if not self.exchange.t_response:
            self._as_500()
        self._finish()

    def finish_unobserved(self, result: Any) -> None:
        """A response the server sends by itself (sendfile): finished when it closes it."""
        exchange = self.exchange
        # The agent never sees these bytes: the entry must not claim it captured the body.
        exchange.response_body = None
        exchange.length_from_headers()
        if not exchange.t_response:
            exchange.t_response = perf_counter()  # the server starts sending it now
        close = getattr(result, "close", None)

        def close_and_finish() -> None:
            try:
                if close is not None:
                    close()
            finally:
                self._finish()

        try:
            # The same object goes back (sendfile needs it): its own close() marks the end,
            # so the entry's time covers the transfer, as for any other response.
            result.close = close_and_finish
        except (AttributeError, TypeError):  # a file object (uWSGI): no end to observe
            self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        try:
            self._finish_entry()
        except Exception:
            self._abandon("capture")

    def _finish_entry(self) -> None:
        self._done = True
        if self._pending is not None:
            if sys.exc_info()[0] is None:
                self._capture_pending()  # closed without asking for more: it has the chunk
            else:
                # Closed while an exception propagates (gunicorn closes in a ``finally``):
                # the server's write of that chunk failed (the client left, a chunk that is
                # not bytes), so it did not cross.
                self._pending = None
                self.exchange.cut_response()
        exchange = self.exchange
        holder = self._holder
        if holder is not None and holder.value is not None:
            exchange.consumer = holder.value
        elif self._consumer is not _UNSET:
            exchange.consumer = self._consumer
        elif self._identify is not None:
            gate, request_of, environ = self._identify
            request = self._request if self._request is not None else request_of(environ)
            exchange.consumer = gate.identify(request)
        hand_over(self._worker, exchange)


#: No consumer asked of ``identify`` yet (None is an answer: no consumer).
_UNSET: Any = object()


def is_chunked(value: object) -> bool:
    """A ``Transfer-Encoding`` value (PEP 3333 text) that says chunked."""
    return isinstance(value, str) and "chunked" in value.lower()


def _method(environ: WSGIEnvironment) -> str:
    return str(environ.get("REQUEST_METHOD", "GET"))


def _path(environ: WSGIEnvironment) -> str:
    """The full request path as text (mount point included), for ``skip_paths``."""
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    if not path.isascii():
        # PEP 3333 carries the bytes as Latin-1; URLs are UTF-8.
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    return path


def _identity(environ: WSGIEnvironment) -> Any:
    return environ


def _request_maker(app: Any) -> Callable[[WSGIEnvironment], Any]:
    """What the option callables receive for this app: a Werkzeug request, or the environ."""
    if not made_with(app, ("flask", "werkzeug")):
        return _identity
    try:
        from werkzeug.wrappers import Request
    except ImportError:  # pragma: no cover - a Flask app always has Werkzeug
        return _identity

    def make(environ: WSGIEnvironment) -> Any:
        # Flask's own request once Flask made it (after the view: with its url_rule, view
        # args); before that a shallow one, which refuses to read the body.
        return environ.get("werkzeug.request") or Request(environ, shallow=True)

    return make


def request_content_type(environ: WSGIEnvironment) -> Any:
    """The request's ``CONTENT_TYPE`` as its client sent it (None: none sent)."""
    value = environ.get("CONTENT_TYPE")
    if value == "text/plain" and _invented(environ):
        return None
    return value


def _invented(environ: WSGIEnvironment) -> bool:
    """Whether ``CONTENT_TYPE: text/plain`` is wsgiref's own: its server (and Django's
    runserver, built on it) writes email's default type for a request that sent none. Taken
    so only for a request that declares no body, which no client labels."""
    software = str(environ.get("SERVER_SOFTWARE", ""))
    return not environ.get("CONTENT_LENGTH") and software.startswith("WSGIServer/")


def _server_ip(environ: WSGIEnvironment) -> str | None:
    address = environ.get("SERVER_ADDR")
    if address:
        return str(address)
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            return str(sock.getsockname()[0])
        except (OSError, AttributeError, IndexError, TypeError):
            pass
    # SERVER_NAME is often a host name; the builder keeps it only if it is an IP literal.
    name = environ.get("SERVER_NAME")
    return name if isinstance(name, str) else None


class _SizedResponder(_Responder):
    """The responder of an app result that has a length (a list or tuple of chunks)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self.result)  # type: ignore[arg-type]


def _layout(keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    layout = tuple(
        (key, key[5:].replace("_", "-").lower())
        for key in keys
        if isinstance(key, str) and key.startswith("HTTP_")
    )
    if len(_LAYOUTS) >= _LAYOUTS_SIZE:  # bounded: clients choose which headers they send
        _LAYOUTS.clear()
    _LAYOUTS[keys] = layout
    return layout


def read_environ(environ: WSGIEnvironment) -> RequestInfo:
    """Request facts from a WSGI environ snapshot (runs on the worker thread)."""
    get = environ.get
    scheme = str(get("wsgi.url_scheme", "http"))
    host = get("HTTP_HOST")
    if not host:
        host = str(get("SERVER_NAME", ""))
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal, as a URL writes it
        port = str(get("SERVER_PORT", ""))
        if port and port != _DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
    script_name = str(get("SCRIPT_NAME", ""))
    path = script_name + str(get("PATH_INFO", ""))
    raw_uri = get("RAW_URI") or get("REQUEST_URI")
    if isinstance(raw_uri, str) and raw_uri.startswith("/"):
        # The request target as sent (percent-encoding kept) is preferred, unless it lacks the
        # mount point (Werkzeug's test client leaves SCRIPT_NAME out of RAW_URI).
        raw_path = raw_uri.partition("?")[0]
        if not script_name or unquote_to_bytes(raw_path).startswith(
            script_name.encode("latin-1", "replace")
        ):
            path = raw_path
    keys = tuple(environ)
    layout = _LAYOUTS.get(keys)
    if layout is None:
        layout = _layout(keys)
    headers = [(name, value) for key, name in layout if isinstance(value := environ[key], str)]
    for key, name in (("CONTENT_TYPE", "content-type"), ("CONTENT_LENGTH", "content-length")):
        value = get(key)
        if value and isinstance(value, str) and not (value == "text/plain" and _invented(environ)):
            headers.append((name, value))
    content_length: int | None = None
    declared = get("CONTENT_LENGTH")
    if declared:  # most requests declare none: no exception raised and caught for them
        try:
            content_length = int(declared)
        except (TypeError, ValueError):
            pass
        else:
            if content_length < 0:
                content_length = None
    remote = get("REMOTE_ADDR")
    return RequestInfo(
        method=str(get("REQUEST_METHOD", "GET")),
        scheme=scheme,
        host=str(host),
        path=path,
        query=str(get("QUERY_STRING", "")),
        http_version=str(get("SERVER_PROTOCOL", "HTTP/1.1")),
        headers=headers,
        peer=str(remote) if remote else None,
        server_ip=_server_ip(environ),
        content_length=content_length,
        chunked=content_length is None and is_chunked(get("HTTP_TRANSFER_ENCODING")),
    )
