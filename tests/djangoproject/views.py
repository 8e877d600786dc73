"""Views for every shape of request and response the Django middleware must observe."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)

#: What the streaming views produced so far, to show the middleware does not read ahead.
PRODUCED: list[bytes] = []
STREAM_CHUNKS = [b"first chunk\n", b"second chunk\n", b"third chunk\n"]
FILE_PATH = Path(__file__)


def sync_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "sync", "method": request.method})


async def async_view(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(float(request.GET.get("sleep", "0")))
    return JsonResponse({"view": "async", "method": request.method})


def body_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


def post_view(request: HttpRequest) -> HttpResponse:
    return JsonResponse({key: request.POST.getlist(key) for key in request.POST})


def upload_view(request: HttpRequest) -> HttpResponse:
    files = {name: f.read().decode("latin-1") for name, f in request.FILES.items()}
    fields = {key: request.POST.getlist(key) for key in request.POST}
    return JsonResponse({"files": files, "fields": fields})


def read_view(request: HttpRequest) -> HttpResponse:
    chunks = []
    while chunk := request.read(7):
        chunks.append(chunk)
    return HttpResponse(b"".join(chunks), content_type="application/octet-stream")


def stream_sync_view(request: HttpRequest) -> HttpResponse:
    def chunks() -> Iterator[bytes]:
        for chunk in STREAM_CHUNKS:
            PRODUCED.append(chunk)
            yield chunk

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def stream_async_view(request: HttpRequest) -> HttpResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in STREAM_CHUNKS:
            await asyncio.sleep(0)
            PRODUCED.append(chunk)
            yield chunk

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def endless_view(request: HttpRequest) -> HttpResponse:
    async def ticks() -> AsyncIterator[bytes]:
        while True:
            yield b"tick\n"
            await asyncio.sleep(0.001)

    return StreamingHttpResponse(ticks(), content_type="text/plain")


def stream_boom_view(request: HttpRequest) -> HttpResponse:
    """A stream that fails after its first chunk (``?kind=async`` for an async one)."""

    def chunks() -> Iterator[bytes]:
        yield STREAM_CHUNKS[0]
        raise RuntimeError("boom mid-stream")

    async def achunks() -> AsyncIterator[bytes]:
        yield STREAM_CHUNKS[0]
        raise RuntimeError("boom mid-stream")

    def early() -> Iterator[bytes]:
        raise RuntimeError("boom mid-stream")
        yield b""  # pragma: no cover - a generator that fails before its first chunk

    kind = request.GET.get("kind")
    content = achunks() if kind == "async" else early() if kind == "early" else chunks()
    return StreamingHttpResponse(content, content_type="text/plain")


def stream_mixed_view(request: HttpRequest) -> HttpResponse:
    """Chunks as views give them: text (in the response's charset) and memoryviews."""
    parts = ["caf\u00e9 ", memoryview(b"view "), b"bytes"]
    return StreamingHttpResponse(iter(parts), content_type="text/plain; charset=utf-8")


def file_view(request: HttpRequest) -> HttpResponse:
    return FileResponse(FILE_PATH.open("rb"), content_type="text/x-python")


def raising_view(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom from the view")


def cookie_view(request: HttpRequest) -> HttpResponse:
    response = JsonResponse({"cookies": "set"})
    response.set_cookie("session", "s3cr3t", httponly=True)
    response.set_cookie("theme", "dark", samesite="Lax")
    return response


#: The equivalence test's response, byte for byte the same in every framework.
ECHO_HEADERS = {"X-Custom": "custom-value"}


def echo_body(query: list[str], raw: bytes) -> bytes:
    """The echo response body: the ``x`` query values and the parsed JSON request body."""
    payload = {"query": query, "echo": json.loads(raw)}
    return json.dumps(payload, separators=(",", ":")).encode()


def echo_view(request: HttpRequest) -> HttpResponse:
    body = echo_body(request.GET.getlist("x"), request.body)
    response = HttpResponse(body, status=201, content_type="application/json")
    response["Content-Length"] = str(len(body))
    for name, value in ECHO_HEADERS.items():
        response[name] = value
    response.set_cookie("session", "s3cr3t", httponly=True)
    return response


def stream_consumer_view(request: HttpRequest) -> HttpResponse:
    """set_consumer() from inside a streamed body, which the server iterates later."""
    import alf_analytics

    def chunks() -> Iterator[bytes]:
        alf_analytics.set_consumer(request.GET["user"])
        yield b"sync stream"

    async def achunks() -> AsyncIterator[bytes]:
        alf_analytics.set_consumer(request.GET["user"])
        yield b"async stream"

    content = achunks() if request.GET.get("kind") == "async" else chunks()
    return StreamingHttpResponse(content, content_type="text/plain")
