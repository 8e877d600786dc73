"""A reference ALF collector: an HTTP server that receives, validates and stores ALF payloads.

It speaks the Galileo collector protocol (``POST /:version/single`` and ``/:version/batch``
for ALF 1.0.0 and 1.1.0, plain, gzip or deflate bodies, answers 200, 207, 400 or 413 with
``{"errors": [...], "sent": N, "saved": M}``) and keeps everything it receives in SQLite, so
tests and local runs can check exactly what an agent sent::

    with Collector() as collector:
        ...  # point the agent at collector.url
        assert collector.wait_for_entries(3)
        [entry.status for entry in collector.entries(service_token="my-token")]

Only the standard library is needed to run it. Schema validation (on by default) needs
``jsonschema``: ``pip install 'alf-analytics[collector]'``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import EllipsisType, TracebackType
from typing import Any, Final, Protocol, cast
from urllib.parse import quote, urlsplit

__all__ = [
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "SUPPORTED_VERSIONS",
    "Collector",
    "CollectorError",
    "RequestRecord",
    "StoredEntry",
    "Summary",
    "SummaryRow",
    "summarize",
]

logger = logging.getLogger("alf_analytics.collector")

SUPPORTED_VERSIONS: Final = ("1.0.0", "1.1.0")
"""ALF versions the collector accepts, each at ``/<version>/single`` and ``/<version>/batch``."""

DEFAULT_MAX_DECOMPRESSED_BYTES: Final = 64 * 1024 * 1024
"""Default cap on a decompressed body; larger bodies (zip bombs) are refused with 413."""

_INSTALL_HINT: Final = "pip install 'alf-analytics[collector]'"
_DB_SCHEMA_VERSION: Final = 1
# An oversized body is still read (and thrown away) up to this many bytes, so that a client
# that writes the whole body before reading the answer gets the 413 instead of a reset.
_DRAIN_LIMIT: Final = 64 * 1024 * 1024
_POLL_INTERVAL: Final = 0.05
_MAX_ERROR_CHARS: Final = 300

_ROUTES: Final[dict[str, tuple[str, str]]] = {
    f"/{version}/{kind}": (version, kind)
    for version in SUPPORTED_VERSIONS
    for kind in ("single", "batch")
}
_HEALTH_PATH: Final = "/health"


class CollectorError(Exception):
    """The collector cannot do what was asked (stopped, or a database it does not recognise)."""


# --------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class StoredEntry:
    """One stored HAR entry, with the ALF envelope fields it arrived with.

    ``entry`` is the entry object exactly as received (``har.log.entries[i]``), so it can be
    compared with what the agent built. The other fields are the indexed columns: they are
    ``None`` when the entry lacks them (only possible with ``validate=False``).
    ``client_ip_address`` is the entry's ``clientIPAddress`` (1.1.0) or, failing that, the
    ALF root's (1.0.0). ``service_token`` is ``""`` if the ALF had no string token.
    """

    id: int
    received_at: datetime
    alf_version: str
    service_token: str
    environment: str | None
    creator: dict[str, Any] | None
    method: str | None
    url: str | None
    path: str | None
    status: int | None
    time_ms: float | None
    request_body_size: int | None
    response_body_size: int | None
    client_ip_address: str | None
    entry: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP request the collector answered (every path except ``/health``).

    ``alf_count`` is the number of ALF objects in the body (the ``sent`` of the answer),
    ``saved_count`` how many of them were stored, ``entry_count`` how many entries those held.
    ``wire_bytes`` is the body as sent (compressed, without chunk framing), ``body_bytes`` the
    decompressed size (0 when the body was refused before decompression). ``headers`` has
    lowercased names; repeated headers are joined with ``", "``.
    """

    id: int
    received_at: datetime
    method: str
    endpoint: str
    content_encoding: str | None
    status: int
    alf_count: int
    saved_count: int
    entry_count: int
    wire_bytes: int
    body_bytes: int
    headers: dict[str, str]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class SummaryRow:
    """Entries grouped by (environment, method, path, status), with ``time`` percentiles in ms.

    Percentiles use the nearest-rank method, so every value is one that was observed. They are
    ``None`` when no entry of the group had a numeric ``time``.
    """

    environment: str | None
    method: str | None
    path: str | None
    status: int | None
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return {
            "environment": self.environment,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "count": self.count,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
        }


@dataclass(frozen=True)
class Summary:
    """What a collector database holds: grouped rows plus totals.

    ``requests`` counts HTTP requests to the ALF endpoints (whatever the answer),
    ``rejected_requests`` those answered with a status of 400 or more, ``alfs`` the ALF objects
    saved and ``service_tokens`` the distinct tokens among stored entries.
    """

    rows: tuple[SummaryRow, ...]
    entries: int
    requests: int
    rejected_requests: int
    alfs: int
    service_tokens: int

    def as_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict: ``{"rows": [...], "totals": {...}}``."""
        return {
            "rows": [row.as_dict() for row in self.rows],
            "totals": {
                "entries": self.entries,
                "requests": self.requests,
                "rejected_requests": self.rejected_requests,
                "alfs": self.alfs,
                "service_tokens": self.service_tokens,
            },
        }


# --------------------------------------------------------------------------------------------
# Validation


class _Validator(Protocol):
    def iter_errors(self, instance: object) -> Iterator[Any]: ...


_validators: dict[str, _Validator] = {}
_validators_lock = threading.Lock()
_format_warning_given = False


def _import_jsonschema() -> Any:
    # import_module keeps jsonschema untyped (Any), so mypy passes with or without its stubs.
    try:
        return importlib.import_module("jsonschema")
    except ImportError as exc:
        raise ImportError(
            "ALF schema validation needs the 'jsonschema' package: "
            f"{_INSTALL_HINT} (or run the collector with validate=False / --no-validate)"
        ) from exc


def _load_schema(name: str) -> dict[str, Any]:
    text = (resources.files("alf_analytics") / "schemas" / f"{name}.json").read_text("utf-8")
    return cast("dict[str, Any]", json.loads(text))


def _validator_for(version: str) -> _Validator:
    global _format_warning_given
    with _validators_lock:
        validator = _validators.get(version)
        if validator is None:
            jsonschema = _import_jsonschema()
            checker = jsonschema.FormatChecker()
            missing = {"uri", "date-time"} - set(checker.checkers)
            if missing and not _format_warning_given:
                _format_warning_given = True
                logger.warning(
                    "jsonschema cannot check the formats %s (install rfc3987 and "
                    "rfc3339-validator); those fields are not validated",
                    ", ".join(sorted(missing)),
                )
            validator = cast(
                "_Validator",
                jsonschema.Draft4Validator(_load_schema(version), format_checker=checker),
            )
            _validators[version] = validator
        return validator


def _abbreviate(value: object) -> str:
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40] + "...")
    return repr(value)


def _describe_validation_error(error: Any) -> str:
    message = str(error.message)
    # jsonschema starts many messages with repr(instance). Objects are abbreviated so that an
    # answer never echoes a whole document (or a service token inside one).
    instance_repr = repr(error.instance)
    if message.startswith(instance_repr) and (
        isinstance(error.instance, (dict, list)) or len(instance_repr) > 60
    ):
        message = _abbreviate(error.instance) + message[len(instance_repr) :]
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    path = getattr(error, "json_path", None)  # jsonschema < 4.0 lacks it
    if path is None:
        path = "$" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path
        )
    return f"{message} (at {path})"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# --------------------------------------------------------------------------------------------
# Body decoding


class _HTTPError(Exception):
    """Ends a request with ``status`` and one error string."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def _sniff_compression(body: bytes) -> str | None:
    if body[:2] == b"\x1f\x8b":
        return "gzip"
    if len(body) >= 2 and body[0] & 0x0F == 8 and body[0] >> 4 <= 7:
        if (body[0] << 8 | body[1]) % 31 == 0:
            return "zlib"
    return None


def _decompress(data: bytes, wbits: int, cap: int, name: str, *, multi_member: bool) -> bytes:
    out: list[bytes] = []
    size = 0
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            # One call suffices: asking for cap + 1 bytes either hits the cap (refused below)
            # or leaves no pending output.
            chunk = decompressor.decompress(data, cap + 1 - size)
        except zlib.error as exc:
            raise _HTTPError(400, f"invalid {name} body: {exc}") from exc
        size += len(chunk)
        if size > cap:
            raise _HTTPError(413, f"decompressed body exceeds the limit of {cap} bytes")
        out.append(chunk)
        if not decompressor.eof:
            raise _HTTPError(400, f"invalid {name} body: compressed data is truncated")
        data = decompressor.unused_data
        if not data:
            return b"".join(out)
        if not multi_member:
            raise _HTTPError(400, f"invalid {name} body: trailing data after the stream")


def _inflate(data: bytes, cap: int) -> bytes:
    # RFC 9110 "deflate" is zlib-wrapped, but many clients send raw deflate: accept both.
    if _sniff_compression(data) == "zlib":
        try:
            return _decompress(data, zlib.MAX_WBITS, cap, "deflate", multi_member=False)
        except _HTTPError as exc:
            if exc.status == 413:
                raise
    return _decompress(data, -zlib.MAX_WBITS, cap, "deflate", multi_member=False)


def _decode_content(body: bytes, content_encoding: str | None, cap: int) -> tuple[bytes, bool]:
    """Undo the Content-Encoding; also says whether any real coding was applied."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    applied = False
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _decompress(body, 16 + zlib.MAX_WBITS, cap, "gzip", multi_member=True)
        elif coding == "deflate":
            body = _inflate(body, cap)
        else:
            raise _HTTPError(415, f"unsupported Content-Encoding {coding!r} (use gzip or deflate)")
        applied = True
    if len(body) > cap:
        raise _HTTPError(413, f"body exceeds the limit of {cap} bytes")
    return body, applied


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _HTTPError(
            400, f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    if not text.strip():
        raise _HTTPError(400, "body is empty")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _HTTPError(400, f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _HTTPError(400, "body is not valid JSON: nested too deeply") from exc


# --------------------------------------------------------------------------------------------
# Storage

_DDL: Final = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    method TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    content_encoding TEXT,
    status INTEGER NOT NULL,
    alf_count INTEGER NOT NULL,
    saved_count INTEGER NOT NULL,
    entry_count INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    body_bytes INTEGER NOT NULL,
    headers_json TEXT NOT NULL,
    errors_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alfs (
    id INTEGER PRIMARY KEY,
    request_id INTEGER NOT NULL REFERENCES requests(id),
    received_at TEXT NOT NULL,
    alf_version TEXT NOT NULL,
    service_token TEXT NOT NULL,
    environment TEXT,
    creator_json TEXT,
    entry_count INTEGER NOT NULL,
    alf_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    alf_id INTEGER NOT NULL REFERENCES alfs(id),
    request_id INTEGER NOT NULL REFERENCES requests(id),
    received_at TEXT NOT NULL,
    alf_version TEXT NOT NULL,
    service_token TEXT NOT NULL,
    environment TEXT,
    method TEXT,
    url TEXT,
    path TEXT,
    status INTEGER,
    time_ms REAL,
    request_body_size INTEGER,
    response_body_size INTEGER,
    client_ip_address TEXT,
    entry_json TEXT NOT NULL
);
"""
_TABLES: Final = ("requests", "alfs", "entries")


def _is_memory(db_path: str) -> bool:
    return db_path in ("", ":memory:") or db_path.startswith("file::memory:")


def _open_db(db_path: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, check_same_thread=False, uri=db_path.startswith("file:"))
    try:
        existing = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if existing and (version != _DB_SCHEMA_VERSION or not set(_TABLES) <= existing):
            raise CollectorError(
                f"{db_path} is not an alf-analytics collector database "
                f"(schema version {version}, tables {sorted(existing)})"
            )
        if not _is_memory(db_path):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_DDL)
        db.execute(f"PRAGMA user_version={_DB_SCHEMA_VERSION}")
        db.commit()
    except BaseException:
        db.close()
        raise
    return db


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _dict_or_empty(value: object) -> dict[str, Any]:
    return cast("dict[str, Any]", value) if isinstance(value, dict) else {}


def _url_path(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return urlsplit(url).path or "/"
    except ValueError:
        return None


def _alf_entries(alf: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    entries = _dict_or_empty(_dict_or_empty(alf.get("har")).get("log")).get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return entries


def _percentile(sorted_values: Sequence[float], percent: int) -> float:
    rank = max(1, -(-percent * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def _summarize(db: sqlite3.Connection) -> Summary:
    groups: dict[tuple[str | None, str | None, str | None, int | None], list[float | None]] = {}
    rows = db.execute("SELECT environment, method, path, status, time_ms FROM entries ORDER BY id")
    for environment, method, path, status, time_ms in rows:
        groups.setdefault((environment, method, path, status), []).append(time_ms)

    def sort_key(key: tuple[str | None, str | None, str | None, int | None]) -> tuple[Any, ...]:
        return tuple((part is not None, part if part is not None else "") for part in key)

    summary_rows = []
    for key in sorted(groups, key=sort_key):
        times = sorted(t for t in groups[key] if t is not None)
        summary_rows.append(
            SummaryRow(
                *key,
                count=len(groups[key]),
                p50=_percentile(times, 50) if times else None,
                p90=_percentile(times, 90) if times else None,
                p99=_percentile(times, 99) if times else None,
                max=times[-1] if times else None,
            )
        )
    endpoints = tuple(_ROUTES)
    marks = ",".join("?" * len(endpoints))
    requests, rejected = db.execute(
        f"SELECT COUNT(*), COALESCE(SUM(status >= 400), 0) FROM requests "
        f"WHERE endpoint IN ({marks})",
        endpoints,
    ).fetchone()
    return Summary(
        rows=tuple(summary_rows),
        entries=sum(row.count for row in summary_rows),
        requests=requests,
        rejected_requests=rejected,
        alfs=db.execute("SELECT COUNT(*) FROM alfs").fetchone()[0],
        service_tokens=db.execute("SELECT COUNT(DISTINCT service_token) FROM entries").fetchone()[
            0
        ],
    )


def summarize(db_path: str) -> Summary:
    """Summarise a collector database file (read only; the collector may be running).

    Raises ``FileNotFoundError`` when the file does not exist and ``CollectorError`` when it is
    not a collector database.
    """
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"no such database file: {db_path}")
    try:
        # mode=rw (no create) rather than ro: only SELECTs are run, and a read-write connection
        # can remove the WAL files when it closes, where a read-only one leaves them behind.
        db = sqlite3.connect(f"file:{_quote_path(db_path)}?mode=rw", uri=True)
    except sqlite3.Error as exc:
        raise CollectorError(f"cannot open {db_path}: {exc}") from exc
    try:
        existing = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not set(_TABLES) <= existing:
            raise CollectorError(f"{db_path} is not an alf-analytics collector database")
        return _summarize(db)
    except sqlite3.DatabaseError as exc:
        raise CollectorError(f"cannot read {db_path}: {exc}") from exc
    finally:
        db.close()


def _quote_path(path: str) -> str:
    return quote(path, safe="/:\\")


def _mask_token(token: str) -> str:
    return f"...{token[-4:]}" if len(token) >= 8 else "***"


# --------------------------------------------------------------------------------------------
# HTTP server


@dataclass
class _Outcome:
    status: int
    errors: list[str]
    sent: int = 0
    saved: int = 0
    entry_count: int = 0
    wire_bytes: int = 0
    body_bytes: int = 0
    tokens: tuple[str, ...] = ()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.collector = collector
        self._connections: dict[Any, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="alf-collector-connection",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """Close open (keep-alive) connections and wait for their threads."""
        with self._connections_lock:
            items = list(self._connections.items())
        for sock, _ in items:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in items:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("unexpected error on a connection from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "alf-analytics-collector"
    sys_version = ""
    timeout = 60.0  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True

    _wire_bytes = 0

    def version_string(self) -> str:
        return self.server_version

    @property
    def _collector(self) -> Collector:
        return cast("_Server", self.server).collector

    # -- logging --------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access lines are logged by ``_finish`` with ALF details instead."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: %s", self.address_string(), format % args)

    # -- dispatch -------------------------------------------------------------------------

    def _request_path(self) -> str:
        path = self.path
        if path.startswith(("http://", "https://")):  # absolute-form, as sent to proxies
            path = urlsplit(path).path
        return path.split("?", 1)[0]

    def _dispatch(self) -> None:
        self._wire_bytes = 0
        path = self._request_path()
        head = self.command == "HEAD"
        try:
            if path == _HEALTH_PATH:
                if self.command in ("GET", "HEAD"):
                    self._discard_body()
                    self._send_json(200, {"status": "ok"}, head=head)
                else:
                    self._discard_body()
                    self._send_json(
                        405,
                        {"errors": [f"method {self.command} not allowed"], "sent": 0, "saved": 0},
                        allow="GET, HEAD",
                        head=head,
                    )
                return
            route = _ROUTES.get(path)
            if route is None:
                self._discard_body()
                self._finish(_Outcome(404, [f"no such endpoint: {path}"]), head=head)
            elif self.command != "POST":
                self._discard_body()
                self._finish(
                    _Outcome(405, [f"method {self.command} not allowed, use POST"]),
                    allow="POST",
                    head=head,
                )
            else:
                outcome, valid = self._receive(*route)
                self._finish(outcome, version=route[0], alfs=valid)
        except _HTTPError as exc:
            if exc.close:
                self.close_connection = True
            self._finish(
                _Outcome(exc.status, [exc.message], wire_bytes=self._wire_bytes), head=head
            )
        except OSError:
            raise  # the connection failed: nothing can be answered
        except Exception:
            logger.exception("collector failed on %s %s", self.command, path)
            self.close_connection = True
            body = {"errors": ["internal collector error"], "sent": 0, "saved": 0}
            self._send_json(500, body, head=head)

    do_GET = _dispatch
    do_HEAD = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch
    do_PATCH = _dispatch
    do_DELETE = _dispatch
    do_OPTIONS = _dispatch
    do_TRACE = _dispatch
    do_CONNECT = _dispatch

    def handle_expect_100(self) -> bool:
        # Refuse an announced oversized body before the client sends it.
        path = self._request_path()
        length = (self.headers.get("Content-Length") or "").strip()
        if (
            self.command == "POST"
            and path in _ROUTES
            and length.isdigit()
            and int(length) > self._collector.max_body_bytes
        ):
            self.close_connection = True
            self._finish(
                _Outcome(413, [self._too_large_message(int(length))], wire_bytes=int(length))
            )
            return False
        return super().handle_expect_100()

    # -- reading --------------------------------------------------------------------------

    def _too_large_message(self, size: int) -> str:
        limit = self._collector.max_body_bytes
        return f"request body of {size} bytes exceeds the limit of {limit} bytes"

    def _read_exact(self, size: int, *, keep: bool) -> bytes:
        parts: list[bytes] = []
        remaining = size
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                raise _HTTPError(400, "request body is shorter than announced", close=True)
            remaining -= len(chunk)
            if keep:
                parts.append(chunk)
        return b"".join(parts)

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _HTTPError(400, "malformed chunked body: bad chunk size line", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise _HTTPError(400, "malformed chunked body: bad chunk size", close=True)
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            self._wire_bytes = total
            if total > _DRAIN_LIMIT:
                raise _HTTPError(413, self._too_large_message(total), close=True)
            data = self._read_exact(size, keep=total <= limit)
            if total <= limit:
                parts.append(data)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _HTTPError(400, "malformed chunked body: missing CRLF", close=True)
        for _ in range(100):  # trailer fields, then the final empty line
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise _HTTPError(400, "malformed chunked body: truncated", close=True)
        else:
            raise _HTTPError(400, "malformed chunked body: too many trailers", close=True)
        if total > limit:
            raise _HTTPError(413, self._too_large_message(total))
        return b"".join(parts)

    def _read_body(self, limit: int) -> bytes:
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise _HTTPError(
                    501, f"unsupported Transfer-Encoding {transfer_encoding!r}", close=True
                )
            return self._read_chunked(limit)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise _HTTPError(400, "invalid Content-Length header", close=True)
        size = int(lengths[0])
        self._wire_bytes = size
        if size > limit:
            if size > _DRAIN_LIMIT:
                raise _HTTPError(413, self._too_large_message(size), close=True)
            self._read_exact(size, keep=False)
            raise _HTTPError(413, self._too_large_message(size))
        return self._read_exact(size, keep=True)

    def _discard_body(self) -> None:
        """Read and drop a body this request does not need, so the connection stays usable."""
        try:
            self._read_body(0)
        except _HTTPError as exc:
            if exc.close:
                self.close_connection = True

    # -- ALF handling ---------------------------------------------------------------------

    def _receive(self, version: str, kind: str) -> tuple[_Outcome, list[dict[str, Any]]]:
        collector = self._collector
        wire = self._read_body(collector.max_body_bytes)
        content_encoding = self.headers.get("Content-Encoding")
        body, decoded = _decode_content(wire, content_encoding, collector.max_decompressed_bytes)
        try:
            payload = _parse_json(body)
        except _HTTPError as exc:
            compression = None if decoded else _sniff_compression(body)
            if compression is None:
                raise
            raise _HTTPError(
                400,
                f"body is {compression}-compressed but the request has no Content-Encoding "
                "header (send Content-Encoding: gzip or deflate)",
            ) from exc
        if kind == "single":
            if not isinstance(payload, dict):
                raise _HTTPError(
                    400,
                    f"/{version}/single expects one ALF object, got a JSON {_json_type(payload)}",
                )
            alfs: list[Any] = [payload]
        else:
            if not isinstance(payload, list):
                raise _HTTPError(
                    400,
                    f"/{version}/batch expects a JSON array of ALF objects, "
                    f"got a JSON {_json_type(payload)}",
                )
            if not payload:
                raise _HTTPError(400, f"/{version}/batch expects at least one ALF object")
            alfs = payload
        errors: list[str] = []
        valid: list[dict[str, Any]] = []
        for index, alf in enumerate(alfs):
            problem = collector._check_alf(alf, version)
            if problem is None:
                valid.append(alf)
            else:
                errors.append(f"ALF[{index}] {problem}")
        outcome = _Outcome(
            200 if not errors else (207 if valid else 400),
            errors,
            sent=len(alfs),
            wire_bytes=len(wire),
            body_bytes=len(body),
        )
        if valid:
            outcome.saved = len(valid)
            outcome.tokens = tuple(
                sorted(
                    {
                        alf["serviceToken"]
                        for alf in valid
                        if isinstance(alf.get("serviceToken"), str)
                    }
                )
            )
        return outcome, valid

    # -- answering ------------------------------------------------------------------------

    def _finish(
        self,
        outcome: _Outcome,
        *,
        version: str = "",
        alfs: Sequence[dict[str, Any]] = (),
        allow: str | None = None,
        head: bool = False,
    ) -> None:
        collector = self._collector
        path = self._request_path()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            outcome.entry_count = collector._store(
                method=self.command,
                endpoint=path,
                content_encoding=self.headers.get("Content-Encoding"),
                outcome=outcome,
                headers=headers,
                version=version,
                alfs=alfs,
            )
        except CollectorError as exc:
            outcome = _Outcome(503, [str(exc)], sent=outcome.sent)
            self.close_connection = True
        if collector.log_requests:
            tokens = ",".join(_mask_token(t) for t in outcome.tokens) or "-"
            logger.info(
                "%s %s %s -> %d sent=%d saved=%d entries=%d token=%s%s",
                self.address_string(),
                self.command,
                path,
                outcome.status,
                outcome.sent,
                outcome.saved,
                outcome.entry_count,
                tokens,
                f" errors={outcome.errors}" if outcome.errors else "",
            )
        self._send_json(
            outcome.status,
            {"errors": outcome.errors, "sent": outcome.sent, "saved": outcome.saved},
            allow=allow,
            head=head,
        )

    def _send_json(
        self, status: int, payload: object, *, allow: str | None = None, head: bool = False
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow is not None:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, oversized headers) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send_json(
            code, {"errors": [text], "sent": 0, "saved": 0}, head=self.command == "HEAD"
        )


# --------------------------------------------------------------------------------------------
# The collector


class Collector:
    """An ALF collector listening on HTTP and storing what it receives in SQLite.

    ``db_path`` is a SQLite file (WAL mode, created if needed, reopened and appended to if it
    exists) or ``":memory:"``. ``port=0`` picks a free port; read the real one from
    :attr:`url`. Bodies larger than ``max_body_bytes`` on the wire, or larger than
    ``max_decompressed_bytes`` once decompressed, are refused with 413. With
    ``validate=False`` any ALF that has a ``har.log.entries`` array is stored, without schema
    or version checks (and without needing ``jsonschema``). ``log_requests=True`` logs one
    line per request on the ``alf_analytics.collector`` logger (tokens masked).

    Use it as a context manager (``with Collector() as c:``), or call :meth:`start` and
    :meth:`stop`; :meth:`serve_forever` blocks instead. A stopped collector cannot be
    restarted, and its query methods raise :class:`CollectorError` (the database is closed).
    """

    def __init__(
        self,
        db_path: str = ":memory:",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 1_000_000,
        validate: bool = True,
        log_requests: bool = False,
        max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    ) -> None:
        if max_body_bytes < 0 or max_decompressed_bytes < 0:
            raise ValueError("size limits must be >= 0")
        self.db_path = db_path
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.validate = validate
        self.log_requests = log_requests
        self._port = port
        if validate:
            _import_jsonschema()
            for version in SUPPORTED_VERSIONS:
                _validator_for(version)
        self._cond = threading.Condition(threading.RLock())
        self._db: sqlite3.Connection | None = _open_db(db_path)
        self._entry_count = self._scalar("SELECT COUNT(*) FROM entries")
        self._request_count = self._scalar("SELECT COUNT(*) FROM requests")
        self._state_lock = threading.Lock()
        self._state = "new"
        self._server: _Server | None = None
        self._loop_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._server is not None else f"{self.host}:{self._port}"
        return f"<Collector {where} db={self.db_path!r} {self._state}>"

    # -- lifecycle ------------------------------------------------------------------------

    def _bind(self) -> _Server:
        with self._state_lock:
            if self._state != "new":
                raise CollectorError(f"collector is already {self._state}")
            self._server = _Server((self.host, self._port), self)
            self._state = "running"
            return self._server

    def start(self) -> Collector:
        """Bind the socket and serve in a daemon thread; returns ``self``."""
        server = self._bind()
        self._loop_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="alf-collector",
            daemon=True,
        )
        self._loop_thread.start()
        logger.info("ALF collector listening on %s", self.url)
        return self

    def serve_forever(self, *, on_ready: Callable[[Collector], None] | None = None) -> None:
        """Serve in the calling thread until :meth:`stop`, Ctrl-C or SIGTERM, then stop.

        ``on_ready`` is called once the socket is listening (for example to print :attr:`url`).
        SIGTERM is handled like Ctrl-C while this runs in the main thread.
        """
        server = self._bind()
        self._loop_thread = threading.current_thread()
        in_main = self._loop_thread is threading.main_thread()
        previous: Any = None
        if in_main:
            previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            logger.info("ALF collector listening on %s", self.url)
            if on_ready is not None:
                on_ready(self)
            server.serve_forever(poll_interval=_POLL_INTERVAL)
        except KeyboardInterrupt:
            logger.info("ALF collector interrupted, stopping")
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            self.stop()

    def stop(self) -> None:
        """Stop serving, close open connections and the database. Safe to call repeatedly."""
        with self._state_lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        server = self._server
        if server is not None:
            loop = self._loop_thread
            if loop is not None and loop is not threading.current_thread() and loop.is_alive():
                # shutdown() waits for the serve loop's next poll; a connection wakes it now.
                stopper = threading.Thread(target=server.shutdown, name="alf-collector-stop")
                stopper.start()
                try:
                    socket.create_connection((server.server_name, server.server_port), 1.0).close()
                except OSError:
                    pass
                stopper.join()
            server.server_close()
            server.close_connections(timeout=5.0)
        with self._cond:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._cond.notify_all()

    def __enter__(self) -> Collector:
        if self._state == "new":
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._server is None:
            raise CollectorError("collector is not started")
        return self._server.server_port

    @property
    def url(self) -> str:
        """Base URL, such as ``http://127.0.0.1:54321`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def endpoint(self, version: str = "1.1.0", kind: str = "batch") -> str:
        """Full URL of an ALF endpoint, such as ``http://127.0.0.1:54321/1.1.0/batch``."""
        if f"/{version}/{kind}" not in _ROUTES:
            raise ValueError(f"no endpoint for version {version!r} and kind {kind!r}")
        return f"{self.url}/{version}/{kind}"

    # -- validation and storage (called from handler threads) -----------------------------

    def _check_alf(self, alf: object, version: str) -> str | None:
        if not isinstance(alf, dict):
            return f"expected an ALF object, got a JSON {_json_type(alf)} (at $)"
        if self.validate:
            sent_version = alf.get("version")
            if isinstance(sent_version, str) and sent_version != version:
                return (
                    f"version {sent_version!r} does not match the endpoint version "
                    f"{version!r} (at $.version)"
                )
            error = _import_jsonschema().exceptions.best_match(
                _validator_for(version).iter_errors(alf)
            )
            if error is not None:
                return _describe_validation_error(error)
        if _alf_entries(alf) is None:
            return "no har.log.entries array of objects (at $.har.log.entries)"
        return None

    def _scalar(self, sql: str, params: Iterable[object] = ()) -> int:
        db = self._require_db()
        return int(db.execute(sql, tuple(params)).fetchone()[0])

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise CollectorError("collector is stopped (its database is closed)")
        return self._db

    def _store(
        self,
        *,
        method: str,
        endpoint: str,
        content_encoding: str | None,
        outcome: _Outcome,
        headers: dict[str, str],
        version: str,
        alfs: Sequence[dict[str, Any]],
    ) -> int:
        received_at = _now().isoformat()
        alf_rows = []
        for alf in alfs:
            token = alf.get("serviceToken")
            entries = _alf_entries(alf) or []
            alf_rows.append(
                (
                    alf,
                    token if isinstance(token, str) else "",
                    _str_or_none(alf.get("environment")),
                    entries,
                )
            )
        entry_count = sum(len(row[3]) for row in alf_rows)
        with self._cond:
            db = self._require_db()
            with db:
                request_id = db.execute(
                    "INSERT INTO requests (received_at, method, endpoint, content_encoding, "
                    "status, alf_count, saved_count, entry_count, wire_bytes, body_bytes, "
                    "headers_json, errors_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        received_at,
                        method,
                        endpoint,
                        content_encoding,
                        outcome.status,
                        outcome.sent,
                        len(alfs),
                        entry_count,
                        outcome.wire_bytes,
                        outcome.body_bytes,
                        json.dumps(headers),
                        json.dumps(outcome.errors),
                    ),
                ).lastrowid
                for alf, token, environment, entries in alf_rows:
                    creator = _dict_or_empty(alf.get("har")).get("log", {})
                    creator = _dict_or_empty(creator).get("creator")
                    alf_id = db.execute(
                        "INSERT INTO alfs (request_id, received_at, alf_version, service_token, "
                        "environment, creator_json, entry_count, alf_json) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            request_id,
                            received_at,
                            version,
                            token,
                            environment,
                            json.dumps(creator) if creator is not None else None,
                            len(entries),
                            json.dumps(alf),
                        ),
                    ).lastrowid
                    db.executemany(
                        "INSERT INTO entries (alf_id, request_id, received_at, alf_version, "
                        "service_token, environment, method, url, path, status, time_ms, "
                        "request_body_size, response_body_size, client_ip_address, entry_json) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (alf_id, request_id, received_at, version, token, environment)
                            + _entry_columns(alf, entry)
                            for entry in entries
                        ],
                    )
            self._entry_count += entry_count
            self._request_count += 1
            self._cond.notify_all()
        return entry_count

    # -- queries --------------------------------------------------------------------------

    def entries(
        self,
        *,
        service_token: str | None = None,
        environment: str | None | EllipsisType = ...,
        alf_version: str | None = None,
    ) -> list[StoredEntry]:
        """Stored entries in arrival order, optionally filtered.

        ``service_token`` and ``alf_version`` filter when given. ``environment`` filters when
        given: a string matches that environment, ``None`` matches entries whose ALF had no
        ``environment``; the default ``...`` matches all.
        """
        where: list[str] = []
        params: list[object] = []
        if service_token is not None:
            where.append("e.service_token = ?")
            params.append(service_token)
        if environment is None:
            where.append("e.environment IS NULL")
        elif isinstance(environment, str):
            where.append("e.environment = ?")
            params.append(environment)
        if alf_version is not None:
            where.append("e.alf_version = ?")
            params.append(alf_version)
        sql = (
            "SELECT e.id, e.received_at, e.alf_version, e.service_token, e.environment, "
            "a.creator_json, e.method, e.url, e.path, e.status, e.time_ms, "
            "e.request_body_size, e.response_body_size, e.client_ip_address, e.entry_json "
            "FROM entries e JOIN alfs a ON a.id = e.alf_id"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.id"
        with self._cond:
            rows = self._require_db().execute(sql, params).fetchall()
        return [
            StoredEntry(
                id=row[0],
                received_at=datetime.fromisoformat(row[1]),
                alf_version=row[2],
                service_token=row[3],
                environment=row[4],
                creator=json.loads(row[5]) if row[5] is not None else None,
                method=row[6],
                url=row[7],
                path=row[8],
                status=row[9],
                time_ms=row[10],
                request_body_size=row[11],
                response_body_size=row[12],
                client_ip_address=row[13],
                entry=json.loads(row[14]),
            )
            for row in rows
        ]

    def alfs(self, *, alf_version: str | None = None) -> list[dict[str, Any]]:
        """Every saved ALF object as received, in arrival order (one per ALF, not per request)."""
        sql = "SELECT alf_json FROM alfs"
        params: tuple[str, ...] = ()
        if alf_version is not None:
            sql += " WHERE alf_version = ?"
            params = (alf_version,)
        with self._cond:
            rows = self._require_db().execute(sql + " ORDER BY id", params).fetchall()
        return [json.loads(row[0]) for row in rows]

    def requests(self) -> list[RequestRecord]:
        """Every HTTP request answered (except ``/health``) in arrival order, any status."""
        with self._cond:
            rows = (
                self._require_db()
                .execute(
                    "SELECT id, received_at, method, endpoint, content_encoding, status, "
                    "alf_count, saved_count, entry_count, wire_bytes, body_bytes, headers_json, "
                    "errors_json FROM requests ORDER BY id"
                )
                .fetchall()
            )
        return [
            RequestRecord(
                id=row[0],
                received_at=datetime.fromisoformat(row[1]),
                method=row[2],
                endpoint=row[3],
                content_encoding=row[4],
                status=row[5],
                alf_count=row[6],
                saved_count=row[7],
                entry_count=row[8],
                wire_bytes=row[9],
                body_bytes=row[10],
                headers=json.loads(row[11]),
                errors=tuple(json.loads(row[12])),
            )
            for row in rows
        ]

    def count(self) -> int:
        """Number of stored entries."""
        with self._cond:
            self._require_db()
            return self._entry_count

    def wait_for_entries(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` entries are stored; ``False`` on timeout or stop."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: self._db is None or self._entry_count >= n, timeout)
                and self._db is not None
            )

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests were answered; ``False`` on timeout or stop."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: self._db is None or self._request_count >= n, timeout)
                and self._db is not None
            )

    def clear(self) -> None:
        """Delete every stored entry, ALF and request record."""
        with self._cond:
            db = self._require_db()
            with db:
                for table in reversed(_TABLES):
                    db.execute(f"DELETE FROM {table}")
            self._entry_count = 0
            self._request_count = 0
            self._cond.notify_all()

    def summary(self) -> Summary:
        """Entries grouped by environment, method, path and status, with time percentiles."""
        with self._cond:
            return _summarize(self._require_db())


def _entry_columns(alf: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[object, ...]:
    request = _dict_or_empty(entry.get("request"))
    response = _dict_or_empty(entry.get("response"))
    url = _str_or_none(request.get("url"))
    client_ip = _str_or_none(entry.get("clientIPAddress")) or _str_or_none(
        alf.get("clientIPAddress")
    )
    return (
        _str_or_none(request.get("method")),
        url,
        _url_path(url),
        _int_or_none(response.get("status")),
        _float_or_none(entry.get("time")),
        _int_or_none(request.get("bodySize")),
        _int_or_none(response.get("bodySize")),
        client_ip,
        json.dumps(entry),
    )
