"""A small Flask JSON API, recorded by alf-analytics.

Run it (with a collector listening, see README.md)::

    export ALF_SERVICE_TOKEN=demo-token ALF_COLLECTOR_URL=http://127.0.0.1:8700
    gunicorn --chdir examples/flask_app --workers 2 app:app

Endpoints: JSON CRUD under ``/api/items``, ``/api/search`` (query string), ``/api/upload``
(raw binary or multipart), ``/api/boom`` (raises: 500), ``/api/stream`` (a generator response),
``/api/events`` (server-sent events) and ``/health``; anything else is a 404. A request with an
``X-Api-Key`` of ``API_KEYS`` is recorded with that key's account as its consumer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, abort, jsonify, request, stream_with_context
from werkzeug.wrappers import Request

from alf_analytics import AnalyticsWSGIMiddleware

app = Flask(__name__)

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
    return API_KEYS.get(request.headers.get("X-Api-Key", ""))


# The short form: service token, environment and collector URL come from ALF_SERVICE_TOKEN,
# ALF_ENVIRONMENT and ALF_COLLECTOR_URL. Wrapping wsgi_app (not app) keeps the Flask object.
# ``identify`` runs after the response and gets Flask's request (a Werkzeug Request).
app.wsgi_app = AnalyticsWSGIMiddleware(app.wsgi_app, log_body=True, identify=consumer_of)

# An in-memory store: each server process (each gunicorn worker) has its own.
_items: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "widget", "price": 9.5, "tags": ["red"]},
    2: {"id": 2, "name": "gadget", "price": 24.0, "tags": ["blue", "new"]},
    3: {"id": 3, "name": "doohickey", "price": 3.25, "tags": []},
}
_ids = itertools.count(4)
_lock = threading.Lock()


def _item_from(payload: Any, item_id: int) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        abort(400, description='expected a JSON object with a "name" string')
    price = payload.get("price", 0)
    if not isinstance(price, (int, float)) or isinstance(price, bool):
        abort(400, description='"price" must be a number')
    tags = payload.get("tags", [])
    return {"id": item_id, "name": payload["name"], "price": price, "tags": list(tags)}


@app.errorhandler(400)
@app.errorhandler(404)
@app.errorhandler(405)
@app.errorhandler(500)
def _json_error(error: Any) -> tuple[Response, int]:
    return jsonify(error=error.name, detail=error.description), error.code


@app.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@app.get("/api/items")
def list_items() -> Response:
    limit = request.args.get("limit", 10, type=int)
    offset = request.args.get("offset", 0, type=int)
    with _lock:
        items = sorted(_items.values(), key=lambda item: item["id"])
    return jsonify(items=items[offset : offset + limit], total=len(items))


@app.post("/api/items")
def create_item() -> tuple[Response, int]:
    payload = request.get_json(silent=True)
    with _lock:
        item = _item_from(payload, next(_ids))
        _items[item["id"]] = item
    return jsonify(item), 201


@app.get("/api/items/<int:item_id>")
def get_item(item_id: int) -> Response:
    with _lock:
        item = _items.get(item_id)
    if item is None:
        abort(404, description=f"no item {item_id}")
    return jsonify(item)


@app.put("/api/items/<int:item_id>")
def put_item(item_id: int) -> tuple[Response, int]:
    item = _item_from(request.get_json(silent=True), item_id)
    with _lock:
        created = item_id not in _items
        _items[item_id] = item
    return jsonify(item), 201 if created else 200


@app.delete("/api/items/<int:item_id>")
def delete_item(item_id: int) -> tuple[str, int]:
    with _lock:
        if _items.pop(item_id, None) is None:
            abort(404, description=f"no item {item_id}")
    return "", 204


@app.get("/api/search")
def search() -> Response:
    query = request.args.get("q", "").lower()
    tags = request.args.getlist("tag")
    with _lock:
        items = list(_items.values())
    results = [
        item for item in items if query in item["name"] and all(tag in item["tags"] for tag in tags)
    ]
    page = request.args.get("page", 1, type=int)
    return jsonify(query=query, tags=tags, page=page, results=results)


@app.post("/api/upload")
def upload() -> tuple[Response, int]:
    if request.files:
        upload = next(iter(request.files.values()))
        data, name = upload.read(), upload.filename
    else:
        data, name = request.get_data(), None
    return jsonify(filename=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()), 201


@app.get("/api/boom")
def boom() -> Response:
    raise RuntimeError("boom: an unhandled error, Flask answers 500")


@app.get("/api/stream")
def stream() -> Response:
    chunks = request.args.get("chunks", 5, type=int)

    def generate() -> Iterator[str]:
        for number in range(chunks):
            yield f"line {number}: {'x' * 64}\n"

    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.get("/api/events")
def events() -> Response:
    count = request.args.get("count", 3, type=int)

    def generate() -> Iterator[str]:
        for number in range(count):
            yield f"id: {number}\nevent: tick\ndata: {json.dumps({'n': number})}\n\n"
            time.sleep(0.005)

    return Response(generate(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
