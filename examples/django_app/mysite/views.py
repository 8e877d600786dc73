"""The example API: a sync JSON CRUD, an async view, streaming views and a file upload.

The same views serve under WSGI (gunicorn) and ASGI (uvicorn); Django adapts sync and async
views to either. Streaming responses use a sync iterator under WSGI and an async one under
ASGI, so that neither server has to buffer them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

# An in-memory store: each server process (each gunicorn worker) has its own.
_items: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "widget", "price": 9.5, "tags": ["red"]},
    2: {"id": 2, "name": "gadget", "price": 24.0, "tags": ["blue", "new"]},
    3: {"id": 3, "name": "doohickey", "price": 3.25, "tags": []},
}
_ids = itertools.count(4)
_lock = threading.Lock()


class _BadRequest(Exception):
    pass


def _int_param(request: HttpRequest, name: str, default: int) -> int:
    try:
        return int(request.GET.get(name, default))
    except ValueError:
        return default


def _item_from(request: HttpRequest, item_id: int) -> dict[str, Any]:
    try:
        payload = json.loads(request.body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise _BadRequest('expected a JSON object with a "name" string')
    price = payload.get("price", 0)
    if not isinstance(price, (int, float)) or isinstance(price, bool):
        raise _BadRequest('"price" must be a number')
    return {"id": item_id, "name": payload["name"], "price": price, "tags": payload.get("tags", [])}


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


@require_http_methods(["GET", "POST"])
def items(request: HttpRequest) -> HttpResponse:
    """A plain sync view."""
    if request.method == "POST":
        try:
            with _lock:
                item = _item_from(request, next(_ids))
                _items[item["id"]] = item
        except _BadRequest as exc:
            return _error(400, str(exc))
        return JsonResponse(item, status=201)
    limit = _int_param(request, "limit", 10)
    offset = _int_param(request, "offset", 0)
    with _lock:
        ordered = sorted(_items.values(), key=lambda item: item["id"])
    return JsonResponse({"items": ordered[offset : offset + limit], "total": len(ordered)})


@require_http_methods(["GET", "PUT", "DELETE"])
def item(request: HttpRequest, item_id: int) -> HttpResponse:
    if request.method == "PUT":
        try:
            new = _item_from(request, item_id)
        except _BadRequest as exc:
            return _error(400, str(exc))
        with _lock:
            created = item_id not in _items
            _items[item_id] = new
        return JsonResponse(new, status=201 if created else 200)
    with _lock:
        found = _items.pop(item_id, None) if request.method == "DELETE" else _items.get(item_id)
    if found is None:
        return _error(404, f"no item {item_id}")
    return HttpResponse(status=204) if request.method == "DELETE" else JsonResponse(found)


async def search(request: HttpRequest) -> HttpResponse:
    """An async view: native under ASGI, run through async_to_sync under WSGI."""
    if request.method != "GET":
        return _error(405, "method not allowed")
    await asyncio.sleep(0)  # stands for an awaited database or HTTP call
    query = request.GET.get("q", "").lower()
    tags = request.GET.getlist("tag")
    with _lock:
        found = list(_items.values())
    results = [i for i in found if query in i["name"] and all(t in i["tags"] for t in tags)]
    page = _int_param(request, "page", 1)
    return JsonResponse({"query": query, "tags": tags, "page": page, "results": results})


@require_POST
def upload(request: HttpRequest) -> HttpResponse:
    """A file upload: multipart (``request.FILES``) or a raw binary body."""
    if request.FILES:
        uploaded = next(iter(request.FILES.values()))
        data, name = uploaded.read(), uploaded.name
    else:
        data, name = request.body, None
    digest = hashlib.sha256(data).hexdigest()
    return JsonResponse({"filename": name, "bytes": len(data), "sha256": digest}, status=201)


@require_GET
def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom: an unhandled error, Django answers 500")


def _streaming(
    request: HttpRequest, count: int, render: Callable[[int], str], pause: float
) -> Iterator[str] | AsyncIterator[str]:
    if isinstance(request, ASGIRequest):

        async def agen() -> AsyncIterator[str]:
            for number in range(count):
                yield render(number)
                if pause:
                    await asyncio.sleep(pause)

        return agen()

    def gen() -> Iterator[str]:
        for number in range(count):
            yield render(number)
            if pause:
                time.sleep(pause)

    return gen()


@require_GET
def stream(request: HttpRequest) -> HttpResponse:
    """A streamed response: Django sends each chunk as the iterator yields it."""
    content = _streaming(
        request, _int_param(request, "chunks", 5), lambda n: f"line {n}: {'x' * 64}\n", 0
    )
    return StreamingHttpResponse(content, content_type="text/plain")


@require_GET
def events(request: HttpRequest) -> HttpResponse:
    """Server-sent events."""
    content = _streaming(
        request,
        _int_param(request, "count", 3),
        lambda n: f"id: {n}\nevent: tick\ndata: {json.dumps({'n': n})}\n\n",
        0.005,
    )
    response = StreamingHttpResponse(content, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    return _error(404, f"no route for {request.path}")


def server_error(request: HttpRequest) -> HttpResponse:
    return _error(500, "internal server error")
