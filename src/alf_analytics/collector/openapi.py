"""The OpenAPI 3.1 document of the collector's HTTP API (served at ``/openapi.json``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["openapi_document"]


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_FILTERS = [
    _param("service", "Service token id, name, or the token itself (alias: service_token)."),
    _param("environment", "Exact environment."),
    _param("since", "Start of the range (inclusive): epoch seconds or ISO 8601."),
    _param("until", "End of the range (exclusive): epoch seconds or ISO 8601."),
    _param(
        "status",
        "A status code, 0 to 999 in 1 to 3 digits (404; 0 is an agent's 'no response'), or a "
        "class, 0xx to 9xx (5xx; 0xx is 0 to 99).",
        {"type": "string", "pattern": "^(?:[0-9]{1,3}|[0-9][xX]{2})$"},
    ),
    _param("method", "HTTP method."),
    _param("path", "Request path prefix."),
    _param("route", "Route template, such as /items/{id}."),
    _param("consumer", "Consumer id (the x-alf-consumer header of the entry)."),
]
_LIMIT = _param("limit", "Rows per answer.", {"type": "integer", "minimum": 1})
_ERRORS = {
    "type": "object",
    "properties": {"errors": {"type": "array", "items": {"type": "string"}}},
}
_PERCENTILES = {name: {"type": ["number", "null"]} for name in ("p50", "p95", "p99")}
_ENTRY_ROW = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "started": {"type": "string", "format": "date-time"},
        "method": {"type": "string"},
        "host": {"type": "string"},
        "path": {"type": "string"},
        "route": {"type": "string"},
        "status": {"type": "integer"},
        "time_ms": {"type": "number"},
        "request_bytes": {"type": "integer"},
        "response_bytes": {"type": "integer"},
        "consumer": {"type": ["string", "null"]},
        "client_ip": {"type": ["string", "null"]},
        "service": {"type": "string"},
        "service_token_id": {"type": "string"},
        "environment": {"type": ["string", "null"]},
    },
}
_BODY = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["json", "text", "binary", "none"]},
        "text": {"type": "string"},
        "size": {"type": "integer"},
        "mime_type": {"type": "string"},
    },
}
_ANSWER = {
    "type": "object",
    "properties": {
        "errors": {"type": "array", "items": {"type": "string"}},
        "sent": {"type": "integer", "description": "ALF objects received"},
        "saved": {"type": "integer", "description": "ALF objects with at least one entry stored"},
        "refused": {"type": "integer", "description": "entries not stored"},
    },
}


_UNAVAILABLE = {
    "description": "The store cannot be read right now (a PostgreSQL that went away): retry "
    "after Retry-After seconds",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": _ERRORS}},
}


def _get(
    summary: str, schema: dict[str, Any], params: list[dict[str, Any]], *, one: bool = False
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
        "400": {
            "description": "A bad parameter",
            "content": {"application/json": {"schema": _ERRORS}},
        },
        "401": {"description": "No or a wrong read key"},
        "403": {"description": "A service token was sent as the read key"},
    }
    if one:
        responses["404"] = {
            "description": "No such entry",
            "content": {"application/json": {"schema": _ERRORS}},
        }
    responses["503"] = _UNAVAILABLE
    return {
        "get": {
            "summary": summary,
            "security": [{"readKey": []}],
            "parameters": params,
            "responses": responses,
        }
    }


def _ingest(kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"$ref": "#/components/schemas/ALF"}
    if kind == "batch":
        body = {"type": "array", "items": body}
    responses: dict[str, str] = {
        "200": "every entry stored",
        "207": "some entries or ALF objects refused (named in errors)",
        "400": "malformed body or nothing valid in it",
        "401": "every ALF object has a service token this collector does not accept",
        "408": "the body did not arrive in time",
        "413": "over a size or count limit: --max-body-bytes, --max-decompressed-bytes, or "
        "--max-entries (entries, ALF objects, and 100 commas and colons per entry allowed)",
        "415": "unsupported Content-Encoding",
        "422": "Idempotency-Key reused with a different body",
        "503": "storage unavailable (JSON, with Retry-After), or --limit-concurrency reached "
        "(plain text, connection closed): retry",
    }
    not_allowed = {
        "summary": "Not allowed: the ALF endpoints take POST",
        "responses": {
            "405": {
                "description": "A method other than POST (Allow: POST)",
                "headers": {"Allow": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": _ANSWER}},
            }
        },
    }
    others = ("get", "head", "put", "patch", "delete", "options")
    return {
        **{method: not_allowed for method in others},
        "post": {
            "summary": f"Receive ALF ({kind})",
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "A repeat within the window is answered like the first "
                    "and stores nothing.",
                },
                {
                    "name": "Content-Encoding",
                    "in": "header",
                    "required": False,
                    "schema": {"enum": ["gzip", "deflate", "identity"]},
                },
            ],
            "requestBody": {"content": {"application/json": {"schema": body}}},
            "responses": {
                code: {"description": text, "content": {"application/json": {"schema": _ANSWER}}}
                for code, text in responses.items()
            },
        },
    }


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    from .._version import __version__

    paths: dict[str, Any] = {}
    for version in ("1.0.0", "1.1.0"):
        for kind in ("single", "batch"):
            paths[f"/{version}/{kind}"] = _ingest(kind)
    health = {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "errors": {"type": "array", "items": {"type": "string"}},
        },
    }
    health_responses = {
        "200": {
            "description": "The store answers a query",
            "content": {"application/json": {"schema": health}},
        },
        "503": {
            **_UNAVAILABLE,
            "description": "The store does not answer (retry after Retry-After seconds)",
            "content": {"application/json": {"schema": health}},
        },
    }
    not_allowed = {
        "description": "A method other than GET or HEAD",
        "content": {"application/json": {"schema": _ERRORS}},
    }
    paths["/health"] = {
        method: {"summary": "Readiness: whether the store answers", "responses": health_responses}
        for method in ("get", "head")
    }
    for method in ("post", "put", "delete"):
        paths["/health"][method] = {"summary": "Not allowed", "responses": {"405": not_allowed}}
    paths["/api/services"] = _get(
        "Each (service, environment) seen",
        {"type": "object", "properties": {"services": {"type": "array"}}},
        _FILTERS[:4],
    )
    paths["/api/stats"] = _get(
        "Totals, error rate, latency percentiles, status breakdown and a time series",
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "errors": {"type": "integer"},
                "error_rate": {"type": "number"},
                **_PERCENTILES,
                "bytes_in": {"type": "integer"},
                "bytes_out": {"type": "integer"},
                "status_classes": {"type": "object"},
                "status_codes": {"type": "object"},
                "series": {"type": "array"},
            },
        },
        [
            *_FILTERS,
            _param("interval", "Series interval in seconds (multiple of 60).", {"type": "integer"}),
        ],
    )
    paths["/api/endpoints"] = _get(
        "Per method and route template",
        {"type": "object", "properties": {"endpoints": {"type": "array"}}},
        [*_FILTERS, _LIMIT, _param("sort", "count, errors, error_rate, p50, p95 or p99")],
    )
    paths["/api/consumers"] = _get(
        "Per consumer",
        {"type": "object", "properties": {"consumers": {"type": "array"}}},
        [*_FILTERS, _LIMIT],
    )
    paths["/api/entries"] = _get(
        "Entries, newest (or slowest) first, paginated by cursor",
        {
            "type": "object",
            "properties": {
                "entries": {"type": "array", "items": _ENTRY_ROW},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        [
            *_FILTERS,
            _LIMIT,
            _param("cursor", "next_cursor of the previous page"),
            _param("sort", "newest or slowest"),
        ],
    )
    entry_id = {"name": "entry_id", "in": "path", "required": True, "schema": {"type": "integer"}}
    paths["/api/entries/{entry_id}"] = _get(
        "One entry in full, with decoded bodies",
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "service": {"type": "string"},
                "environment": {"type": ["string", "null"]},
                "received": {"type": "string", "format": "date-time"},
                "entry": {"type": "object"},
                "bodies": {"type": "object", "properties": {"request": _BODY, "response": _BODY}},
            },
        },
        [entry_id],
        one=True,
    )
    paths["/api/entries/{entry_id}.har"] = _get(
        "One entry as HAR 1.2", {"type": "object"}, [entry_id], one=True
    )
    paths["/api/export.har"] = _get(
        "The filtered entries as HAR 1.2", {"type": "object"}, [*_FILTERS, _LIMIT]
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "alf-analytics collector", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"readKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {"ALF": {"type": "object", "description": "An ALF 1.0.0 or 1.1.0 object"}},
        },
    }
