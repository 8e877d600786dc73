"""The ASGI adapter: Starlette/FastAPI on both anyio backends, raw ASGI protocol care, uvicorn.

Entries always travel to the real ``collector`` fixture over loopback HTTP and are schema-checked
there (``received_entries``). Raw ASGI tests play the server themselves (:class:`Server`), which
is the only way to observe message identity, ordering and back-pressure.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse, StreamingResponse

import alf_analytics
from alf_analytics import AnalyticsASGIMiddleware, _worker
from alf_analytics._config import make_config
from alf_analytics._worker import Worker
from alf_analytics.asgi import FlushOnShutdown
from alf_analytics.collector import Collector

from .asgi_apps import (
    BodyReadingMiddleware,
    ContextMiddleware,
    echo_app,
    fastapi_app,
    read_body,
    starlette_app,
    starlette_routes,
)
from .conftest import received_entries
from .raw import asgi_scope
from .servers import free_port, reaped, sigterm

TOKEN = "asgi-test-token"
TESTS = Path(__file__).resolve().parent
KIB = 1024
MIB = 1024 * KIB


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on both anyio backends unless it narrows this itself."""
    return str(request.param)


def analytics(app: Any, collector: Collector, **options: Any) -> AnalyticsASGIMiddleware:
    # Every body, so byte-faithfulness shows; the default allow-list has its own tests.
    options.setdefault("log_body_types", ["*/*", "text/event-stream"])
    return AnalyticsASGIMiddleware(app, service_token=TOKEN, collector_url=collector.url, **options)


def http_scope(path: str = "/", *, method: str = "GET", **overrides: Any) -> dict[str, Any]:
    """An ``http`` scope as uvicorn builds it (``overrides`` replace or add keys)."""
    scope = asgi_scope(method, path, host="testserver", client=("127.0.0.1", 50000))
    scope.update(overrides)
    return scope


def body_messages(body: bytes, piece: int) -> list[dict[str, Any]]:
    """``body`` as ``http.request`` messages of ``piece`` bytes (``more_body`` but the last)."""
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)] or [b""]
    return [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]


class Server:
    """The server side of one ASGI call: scripted ``receive`` messages, recorded ``send`` ones.

    Once the script is used up, ``receive`` waits for the response to complete and then reports
    ``http.disconnect`` (what uvicorn and httpx do). ``on_send`` runs on every sent message.
    """

    def __init__(
        self,
        messages: list[dict[str, Any]] | None = None,
        on_send: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.script = list(messages if messages is not None else body_messages(b"", 1))
        self.received: list[dict[str, Any]] = []
        self.sent: list[Any] = []
        self.on_send = on_send
        self.complete = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.script:
            message = self.script.pop(0)
        else:
            await self.complete.wait()
            message = {"type": "http.disconnect"}
        self.received.append(message)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            result = self.on_send(message)
            if hasattr(result, "__await__"):
                await result
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete.set()
        if message["type"] == "http.response.pathsend":
            self.complete.set()

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def header_values(headers: list[dict[str, str]], name: str) -> list[str]:
    return [h["value"] for h in headers if h["name"] == name]


def only_entry(collector: Collector) -> dict[str, Any]:
    """Exactly one entry arrived (after a flush): return it."""
    entries = received_entries(collector, 1)  # flushes first: nothing else is on its way
    assert len(entries) == 1, [e["request"]["url"] for e in entries]
    return entries[0]


# -- Starlette and FastAPI on both backends ---------------------------------------------------


def _added(collector: Collector) -> Any:
    app = starlette_app()
    app.add_middleware(
        AnalyticsASGIMiddleware,
        service_token=TOKEN,
        collector_url=collector.url,
        environment="starlette",
        log_body=True,
    )
    return app


def _wrapped(collector: Collector) -> Any:
    return analytics(starlette_app(), collector, environment="starlette", log_body=True)


@pytest.mark.anyio
async def test_a_start_the_server_refuses_records_no_answer(collector: Collector) -> None:
    """uvicorn's send raises for a status it cannot write (99) and nothing reaches the client:
    the entry records no answer (status 0, no headers), not the app's refused status."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 99, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"never"})

    def refuse(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            raise KeyError(99)

    server = Server(on_send=refuse)
    with pytest.raises(KeyError):
        await analytics(app, collector)(http_scope(), server.receive, server.send)
    entry = only_entry(collector)
    assert entry["response"]["status"] == 0
    assert entry["response"]["headers"] == [] and entry["response"]["bodySize"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "install", [pytest.param(_added, id="add_middleware"), pytest.param(_wrapped, id="wrapped")]
)
async def test_starlette_records_every_exchange(
    anyio_backend: str, collector: Collector, install: Callable[[Collector], Any]
) -> None:
    """Starlette with the middleware added or wrapped records JSON posts and streams."""
    app = install(collector)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        posted = await client.post("/json?x=1", json={"n": 1})
        streamed = await client.get("/stream", params={"count": 3, "size": 10})
    assert posted.status_code == 201
    assert posted.json() == {"received": {"n": 1}}
    assert streamed.content == b"A" * 10 + b"B" * 10 + b"C" * 10

    entries = received_entries(collector, 2)
    stored = collector.entries()
    assert {s.environment for s in stored} == {"starlette"}
    assert {s.service_token for s in stored} == {TOKEN}
    by_url = {e["request"]["url"]: e for e in entries}
    post = by_url["http://testserver/json?x=1"]
    assert post["request"]["method"] == "POST"
    assert post["request"]["queryString"] == [{"name": "x", "value": "1"}]
    assert post["request"]["bodySize"] == len(b'{"n":1}')
    assert post["request"]["postData"]["text"] == b64(b'{"n":1}')
    assert post["response"]["status"] == 201
    assert post["response"]["bodySize"] == len(posted.content)
    assert post["response"]["content"]["text"] == b64(posted.content)
    stream = by_url["http://testserver/stream?count=3&size=10"]
    assert stream["response"]["status"] == 200
    assert stream["response"]["bodySize"] == 30
    assert stream["response"]["content"]["mimeType"].startswith("text/plain")
    assert stream["clientIPAddress"] == "127.0.0.1"
    assert len(entries) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("wrap", [pytest.param(False, id="add_middleware"), True])
async def test_fastapi_unhandled_exception_is_recorded_as_500(
    anyio_backend: str, collector: Collector, wrap: bool
) -> None:
    """An unhandled FastAPI exception gives an entry with 500, whichever side sends the 500."""
    app: Any = fastapi_app()
    if wrap:
        app = analytics(app, collector)
    else:
        app.add_middleware(
            AnalyticsASGIMiddleware, service_token=TOKEN, collector_url=collector.url
        )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/boom")
    assert response.status_code == 500

    entry = only_entry(collector)
    assert entry["response"]["status"] == 500
    assert entry["request"]["url"] == "http://testserver/boom"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_background_task_does_not_inflate_time(
    anyio_backend: str, collector: Collector
) -> None:
    """A 1 s BackgroundTask after the response counts neither in ``time`` nor in ``receive``."""
    app = analytics(starlette_app(), collector)
    transport = httpx.ASGITransport(app=app)
    started = time.perf_counter()
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/background", params={"seconds": 1})
    whole_call_ms = (time.perf_counter() - started) * 1000
    assert response.text == "done"
    assert whole_call_ms >= 1000  # the transport waits for the app, background task included

    entry = only_entry(collector)
    assert entry["time"] * 2 < whole_call_ms
    assert entry["timings"]["receive"] * 2 < whole_call_ms


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path", [pytest.param("/raw/echo", id="mounted-raw-asgi"), pytest.param("/body", id="route")]
)
@pytest.mark.parametrize("user_outside", [pytest.param(True, id="user-first"), False])
async def test_body_reading_user_middleware_in_both_orders(
    anyio_backend: str, collector: Collector, path: str, user_outside: bool
) -> None:
    """A user middleware that reads the body before or after ours leaves it for the endpoint."""
    app: Any = starlette_app()
    if user_outside:
        app = BodyReadingMiddleware(analytics(app, collector, log_body=True))
    else:
        app.add_middleware(BodyReadingMiddleware)
        app.add_middleware(
            AnalyticsASGIMiddleware,
            service_token=TOKEN,
            collector_url=collector.url,
            log_body=True,
            log_body_types=["*/*"],
        )
    body = bytes(range(256)) * 400  # 100 KiB, sent in pieces

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16 * KIB):
            yield body[i : i + 16 * KIB]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with anyio.fail_after(10):
            response = await client.post(path, content=pieces())
    assert response.status_code == 200
    assert response.content == body

    entry = only_entry(collector)
    assert entry["request"]["bodySize"] == len(body)
    assert entry["request"]["postData"]["text"] == b64(body[: 64 * KIB])
    assert entry["response"]["bodySize"] == len(body)


@pytest.mark.anyio
async def test_contextvar_from_outer_middleware_reaches_endpoint_and_background(
    anyio_backend: str, collector: Collector
) -> None:
    """A contextvar set outside ours reaches the endpoint and its background task (run later)."""
    observed: list[str] = []
    app = ContextMiddleware(analytics(starlette_app(observed=observed), collector))

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            observed.append("server:final-body")

    server = Server(on_send=on_send)
    await app(http_scope("/context"), server.receive, server.send)
    assert observed == [
        "endpoint:set-by-outer:/context",
        "server:final-body",
        "background:set-by-outer:/context",
    ]
    assert only_entry(collector)["response"]["status"] == 200


# -- raw ASGI: receive ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_more_body_request_arrives_intact_and_is_captured_up_to_the_cap(
    anyio_backend: str, collector: Collector
) -> None:
    """5 MB in 64 KiB ``more_body`` messages reach the app intact; only max_body_bytes are kept."""
    body = os.urandom(5 * MIB)
    app = analytics(echo_app, collector, log_body=True, max_body_bytes=100_000)
    server = Server(body_messages(body, 64 * KIB))
    await app(http_scope("/upload", method="POST"), server.receive, server.send)
    assert server.body() == body

    entry = only_entry(collector)
    request = entry["request"]
    assert request["bodySize"] == 5 * MIB
    assert request["bodyCaptured"] is False
    assert base64.b64decode(request["postData"]["text"]) == body[:100_000]
    assert entry["response"]["bodySize"] == 5 * MIB


@pytest.mark.anyio
async def test_every_receive_message_is_forwarded_unchanged(
    anyio_backend: str, collector: Collector
) -> None:
    """The app gets the server's very message objects, ``http.disconnect`` included, unmodified."""
    script = [*body_messages(b"abcdefghij", 3), {"type": "http.disconnect"}]
    pristine = copy.deepcopy(script)
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "http.disconnect":
                return

    server = Server(script)
    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True)(
            http_scope("/in", method="POST"), server.receive, server.send
        )
    assert len(seen) == len(server.received) == 5
    assert all(got is given for got, given in zip(seen, server.received, strict=True))
    assert seen == pristine

    entry = only_entry(collector)
    assert entry["request"]["bodySize"] == 10
    assert entry["request"]["postData"]["text"] == b64(b"abcdefghij")


@pytest.mark.anyio
async def test_a_body_of_unknown_length_read_in_part_is_not_called_captured(
    anyio_backend: str, collector: Collector
) -> None:
    """A chunked upload (no Content-Length) the app stops reading after one message: more may
    have followed, so the entry does not claim the whole body (bodyCaptured false)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # one message of several, then an answer
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server = Server(body_messages(b"abcdefghij", 3))
    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True)(
            http_scope("/in", method="POST"), server.receive, server.send
        )
    entry = only_entry(collector)
    assert entry["request"]["bodySize"] == 3
    assert entry["request"]["bodyCaptured"] is False


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"testserver"), (b"transfer-encoding", b"chunked")],
        [(b"Host", b"testserver"), (b"Transfer-Encoding", b"gzip, Chunked")],  # the slow path
    ],
)
async def test_a_chunked_body_the_app_never_read_is_not_called_captured(
    anyio_backend: str, collector: Collector, headers: list[tuple[bytes, bytes]]
) -> None:
    """The app answers without a single receive(): no byte was read, and an empty read is
    not the end of a chunked body."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server = Server(body_messages(b"abcdefghij", 3))
    scope = http_scope("/in", method="POST", headers=headers)
    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True)(scope, server.receive, server.send)
    request = only_entry(collector)["request"]
    assert (request["bodySize"], request["bodyCaptured"]) == (0, False)


@pytest.mark.anyio
async def test_a_second_content_type_cannot_carry_a_secret_past_redaction(
    anyio_backend: str, collector: Collector
) -> None:
    """uvicorn and hypercorn pass every Content-Type pair on: JSON first (the capture is
    decided on it), another type last. The JSON body is never sent unredacted."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    secret = b'{"password": "hunter2"}'
    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(secret)).encode()),
        (b"content-type", b"x/other"),
    ]
    server = Server(body_messages(secret, 100))
    scope = http_scope("/in", method="POST", headers=headers)
    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True, log_body_types=None)(
            scope, server.receive, server.send
        )
    request = only_entry(collector)["request"]
    assert "postData" not in request
    assert (request["bodySize"], request["bodyCaptured"]) == (len(secret), False)


def _leaving(at: str) -> tuple[Any, Any]:
    """``receive``/``send`` of a client that leaves right after its request (``"request"``)
    or once the first body bytes reached it (``"body"``)."""
    left = anyio.Event()
    if at == "request":
        left.set()
    script = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if script:
            return script.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            left.set()

    return receive, send


@pytest.mark.anyio
async def test_bytes_sent_after_the_client_left_are_not_counted(
    anyio_backend: str, collector: Collector
) -> None:
    """uvicorn drops sends once the client has gone; an app that heard the disconnect through
    us (as Starlette's StreamingResponse listens for it) sends on into nothing (PITFALLS #22)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"into the void", "more_body": False})

    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True)(http_scope("/left"), *_leaving("body"))
    response = only_entry(collector)["response"]
    assert (response["status"], response["bodySize"]) == (200, len(b"first"))


@pytest.mark.anyio
async def test_a_response_started_after_the_client_left_is_recorded_as_no_answer(
    anyio_backend: str, collector: Collector
) -> None:
    """The client left before the app answered (the app saw http.disconnect): status 0, as HAR
    writes a response that never came, not the 200 nobody received (PITFALLS #22)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"too late"})

    with anyio.fail_after(10):
        await analytics(app, collector)(http_scope("/late"), *_leaving("request"))
    response = only_entry(collector)["response"]
    assert (response["status"], response["bodySize"], response["headers"]) == (0, 0, [])


@pytest.mark.anyio
async def test_an_upload_cut_by_the_client_counts_what_crossed_not_what_it_announced(
    anyio_backend: str, collector: Collector
) -> None:
    """Content-Length 100, 50 bytes, then the client leaves: bodySize is the 50 that crossed,
    and the cut body is not captured."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = http_scope("/in", method="POST")
    scope["headers"] = [*scope["headers"], (b"content-length", b"100")]
    cut = {"type": "http.request", "body": b"x" * 50, "more_body": True}
    server = Server([cut, {"type": "http.disconnect"}])
    with anyio.fail_after(10):
        await analytics(app, collector, log_body=True)(scope, server.receive, server.send)
    entry = only_entry(collector)
    assert entry["request"]["bodySize"] == 50
    assert entry["request"]["bodyCaptured"] is False
    assert "postData" not in entry["request"]


# -- raw ASGI: send ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_send_message_is_forwarded_unchanged(
    anyio_backend: str, collector: Collector
) -> None:
    """The server gets the app's very message objects, in order, with nothing added or changed."""
    messages: list[dict[str, Any]] = [
        {
            "type": "http.response.start",
            "status": 207,
            "headers": [(b"content-type", b"text/plain"), (b"x-a", b"1")],
            "trailers": False,
        },
        {"type": "http.response.body", "body": b"one", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": True},
        {"type": "http.response.body", "body": b"two", "more_body": False},
    ]
    pristine = copy.deepcopy(messages)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    server = Server()
    await analytics(app, collector)(http_scope(), server.receive, server.send)
    assert len(server.sent) == len(messages)
    assert all(got is given for got, given in zip(server.sent, messages, strict=True))
    assert server.sent == pristine

    entry = only_entry(collector)
    assert entry["response"]["status"] == 207
    assert entry["response"]["bodySize"] == 6


@pytest.mark.anyio
async def test_each_chunk_reaches_the_server_before_the_next_is_produced(
    anyio_backend: str, collector: Collector
) -> None:
    """No buffering: the app produces chunk 2 only after the server has seen chunk 1 (SSE works)."""
    chunk_one_seen = anyio.Event()

    async def sse(scope: Any, receive: Any, send: Any) -> None:
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await chunk_one_seen.wait()
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    recorded_at_chunk_one: list[int] = []

    def on_send(message: dict[str, Any]) -> None:
        if message.get("body") == b"data: 1\n\n":
            counters = alf_analytics.stats()
            recorded_at_chunk_one.append(counters["captured"] + counters["queued"])
            chunk_one_seen.set()

    server = Server(on_send=on_send)
    with anyio.fail_after(10):  # a buffering middleware deadlocks here
        await analytics(sse, collector)(http_scope("/events"), server.receive, server.send)
    assert server.body() == b"data: 1\n\ndata: 2\n\n"
    assert recorded_at_chunk_one == [0]  # the entry is made only once the stream has ended

    entry = only_entry(collector)
    assert entry["response"]["bodySize"] == 18
    assert header_values(entry["response"]["headers"], "content-type") == ["text/event-stream"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_large_streamed_response_keeps_memory_flat(
    anyio_backend: str, collector: Collector
) -> None:
    """200 MB streamed in 64 KiB chunks with log_body on: traced peak stays far below the size."""
    total = 200 * MIB
    piece = 64 * KIB

    async def big(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for index in range(total // piece):
            # A fresh object per chunk, so holding on to chunks would show in the trace.
            chunk = bytes([index % 251]) * piece
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    received = 0

    def count(message: dict[str, Any]) -> None:
        nonlocal received
        received += len(message.get("body", b""))

    server = Server(on_send=count)
    app = analytics(big, collector, log_body=True)
    server.sent = _Discard()
    tracemalloc.start()
    try:
        await app(http_scope("/big"), server.receive, server.send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == total
    assert peak < total / 20

    entry = only_entry(collector)
    assert entry["response"]["bodySize"] == total
    assert entry["response"]["bodyCaptured"] is False
    assert base64.b64decode(entry["response"]["content"]["text"]) == bytes([0]) * (64 * KIB)


class _Discard(list[Any]):
    """A ``Server.sent`` that keeps nothing (for the memory test)."""

    def append(self, item: Any) -> None:
        pass


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pathsend_response_is_recorded_with_its_length(
    anyio_backend: str, collector: Collector, tmp_path: Path
) -> None:
    """A FileResponse sent as ``http.response.pathsend`` passes through, sized by Content-Length."""
    target = tmp_path / "report.csv"
    target.write_bytes(b"a,b\n" * 1000)
    response = FileResponse(target, media_type="text/csv")
    scope = http_scope("/report.csv", extensions={"http.response.pathsend": {}})
    server = Server()
    await analytics(response, collector)(scope, server.receive, server.send)
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.pathsend"]
    assert server.sent[1]["path"] == str(target)

    entry = only_entry(collector)
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodySize"] == 4000


# -- raw ASGI: other scopes and lifespan ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("scope_type", ["websocket", "custom.protocol"])
async def test_websocket_and_unknown_scopes_pass_through_untouched(
    anyio_backend: str, collector: Collector, scope_type: str
) -> None:
    """Non-http scopes reach the app as the same scope, receive and send; nothing is logged."""
    scope = {"type": scope_type, "asgi": {"version": "3.0"}, "path": "/ws", "headers": []}
    pristine = copy.deepcopy(scope)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    calls: list[tuple[Any, Any, Any]] = []

    async def app(got_scope: Any, got_receive: Any, got_send: Any) -> None:
        calls.append((got_scope, got_receive, got_send))

    await analytics(app, collector)(scope, receive, send)
    assert len(calls) == 1
    assert calls[0][0] is scope and calls[0][1] is receive and calls[0][2] is send
    assert scope == pristine
    assert alf_analytics.flush(5.0)
    assert collector.count() == 0
    assert alf_analytics.stats()["captured"] == 0


class LifespanServer:
    """The server side of a lifespan: scripted events in, recorded messages out."""

    def __init__(self, on_send: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        self.given: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.on_send = on_send
        self.shutdown_at = 0.0

    async def receive(self) -> dict[str, Any]:
        event = self.events.pop(0)
        if event["type"] == "lifespan.shutdown":
            self.shutdown_at = time.perf_counter()
        self.given.append(event)
        return event

    async def send(self, message: dict[str, Any]) -> None:
        if self.on_send is not None:
            self.on_send(message)
        self.sent.append(message)


def lifespan_app(
    shutdown_reply: dict[str, Any], received: list[Any]
) -> Callable[[Any, Any, Any], Any]:
    """A raw app: answers lifespan events with fixed messages, and 200 to http requests."""
    startup_reply = {"type": "lifespan.startup.complete"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                received.append(event)
                if event["type"] == "lifespan.startup":
                    await send(startup_reply)
                else:
                    await send(shutdown_reply)
                    return
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


SHUTDOWN_REPLIES = [
    pytest.param({"type": "lifespan.shutdown.complete"}, id="complete"),
    pytest.param({"type": "lifespan.shutdown.failed", "message": "db close failed"}, id="failed"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("reply", SHUTDOWN_REPLIES)
async def test_lifespan_shutdown_is_forwarded_after_the_flush(
    anyio_backend: str, collector: Collector, reply: dict[str, Any]
) -> None:
    """Lifespan messages pass unchanged; the shutdown reply reaches the server after the flush."""
    received: list[Any] = []
    pristine = copy.deepcopy(reply)
    app = analytics(lifespan_app(reply, received), collector, delay=60.0)
    server = Server()
    await app(http_scope("/before-shutdown"), server.receive, server.send)
    assert collector.count() == 0  # queued: delay=60 leaves it to the shutdown flush

    at_collector_when_forwarded: list[int] = []

    def on_send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.shutdown"):
            at_collector_when_forwarded.append(collector.count())

    lifespan = LifespanServer(on_send)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(10):
        await app(scope, lifespan.receive, lifespan.send)
    assert len(received) == 2
    assert all(got is given for got, given in zip(received, lifespan.given, strict=True))
    assert [m["type"] for m in lifespan.sent] == ["lifespan.startup.complete", reply["type"]]
    assert lifespan.sent[1] is reply
    assert reply == pristine
    assert at_collector_when_forwarded == [1]
    assert collector.entries()[0].path == "/before-shutdown"


@pytest.mark.anyio
async def test_lifespan_flush_that_runs_out_of_time_says_what_stays_unsent(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn exits after the lifespan shutdown without running atexit: when the flush runs
    out of time, the lifespan flush is the last chance to say entries stay unsent."""
    app = AnalyticsASGIMiddleware(
        lifespan_app({"type": "lifespan.shutdown.complete"}, []),
        service_token=TOKEN,
        collector_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: refused, retried
        shutdown_timeout=0.3,
    )
    server = Server()
    await app(http_scope("/unsent"), server.receive, server.send)
    lifespan = LifespanServer()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with caplog.at_level("WARNING", logger="alf_analytics"), anyio.fail_after(10):
        await app(scope, lifespan.receive, lifespan.send)
    assert lifespan.sent[-1]["type"] == "lifespan.shutdown.complete"
    said = [r.getMessage() for r in caplog.records if "unsent" in r.getMessage()]
    assert said == [
        "alf_analytics: lifespan shutdown with 1 entries unsent (shutdown_timeout reached)"
    ]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_shutdown_hooks_share_one_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """What one shutdown flush spent is gone for the next, until an entry is captured."""
    clock = _Clock()
    monkeypatch.setattr(_worker, "_monotonic", clock)
    assert _worker.shutdown_bound(2.0) == 2.0
    clock.now += 0.5
    assert _worker.shutdown_bound(2.0) == 1.5
    assert _worker.shutdown_bound(1.0) == 1.0  # never more than its own
    clock.now += 3.0
    assert _worker.shutdown_bound(5.0) == 0.0  # spent: exit without waiting again
    config = make_config({"service_token": TOKEN, "collector_url": "http://127.0.0.1:9"})
    worker = _worker.get_worker(config)
    next(worker._captured)  # an entry captured since: a new bound
    assert _worker.shutdown_bound(2.0) == 2.0


@pytest.mark.anyio
async def test_nested_middlewares_flush_within_the_shutdown_timeout_in_force(
    anyio_backend: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two middlewares on one collector: the inner one's 1 s is in force (the outer's 4 s is
    ignored with a warning), and the outer lifespan flush gets what the inner one left; each
    used to wait its own (5 s in all)."""
    clock = _Clock()
    monkeypatch.setattr(_worker, "_monotonic", clock)
    given: list[float] = []

    def slow_flush(self: _worker.Worker, timeout: float | None = None) -> bool:
        assert timeout is not None
        given.append(timeout)
        clock.now += 0.3  # a collector that does not answer: the flush spends its time
        return False

    monkeypatch.setattr(_worker.Worker, "flush", slow_flush)
    received: list[Any] = []
    app = lifespan_app({"type": "lifespan.shutdown.complete"}, received)
    inner = analytics(app, collector, shutdown_timeout=1.0)
    outer = AnalyticsASGIMiddleware(
        inner, service_token="outer-token-0123456789", collector_url=collector.url,
        shutdown_timeout=4.0,
    )  # fmt: skip
    lifespan = LifespanServer()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(10):
        await outer(scope, lifespan.receive, lifespan.send)
    assert given == [1.0, pytest.approx(0.7)]  # the 1 s in force, shared by both
    assert _worker.shutdown_bound(4.0) == pytest.approx(0.4)  # what atexit would get


@pytest.mark.anyio
async def test_user_lifespan_runs_and_the_flush_follows_it(
    anyio_backend: str, collector: Collector
) -> None:
    """A Starlette app's own lifespan runs both halves; our flush comes after its shutdown code."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("user-startup")
        yield
        events.append(f"user-shutdown:{collector.count()}")

    app = Starlette(routes=starlette_routes(), lifespan=lifespan)
    app.add_middleware(
        AnalyticsASGIMiddleware, service_token=TOKEN, collector_url=collector.url, delay=60.0
    )
    server = Server()
    await app(http_scope("/health"), server.receive, server.send)

    def on_send(message: dict[str, Any]) -> None:
        events.append(f"{message['type']}:{collector.count()}")

    lifespan_server = LifespanServer(on_send)
    with anyio.fail_after(10):
        await app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            lifespan_server.receive,
            lifespan_server.send,
        )
    assert events == [
        "user-startup",
        "lifespan.startup.complete:0",
        "user-shutdown:0",
        "lifespan.shutdown.complete:1",
    ]


async def refuses_lifespan_with_assert(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await echo_app(scope, receive, send)


async def refuses_lifespan_like_django(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
    await echo_app(scope, receive, send)


@pytest.mark.anyio
@pytest.mark.parametrize("refusing", [refuses_lifespan_with_assert, refuses_lifespan_like_django])
async def test_app_refusing_lifespan_refuses_it_through_us_too(
    anyio_backend: str, collector: Collector, refusing: Any
) -> None:
    """An app refusing the lifespan scope raises the same exception with us: nothing answered.

    The server decides what that means (uvicorn: "unsupported" with --lifespan auto, exit 3
    with --lifespan on), exactly as without the middleware.
    """
    errors = []
    for app in (refusing, analytics(refusing, collector, delay=60.0)):
        lifespan = LifespanServer()
        with pytest.raises(Exception) as raised:
            await app(
                {"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.receive, lifespan.send
            )
        assert lifespan.sent == []
        errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1]


@pytest.mark.anyio
@pytest.mark.parametrize("refusing", [refuses_lifespan_with_assert, refuses_lifespan_like_django])
async def test_flush_on_shutdown_runs_lifespan_for_an_app_refusing_it(
    anyio_backend: str, collector: Collector, refusing: Any
) -> None:
    """FlushOnShutdown (for Django) answers the events itself and flushes before shutdown."""
    recorded = analytics(refusing, collector, delay=60.0)
    server = Server()
    await recorded(http_scope("/queued"), server.receive, server.send)
    at_collector_when_forwarded: list[int] = []

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            at_collector_when_forwarded.append(collector.count())

    lifespan = LifespanServer(on_send)
    with anyio.fail_after(10):
        await FlushOnShutdown(refusing)(
            {"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.receive, lifespan.send
        )
    assert lifespan.sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    assert at_collector_when_forwarded == [1]


class StartupError(Exception):
    """A lifespan app's failure during startup."""


@pytest.mark.anyio
@pytest.mark.parametrize("reports_failure", [pytest.param(True, id="sends-failed"), False])
async def test_startup_failure_of_a_lifespan_app_is_not_masked(
    anyio_backend: str, collector: Collector, reports_failure: bool
) -> None:
    """An app that takes the startup event and then fails keeps its failure: we answer nothing."""
    error = StartupError("database unreachable")
    failed = {"type": "lifespan.startup.failed", "message": "database unreachable"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if reports_failure:
            await send(failed)
        raise error

    lifespan = LifespanServer()
    with pytest.raises(StartupError) as raised:
        await analytics(app, collector)(
            {"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.receive, lifespan.send
        )
    assert raised.value is error
    assert lifespan.sent == ([failed] if reports_failure else [])
    assert not reports_failure or lifespan.sent[0] is failed


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A collector URL whose socket accepts connections into its backlog and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()  # resets the queued connections: the stuck worker fails fast


@pytest.mark.anyio
async def test_shutdown_flush_runs_off_the_loop_and_is_bounded(
    anyio_backend: str, black_hole: str
) -> None:
    """With a black-holed collector the flush keeps the loop live and ends by shutdown_timeout."""
    received: list[Any] = []
    shutdown_timeout, transport_timeout = 1.0, 8.0
    app = AnalyticsASGIMiddleware(
        lifespan_app({"type": "lifespan.shutdown.complete"}, received),
        service_token=TOKEN,
        collector_url=black_hole,
        delay=60.0,
        retries=0,
        timeout=transport_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    server = Server()
    await app(http_scope("/queued"), server.receive, server.send)

    ticks = 0
    marks: dict[str, float] = {}

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            marks["ticks_during_flush"] = ticks - marks["ticks_at_shutdown"]
            marks["flush_seconds"] = time.perf_counter() - lifespan.shutdown_at

    lifespan = LifespanServer(on_send)
    server_receive = lifespan.receive

    async def receive() -> dict[str, Any]:
        event = await server_receive()
        marks["ticks_at_shutdown"] = ticks
        return event

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ticker)
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, lifespan.send)
        tasks.cancel_scope.cancel()
    assert marks["flush_seconds"] >= shutdown_timeout * 0.8  # it really waited for the collector
    assert marks["flush_seconds"] < transport_timeout / 2  # ...but not for the transport timeout
    assert marks["ticks_during_flush"] >= 10  # ~100 ticks fit into 1 s; a blocked loop gets 0
    assert [m["type"] for m in lifespan.sent][-1] == "lifespan.shutdown.complete"


@pytest.mark.anyio
async def test_handing_over_never_blocks_the_loop(anyio_backend: str, black_hole: str) -> None:
    """With the worker stuck on a black-holed collector and its queue full, requests run on."""
    transport_timeout = 6.0
    app = AnalyticsASGIMiddleware(
        echo_app,
        service_token=TOKEN,
        collector_url=black_hole,
        batch_size=1,
        queue_size=5,
        retries=0,
        timeout=transport_timeout,
    )
    started = time.perf_counter()
    with anyio.fail_after(30):
        for index in range(100):
            server = Server(body_messages(b"%d" % index, 8))
            await app(http_scope(f"/n/{index}", method="POST"), server.receive, server.send)
            assert server.body() == b"%d" % index
    elapsed = time.perf_counter() - started
    counters = alf_analytics.stats()
    assert counters["dropped"]["queue_full"] >= 90  # dropped, never waited for
    assert elapsed < transport_timeout / 2  # nobody waited for the stuck worker either


# -- timings, exceptions, disconnects ---------------------------------------------------------


@pytest.mark.anyio
async def test_wait_ends_at_response_start_and_receive_at_last_body(
    anyio_backend: str, collector: Collector
) -> None:
    """``wait`` spans the time to ``http.response.start``, ``receive`` the time to the last body."""
    before_start, before_last = 0.05, 0.6

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(before_start)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await anyio.sleep(before_last)
        await send({"type": "http.response.body", "body": b"b", "more_body": False})
        await anyio.sleep(before_last)  # after the body: must not count

    server = Server()
    await analytics(slow, collector)(http_scope(), server.receive, server.send)

    entry = only_entry(collector)
    timings = entry["timings"]
    assert timings["wait"] >= before_start * 1000 * 0.9
    assert timings["receive"] >= before_last * 1000 * 0.9
    assert timings["wait"] < timings["receive"]
    assert entry["time"] < 2 * before_last * 1000
    assert entry["time"] == pytest.approx(timings["send"] + timings["wait"] + timings["receive"])


class AppError(Exception):
    """Raised by the failing apps below."""


def failing_app(when: str) -> tuple[Callable[[Any, Any, Any], Any], AppError, KeyError]:
    """A raw app that raises ``AppError`` (caused by a KeyError) at the point named by ``when``."""
    cause = KeyError("root cause")
    error = AppError(f"failed {when}")
    error.__cause__ = cause

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if when != "before-start":
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send(
                {"type": "http.response.body", "body": b"12345", "more_body": when == "mid-body"}
            )
        raise error

    return app, error, cause


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("when", "status", "body_size"),
    [
        pytest.param("before-start", 500, 0, id="before-start"),
        pytest.param("mid-body", 201, 5, id="after-start"),
        pytest.param("after-complete", 201, 5, id="after-complete"),
    ],
)
async def test_app_exception_is_recorded_and_reraised_unchanged(
    anyio_backend: str, collector: Collector, when: str, status: int, body_size: int
) -> None:
    """The same exception object (cause intact) propagates; the entry has the status really sent."""
    app, error, cause = failing_app(when)
    server = Server()
    with pytest.raises(AppError) as raised:
        await analytics(app, collector)(http_scope("/fail"), server.receive, server.send)
    assert raised.value is error
    assert raised.value.__cause__ is cause
    assert any(entry.name == "app" for entry in raised.traceback)
    if when == "before-start":
        assert server.sent == []  # we never answer on the app's behalf

    entry = only_entry(collector)
    assert entry["response"]["status"] == status
    assert entry["response"]["bodySize"] == body_size


@pytest.mark.anyio
async def test_background_task_exception_keeps_the_real_status(
    anyio_backend: str, collector: Collector
) -> None:
    """A Starlette background task failing after a 200 leaves the entry at 200, not 500."""
    app = analytics(starlette_app(), collector)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with pytest.raises(RuntimeError, match="background task failed"):
            await client.get("/background-error")

    entry = only_entry(collector)
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodySize"] == 2


@pytest.mark.anyio
async def test_send_failing_mid_response_yields_one_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """A client gone mid-response (``send`` raises OSError) still yields exactly one entry."""

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def broken_pipe(message: dict[str, Any]) -> None:
        if len([m for m in server.sent if m["type"] == "http.response.body"]) == 2:
            raise OSError(32, "Broken pipe")

    server = Server(on_send=broken_pipe)
    with pytest.raises(OSError, match="Broken pipe"):
        await analytics(stream, collector)(http_scope("/gone"), server.receive, server.send)

    entry = only_entry(collector)
    assert entry["response"]["status"] == 200
    assert entry["request"]["url"] == "http://testserver/gone"


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["raises", "returns"])
async def test_a_body_the_app_broke_off_is_not_called_captured(
    anyio_backend: str, collector: Collector, how: str
) -> None:
    """An app that raises, or returns, after part of its body: the client got a cut body, so
    the entry keeps what crossed but does not claim the whole body (bodyCaptured false)."""

    async def breaks_off(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        if how == "raises":
            raise RuntimeError("the database went away")

    server = Server()
    app = analytics(breaks_off, collector, log_body=True)
    if how == "raises":
        with pytest.raises(RuntimeError, match="database"):
            await app(http_scope("/cut"), server.receive, server.send)
    else:
        await app(http_scope("/cut"), server.receive, server.send)
    response = only_entry(collector)["response"]
    assert (response["status"], response["bodySize"], response["bodyCaptured"]) == (200, 5, False)
    assert base64.b64decode(response["content"]["text"]) == b"first"


@pytest.mark.anyio
async def test_an_app_that_never_answered_a_client_who_left_is_no_response(
    anyio_backend: str, collector: Collector
) -> None:
    """The client left and the app raised without answering: nobody got the server's 500,
    so the entry records no answer (status 0) and no body."""

    async def fails(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise RuntimeError("too late")

    server = Server([{"type": "http.disconnect"}])
    with pytest.raises(RuntimeError, match="too late"):
        await analytics(fails, collector, log_body=True)(
            http_scope("/left"), server.receive, server.send
        )
    response = only_entry(collector)["response"]
    assert (response["status"], response["bodySize"], response["bodyCaptured"]) == (0, 0, False)


@pytest.mark.anyio
async def test_the_servers_own_500_is_not_called_a_captured_empty_body(
    anyio_backend: str, collector: Collector
) -> None:
    """The app raised before answering: the server sends its own 500, whose body we never
    see, so the entry does not claim an empty body."""

    async def fails(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    server = Server()
    with pytest.raises(RuntimeError, match="boom"):
        await analytics(fails, collector, log_body=True)(
            http_scope("/boom"), server.receive, server.send
        )
    response = only_entry(collector)["response"]
    assert (response["status"], response["bodyCaptured"]) == (500, False)
    assert "content" not in response


@pytest.mark.anyio
async def test_a_chunk_the_server_refused_is_not_counted(
    anyio_backend: str, collector: Collector
) -> None:
    """Each chunk goes to the server first and is counted once ``send`` returns: the one
    whose ``send`` raised (the client is gone) is neither counted nor captured."""

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"sent", "more_body": True})
        await send({"type": "http.response.body", "body": b"refused", "more_body": False})

    def refuse(message: dict[str, Any]) -> None:
        if message.get("body") == b"refused":
            raise OSError(32, "Broken pipe")

    server = Server(on_send=refuse)
    with pytest.raises(OSError, match="Broken pipe"):
        await analytics(stream, collector, log_body=True)(
            http_scope("/gone"), server.receive, server.send
        )
    response = only_entry(collector)["response"]
    assert response["bodySize"] == 4
    # What crossed is kept, but it is not the whole body.
    assert base64.b64decode(response["content"]["text"]) == b"sent"
    assert response["bodyCaptured"] is False


@pytest.mark.anyio
async def test_disconnect_from_receive_mid_stream_yields_one_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """A Starlette stream cancelled by ``http.disconnect`` still yields exactly one entry."""

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"tick\n"
            await anyio.sleep(0.001)

    first_chunk = anyio.Event()

    def on_send(message: dict[str, Any]) -> None:
        if message.get("body"):
            first_chunk.set()

    class DisconnectingServer(Server):
        async def receive(self) -> dict[str, Any]:
            if self.script:
                return await super().receive()
            await first_chunk.wait()
            return {"type": "http.disconnect"}

    server = DisconnectingServer(on_send=on_send)
    response = StreamingResponse(endless(), media_type="text/plain")
    with anyio.fail_after(10):
        await analytics(response, collector)(http_scope("/endless"), server.receive, server.send)

    entry = only_entry(collector)
    assert entry["response"]["status"] == 200
    assert entry["response"]["bodySize"] == len(server.body())
    assert entry["response"]["bodySize"] >= 5


@pytest.mark.anyio
async def test_disconnect_before_any_response_yields_one_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """An app that returns without answering because the client left still yields one entry."""

    async def gives_up(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    server = Server([*body_messages(b"partial", 4)[:1], {"type": "http.disconnect"}])
    with anyio.fail_after(10):
        await analytics(gives_up, collector)(
            http_scope("/left", method="POST"), server.receive, server.send
        )
    assert server.sent == []

    entry = only_entry(collector)
    assert entry["request"]["bodySize"] == 4
    assert entry["response"]["bodySize"] == 0


@pytest.mark.anyio
async def test_internal_failure_never_changes_the_response(
    anyio_backend: str,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[Any],
) -> None:
    """If handing the entry over fails, the response is unchanged and the failure is logged."""

    def broken_submit(self: Worker, exchange: Any) -> bool:
        raise RuntimeError("submit exploded")

    monkeypatch.setattr(Worker, "submit", broken_submit)
    server = Server(body_messages(b"payload", 3))
    await analytics(echo_app, collector)(
        http_scope("/echo", method="POST"), server.receive, server.send
    )
    assert server.body() == b"payload"
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]
    assert len(internal_errors) == 1
    assert "could not queue an entry" in internal_errors[0].getMessage()
    internal_errors.clear()


# -- scope facts ------------------------------------------------------------------------------

SCOPE_FACTS = [
    pytest.param(
        {"client": ("203.0.113.7", 41000), "server": ("192.0.2.10", 8443)},
        {"clientIPAddress": "203.0.113.7", "serverIPAddress": "192.0.2.10"},
        id="client-and-server-addresses",
    ),
    pytest.param(
        {"client": ["2001:db8::1", 41000], "server": ["::1", 80]},
        {"clientIPAddress": "2001:db8::1", "serverIPAddress": "::1"},
        id="ipv6-as-lists",
    ),
    pytest.param(
        {"client": None, "server": None},
        {"clientIPAddress": None, "serverIPAddress": None},
        id="no-addresses",
    ),
    pytest.param({"http_version": "2"}, {"httpVersion": "HTTP/2"}, id="http2"),
    pytest.param({"http_version": "1.0"}, {"httpVersion": "HTTP/1.0"}, id="http10"),
    pytest.param(
        {
            "scheme": "https",
            "headers": [(b"host", b"api.example.com")],
            "path": "/v1/café",
            "raw_path": b"/v1/caf%C3%A9",
            "query_string": b"a=1&b=%20x",
        },
        {"url": "https://api.example.com/v1/caf%C3%A9?a=1&b=%20x"},
        id="host-header-raw-path-query",
    ),
    pytest.param(
        {"path": "/api/items", "raw_path": b"/api/items", "root_path": "/api"},
        {"url": "http://testserver/api/items"},
        id="root-path-already-in-raw-path",
    ),
    pytest.param(
        {"path": "/items", "raw_path": b"/items", "root_path": "/api"},
        {"url": "http://testserver/api/items"},
        id="root-path-stripped-by-proxy",
    ),
    pytest.param(
        {"path": "/api/caf\u00e9", "raw_path": None, "root_path": "/api"},
        {"url": "http://testserver/api/caf%C3%A9"},
        id="no-raw-path",
    ),
    pytest.param(
        # A lone surrogate in root_path (server configuration): kept as its UTF-8 bytes.
        {"path": "/\ud800/s", "raw_path": None, "root_path": "/\ud800"},
        {"url": "http://testserver/%ED%A0%80/s"},
        id="lone-surrogate-in-root-path",
    ),
    pytest.param(
        {"path": "/caf\u00e9", "raw_path": b"/caf\xe9", "query_string": b"q=\xff"},
        {"url": "http://testserver/caf%E9?q=%FF"},
        id="raw-path-and-query-not-utf8",
    ),
    pytest.param(
        {"headers": [], "server": ("10.0.0.5", 8080)},
        {"url": "http://10.0.0.5:8080/"},
        id="no-host-header",
    ),
    pytest.param(
        {"headers": [], "scheme": "https", "server": ("10.0.0.5", 443)},
        {"url": "https://10.0.0.5/"},
        id="no-host-header-default-port",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("overrides", "expected"), SCOPE_FACTS)
async def test_scope_facts(
    anyio_backend: str, collector: Collector, overrides: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Addresses, HTTP version and URL come from the ASGI scope as the server filled it in."""
    scope = http_scope()
    scope.update(overrides)
    server = Server()
    await analytics(echo_app, collector)(scope, server.receive, server.send)

    entry = only_entry(collector)
    for key, value in expected.items():
        if key in ("url", "httpVersion"):
            assert entry["request"][key] == value
            if key == "httpVersion":
                assert entry["response"][key] == value
        else:
            assert entry.get(key) == value


@pytest.mark.anyio
async def test_scope_changes_downstream_do_not_change_the_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """A router rewriting path/root_path in the scope it was given does not alter the logged URL."""

    async def router(scope: Any, receive: Any, send: Any) -> None:
        scope["path"], scope["raw_path"], scope["root_path"] = "/x", b"/x", "/mounted"
        scope["headers"][0] = (b"host", b"elsewhere")  # in place, as some middlewares do
        scope["headers"].append((b"x-added-downstream", b"1"))
        await echo_app(scope, receive, send)

    server = Server()
    await analytics(router, collector)(http_scope("/orig/path"), server.receive, server.send)
    entry = only_entry(collector)
    assert entry["request"]["url"] == "http://testserver/orig/path"
    assert [h["name"] for h in entry["request"]["headers"]] == ["host"]


@pytest.mark.anyio
async def test_body_read_after_the_response_does_not_touch_the_queued_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """An app that answers first and reads the body later gets it; the queued entry stays put."""
    later: list[bytes] = []

    async def answer_first(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"accepted"})
        later.append(await read_body(receive))

    scope = http_scope("/later", method="POST")
    scope["headers"].append((b"content-length", b"10"))
    server = Server(body_messages(b"0123456789", 2))
    with anyio.fail_after(10):
        await analytics(answer_first, collector, log_body=True)(scope, server.receive, server.send)
    assert later == [b"0123456789"]

    request = only_entry(collector)["request"]
    assert request["bodySize"] == 10  # the declared length: the app had not read it yet
    assert request["bodyCaptured"] is False
    assert "postData" not in request


@pytest.mark.anyio
async def test_non_utf8_header_bytes_are_tolerated(
    anyio_backend: str, collector: Collector
) -> None:
    """Header bytes 0x80-0xFF in requests and responses are kept as Latin-1 and passed on as is."""
    raw = bytes(range(0x80, 0x100))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (b"x-raw", raw) in scope["headers"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-out", raw)]})
        await send({"type": "http.response.body", "body": b"ok"})

    headers = [(b"host", b"testserver"), (b"x-raw", raw)]
    server = Server()
    await analytics(app, collector)(http_scope(headers=headers), server.receive, server.send)
    assert server.sent[0]["headers"] == [(b"x-out", raw)]

    entry = only_entry(collector)
    assert header_values(entry["request"]["headers"], "x-raw") == [raw.decode("latin-1")]
    assert header_values(entry["response"]["headers"], "x-out") == [raw.decode("latin-1")]
    assert entry["response"]["status"] == 200


@pytest.mark.anyio
async def test_repeated_headers_are_kept(anyio_backend: str, collector: Collector) -> None:
    """Two Set-Cookie response headers and two Accept request headers stay separate pairs."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    headers = [(b"host", b"testserver"), (b"accept", b"text/html"), (b"accept", b"*/*")]
    server = Server()
    await analytics(app, collector, default_redactions=False)(
        http_scope(headers=headers), server.receive, server.send
    )

    entry = only_entry(collector)
    assert header_values(entry["request"]["headers"], "accept") == ["text/html", "*/*"]
    assert header_values(entry["response"]["headers"], "set-cookie") == [
        "a=1; Path=/",
        "b=2; Path=/",
    ]


# -- no per-request state on the middleware ---------------------------------------------------

STATUSES = (200, 201, 202, 404, 503)


@pytest.mark.anyio
async def test_concurrent_requests_each_get_their_own_entry(
    anyio_backend: str, collector: Collector
) -> None:
    """200 interleaved requests of different bodies, statuses and sizes: one matching entry each."""
    count = 200

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ident = int(dict(scope["headers"])[b"x-id"])
        body = await read_body(receive)
        await anyio.sleep(0)
        out = b"r" * (ident * 3 + 1)
        status = STATUSES[ident % len(STATUSES)]
        await send({"type": "http.response.start", "status": status, "headers": []})
        await anyio.sleep(0)
        await send({"type": "http.response.body", "body": out[:ident], "more_body": True})
        await anyio.sleep(0)
        await send({"type": "http.response.body", "body": out[ident:] + body[:0]})

    middleware = analytics(app, collector, log_body=True)
    servers: dict[int, Server] = {}

    def threads() -> tuple[int, int]:
        """(threads other than senders, sender threads): senders are bounded by max_inflight.

        The in-process collector's thread pool ("AnyIO worker thread": it stores the batches)
        is not ours, and grows with how many POSTs arrive at once: it is left out."""
        names = [t.name for t in threading.enumerate() if t.name != "AnyIO worker thread"]
        senders = sum(name.startswith("alf-analytics-sender") for name in names)
        return len(names) - senders, senders

    before = threads()[0]

    async def one(ident: int) -> None:
        body = bytes([ident % 256]) * (ident * 7 + 1)
        server = servers[ident] = Server(body_messages(body, ident * 4 + 1))
        scope = http_scope(f"/item/{ident}", method="POST")
        scope["headers"] = [(b"host", b"testserver"), (b"x-id", str(ident).encode())]
        await middleware(scope, server.receive, server.send)

    async with anyio.create_task_group() as tasks:
        for ident in range(count):
            tasks.start_soon(one, ident)
    others, senders = threads()
    assert others <= before + 1  # at most the worker thread, no per-request ones
    assert senders <= middleware.config.max_inflight

    entries = received_entries(collector, count)
    assert len(entries) == count
    by_id = {int(header_values(e["request"]["headers"], "x-id")[0]): e for e in entries}
    assert sorted(by_id) == list(range(count))
    for ident, entry in by_id.items():
        body = bytes([ident % 256]) * (ident * 7 + 1)
        assert entry["request"]["url"] == f"http://testserver/item/{ident}"
        assert entry["request"]["bodySize"] == len(body)
        assert entry["request"]["postData"]["text"] == b64(body)
        assert entry["response"]["status"] == STATUSES[ident % len(STATUSES)]
        assert entry["response"]["bodySize"] == ident * 3 + 1
        assert servers[ident].body() == b"r" * (ident * 3 + 1)


# -- a real uvicorn ---------------------------------------------------------------------------


def wait_until_serving(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"uvicorn exited early: {process.communicate()[1]!r}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("uvicorn did not start serving in time")


def run_uvicorn(
    collector: Collector, factory: str, lifespan: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "ALF_COLLECTOR_URL": collector.url,
        "ALF_SERVICE_TOKEN": "uvicorn-token",
    }
    command = [
        sys.executable, "-m", "uvicorn", "--factory", factory,
        "--app-dir", str(TESTS.parent), "--host", "127.0.0.1", "--port", str(port),
        "--lifespan", lifespan, "--log-level", "info", "--no-access-log",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "lifespan"),
    [
        pytest.param("tests.asgi_apps:create_uvicorn_app", "on", id="starlette"),
        pytest.param(
            "tests.asgi_apps:create_uvicorn_raw_app_flushing_at_sigterm",
            "auto",
            id="raw-asgi-without-lifespan-sigterm-flush",
        ),
    ],
)
def test_uvicorn_delivers_entries_and_exits_cleanly(
    collector: Collector, factory: str, lifespan: str
) -> None:
    """Under a real uvicorn, requests are logged and SIGTERM's shutdown flushes them.

    With lifespan the lifespan shutdown flushes; an app without lifespan support gets the same
    from ``install_sigterm_flush()`` (uvicorn re-raises SIGTERM, skipping atexit).
    """
    process, base_url = run_uvicorn(collector, factory, lifespan)
    with reaped(process):
        wait_until_serving(process, base_url)
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            posted = client.post("/json", json={"hello": "uvicorn"})
            chunks = []
            with client.stream("GET", "/stream", params={"count": 20, "size": 5000}) as streamed:
                for chunk in streamed.iter_raw():
                    chunks.append(chunk)
        assert posted.status_code == 201
        assert b"".join(chunks) == b"".join(bytes([65 + i]) * 5000 for i in range(20))
        assert collector.count() == 0  # queued (delay=60) until the shutdown flush
        stderr = sigterm(process)
    # uvicorn >= 0.29 re-raises the captured SIGTERM once its graceful shutdown is complete, so
    # the process ends "killed by SIGTERM" -- without atexit handlers: the entries at the
    # collector were sent by the lifespan shutdown flush, or by the SIGTERM flush.
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert b"Finished server process" in stderr, stderr
    assert b"Traceback" not in stderr and b"ERROR" not in stderr, stderr
    assert b"alf_analytics" not in stderr, stderr  # no warning: the exit flush is in place
    if lifespan == "on":
        assert b"Application shutdown complete." in stderr, stderr

    entries = received_entries(collector, 3)
    assert {s.environment for s in collector.entries()} == {"uvicorn"}
    by_path = {e["request"]["url"].split("?")[0]: e for e in entries}
    post = by_path[f"{base_url}/json"]
    assert post["request"]["method"] == "POST"
    assert post["request"]["postData"]["text"] == b64(b'{"hello":"uvicorn"}')
    assert post["response"]["status"] == 201
    assert post["clientIPAddress"] == "127.0.0.1"
    assert post["serverIPAddress"] == "127.0.0.1"
    assert post["request"]["httpVersion"] == "HTTP/1.1"
    stream = by_path[f"{base_url}/stream"]
    assert stream["response"]["bodySize"] == 100_000
    assert stream["response"]["status"] == 200
    assert by_path[f"{base_url}/health"]["response"]["status"] == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "app",
    [
        pytest.param("create_failing_starlette", id="starlette-lifespan-raises"),
        pytest.param("create_raises_before_startup", id="raw-raises-before-startup"),
    ],
)
def test_uvicorn_startup_failure_exits_as_without_us(collector: Collector, app: str) -> None:
    """A failing lifespan startup ends uvicorn with code 3, with or without the middleware."""
    outcomes = []
    for variant in ("bare", "recorded"):
        process, _ = run_uvicorn(collector, f"tests.asgi_apps:{app}_{variant}", "on")
        with reaped(process):
            _, stderr = process.communicate(timeout=30)
        assert b"Application startup failed. Exiting." in stderr, stderr
        outcomes.append(process.returncode)
    assert outcomes == [3, 3]


@pytest.mark.slow
def test_a_bad_option_through_add_middleware_is_logged_at_uvicorns_startup(
    collector: Collector,
) -> None:
    """Starlette builds add_middleware's middleware at the lifespan startup, which uvicorn's
    --lifespan auto swallows: the error is logged there by us, and requests show it too."""
    process, base_url = run_uvicorn(
        collector, "tests.asgi_apps:create_fastapi_with_a_bad_option", "auto"
    )
    with reaped(process):
        status = None
        deadline = time.monotonic() + 30
        while status is None and time.monotonic() < deadline and process.poll() is None:
            try:  # every request fails: wait for any answer, not a /health 200
                status = httpx.get(f"{base_url}/anything", timeout=1.0).status_code
            except httpx.TransportError:
                time.sleep(0.05)
        assert status == 500
        stderr = sigterm(process)
    message = b"alf_analytics: option sample_rate=5 is invalid: must be between 0 and 1"
    startup = stderr.partition(b"Application startup complete")[0]
    assert message in startup, stderr


@pytest.mark.slow
def test_uvicorn_without_lifespan_warns_once_that_the_exit_flush_cannot_run(
    collector: Collector,
) -> None:
    """--lifespan off and no SIGTERM flush: one warning, at the first request, with the fix."""
    process, base_url = run_uvicorn(collector, "tests.asgi_apps:create_uvicorn_app", "off")
    with reaped(process):
        wait_until_serving(process, base_url)
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            for _ in range(3):
                assert client.get("/health").status_code == 200
        stderr = sigterm(process)
    assert stderr.count(b"alf_analytics: no ASGI lifespan") == 1, stderr
    assert b"install_sigterm_flush()" in stderr, stderr
