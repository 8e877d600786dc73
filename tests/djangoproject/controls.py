"""Django views and URLconf of the control tests (``ROOT_URLCONF`` of tests/test_controls.py)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

import alf_analytics

FILE_BYTES = bytes(range(256)) * 16


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


def echo(request: HttpRequest) -> HttpResponse:
    content_type = request.headers.get("content-type", "application/octet-stream")
    return HttpResponse(request.body, content_type=content_type)


def events(request: HttpRequest) -> StreamingHttpResponse:
    chunks = [b"data: 1\n\n", b"data: 2\n\n"]
    if hasattr(request, "scope"):  # under ASGI, Django wants an async iterator

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return StreamingHttpResponse(stream(), content_type="text/event-stream")
    return StreamingHttpResponse(iter(chunks), content_type="text/event-stream")


def file(request: HttpRequest) -> FileResponse:
    return FileResponse(io.BytesIO(FILE_BYTES), content_type="application/octet-stream")


def whoami(request: HttpRequest) -> HttpResponse:
    took = alf_analytics.set_consumer(request.GET["user"])
    return HttpResponse(json.dumps(took).encode(), content_type="application/json")


async def awhoami(request: HttpRequest) -> HttpResponse:
    took = alf_analytics.set_consumer(request.GET["user"])
    return HttpResponse(json.dumps(took).encode(), content_type="application/json")


urlpatterns = [
    path("", index),
    path("health", index),
    path("static/app.js", index),
    path("echo", echo),
    path("events", events),
    path("file", file),
    path("whoami", whoami),
    path("awhoami", awhoami),
]
