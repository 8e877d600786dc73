"""The pure ALF 1.1.0 builder: an :class:`~alf_analytics._record.Exchange` in, an entry out.

Nothing here knows a framework or touches the network. Every rule of ``shared/ALF.md`` that the
schema does not enforce lives here: lower-case header names, repeated headers kept as pairs,
``headersSize`` rebuilt from the wire form, ``bodySize`` from counted bytes, standard base64
bodies, ``time == send + wait + receive``, redaction and the trusted-proxy client address.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote_plus

from ._config import REDACTED, Config
from ._record import Exchange, RawHeader, RequestInfo
from ._version import __version__

try:  # orjson is a dependency on CPython: ~10x faster than json for the worker's hot loop.
    import orjson as _orjson
except ImportError:  # pragma: no cover - PyPy and other interpreters
    _orjson = None  # type: ignore[assignment]

ALF_VERSION = "1.1.0"
CREATOR = {"name": "alf-analytics", "version": __version__}
OCTET_STREAM = "application/octet-stream"

_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
_HTTP_VERSIONS = {
    "1": "HTTP/1",
    "1.0": "HTTP/1.0",
    "1.1": "HTTP/1.1",
    "2": "HTTP/2",
    "2.0": "HTTP/2",
}
# Characters RFC 3986 allows unescaped in a path and a query; everything else gets %XX.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_URI_PLAIN = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*")
_PERCENT_OK = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOST = re.compile(
    r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"
)


def text(value: str | bytes) -> str:
    """A header name or value as text: bytes are UTF-8 when they decode, else Latin-1."""
    if isinstance(value, str):
        # WSGI hands over "bytes as Latin-1"; recover UTF-8 text where that is what was sent.
        if value.isascii():
            return value
        try:
            return value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def wire_length(value: str | bytes) -> int:
    """Bytes a header name or value took on the wire."""
    if isinstance(value, bytes):
        return len(value)
    try:
        return len(value.encode("latin-1"))
    except UnicodeEncodeError:
        return len(value.encode("utf-8"))


def http_version(raw: str) -> str:
    """Map ``1.1``, ``HTTP/1.1``, ``2``... onto the schema's enum (``unknown`` otherwise)."""
    token = raw[5:] if raw[:5].upper() == "HTTP/" else raw
    return _HTTP_VERSIONS.get(token, "unknown")


_last_second: tuple[int, str] = (-1, "")


def iso_utc(timestamp: float) -> str:
    """``startedDateTime``: UTC, millisecond precision, ``Z`` suffix."""
    global _last_second
    second = int(timestamp)
    # Round to microseconds first, as datetime does, so 0.123 is not shown as .122.
    millis = round((timestamp - second) * 1_000_000) // 1000
    if millis >= 1000:
        second, millis = second + 1, 0
    cached_second, prefix = _last_second
    if second != cached_second:
        # Entries arrive in bursts within the same second: format the date part once.
        prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _last_second = (second, prefix)
    return f"{prefix}{millis:03d}Z"


def _escape(value: str, safe: str) -> str:
    if not _URI_PLAIN.fullmatch(value):
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "replace")
        value = quote(raw, safe=safe)
    # A lone '%' not followed by two hex digits is not a valid URI either.
    return _PERCENT_OK.sub("%25", value)


def build_url(info: RequestInfo) -> str:
    """An absolute URL (``format: uri``) from what the request carried."""
    scheme = info.scheme if info.scheme in ("http", "https") else "http"
    host = info.host if info.host and _HOST.fullmatch(info.host) else "unknown"
    default_port = _DEFAULT_PORTS.get(scheme, "")
    if default_port and host.endswith(default_port):
        # "Host: example.com:80" names the default port: the URL leaves it out.
        host = host[: -len(default_port)]
    path = _escape(info.path or "/", _PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    url = f"{scheme}://{host}{path}"
    if info.query:
        url += "?" + _escape(info.query, _QUERY_SAFE)
    return url


#: (redaction set) -> {(raw name, raw value): (ALF pair, wire size)}. Most headers repeat from
#: request to request (host, accept, user-agent, content-type...): an entry reuses the pair
#: objects (they are never mutated). Cleared when full, so it stays bounded.
_PAIR_CACHE: dict[frozenset[str], dict[tuple[Any, Any], tuple[dict[str, str], int]]] = {}
_PAIR_CACHE_SIZE = 4096


def pairs(headers: Iterable[Any], redact: frozenset[str]) -> tuple[list[dict[str, str]], int]:
    """Headers as ALF name/value pairs (repeats kept, names lower-cased) and their wire size."""
    cache = _PAIR_CACHE.get(redact)
    if cache is None:
        cache = _PAIR_CACHE[redact] = {}
    out = []
    size = 0
    for raw_name, raw_value in headers:
        key = (raw_name, raw_value)
        known = cache.get(key)
        if known is None:
            known = _pair(raw_name, raw_value, redact)
            if len(cache) >= _PAIR_CACHE_SIZE:
                cache.clear()
            cache[key] = known
        out.append(known[0])
        size += known[1]
    return out, size


def _pair(raw_name: Any, raw_value: Any, redact: frozenset[str]) -> tuple[dict[str, str], int]:
    # Fast path for the common case: ASCII names and values (bytes from ASGI, str from WSGI).
    if raw_name.isascii() and raw_value.isascii():
        size = len(raw_name) + len(raw_value) + 4  # ": " and CRLF
        if isinstance(raw_name, bytes):
            name = raw_name.decode("ascii").lower()
            value = raw_value.decode("ascii")
        else:
            name = raw_name.lower()
            value = raw_value
    else:
        size = wire_length(raw_name) + wire_length(raw_value) + 4
        name = text(raw_name).lower()
        value = text(raw_value)
    return {"name": name, "value": REDACTED if name in redact else value}, size


def query_pairs(query: str) -> list[dict[str, str]]:
    """The query string parsed into pairs, repeats and blank values kept, in order.

    The same result as ``parse_qsl(query, keep_blank_values=True, errors="replace")``, with
    the decoding skipped for the parts that hold nothing to decode (most of them).
    """
    if not query:
        return []
    out = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if "%" in value or "+" in value:
            value = unquote_plus(value, errors="replace")
        out.append({"name": name, "value": value})
    return out


def _ip(value: str | None) -> str | None:
    if not value:
        return None
    return _ip_literal(value.strip())


@lru_cache(maxsize=1024)
def _ip_literal(candidate: str) -> str | None:
    """The normalised IP literal, or None (cached: peers repeat, and parsing raises)."""
    if candidate.startswith("[") and "]" in candidate:
        candidate = candidate[1 : candidate.index("]")]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def _forwarded_for(headers: Sequence[RawHeader]) -> list[str]:
    """Addresses from ``Forwarded: for=`` or else ``X-Forwarded-For``, left to right."""
    forwarded: list[str] = []
    xff: list[str] = []
    for raw_name, raw_value in headers:
        name = text(raw_name).lower()
        if name == "forwarded":
            for element in text(raw_value).split(","):
                for param in element.split(";"):
                    key, _, val = param.strip().partition("=")
                    if key.lower() == "for":
                        val = val.strip().strip('"')
                        # for="1.2.3.4:8080" and for="[::1]:80" carry a port.
                        if not val.startswith("[") and val.count(":") == 1:
                            val = val.split(":")[0]
                        forwarded.append(val)
        elif name == "x-forwarded-for":
            xff.extend(part.strip() for part in text(raw_value).split(","))
    return forwarded or xff


def client_ip(info: RequestInfo, config: Config) -> str | None:
    """The client address: the socket peer, or the first untrusted hop from the right.

    Forwarding headers are honoured only when the peer is a configured trusted proxy, and then
    hop by hop from the right, so a client cannot forge its address by sending the header.
    """
    peer = _ip(info.peer)
    if peer is None or not config.trusted_proxies:
        return peer
    trusted = config.trusted_proxies

    def is_trusted(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in trusted)

    if not is_trusted(peer):
        return peer
    client = peer
    for hop in reversed(_forwarded_for(info.headers)):
        address = _ip(hop)
        if address is None:
            break
        client = address
        if not is_trusted(address):
            break
    return client


def _content_type(headers: Sequence[RawHeader]) -> str:
    for raw_name, raw_value in headers:
        if text(raw_name).lower() == "content-type":
            return text(raw_value) or OCTET_STREAM
    return OCTET_STREAM


def _body(captured: bytearray | None, headers: Sequence[RawHeader]) -> dict[str, str] | None:
    if captured is None or not captured:
        return None
    return {
        "mimeType": _content_type(headers),
        "encoding": "base64",
        "text": base64.b64encode(captured).decode("ascii"),
    }


_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def _reason(status: int, reason: str) -> str:
    return reason or _PHRASES.get(status, "")


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 3)


def build_entry(exchange: Exchange) -> dict[str, Any]:
    """The ALF 1.1.0 entry for one exchange."""
    config = exchange.config
    info = exchange.reader(exchange.source)
    version = http_version(info.http_version)
    redact = config.redact_headers

    request_headers, request_headers_size = pairs(info.headers, redact)
    target = info.path + ("?" + info.query if info.query else "")
    request_headers_size += len(info.method) + 1 + wire_length(target) + 1 + len(version) + 2 + 2
    # Body sizes: the bytes we counted, unless the app stopped reading early and the client
    # declared more (ALF.md 1.6: measure; else Content-Length; else 0).
    request_size = exchange.request_body_size
    if not exchange.request_complete and info.content_length is not None:
        request_size = max(request_size, info.content_length)
    request_complete = exchange.request_body is not None and request_size == len(
        exchange.request_body
    )

    status = exchange.status or 500
    response_headers, response_headers_size = pairs(exchange.response_headers, redact)
    reason = _reason(status, exchange.reason)
    response_headers_size += len(version) + 1 + len(str(status)) + 1 + wire_length(reason) + 4
    response_size = exchange.response_body_size
    if exchange.response_content_length is not None:
        response_size = max(response_size, exchange.response_content_length)
    response_body = exchange.response_body
    if info.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        # The server sends no body for these, whatever the app produced (RFC 9110 6.4.1).
        response_size = 0
        response_body = None if response_body is None else bytearray()
    response_complete = response_body is not None and response_size == len(response_body)

    request: dict[str, Any] = {
        "method": info.method,
        "url": build_url(info),
        "httpVersion": version,
        "queryString": query_pairs(info.query),
        "headers": request_headers,
        "headersSize": request_headers_size,
        "bodyCaptured": request_complete,
        "bodySize": request_size,
    }
    post_data = _body(exchange.request_body, info.headers)
    if post_data is not None:
        request["postData"] = post_data

    response: dict[str, Any] = {
        "status": status,
        "statusText": reason,
        "httpVersion": version,
        "headers": response_headers,
        "headersSize": response_headers_size,
        "bodyCaptured": response_complete,
        "bodySize": response_size,
    }
    content = _body(response_body, exchange.response_headers)
    if content is not None:
        response["content"] = content

    t_start = exchange.t_start
    t_end = exchange.t_end or t_start
    t_response = exchange.t_response or t_end
    wait = _ms(t_response - t_start)
    receive = _ms(t_end - t_response)
    entry: dict[str, Any] = {
        "startedDateTime": iso_utc(exchange.started_at),
        "time": round(wait + receive, 3),
        "request": request,
        "response": response,
        "timings": {"send": 0.0, "wait": wait, "receive": receive},
    }
    client = client_ip(info, config)
    if client is not None:
        entry["clientIPAddress"] = client
    server = _ip(info.server_ip)
    if server is not None:
        entry["serverIPAddress"] = server
    return entry


def alf_envelope(service_token: str, environment: str | None) -> dict[str, Any]:
    """The ALF object around a group's entries (``entries`` is filled by the caller)."""
    alf: dict[str, Any] = {"version": ALF_VERSION, "serviceToken": service_token}
    if environment is not None:
        alf["environment"] = environment
    alf["har"] = {"log": {"creator": dict(CREATOR), "entries": []}}
    return alf


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the collector expects it."""
    if _orjson is not None:
        try:
            # orjson's bytes keep their whole output buffer (~8 KiB for a 1 KiB entry): copy
            # into an exact-size object, since entries wait in memory for their batch.
            return bytes(memoryview(_orjson.dumps(value)))
        except TypeError:  # e.g. a lone surrogate in a str: fall back to the stdlib encoder
            pass
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
