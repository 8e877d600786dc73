"""The neutral per-request record that every capture adapter fills in.

The request path only stores raw facts here (timestamps, status, header lists as the server gave
them, byte counts and a capped copy of the bodies). Turning them into an ALF entry happens later,
on the worker thread, in :mod:`alf_analytics._alf`.

Request facts are resolved lazily: an adapter stores its own cheap snapshot (a copy of the WSGI
environ, an ASGI scope, ...) in ``source`` together with a ``reader`` that turns it into a
:class:`RequestInfo` on the worker thread. This keeps framework knowledge in the adapters and
work off the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from time import monotonic, perf_counter, time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ._config import Config

#: A header as the server or app gave it: ``str`` (WSGI, Django) or ``bytes`` (ASGI) pairs.
RawHeader = tuple[str, str] | tuple[bytes, bytes] | Sequence[Any]


logger = logging.getLogger("alf_analytics")

#: Where an internal error of ours was last logged (monotonic time): once a minute each.
_INTERNAL_LOGGED: dict[str, float] = {}


def log_internal_error(where: str) -> None:
    """A failure of the agent's own code on the request path (PITFALLS #20): logged with its
    traceback, at most once a minute per place, and never raised to the app, whose request
    then goes on exactly as without us (unrecorded)."""
    now = monotonic()
    last = _INTERNAL_LOGGED.get(where)
    if last is not None and now - last < 60.0:
        return
    _INTERNAL_LOGGED[where] = now
    logger.error(
        "alf_analytics: internal error in %s; the request goes on unrecorded", where, exc_info=True
    )


#: ``Exchange.status`` of an exchange the client left before any answer was sent (Django's
#: ASGI handler cancels the view then): recorded as status 0, unknown, as HAR writes it.
NO_RESPONSE = -1


class RequestInfo(NamedTuple):
    """What an adapter's reader extracts from its request snapshot."""

    method: str
    scheme: str
    #: ``host[:port]`` as the client addressed it (Host header), or the server name and port.
    host: str
    #: The path as sent on the wire: percent-encoded, without the query string.
    path: str
    #: The raw query string, without the ``?``.
    query: str
    #: ``"1.0"``, ``"1.1"``, ``"2"``... without the ``HTTP/`` prefix.
    http_version: str
    headers: Sequence[RawHeader]
    #: The socket peer's address, and the forwarding headers used with ``trusted_proxies``.
    peer: str | None
    server_ip: str | None
    content_length: int | None
    #: ``Transfer-Encoding: chunked`` and no ``Content-Length``: a body of unknown length,
    #: so an app that read none of it did not see its end.
    chunked: bool = False


#: A ``bytes`` chunk at least this long is captured by reference (see :class:`Capture`).
_SHARED_CHUNK = 1024


class Capture:
    """A captured body prefix, at most the cap given to :meth:`add`.

    The request path must not pay for a copy: a ``bytes`` chunk (immutable) that fits is kept
    as it is, and the parts are joined on the worker thread (``bytes(capture)``). Other chunks
    (a ``bytearray`` or ``memoryview`` the app may reuse, the cut end of a chunk past the cap)
    and short ones are copied into a buffer, so a body sent a byte at a time is not a list of
    tiny objects.
    """

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        parts = self._parts
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"Capture({bytes(self)!r})"

    def add(self, chunk: bytes | bytearray | memoryview, limit: int) -> None:
        """Append what of ``chunk`` fits within ``limit`` bytes in all."""
        room = limit - self._size
        if room <= 0 or not chunk:
            return
        parts = self._parts
        size = len(chunk)
        if size <= room and size >= _SHARED_CHUNK and type(chunk) is bytes:
            parts.append(chunk)
        else:
            if size > room:
                chunk = chunk[:room]
                size = room
            tail = parts[-1] if parts else None
            if type(tail) is bytearray:
                tail += chunk
            else:
                parts.append(bytearray(chunk))
        self._size += size

    def truncate(self, size: int) -> None:
        """Keep the first ``size`` bytes (a request body stream rewound by the app)."""
        if size < self._size:
            kept = bytes(self)[: max(0, size)]
            self._parts = [bytearray(kept)] if kept else []
            self._size = len(kept)


class Exchange:
    """Everything observed about one HTTP exchange, in raw form."""

    __slots__ = (
        "config",
        "group",
        "consumer",
        "started_at",
        "t_start",
        "t_response",
        "t_end",
        "source",
        "reader",
        "request_body_size",
        "request_body",
        "request_complete",
        "status",
        "reason",
        "response_headers",
        "response_body_size",
        "response_body",
        "response_ended",
        "response_content_length",
        "queued_bytes",
    )

    def __init__(
        self,
        config: Config,
        source: Any,
        reader: Callable[[Any], RequestInfo],
        group: tuple[str, str | None] | None = None,
    ) -> None:
        self.config = config
        #: ``(service_token, environment)`` of this request, resolved by the adapter (the
        #: config's own values unless they are callables): the worker batches per group.
        self.group = config.group if group is None else group
        #: The caller's id, from ``identify`` or :func:`alf_analytics.set_consumer`.
        self.consumer: str | None = None
        #: Wall clock at the start (for ``startedDateTime``), then monotonic marks (seconds).
        self.started_at = time()
        self.t_start = perf_counter()
        #: When the response started (headers handed to the server); 0.0 while not yet.
        self.t_response = 0.0
        self.t_end = 0.0
        self.source = source
        self.reader = reader
        self.request_body_size = 0
        #: Captured request body prefix (``None`` when not captured: ``log_body`` or
        #: ``log_body_types`` say no, decided by the adapter before any byte is kept).
        self.request_body: Capture | None = Capture() if config.log_request_body else None
        #: True once the app read the request body to its end.
        self.request_complete = False
        self.status = 0
        #: The status line's reason as the server writes it; None: the server's own phrase.
        self.reason: str | None = None
        self.response_headers: Sequence[RawHeader] = ()
        self.response_body_size = 0
        self.response_body: Capture | None = Capture() if config.log_response_body else None
        #: False once the response body was cut short (see :meth:`cut_response`).
        self.response_ended = True
        #: Set when the response is passed through unobserved (a file wrapper).
        self.response_content_length: int | None = None
        #: What the worker charged for it when it was queued (set by ``Worker.submit``).
        self.queued_bytes = 0

    def decide_request_capture(self, content_type: str | bytes | None) -> None:
        """Keep no request bytes when ``log_body_types`` does not allow this content type."""
        if self.request_body is not None and not _type_allowed(self.config, content_type):
            self.request_body = None

    def decide_response_capture(self) -> None:
        """At the response start: keep no response bytes unless its content type is allowed."""
        if self.response_body is None:
            return
        content_type = None
        for name, value in self.response_headers:
            if name.lower() in ("content-type", b"content-type"):
                content_type = value
                break
        if not _type_allowed(self.config, content_type):
            self.response_body = None

    def length_from_headers(self) -> None:
        """Take the response size from Content-Length when the body passes by unobserved."""
        for name, value in self.response_headers:
            if name.lower() in ("content-length", b"content-length"):
                try:
                    self.response_content_length = int(value)
                except ValueError:
                    pass
                return

    def request_data(self, chunk: bytes | memoryview) -> None:
        """Count (and capture, up to the cap) request body bytes as the app reads them."""
        self.request_body_size += len(chunk)
        body = self.request_body
        if body is not None:
            body.add(chunk, self.config.max_body_bytes)

    def answered_by_server(self) -> None:
        """The app failed before any header reached the client: the server answers its
        own 500, without the app's status line or headers."""
        self.status = 500
        self.reason = None
        self.response_headers = ()
        self.response_body = None  # the server's own body, which we never see

    def cut_response(self) -> None:
        """The response body stopped before its end (the client left, the server could not
        send a chunk, the app raised mid-body): the bytes that crossed are counted and kept,
        but they are not the whole body (``bodyCaptured`` false, as past ``max_body_bytes``)."""
        self.response_ended = False

    def response_data(self, chunk: bytes) -> None:
        """Count (and capture, up to the cap) response body bytes as they are sent."""
        self.response_body_size += len(chunk)
        body = self.response_body
        if body is not None:
            body.add(chunk, self.config.max_body_bytes)


#: (log_body_types, content type) -> allowed: a service answers with few content types, and
#: matching one against the patterns is a loop on the request path.
_ALLOWED: dict[tuple[tuple[str, ...], Any], bool] = {}


def _type_allowed(config: Config, content_type: str | bytes | None) -> bool:
    key = (config.log_body_types, content_type)
    try:
        allowed = _ALLOWED.get(key)
    except TypeError:  # an unhashable value where a header value belongs
        return config.body_type_allowed(content_type)
    if allowed is None:
        allowed = config.body_type_allowed(content_type)
        if len(_ALLOWED) >= 1024:  # bounded: clients choose content types
            _ALLOWED.clear()
        _ALLOWED[key] = allowed
    return allowed


class InputTee:
    """A request body stream as the app sees it (``wsgi.input``, Django's ``request._stream``).

    Every read is passed to the real stream and its bytes are counted (and captured up to the
    cap); nothing is read ahead, so the app still gets the whole body.
    """

    __slots__ = ("_stream", "_exchange")

    def __init__(self, stream: Any, exchange: Exchange) -> None:
        self._stream = stream
        self._exchange = exchange

    def _seen(self, data: bytes, size: Any, short_is_end: bool = True) -> bytes:
        exchange = self._exchange
        try:
            asked = size if isinstance(size, int) else -1
            if data:
                exchange.request_data(data)
            if asked < 0 or (len(data) < asked if short_is_end else not data and asked != 0):
                # read() without a size returns everything; read(n) returns fewer than n
                # bytes only at the end of input (gunicorn's when the client left mid-upload:
                # Django reads request.body with one sized read); an empty read is the end.
                exchange.request_complete = True
        except Exception:
            self._failed()
        return data

    def _count(self, data: Any, ended: bool) -> None:
        try:
            if data:
                self._exchange.request_data(data)
            elif ended:
                self._exchange.request_complete = True
        except Exception:
            self._failed()

    def _failed(self) -> None:
        # Our own failure (PITFALLS #20): the app still gets every byte; the body is no
        # longer counted, nor captured.
        log_internal_error("request capture")
        self._exchange.request_body = None

    # Sizes are passed on exactly as given (positionally or by keyword, as Django's
    # HttpRequest.read(size=...) does), so the stream sees the call the app made.
    def read(self, *args: Any, **kwargs: Any) -> bytes:
        size = args[0] if args else kwargs.get("size", kwargs.get("n"))
        return self._seen(self._stream.read(*args, **kwargs), size)

    def read1(self, *args: Any, **kwargs: Any) -> bytes:
        size = args[0] if args else kwargs.get("size", kwargs.get("n"))
        # read1() may return fewer bytes than asked before the end.
        return self._seen(self._stream.read1(*args, **kwargs), size, False)

    def readinto(self, buffer: Any) -> int:
        # Werkzeug's LimitedStream prefers readinto() when the stream has one, and ours always
        # has: fall back to read() for servers whose stream lacks it (PEP 3333 does not ask).
        readinto = getattr(self._stream, "readinto", None)
        if readinto is None:
            data = self._stream.read(len(buffer))
            count = len(data)
            buffer[:count] = data
        else:
            count = readinto(buffer) or 0
        self._count(memoryview(buffer)[:count] if count else None, bool(len(buffer)))
        return count

    def readline(self, *args: Any, **kwargs: Any) -> bytes:
        size = args[0] if args else kwargs.get("size", kwargs.get("limit"))
        line: bytes = self._stream.readline(*args, **kwargs)
        self._count(line, size != 0)
        return line

    def readlines(self, *args: Any, **kwargs: Any) -> list[bytes]:
        lines: list[bytes] = self._stream.readlines(*args, **kwargs)
        for line in lines:
            self._count(line, False)
        if not args and not kwargs:
            self._count(None, True)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def seek(self, *args: Any, **kwargs: Any) -> Any:
        # A rewind (Django's and Werkzeug's caching streams) must not count bytes twice.
        position = self._stream.seek(*args, **kwargs)
        if not isinstance(position, int):
            # File-like objects may return None from seek(): ask where it is, and give the
            # app exactly what the stream returned.
            tell = getattr(self._stream, "tell", None)
            where: Any = None
            try:
                if tell is not None:
                    where = tell()
                elif args in ((0,), (0, 0)) and not kwargs:
                    where = 0
            except Exception:
                where = None
            self._rewound(where if isinstance(where, int) else None)
            return position
        self._rewound(position)
        return position

    def _rewound(self, position: int | None) -> None:
        exchange = self._exchange
        if position is None:
            # Unknown position: count from scratch, and claim no complete body.
            exchange.request_body_size = 0
            exchange.request_complete = False
            if exchange.request_body is not None:
                exchange.request_body = None
            return
        exchange.request_body_size = position
        exchange.request_complete = False
        body = exchange.request_body
        if body is not None:
            body.truncate(position)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
