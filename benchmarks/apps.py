"""Minimal Starlette and Flask apps: the "bare" baselines the middlewares wrap.

Each app has three routes matching the scenarios: a small JSON answer to a GET with a
query string, a POST that reads a 4 KiB JSON body and answers 4 KiB of JSON, and a
streamed 1 MiB response in 64 KiB chunks (``?mib=4`` for 4 MiB, to check that memory does
not grow with the response).  Handlers do as little as possible so that the
middleware's cost is not hidden behind the application's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from common import RESPONSE_BODY_4K, SMALL_JSON, STREAM_CHUNK_BYTES, STREAM_CHUNKS


def make_starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def get_item(request: Request) -> Response:
        return JSONResponse({**SMALL_JSON, "id": int(request.path_params["item_id"])})

    async def echo(request: Request) -> Response:
        await request.body()
        return Response(RESPONSE_BODY_4K, media_type="application/json")

    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield STREAM_CHUNK_BYTES

    async def stream(request: Request) -> Response:
        count = STREAM_CHUNKS * int(request.query_params.get("mib", "1"))
        return StreamingResponse(chunks(count), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", get_item),
            Route("/echo", echo, methods=["POST"]),
            Route("/stream", stream),
        ]
    )


def make_flask_app() -> Any:
    from flask import Flask, Response, jsonify, request

    app = Flask("bench")

    @app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> Any:
        return jsonify({**SMALL_JSON, "id": item_id})

    @app.post("/echo")
    def echo() -> Any:
        request.get_data()
        return Response(RESPONSE_BODY_4K, mimetype="application/json")

    def chunks(count: int) -> Iterator[bytes]:
        for _ in range(count):
            yield STREAM_CHUNK_BYTES

    @app.get("/stream")
    def stream() -> Any:
        count = STREAM_CHUNKS * int(request.args.get("mib", "1"))
        return Response(chunks(count), mimetype="text/plain")

    return app


def make_app(framework: str) -> Any:
    return make_starlette_app() if framework == "starlette" else make_flask_app()


def make_raw_wsgi_app(body: bytes) -> Any:
    """A plain WSGI app (no framework): reads the request body, answers ``body``.

    Used where the app's own cost should vanish: the worker and memory benchmarks.
    """
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        stream = environ.get("wsgi.input")
        if stream is not None:
            stream.read()
        start_response("200 OK", headers)
        return [body]

    return app
