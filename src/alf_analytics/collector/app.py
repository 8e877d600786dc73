"""The collector's ASGI application: :func:`create_app`.

Routes: the ALF protocol (``POST /1.0.0|1.1.0/single|batch``), ``GET /health``, the read
API under ``/api`` (:mod:`.routes`), ``/openapi.json``, and the dashboard (``/``) when its
module is installed. Run it with any ASGI server::

    uvicorn --factory 'alf_analytics.collector:create_app' --limit-concurrency 100

(the factory then reads its settings from ``ALF_COLLECTOR_*`` variables), or build it
in Python with explicit arguments. ``alf-analytics collector`` does the latter under uvicorn.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from . import routes
from .auth import ReadAccess
from .ingest import IngestError, Prepared, decode_body, prepare
from .settings import (
    SUPPORTED_VERSIONS,
    AccessLogMask,
    CollectorError,
    Limits,
    TokenSet,
    check_read_key,
    parse_duration,
)
from .storage import (
    STORAGE_RETRY_AFTER,
    SaveRequest,
    SaveResult,
    Store,
    hash_key,
    is_storage_failure,
    open_store,
)

__all__ = ["RequestRecord", "create_app"]

logger = logging.getLogger("alf_analytics.collector")

_MAX_KEY_LENGTH: Final = 255


@dataclass(frozen=True)
class RequestRecord:
    """One answered request to an ALF endpoint, as given to ``create_app(observer=...)``.

    Nothing of it is stored: it exists for tests and for metrics. ``alf_count`` is the
    answer's ``sent``, ``saved_count`` its ``saved``, ``entry_count`` the entries stored,
    ``wire_bytes`` the body as sent and ``body_bytes`` decompressed (0 when refused before).
    ``headers`` has lowercased names (repeated headers joined with ``", "``).
    """

    received_at: float
    method: str
    endpoint: str
    content_encoding: str | None
    status: int
    alf_count: int
    saved_count: int
    entry_count: int
    wire_bytes: int
    body_bytes: int
    headers: dict[str, str] = field(repr=False)
    errors: tuple[str, ...]
    replayed: bool = False


@dataclass
class _Outcome:
    status: int
    body: dict[str, Any]
    entry_count: int = 0
    body_bytes: int = 0
    replayed: bool = False


def _answer(
    status: int, errors: Sequence[str], sent: int = 0, saved: int = 0, refused: int = 0
) -> _Outcome:
    return _Outcome(
        status, {"errors": list(errors), "sent": sent, "saved": saved, "refused": refused}
    )


class _Ingest:
    """The ALF endpoints: read the body (bounded), then decode, validate and store it."""

    def __init__(
        self,
        store: Store,
        tokens: TokenSet,
        limits: Limits,
        concurrency: int,
        observer: Callable[[RequestRecord], None] | None,
        idempotency_window: float = 86_400.0,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.limits = limits
        self.idempotency_window = idempotency_window
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.observer = observer

    async def __call__(self, request: Request) -> Response:
        version, kind = request.scope["route_version"], request.scope["route_kind"]
        wire = b""
        if request.method != "POST":
            outcome = _answer(405, [f"method {request.method[:20]} not allowed, use POST"])
            response = self._respond(outcome, allow="POST")
        else:
            try:
                wire = await self._read_body(request)
                outcome = await anyio.to_thread.run_sync(
                    self._process, wire, version, kind, request, limiter=self.limiter
                )
            except IngestError as exc:
                outcome = _answer(exc.status, [exc.message])
            except ClientDisconnect:
                return Response(status_code=400)
            response = self._respond(outcome)
        if self.observer is not None:
            self._observe(request, outcome, len(wire))
        return response

    def _respond(self, outcome: _Outcome, allow: str | None = None) -> Response:
        headers = {}
        if allow:
            headers["allow"] = allow
        if outcome.status == 503:
            headers["retry-after"] = STORAGE_RETRY_AFTER
        if outcome.replayed:
            headers["idempotent-replayed"] = "true"
        return Response(
            orjson.dumps(outcome.body),
            status_code=outcome.status,
            media_type="application/json",
            headers=headers,
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise IngestError(400, "invalid Content-Length header")
            if int(length) > limit:
                raise IngestError(
                    413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes"
                )
        parts: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise IngestError(413, f"request body exceeds the limit of {limit} bytes")
                    parts.append(chunk)
        except TimeoutError:
            raise IngestError(
                408, f"the body did not arrive within {self.limits.body_timeout:g} s"
            ) from None
        return b"".join(parts)

    def _process(self, wire: bytes, version: str, kind: str, request: Request) -> _Outcome:
        key = request.headers.get("idempotency-key")
        key_hash = digest = since = None
        if key is not None:
            if not 0 < len(key) <= _MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
                raise IngestError(
                    400,
                    f"Idempotency-Key must be 1 to {_MAX_KEY_LENGTH} printable ASCII characters",
                )
        body = decode_body(
            wire, request.headers.get("content-encoding"), self.limits.max_decompressed_bytes
        )
        if key is not None:
            key_hash = hash_key(key)
            # The body decoded: the same ALF sent plain, gzip or deflate (any mtime) is the
            # same body.
            digest = hashlib.sha256(body).hexdigest()
            # Remembered for the window, not until the housekeeping forgets it.
            since = int((time.time() - self.idempotency_window) * 1_000_000)
            try:
                seen = self.store.find_answer(key_hash, since=since)
            except Exception as exc:
                return self._storage_failed(exc)
            if seen is not None:
                return self._replay(seen, digest, wire)
        prepared = prepare(body, version=version, kind=kind, tokens=self.tokens, limits=self.limits)
        outcome = self._outcome(prepared)
        outcome.body_bytes = len(body)
        if not prepared.entry_count:
            return outcome
        save = SaveRequest(
            groups=prepared.groups,
            received=int(time.time() * 1_000_000),
            status=outcome.status,
            answer=orjson.dumps(outcome.body).decode(),
            key_hash=key_hash,
            digest=digest,
            remembered_since=since,
        )
        try:
            result = self.store.save(save)
        except Exception as exc:
            return self._storage_failed(exc)
        if result.replayed:
            return self._replay(result, digest)
        outcome.entry_count = prepared.entry_count
        return outcome

    @staticmethod
    def _outcome(prepared: Prepared) -> _Outcome:
        saved_entries = prepared.entry_count
        if saved_entries and not prepared.error_count:
            status = 200
        elif saved_entries:
            status = 207
        elif prepared.unauthorized == prepared.sent:
            status = 401
        else:
            status = 400
        return _answer(
            status, prepared.errors, prepared.sent, prepared.saved, prepared.refused_entries
        )

    @staticmethod
    def _replay(seen: SaveResult, digest: str | None, wire: bytes | None = None) -> _Outcome:
        # Collectors before stored the digest of the bytes as sent, which still proves the
        # same body for a key they remembered: hashed only when the decoded one differs.
        if seen.digest != digest and (
            wire is None or seen.digest != hashlib.sha256(wire).hexdigest()
        ):
            return _answer(
                422, ["this Idempotency-Key was already used for a different request body"]
            )
        outcome = _Outcome(seen.status, orjson.loads(seen.answer), replayed=True)
        return outcome

    def _storage_failed(self, exc: Exception) -> _Outcome:
        if is_storage_failure(exc):
            logger.error("storing failed (answered 503): %s", exc)
            return _answer(503, ["the collector cannot store right now; retry later"])
        raise exc

    def _observe(self, request: Request, outcome: _Outcome, wire_bytes: int) -> None:
        assert self.observer is not None
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = outcome.body
        self.observer(
            RequestRecord(
                received_at=time.time(),
                method=request.method,
                endpoint=request.url.path,
                content_encoding=request.headers.get("content-encoding"),
                status=outcome.status,
                alf_count=int(body.get("sent", 0)),
                saved_count=int(body.get("saved", 0)),
                entry_count=outcome.entry_count,
                wire_bytes=wire_bytes,
                body_bytes=outcome.body_bytes,
                headers=headers,
                errors=tuple(body.get("errors", ())),
                replayed=outcome.replayed,
            )
        )


_GC_THRESHOLD: Final = 50_000


@contextlib.contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """Fewer cyclic garbage collections while serving (a measured ~10% of ingest's CPU).

    A batch parses into thousands of dicts and lists, freed by reference counting (they
    hold no cycles); with the default threshold (700 allocations) each batch set off
    several collections, now and then a full one over everything the process holds. The
    threshold in force before is restored when the app stops.
    """
    before = gc.get_threshold()
    if before[0] < _GC_THRESHOLD:
        gc.set_threshold(_GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        if gc.get_threshold()[0] == _GC_THRESHOLD:
            gc.set_threshold(*before)


class _AnyMethod:
    """An endpoint as a plain ASGI app, so that its route takes every method (Starlette's
    routes of functions list theirs, and answer any other, ``PROPFIND`` or ``TRACE``, with
    their own 405: no ingest counts, and an ``Allow`` naming methods that are 405s too)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]], **scope: str) -> None:
        self.handler = handler
        self.scope = scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.update(self.scope)
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


def _alf_routes(ingest: _Ingest) -> list[BaseRoute]:
    return [
        Route(f"/{version}/{kind}", _AnyMethod(ingest, route_version=version, route_kind=kind))
        for version in SUPPORTED_VERSIONS
        for kind in ("single", "batch")
    ]


async def _health(request: Request) -> Response:
    """``ok`` when the store answers a query: a probe must see a database that is down."""
    if request.method not in ("GET", "HEAD"):
        return JSONResponse({"errors": ["method not allowed"]}, 405, headers={"allow": "GET, HEAD"})
    store: Store = request.app.state.store
    try:
        await anyio.to_thread.run_sync(store.scalar, "SELECT 1")
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        logger.error("health check: the store does not answer (answered 503): %s", exc)
        return JSONResponse(
            {"status": "unavailable", "errors": ["the collector cannot reach its store"]},
            503,
            headers={"retry-after": STORAGE_RETRY_AFTER},
        )
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if exc.status_code != 404 else f"no such endpoint: {request.url.path[:200]}"
    return JSONResponse(
        {"errors": [str(detail)[:300]]}, exc.status_code, headers=dict(exc.headers or {})
    )


@dataclass
class _Housekeeping:
    store: Store
    retention: float | None
    idempotency_window: float
    interval: float

    def run_once(self) -> int:
        """One pass: expired entries and rollups, then forgotten idempotency keys."""
        now = time.time()
        deleted = 0
        if self.retention is not None:
            before = int((now - self.retention) * 1_000_000)
            while True:
                count = self.store.purge(before)
                deleted += count
                if not count:
                    break
        before = int((now - self.idempotency_window) * 1_000_000)
        while self.store.forget_keys(before):
            pass
        # Past hours of per-minute rollups summed into hourly rows (what long ranges read).
        self.store.compact()
        return deleted

    async def loop(self) -> None:
        while True:
            try:
                deleted = await anyio.to_thread.run_sync(self.run_once)
                if deleted:
                    logger.info("retention: deleted %d expired rows", deleted)
            except Exception:
                logger.exception("retention pass failed (retried at the next interval)")
            await anyio.sleep(self.interval)


def _duration(value: float | str | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise CollectorError(f"{name}: {exc}") from None
    if not value > 0:
        raise CollectorError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


def create_app(
    db: str | Store | None = None,
    *,
    tokens: Iterable[str] | TokenSet | None = None,
    read_key: str | None = None,
    limits: Limits | None = None,
    retention: float | str | None = None,
    idempotency_window: float | str = "24h",
    housekeeping_interval: float = 60.0,
    ingest_concurrency: int = 2,
    observer: Callable[[RequestRecord], None] | None = None,
    dashboard: bool = True,
) -> Starlette:
    """The collector as an ASGI application.

    ``db`` is an SQLite path (``alf.sqlite``, ``:memory:``), a ``postgresql://`` URL or an
    open :class:`~.storage.Store`; ``None`` reads ``ALF_COLLECTOR_DB`` (default
    ``alf.sqlite``). ``tokens`` are the accepted service tokens (``TOKEN`` or
    ``NAME=TOKEN``; ``None`` reads ``ALF_COLLECTOR_TOKENS``; empty accepts any token).
    ``read_key`` guards ``/api`` and the dashboard (``None`` reads
    ``ALF_COLLECTOR_READ_KEY``; unset leaves reading open; one that equals an accepted
    service token is a :class:`~.settings.SettingsError`, a ``ValueError``). ``retention``
    (seconds or ``"30d"``) deletes older entries in the background; idempotency keys are
    remembered for ``idempotency_window``. At most ``ingest_concurrency`` requests are
    decoded and stored at once (the rest wait, their bodies already read within ``limits``).
    ``observer`` is called with a :class:`RequestRecord` after each ALF request.

    This factory does not check where the app will listen: ``alf-analytics collector``
    refuses a non-loopback address without tokens and read key; behind your own server,
    configure both.
    """
    env = os.environ
    if tokens is None:
        token_set = TokenSet.from_sources(environ=env)
    elif isinstance(tokens, TokenSet):
        token_set = tokens
    else:
        token_set = TokenSet.parse(tokens)
    if read_key is None:
        read_key = env.get("ALF_COLLECTOR_READ_KEY") or None
    check_read_key(read_key, token_set)  # before a store is opened: nothing to close
    if retention is None and env.get("ALF_COLLECTOR_RETENTION"):
        retention = env["ALF_COLLECTOR_RETENTION"]
    limits = limits or Limits()
    if isinstance(db, Store):
        store = db
        owns_store = False
    else:
        # An empty variable is an unset one, as for the others (SQLite's "" is a
        # throw-away database: everything stored would be lost at the next restart).
        store = open_store(db or env.get("ALF_COLLECTOR_DB") or "alf.sqlite", tokens=token_set)
        owns_store = True
    if store.tokens is not token_set:
        store.tokens = token_set
    window = _duration(idempotency_window, "idempotency_window") or 86_400.0
    housekeeping = _Housekeeping(
        store, _duration(retention, "retention"), window, housekeeping_interval
    )
    ingest = _Ingest(store, token_set, limits, ingest_concurrency, observer, window)
    access_mask = AccessLogMask(token_set, read_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The server has configured its logging by now: the mask goes on the access logger.
        access_log = logging.getLogger("uvicorn.access")
        access_log.addFilter(access_mask)
        try:
            with _fewer_gc_passes():
                async with anyio.create_task_group() as group:
                    group.start_soon(housekeeping.loop)
                    try:
                        yield
                    finally:
                        group.cancel_scope.cancel()
        finally:
            access_log.removeFilter(access_mask)
        if owns_store:
            store.close()

    app_routes: list[BaseRoute] = [
        *_alf_routes(ingest),
        Route("/health", _AnyMethod(_health)),
        *routes.api_routes(),
    ]
    if dashboard:
        try:
            from . import dashboard as dashboard_module
        except ImportError:
            dashboard_module = None  # type: ignore[assignment]
        if dashboard_module is not None:
            app_routes.extend(dashboard_module.dashboard_routes())
    app = Starlette(
        routes=app_routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    # No redirect from "/1.1.0/single/" to "/1.1.0/single": an agent must be told its
    # endpoint is wrong (404), not be sent a 307 it may not follow with the body.
    app.router.redirect_slashes = False
    app.state.store = store
    app.state.tokens = token_set
    app.state.limits = limits
    app.state.read_access = ReadAccess(read_key, token_set)
    app.state.housekeeping = housekeeping
    return app
