"""The read API: ``/api/...`` JSON endpoints over :mod:`.queries`, and ``/openapi.json``.

Every ``/api`` endpoint needs the read key (:mod:`.auth`) when one is configured, answers
400 with ``{"errors": [...]}`` for a bad parameter and never shows a service token in full.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import queries
from .auth import read_refusal
from .openapi import openapi_document
from .storage import STORAGE_RETRY_AFTER, Store, is_storage_failure
from .storage.base import INT64_MAX

__all__ = ["api_routes"]

logger = logging.getLogger("alf_analytics.collector")

Handler = Callable[[Request], Awaitable[Response]]


class EntryIdConvertor(Convertor[int]):
    """An entry id in a path (``{entry_id:entry_id}``): digits, as Starlette's ``int``, but
    one too long for any row reads as an id no row has (a 404), never as ``int()``'s
    ``ValueError`` past 4,300 digits (a 500)."""

    regex = "[0-9]+"

    def convert(self, value: str) -> int:
        return int(value) if len(value) <= 19 else INT64_MAX + 1

    def to_string(self, value: int) -> str:
        return str(int(value))


ENTRY_ID: Final = "entry_id"
"""The convertor's name, registered with Starlette on import."""
register_url_convertor(ENTRY_ID, EntryIdConvertor())


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data), status_code=status, media_type="application/json", headers=headers
    )


def _error(status: int, message: str) -> Response:
    headers = {"www-authenticate": 'Bearer realm="alf-analytics"'} if status == 401 else None
    return _json({"errors": [message]}, status, headers)


def _guarded(query: Callable[[Request, Store], Any], *, download: str | None = None) -> Handler:
    async def endpoint(request: Request) -> Response:
        refusal = read_refusal(request)
        if refusal is not None:
            return _error(*refusal)
        store: Store = request.app.state.store
        try:
            data = await run_in_threadpool(query, request, store)
        except queries.FilterError as exc:
            return _error(400, str(exc))
        except Exception as exc:
            if not is_storage_failure(exc):
                raise
            logger.error("reading failed (answered 503): %s", exc)
            return _json(
                {"errors": ["the collector cannot read its store right now; retry later"]},
                503,
                {"retry-after": STORAGE_RETRY_AFTER},
            )
        if data is None:
            return _error(404, "no such entry")
        headers = {"cache-control": "no-store"}
        if download is not None:
            name = download.format(**request.path_params)
            headers["content-disposition"] = f'attachment; filename="{name}"'
        return _json(data, headers=headers)

    return endpoint


def _filters(request: Request) -> queries.Filters:
    return queries.Filters.from_query(request.query_params)


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    return queries.parse_limit(request.query_params.get(name), default, maximum)


def _services(request: Request, store: Store) -> Any:
    return queries.services(store, _filters(request))


def _stats(request: Request, store: Store) -> Any:
    interval = queries.whole_number(request.query_params.get("interval") or "60", 60, 86_400 * 31)
    if interval is None:
        raise queries.FilterError("interval must be whole seconds from 60 to 2678400")
    return queries.stats(store, _filters(request), interval)


def _endpoints(request: Request, store: Store) -> Any:
    sort = request.query_params.get("sort") or "count"
    limit = _int_param(request, "limit", 100, queries.MAX_LIMIT)
    return queries.endpoints(store, _filters(request), sort, limit)


def _consumers(request: Request, store: Store) -> Any:
    return queries.consumers(
        store, _filters(request), _int_param(request, "limit", 100, queries.MAX_LIMIT)
    )


def _entries(request: Request, store: Store) -> Any:
    return queries.entries(
        store,
        _filters(request),
        limit=_int_param(request, "limit", 50, queries.MAX_LIMIT),
        cursor=request.query_params.get("cursor") or None,
        sort=request.query_params.get("sort") or "newest",
    )


def _entry(request: Request, store: Store) -> Any:
    return queries.entry_detail(store, int(request.path_params["entry_id"]))


def _entry_har(request: Request, store: Store) -> Any:
    return queries.entry_har(store, int(request.path_params["entry_id"]))


def _export(request: Request, store: Store) -> Any:
    limit = _int_param(request, "limit", 1_000, queries.MAX_EXPORT)
    return queries.har_export(store, _filters(request), limit)


async def _openapi(request: Request) -> Response:
    return _json(openapi_document())


def api_routes() -> list[BaseRoute]:
    """The ``/api`` routes and ``/openapi.json``."""
    return [
        Route("/api/services", _guarded(_services)),
        Route("/api/stats", _guarded(_stats)),
        Route("/api/endpoints", _guarded(_endpoints)),
        Route("/api/consumers", _guarded(_consumers)),
        Route("/api/entries", _guarded(_entries)),
        Route(
            "/api/entries/{entry_id:entry_id}.har",
            _guarded(_entry_har, download="entry-{entry_id}.har"),
        ),
        Route("/api/entries/{entry_id:entry_id}", _guarded(_entry)),
        Route("/api/export.har", _guarded(_export, download="alf-export.har")),
        Route("/openapi.json", _openapi),
    ]
