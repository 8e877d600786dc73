"""The pure ALF 1.1.0 builder: an :class:`~alf_analytics._record.Exchange` in, an entry out.

Nothing here knows a framework or touches the network. Every rule of ``shared/ALF.md`` that the
schema does not enforce lives here: lower-case header names, repeated headers kept as pairs,
``headersSize`` rebuilt from the wire form, ``bodySize`` from counted bytes, standard base64
bodies, ``time == send + wait + receive``, redaction and the trusted-proxy client address.

Whatever the request carried, every field is valid against the 1.1.0 schema *with* its format
checks (``uri``, ``date-time``, ``ipv4``/``ipv6``) and numbers stay in sane ranges: one hostile
request must never make a collector reject the batch its entry travels in. The placeholders
used for values that cannot be written faithfully are listed in the README ("What an entry
holds").

Speed: the worker builds every entry on the app's interpreter, so the per-config rules are
prepared once (:class:`_Plan`) and what repeats from request to request (header pairs, query
strings, the URL origin) is cached in bounded caches whose values are never mutated.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

from . import _net
from ._config import REDACTED, Config
from ._record import Capture, Exchange, RawHeader, RequestInfo
from ._redact import Redactor, body_kind, decoded, redacted_query
from ._version import __version__

try:  # SIMD base64 (a dependency on CPython): a 4 KiB body in 0.3 µs instead of 4.3 µs, and
    # 64 KiB in 1.8 µs instead of 67 µs, all of it otherwise holding the app's global lock.
    from pybase64 import b64encode as _b64encode
except ImportError:  # pragma: no cover - other interpreters, or no wheel and no compiler
    from base64 import b64encode as _b64encode  # type: ignore[assignment]

try:  # orjson is a dependency on CPython: ~10x faster than json for the worker's hot loop.
    import orjson as _orjson
except ImportError:  # pragma: no cover - PyPy and other interpreters
    _orjson = None  # type: ignore[assignment]

__all__ = [
    "ALF_VERSION",
    "CONSUMER_HEADER",
    "CREATOR",
    "MAX_CONSUMER_LENGTH",
    "MAX_DECLARED_SIZE",
    "alf_envelope",
    "build_entry",
    "dumps",
    "query_pairs",
]

ALF_VERSION = "1.1.0"
CREATOR = {"name": "alf-analytics", "version": __version__}
OCTET_STREAM = "application/octet-stream"
#: The synthetic request header that carries the consumer id (``identify``/``set_consumer``).
CONSUMER_HEADER = "x-alf-consumer"
#: A size taken from a ``Content-Length`` header (never from counted bytes) is believed only up
#: to 1 TiB; above it, the bytes actually seen are recorded instead.
MAX_DECLARED_SIZE = 1 << 40
#: A consumer id (from ``identify`` or ``set_consumer``) longer than this is cut to it.
MAX_CONSUMER_LENGTH = 256

_HTTP_VERSIONS = {
    "1": "HTTP/1",
    "1.0": "HTTP/1.0",
    "1.1": "HTTP/1.1",
    "2": "HTTP/2",
    "2.0": "HTTP/2",
}
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_CACHE_SIZE = 4096
# What a header's name says of its value: kept as sent, passed to the redactor, or left out.
_KEEP, _CHECK, _LEAVE_OUT = object(), object(), object()
_QUERY_CACHE_SIZE = 512
# The latest second a datetime can show (9999-12-31T23:59:59).
_MAX_TIMESTAMP = 253_402_300_799


def text(value: str | bytes) -> str:
    """A header name or value as text: bytes are UTF-8 when they decode, else Latin-1.

    The result always encodes to UTF-8 (a lone surrogate becomes U+FFFD).
    """
    if isinstance(value, str):
        if value.isascii():
            return value
        # WSGI hands over "bytes as Latin-1": recover UTF-8 text where that is what was sent.
        try:
            return value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return _net.clean(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def wire_length(value: str | bytes) -> int:
    """Bytes a header name or value took on the wire."""
    if isinstance(value, bytes):
        return len(value)
    if value.isascii():
        return len(value)
    return len(_net.to_bytes(value))


def http_version(raw: str) -> str:
    """Map ``1.1``, ``HTTP/1.1``, ``2``... onto the schema's enum (``unknown`` otherwise)."""
    known = _VERSIONS_SEEN.get(raw)
    if known is None:
        token = raw[5:] if raw[:5].upper() == "HTTP/" else raw
        known = _HTTP_VERSIONS.get(token, "unknown")
        if len(_VERSIONS_SEEN) < 64:  # bounded: the server passes on what the client wrote
            _VERSIONS_SEEN[raw] = known
    return known


_VERSIONS_SEEN: dict[str, str] = {}


_last_second: tuple[int, str] = (-1, "")


def iso_utc(timestamp: float) -> str:
    """``startedDateTime``: UTC, millisecond precision, ``Z`` suffix (years 1970 to 9999)."""
    global _last_second
    if not 0 <= timestamp <= _MAX_TIMESTAMP:  # also catches NaN
        timestamp = 0.0 if not timestamp > 0 else float(_MAX_TIMESTAMP)
    second = int(timestamp)
    # Round to microseconds first, as datetime does, so 0.123 is not shown as .122.
    millis = int((timestamp - second) * 1_000_000 + 0.5) // 1000
    if millis >= 1000:
        second, millis = second + 1, 0
    suffix = _MILLIS[millis]
    cached_second, prefix = _last_second
    if second != cached_second:
        # Entries arrive in bursts within the same second: format the date part once.
        prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second = (second, prefix)
    return prefix + suffix


_MILLIS = [f"{millis:03d}Z" for millis in range(1000)]


def query_pairs(query: str) -> list[dict[str, str]]:
    """The query string parsed into pairs, repeats and blank values kept, in order.

    The same result as ``parse_qsl(query, keep_blank_values=True, errors="replace")``, with
    the decoding skipped for the parts that hold nothing to decode (most of them).
    """
    return _parse_query(query, None)[0]


def _parse_query(
    query: str, redactor: Redactor | None
) -> tuple[list[dict[str, str]], list[tuple[int, bool]]]:
    out = []
    marks: list[tuple[int, bool]] = []
    redacted = False
    for index, part in enumerate(query.split("&") if query else ()):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if "%" in value or "+" in value:
            value = unquote_plus(value, errors="replace")
        if not part.isascii():
            name, value = _net.clean(name), _net.clean(value)
        if redactor is not None and redactor.query_key(name):
            value = REDACTED
            redacted = True
            marks.append((index, True))
        out.append({"name": name, "value": value})
    return out, marks if redacted else []


class _Plan:
    """What building an entry needs from one Config, prepared once, with its caches."""

    __slots__ = (
        "redactor",
        "copy_pairs",
        "client_ip",
        "trusted",
        "forwarded_header",
        "limit",
        "header_pairs",
        "queries",
        "paths",
        "names",
    )

    def __init__(self, config: Config) -> None:
        self.redactor = Redactor(config)
        #: A before_send hook may edit the entry: it must get pairs of its own.
        self.copy_pairs = config.before_send is not None
        self.client_ip = config.client_ip
        self.trusted = config.trusted_proxies
        self.forwarded_header = config.forwarded_header
        self.limit = config.max_body_bytes
        #: (raw name, raw value) -> (ALF pair, wire size); headers left out are not cached
        self.header_pairs: dict[Any, tuple[dict[str, str], int]] = {}
        #: raw query -> (query for the URL, queryString pairs)
        self.queries: dict[str, tuple[str, list[dict[str, str]]]] = {}
        #: raw path -> path for the URL
        self.paths: dict[str, str] = {}
        #: raw header name -> (ALF name, wire size, rule: kept, checked or left out)
        self.names: dict[Any, tuple[str, int, object]] = {}

    def pairs(self, headers: Sequence[RawHeader]) -> tuple[list[dict[str, str]], int]:
        """Headers as ALF name/value pairs (repeats kept, names lower-cased), and wire size."""
        try:
            return self._pairs(headers)
        except (TypeError, ValueError, AttributeError):
            # Not (str | bytes, str | bytes) tuples: an ASGI app's malformed header list, which
            # the server refuses, or list pairs. The well-formed ones are kept (as tuples),
            # the others shown as text.
            return self._pairs([_as_text_pair(item) for item in headers if _is_pair(item)])

    def _pairs(self, headers: Sequence[RawHeader]) -> tuple[list[dict[str, str]], int]:
        cache = self.header_pairs
        get = cache.get
        out: list[dict[str, str]] = []
        append = out.append
        size = 0
        for item in headers:
            # Servers and apps give each header as a tuple: it is its own cache key.
            known = get(item)
            if known is None:
                raw_name, raw_value = item
                pair, length = self._pair(raw_name, raw_value)
                if pair is None:
                    size += length  # left out, and not cached
                    continue
                known = (pair, length)
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[item] = known
            append(known[0])
            size += known[1]
        if self.copy_pairs:
            out = [dict(pair) for pair in out]
        return out, size

    def _pair(self, raw_name: Any, raw_value: Any) -> tuple[dict[str, str] | None, int]:
        # A pair not seen before often has a name seen before (a request id, a cookie): what
        # the name decides (its text, size and redaction rule) is looked up, not redone.
        known = self.names.get(raw_name)
        if known is None:
            known = self._name(raw_name)
        name, size, rule = known
        size += wire_length(raw_value) + 4  # ": " and CRLF
        if rule is _LEAVE_OUT:
            # Sent by the client: it would pose as the consumer id. Left out (still counted).
            return None, size
        value = text(raw_value)
        if rule is _CHECK:
            value = self.redactor.header(name, value)
        return {"name": name, "value": value}, size

    def _name(self, raw_name: Any) -> tuple[str, int, object]:
        name = text(raw_name).lower()
        if name == CONSUMER_HEADER:
            rule = _LEAVE_OUT
        elif self.redactor.header_kept(name):
            rule = _KEEP
        else:
            rule = _CHECK
        known = (name, wire_length(raw_name), rule)
        if len(self.names) >= _CACHE_SIZE:
            self.names.clear()
        self.names[raw_name] = known
        return known

    def query(self, query: str) -> tuple[str, list[dict[str, str]]]:
        """The query for the URL (redacted, escaped) and the queryString pairs."""
        cache = self.queries
        known = cache.get(query)
        if known is None:
            pairs, marks = _parse_query(query, self.redactor)
            in_url = redacted_query(query, marks) if marks else query
            known = (_net.escape(in_url, query=True), pairs)
            if len(cache) >= _QUERY_CACHE_SIZE:
                cache.clear()
            cache[query] = known
        url_query, pairs = known
        if self.copy_pairs:
            return url_query, [dict(pair) for pair in pairs]
        return url_query, list(pairs)

    def path(self, path: str) -> str:
        """The path for the URL: escaped as RFC 3986 asks, always starting with ``/``."""
        known = self.paths.get(path)
        if known is None:
            known = _net.escape(path) if path else "/"
            if not known.startswith("/"):
                known = "/" + known
            if len(self.paths) >= _QUERY_CACHE_SIZE:
                self.paths.clear()
            self.paths[path] = known
        return known

    def client(self, info: RequestInfo) -> str | None:
        """``clientIPAddress`` as the ``client_ip`` option asks for it (None: left out)."""
        mode = self.client_ip
        if mode == "none" or not info.peer:
            return None
        address = _net.ip_literal(info.peer)
        if address is None:
            return None
        if self.trusted:
            address = _net.client_address(
                address, info.headers, self.trusted, self.forwarded_header
            )
        return _net.anonymized(address) if mode == "anonymized" else address

    def body(
        self,
        captured: Capture | None,
        size: int,
        headers: Sequence[RawHeader],
        ended: bool = True,
    ) -> tuple[dict[str, str] | None, bool]:
        """The body object (or None) and ``bodyCaptured`` for a captured body prefix.

        ``ended``: False when more of the body may follow what was counted (a request body
        of no declared length that the app stopped reading before its end, a response body
        cut short).
        """
        if captured is None:
            return None, False
        complete = ended and len(captured) == size
        if not captured:
            return None, complete  # an empty body: captured, nothing to send
        try:
            content_type, coding = _body_headers(headers)
        except (TypeError, ValueError, AttributeError):  # a malformed list, as in pairs()
            content_type, coding = _body_headers(
                [_as_text_pair(item) for item in headers if _is_pair(item)]
            )
        if content_type is None:
            # Content-Type pairs that disagree: the capture was decided on one, the app may
            # have parsed by another; no redaction can be sure to apply, so leave it out.
            return None, False
        data = bytes(captured)
        if coding:
            # Never compressed bytes labelled JSON: decoded (bounded), or left out.
            result = decoded(data, coding, self.limit)
            if result is None:
                return None, False
            data, whole = result
            complete = complete and whole
        kind = body_kind(content_type)
        if kind != "other":
            redacted = self.redactor.body(data, kind) if complete else None
            if redacted is None or len(redacted) > self.limit:
                # Never sent half-redacted, and never past the cap: a body that redaction
                # made longer ([{"pin": 0}, ...] grows by the marker) is left out like a
                # longer one, since a prefix of it would be cut JSON.
                return None, False
            data = redacted
        body = {
            "mimeType": content_type or OCTET_STREAM,
            "encoding": "base64",
            "text": _b64encode(data).decode("ascii"),
        }
        return body, complete


def _body_headers(headers: Sequence[RawHeader]) -> tuple[str | None, str]:
    """The ``Content-Type`` and ``Content-Encoding`` values ("" when absent); the type is
    None when several ``Content-Type`` pairs disagree (an ASGI scope keeps them all)."""
    content_type: str | None = None
    coding = ""
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name in ("content-type", b"content-type"):
            value = text(raw_value)
            if content_type is not None and value != content_type:
                return None, coding
            content_type = value
        elif name in ("content-encoding", b"content-encoding"):
            # Several pairs are one list, applied in order (RFC 9110 5.3).
            coding = f"{coding}, {text(raw_value)}" if coding else text(raw_value)
    return content_type or "", coding


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2


def _as_text_pair(item: Sequence[Any]) -> tuple[str | bytes, str | bytes]:
    name, value = item
    return (
        name if isinstance(name, (str, bytes)) else str(name),
        value if isinstance(value, (str, bytes)) else str(value),
    )


_plans: weakref.WeakKeyDictionary[Config, _Plan] = weakref.WeakKeyDictionary()
_last_plan: tuple[Config | None, _Plan | None] = (None, None)


def _plan(config: Config) -> _Plan:
    global _last_plan
    last_config, plan = _last_plan
    if config is last_config and plan is not None:
        return plan
    plan = _plans.get(config)
    if plan is None:
        plan = _plans[config] = _Plan(config)
    _last_plan = (config, plan)
    return plan


def _status(value: Any) -> int:
    """A response status in 0..999: 0 (unknown) for anything else the app gave."""
    if type(value) is int:  # the common case; bool and str are not statuses
        return value if 0 <= value <= 999 else 0
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value) if 0 <= value <= 999 else 0  # an IntEnum (HTTPStatus)
    return 0


def _declared(value: int | None) -> int:
    """A Content-Length believed only within 0..MAX_DECLARED_SIZE (0 otherwise)."""
    if value is None or type(value) is not int or not 0 <= value <= MAX_DECLARED_SIZE:
        return 0
    return value


def _us(seconds: float) -> int:
    """Whole microseconds (timings are written in milliseconds with 3 decimals)."""
    return int(seconds * 1_000_000.0 + 0.5) if seconds > 0 else 0


def build_entry(exchange: Exchange) -> dict[str, Any]:
    """The ALF 1.1.0 entry for one exchange. Never raises for anything a request carried."""
    # The worker's hot loop: the plan's caches and helpers are used inline, and the common
    # case (ASCII text, cached headers, no body) takes the fewest steps.
    plan = _plan(exchange.config)
    info = exchange.reader(exchange.source)
    raw_version = info.http_version
    version = _VERSIONS_SEEN.get(raw_version) or http_version(raw_version)
    # The sizes count the version as the server read it ("HTTP/1.2", "HTTP/2.0"), not the
    # schema's name for it ("unknown", "HTTP/2"); ASGI gives it without "HTTP/".
    wire_version = len(raw_version) if raw_version[:5].upper() == "HTTP/" else 5 + len(raw_version)

    # -- request
    method = info.method
    if not method.isascii():
        method = _net.clean(method)
    request_headers, request_headers_size = plan.pairs(info.headers)
    path = info.path
    query = info.query
    # The request line: method SP target SP version CRLF, then the CRLF ending the headers.
    target = f"{method} {path}?{query}" if query else f"{method} {path}"
    request_headers_size += (
        (len(target) if target.isascii() else wire_length(target)) + wire_version + 5
    )
    consumer = exchange.consumer
    if consumer:
        if len(consumer) > MAX_CONSUMER_LENGTH:  # a collector indexes it: keep it sane
            consumer = consumer[:MAX_CONSUMER_LENGTH]
        request_headers.append({"name": CONSUMER_HEADER, "value": _net.clean(consumer)})
    url_path = plan.paths.get(path)
    if url_path is None:
        url_path = plan.path(path)
    url = _net.origin(info.scheme, info.host) + url_path
    if query:
        known = plan.queries.get(query)
        if known is None or plan.copy_pairs:
            url_query, query_string = plan.query(query)
        else:
            url_query, query_string = known[0], list(known[1])
        url = f"{url}?{url_query}"
    else:
        query_string = []
    # Body sizes: the bytes we counted, unless the app stopped reading early and the client
    # declared more (ALF.md 1.6: measure; else Content-Length, within bounds; else 0).
    request_size = exchange.request_body_size
    ended = True
    declared = info.content_length
    if not exchange.request_complete:
        if declared is not None:
            request_size = max(request_size, _declared(declared))
        elif request_size or info.chunked:
            ended = False  # read in part, length unknown (chunked): more may have followed
    elif declared is not None and request_size < declared:
        # The input ended before the length the client declared: it left mid-body (gunicorn
        # then ends wsgi.input early). What crossed is the size, and it is not the whole body.
        ended = False
    request: dict[str, Any] = {
        "method": method,
        "url": url,
        "httpVersion": version,
        "queryString": query_string,
        "headers": request_headers,
        "headersSize": request_headers_size,
        "bodyCaptured": False,
        "bodySize": request_size,
    }
    if exchange.request_body is not None:
        post_data, request["bodyCaptured"] = plan.body(
            exchange.request_body, request_size, info.headers, ended
        )
        if post_data is not None:
            request["postData"] = post_data

    # -- response
    status = exchange.status
    if type(status) is not int or not 0 < status <= 999:
        status = _status(status) if status else 500
    response_headers, response_headers_size = plan.pairs(exchange.response_headers)
    reason = exchange.reason
    if reason is None:
        reason = _PHRASES.get(status, "")
    # The status line: version SP status SP reason CRLF, then the CRLF ending the headers.
    if reason.isascii():
        response_headers_size += wire_version + len(str(status)) + len(reason) + 6
    else:
        reason = _net.clean(reason)
        response_headers_size += wire_version + len(str(status)) + wire_length(reason) + 6
    response_size = exchange.response_body_size
    if exchange.response_content_length is not None:
        response_size = max(response_size, _declared(exchange.response_content_length))
    response_body = exchange.response_body
    if info.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        # The server sends no body for these, whatever the app produced (RFC 9110 6.4.1).
        response_size = 0
        response_body = None if response_body is None else Capture()
    response: dict[str, Any] = {
        "status": status,
        "statusText": reason,
        "httpVersion": version,
        "headers": response_headers,
        "headersSize": response_headers_size,
        "bodyCaptured": False,
        "bodySize": response_size,
    }
    if response_body is not None:
        content, response["bodyCaptured"] = plan.body(
            response_body, response_size, exchange.response_headers, exchange.response_ended
        )
        if content is not None:
            response["content"] = content

    # -- timings
    t_start = exchange.t_start
    t_end = exchange.t_end or t_start
    t_response = exchange.t_response or t_end
    # In whole microseconds first, so that time == send + wait + receive exactly.
    wait = t_response - t_start
    wait = int(wait * 1_000_000.0 + 0.5) if wait > 0 else 0
    receive = t_end - t_response
    receive = int(receive * 1_000_000.0 + 0.5) if receive > 0 else 0
    entry: dict[str, Any] = {
        "startedDateTime": iso_utc(exchange.started_at),
        "time": (wait + receive) / 1000,
        "request": request,
        "response": response,
        "timings": {"send": 0.0, "wait": wait / 1000, "receive": receive / 1000},
    }
    peer = info.peer
    if peer and plan.client_ip != "none":
        client = plan.client(info)
        if client is not None:
            entry["clientIPAddress"] = client
    if info.server_ip:
        server = _net.ip_literal(info.server_ip)
        if server is not None:
            entry["serverIPAddress"] = server
    return entry


def alf_envelope(service_token: str, environment: str | None) -> dict[str, Any]:
    """The ALF object around a group's entries (``entries`` is filled by the caller)."""
    alf: dict[str, Any] = {"version": ALF_VERSION, "serviceToken": _net.clean(service_token)}
    if environment is not None:
        alf["environment"] = _net.clean(environment)
    alf["har"] = {"log": {"creator": dict(CREATOR), "entries": []}}
    return alf


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the collector expects it."""
    if _orjson is not None:
        try:
            # orjson's bytes keep their whole output buffer (~8 KiB for a 1 KiB entry): copy
            # into an exact-size object, since entries wait in memory for their batch.
            return bytes(memoryview(_orjson.dumps(value)))
        except TypeError:  # e.g. a lone surrogate a before_send hook put in: stdlib below
            pass
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
