"""A small Starlette JSON API, recorded by alf-analytics (FastAPI is set up the same way).

Run it (with a collector listening, see README.md)::

    export ALF_SERVICE_TOKEN=demo-token ALF_COLLECTOR_URL=http://127.0.0.1:8700
    uvicorn --app-dir examples/starlette_app app:app

Endpoints: JSON CRUD under ``/api/items``, ``/api/search`` (query string), ``/api/upload``
(raw binary body, read as a stream), ``/api/boom`` (raises: 500), ``/api/stream`` (an async
generator response), ``/api/events`` (server-sent events) and ``/health``; anything else is a
404. A request with an ``X-Api-Key`` of ``API_KEYS`` is recorded with that key's account as its
consumer.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alf_analytics import AnalyticsASGIMiddleware

#: The example's API keys and the account each belongs to (``make demo`` sends these).
API_KEYS = {
    "demo-key-acme-1f3a": "acme",
    "demo-key-globex-7c2d": "globex",
    "demo-key-initech-90be": "initech",
    "demo-key-umbrella-44d1": "umbrella",
    "demo-key-hooli-b6e8": "hooli",
}


def consumer_of(request: Request) -> str | None:
    """The account behind the request's ``X-Api-Key``: the consumer its entry records.

    The account name, never the key: the key is a secret (and ``X-Api-Key`` is redacted from
    every entry by default). Anonymous calls and unknown keys record no consumer.
    """
    return API_KEYS.get(request.headers.get("x-api-key", ""))


# An in-memory store (one per server process). Handlers run on one event loop: no lock needed.
_items: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "widget", "price": 9.5, "tags": ["red"]},
    2: {"id": 2, "name": "gadget", "price": 24.0, "tags": ["blue", "new"]},
    3: {"id": 3, "name": "doohickey", "price": 3.25, "tags": []},
}
_ids = itertools.count(4)


def _int_param(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name, default))
    except ValueError:
        return default


async def _item_from(request: Request, item_id: int) -> dict[str, Any]:
    try:
        payload = await request.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise HTTPException(400, 'expected a JSON object with a "name" string')
    price = payload.get("price", 0)
    if not isinstance(price, (int, float)) or isinstance(price, bool):
        raise HTTPException(400, '"price" must be a number')
    return {"id": item_id, "name": payload["name"], "price": price, "tags": payload.get("tags", [])}


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def items(request: Request) -> Response:
    if request.method == "POST":
        item = await _item_from(request, next(_ids))
        _items[item["id"]] = item
        return JSONResponse(item, status_code=201)
    limit = _int_param(request, "limit", 10)
    offset = _int_param(request, "offset", 0)
    ordered = sorted(_items.values(), key=lambda item: item["id"])
    return JSONResponse({"items": ordered[offset : offset + limit], "total": len(ordered)})


async def item(request: Request) -> Response:
    item_id: int = request.path_params["item_id"]
    if request.method == "PUT":
        new = await _item_from(request, item_id)
        created = item_id not in _items
        _items[item_id] = new
        return JSONResponse(new, status_code=201 if created else 200)
    if request.method == "DELETE":
        if _items.pop(item_id, None) is None:
            raise HTTPException(404, f"no item {item_id}")
        return Response(status_code=204)
    found = _items.get(item_id)
    if found is None:
        raise HTTPException(404, f"no item {item_id}")
    return JSONResponse(found)


async def search(request: Request) -> Response:
    query = request.query_params.get("q", "").lower()
    tags = request.query_params.getlist("tag")
    results = [
        item
        for item in _items.values()
        if query in item["name"] and all(tag in item["tags"] for tag in tags)
    ]
    page = _int_param(request, "page", 1)
    return JSONResponse({"query": query, "tags": tags, "page": page, "results": results})


async def upload(request: Request) -> Response:
    # Read the body as it arrives (one ASGI message at a time) instead of buffering it.
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"filename": None, "bytes": size, "sha256": digest.hexdigest()}, 201)


async def boom(request: Request) -> Response:
    raise RuntimeError("boom: an unhandled error, Starlette answers 500")


async def stream(request: Request) -> Response:
    chunks = _int_param(request, "chunks", 5)

    async def generate() -> AsyncIterator[str]:
        for number in range(chunks):
            yield f"line {number}: {'x' * 64}\n"

    return StreamingResponse(generate(), media_type="text/plain")


async def events(request: Request) -> Response:
    count = _int_param(request, "count", 3)

    async def generate() -> AsyncIterator[str]:
        for number in range(count):
            yield f"id: {number}\nevent: tick\ndata: {json.dumps({'n': number})}\n\n"
            await asyncio.sleep(0.005)

    return StreamingResponse(
        generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/api/items", items, methods=["GET", "POST"]),
        Route("/api/items/{item_id:int}", item, methods=["GET", "PUT", "DELETE"]),
        Route("/api/search", search),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/boom", boom),
        Route("/api/stream", stream),
        Route("/api/events", events),
    ],
    exception_handlers={HTTPException: http_error},
)
# The short form: service token, environment and collector URL come from ALF_SERVICE_TOKEN,
# ALF_ENVIRONMENT and ALF_COLLECTOR_URL. On lifespan shutdown the middleware flushes its queue.
# ``identify`` runs after the response and gets a starlette.requests.Request.
app.add_middleware(AnalyticsASGIMiddleware, log_body=True, identify=consumer_of)
