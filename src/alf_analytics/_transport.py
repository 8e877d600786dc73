"""The transport: one keep-alive HTTP connection that POSTs gzip batches to the collector.

It only moves bytes and reports what happened; what to do about it (retry, split, give up) is
the worker's decision. Each sender thread of the worker owns one transport, so several POSTs
can be in flight at once, one per connection.

It speaks through httpcore (the HTTP layer of httpx) directly: a batch needs none of httpx's
request and response models, and skipping them halves the client's CPU per POST; nor does it
need httpcore's connection pool for its one connection.
"""

from __future__ import annotations

import base64
import email.utils
import importlib
import re
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import httpcore
from httpcore import NetworkBackend, NetworkStream, SyncBackend

from ._version import __version__

try:
    # ISA-L's deflate writes the same gzip format as zlib for a tenth of its CPU, and here
    # compresses ALF batches as well or better (the batches of `make bench`: 0.23 against
    # 2.2 µs per GET entry, 2.1 against 21.7 µs per entry with 4 KiB bodies). It is a
    # dependency wherever it has a wheel; elsewhere the standard library's zlib does the job.
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _deflate = zlib  # type: ignore[misc,unused-ignore]

#: zlib's level 1 compresses repetitive ALF JSON ~25:1 at a quarter of level 6's CPU (a batch
#: of 100 small entries: 29 µs and 1,356 bytes at level 1, 112 µs and 1,214 at level 6).
#: ISA-L's levels run 0-3: its 1 is still smaller than zlib's 1 on those batches.
GZIP_LEVEL = 1

USER_AGENT = f"alf-analytics/{__version__}"
#: How much of the collector's answer is kept (for log lines and 207 accounting).
MAX_ANSWER_BYTES = 65_536
#: The longest a connection attempt may take, whatever ``timeout`` says.
MAX_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Outcome:
    """What the collector answered (``status`` 0 means no answer: a network error)."""

    status: int
    body: bytes = b""
    retry_after: float | None = None
    error: str | None = None
    #: True when the request may have reached the collector (no answer after it was written).
    maybe_delivered: bool = False
    #: The ``Location`` of a 3xx answer (redirects are not followed).
    location: str | None = None


#: A request body: bytes, or a list of parts that, joined, are the body.
Payload = bytes | list[bytes]


class Transport(Protocol):
    """Sends one request body (a JSON array of ALF objects) to the collector."""

    def send(self, payload: Payload, idempotency_key: str | None = None) -> Outcome: ...

    def close(self) -> None: ...


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when unusable."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" and obsolete zones: RFC 9110 dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, when.timestamp() - time.time())
    except (OverflowError, OSError, ValueError):
        return None


_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")

#: Failures before any byte of the request reached the collector: it cannot have stored it.
_NOT_SENT = (
    httpcore.ConnectError,
    httpcore.ConnectTimeout,
    httpcore.PoolTimeout,
    httpcore.WriteError,
    httpcore.WriteTimeout,
    httpcore.UnsupportedProtocol,
    httpcore.LocalProtocolError,
    httpcore.ConnectionNotAvailable,
)


def gzip_compress(payload: Payload) -> bytes:
    """A gzip member (no file name, mtime 0) at :data:`GZIP_LEVEL`; it runs without the GIL.

    A body given in parts is compressed part by part, never joined: a batch of 100 entries
    is past the allocator's threshold for a fresh mapping, whose page faults cost more than
    compressing it.
    """
    compressor = _deflate.compressobj(GZIP_LEVEL, _deflate.DEFLATED, 31)
    if isinstance(payload, bytes):
        return compressor.compress(payload) + compressor.flush()
    out = [compressor.compress(part) for part in payload]
    out.append(compressor.flush())
    return b"".join(out)


class _Deadline:
    """The end of the request in progress: ``timeout`` bounds a whole POST, not each read.

    httpcore's timeouts hold for one socket operation each, so a collector that drips its
    answer a byte at a time would hold a sender (and its ``max_inflight`` slot) for ever.
    """

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = float("inf")

    def left(self, timeout: float | None, error: type[Exception]) -> float | None:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise error("the collector took longer than the timeout for the whole request")
        return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(NetworkStream):
    def __init__(self, stream: NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> NetworkStream:
        left = self._deadline.left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(NetworkBackend):
    def __init__(self, deadline: _Deadline) -> None:
        self._backend = SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> NetworkStream:
        left = self._deadline.left(timeout, httpcore.ConnectTimeout)
        try:
            stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            if not _blocking_gevent_resolver():
                raise
            stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)


def _blocking_gevent_resolver() -> bool:
    """Whether gevent's resolver was switched to its blocking one, to retry a connection.

    gevent resolves on a thread pool (even ``127.0.0.1``), and Python 3.12 refuses new threads
    at interpreter shutdown: the ``atexit`` flush of a gunicorn ``-k gevent`` worker could not
    connect at all and dropped every queued entry. The process is exiting: blocking is fine.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return False
    blocking = importlib.import_module("gevent.resolver.blocking").Resolver
    hub = importlib.import_module("gevent").get_hub()
    if isinstance(hub.resolver, blocking):
        return False
    hub.resolver = blocking(hub)
    return True


class HTTPTransport:
    """POST ``{collector_url}/1.1.0/batch`` with ``Content-Encoding: gzip``.

    Credentials in the URL (``http://user:pass@host``) are sent as HTTP Basic authentication
    and never appear in the request line. Proxy settings from the environment are not read:
    the collector URL is explicit, and a proxy would silently reroute loopback collectors.
    """

    def __init__(self, collector_url: str, *, timeout: float, alf_version: str = "1.1.0") -> None:
        parts = urlsplit(collector_url)
        netloc = parts.netloc.rpartition("@")[2]
        self.url = f"{parts.scheme}://{netloc}{parts.path}/{alf_version}/batch"
        self._url = httpcore.URL(self.url)
        headers = [
            (b"Host", netloc.encode("idna")),
            (b"User-Agent", USER_AGENT.encode()),
            (b"Content-Type", b"application/json"),
            (b"Content-Encoding", b"gzip"),
        ]
        if parts.username is not None or parts.password is not None:
            credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            token = base64.b64encode(credentials.encode("utf-8"))
            headers.append((b"Authorization", b"Basic " + token))
        self._headers = headers
        self.timeouts = {
            "connect": min(timeout, MAX_CONNECT_TIMEOUT),
            "read": timeout,
            "write": timeout,
            "pool": timeout,
        }
        self._extensions = {"timeout": self.timeouts}
        self._timeout = timeout
        self._deadline = _Deadline()
        self._backend = _DeadlineBackend(self._deadline)
        self._origin = self._url.origin
        self._connection: httpcore.HTTPConnection | None = None
        #: The connection has answered a request before (it was kept alive).
        self._answered = False

    def _get_connection(self) -> httpcore.HTTPConnection:
        # One connection, no pool: the worker runs one transport per sender thread, and the
        # pool's bookkeeping costs a tenth of a POST's CPU. What the pool would do is done
        # here: a connection that closed, failed to connect or that the collector closed
        # while it was idle (keep-alive expiry) is replaced by a fresh one.
        connection = self._connection
        if connection is not None and (connection.is_closed() or connection.has_expired()):
            connection.close()
            connection = None
        if connection is None:
            connection = self._connection = httpcore.HTTPConnection(
                self._origin, retries=0, network_backend=self._backend
            )
            self._answered = False
        return connection

    def _open(self, request: httpcore.Request) -> httpcore.Response:
        connection = self._get_connection()
        try:
            response = connection.handle_request(request)
        except (httpcore.ReadError, httpcore.RemoteProtocolError, httpcore.WriteError):
            if not self._answered:
                raise
            # A kept-alive connection that reset or closed with no answer: the collector
            # closed it (its keep-alive timeout) as this request went out, unread. Once more
            # on a fresh connection, as browsers and Go's net/http do (the batch carries an
            # Idempotency-Key); otherwise a routine close would read as an outage.
            connection.close()
            self._connection = None
            response = self._get_connection().handle_request(request)
        self._answered = True
        return response

    def send(self, payload: Payload, idempotency_key: str | None = None) -> Outcome:
        body = gzip_compress(payload)
        headers = [*self._headers, (b"Content-Length", str(len(body)).encode())]
        if idempotency_key is not None:
            headers.append((b"Idempotency-Key", idempotency_key.encode("ascii")))
        request = httpcore.Request(
            b"POST", self._url, headers=headers, content=[body], extensions=self._extensions
        )
        # ``timeout`` bounds the whole exchange: connect, send, and the answer to its end.
        self._deadline.at = time.monotonic() + self._timeout
        try:
            response = self._open(request)
            try:
                # The answer only feeds log lines and the 207 accounting: read at most
                # MAX_ANSWER_BYTES of it (a longer answer costs its connection).
                answer = bytearray()
                for chunk in response.stream:  # type: ignore[union-attr]
                    answer += chunk
                    if len(answer) >= MAX_ANSWER_BYTES:
                        del answer[MAX_ANSWER_BYTES:]
                        break
            finally:
                response.close()
        except _NOT_SENT as exc:
            # Nothing (or not all) of the request was written: the collector cannot have
            # stored this batch.
            return Outcome(0, error=_describe(exc), maybe_delivered=False)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            # A read timeout, a reset or a connection closed before the answer, after the
            # request was written: the outcome is unknown, the collector may have stored it.
            return Outcome(0, error=_describe(exc), maybe_delivered=True)
        retry_after = location = None
        for name, value in response.headers:
            name = name.lower()
            if name == b"retry-after":
                retry_after = parse_retry_after(value.decode("latin-1"))
            elif name == b"location":
                location = value.decode("latin-1")
        return Outcome(response.status, bytes(answer), retry_after, location=location)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
