"""Loopback sink: the collector every variant sends to during the benchmark.

A small asyncio HTTP/1.1 server (keep-alive, Content-Length and chunked bodies) that
accepts any request on any path and answers 200 with a body each client accepts: the ALF
collector answer for our ``/1.1.0/batch``, an empty protobuf body for OTLP ``/v1/*``
exports, ``[]`` for Moesif's governance rules and ``{}`` for everything else.  It counts
requests, bytes on the wire and, for ALF batches, the entries (gzip is decompressed and
``har.log.entries`` counted), so a benchmark process can wait until the sink has received
everything it produced.  ``GET /__stats`` returns the counters as JSON.

For the peers it counts "events" the same way (one per request they report): Moesif
events in ``/v1/events/batch``, readme-metrics logs in ``/v1/request``, api-analytics
requests in ``/api/log-request`` and OTLP SERVER spans in ``/v1/traces`` (OpenTelemetry
and apitally), so a variant can wait for exactly what it produced.

It runs in its own process so its CPU time is never charged to the variant measured.
It stops by itself after ``--max-seconds``.

``--latency SECONDS`` delays the answer to every ALF batch POST (the collector "far away"
of the delivery benchmark) without blocking other connections: each connection waits in
its own task, so POSTs sent at once are answered at once after the delay.  The counters
include ``first_entry_at``/``last_entry_at`` (``time.monotonic()``, one clock for every
process on Linux) so a client can compute the rate at which entries arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

ALF_REPLY_TEMPLATE = '{{"errors":[],"sent":{n},"saved":{n}}}'


class Counters:
    """What the sink has received so far."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.entries = 0
        self.events = 0
        self.alf_batches = 0
        self.alf_raw_bytes = 0
        self.parse_errors = 0
        self.first_entry_at = 0.0
        self.last_entry_at = 0.0
        self.concurrent = 0
        self.max_concurrent = 0
        self.by_path: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "bytes": self.bytes,
                "entries": self.entries,
                "events": self.events,
                "alf_batches": self.alf_batches,
                "alf_raw_bytes": self.alf_raw_bytes,
                "parse_errors": self.parse_errors,
                "first_entry_at": self.first_entry_at,
                "last_entry_at": self.last_entry_at,
                "max_concurrent": self.max_concurrent,
                "by_path": self.by_path,
            }
        ).encode()


def count_alf_entries(doc: Any) -> int:
    """Entries in an ALF document or a list of them (ALF 1.x batch)."""
    if isinstance(doc, list):
        return sum(count_alf_entries(d) for d in doc)
    if isinstance(doc, dict):
        if "har" in doc:
            return len(doc["har"]["log"]["entries"])
        if "log" in doc:
            return len(doc["log"]["entries"])
    raise ValueError("not an ALF document")


def count_otlp_server_spans(raw: bytes) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    req = ExportTraceServiceRequest()
    req.ParseFromString(raw)  # concatenated messages (apitally's spool files) merge
    server = 2  # SpanKind.SPAN_KIND_SERVER
    return sum(
        1
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
        if span.kind == server
    )


try:  # the sink shares the machine with the server measured: parse with as little CPU as it can
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - a benchmark venv without orjson
    _loads = json.loads


def count_events(path: str, raw: bytes, is_alf: bool) -> int:
    """Requests reported by one POST, whatever the sender's format."""
    if is_alf:
        return count_alf_entries(_loads(raw))
    if path == "/v1/traces":
        return count_otlp_server_spans(raw)
    if path in ("/v1/events/batch", "/v1/request"):
        doc = _loads(raw)
        return len(doc) if isinstance(doc, list) else 1
    if path == "/api/log-request":
        return len(_loads(raw)["requests"])
    return 0


def decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


class Sink:
    def __init__(self, latency: float = 0.0) -> None:
        self.c = Counters()
        self.latency = latency

    def delays(self, method: str, path: str) -> bool:
        """Whether this request's answer waits ``latency`` (ALF batch POSTs only)."""
        return bool(self.latency) and method == "POST" and path.rstrip("/").endswith("/batch")

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """Count one request; return the full HTTP response."""
        if path == "/__stats":
            return response(200, self.c.as_json(), "application/json")
        c = self.c
        c.requests += 1
        c.bytes += len(body)
        per = c.by_path[path.split("?", 1)[0]]
        per[0] += 1
        per[1] += len(body)
        ctype = "application/json"
        bare = path.split("?", 1)[0]
        is_alf = method == "POST" and bare.rstrip("/").endswith("/batch") and "/v1/" not in bare
        if method == "POST":
            try:
                raw = decode_body(body, headers.get("content-encoding", ""))
                n = count_events(bare, raw, is_alf)
                if is_alf:
                    c.alf_raw_bytes += len(raw)
                    c.alf_batches += 1
                    c.entries += n
                    now = time.monotonic()
                    c.first_entry_at = c.first_entry_at or now
                    c.last_entry_at = now
                c.events += n
            except Exception:
                c.parse_errors += 1
                n = 0
        if is_alf:
            payload = ALF_REPLY_TEMPLATE.format(n=n).encode()
        elif bare in ("/v1/traces", "/v1/logs", "/v1/metrics"):
            payload, ctype = b"", "application/x-protobuf"
        elif path.startswith("/v1/rules"):
            payload = b"[]"
        else:
            payload = b"{}"
        return response(200, payload, ctype)

    async def serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, version = (lines[0].split(" ") + ["", ""])[:3]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await read_body(reader, headers)
                if self.delays(method, path):
                    c = self.c
                    c.concurrent += 1
                    c.max_concurrent = max(c.max_concurrent, c.concurrent)
                    try:
                        await asyncio.sleep(self.latency)  # counted when answered
                    finally:
                        c.concurrent -= 1
                out = self.handle(method, path, headers, body)
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                if close:
                    out = out.replace(b"Connection: keep-alive", b"Connection: close", 1)
                writer.write(out)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # (no trailers expected)
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return b"".join(parts)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def response(status: int, payload: bytes, ctype: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} OK\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + payload


async def main_async(port: int, port_file: str | None, max_seconds: float, latency: float) -> None:
    sink = Sink(latency)
    server = await asyncio.start_server(sink.serve_conn, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(bound))
        os.replace(tmp, port_file)
    async with server:
        try:
            await asyncio.wait_for(server.serve_forever(), timeout=max_seconds)
        except asyncio.TimeoutError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each batch answer")
    a = p.parse_args()
    asyncio.run(main_async(a.port, a.port_file, a.max_seconds, a.latency))


if __name__ == "__main__":
    main()


class SinkProcess:
    """Start the sink in a child process; ``url`` is where variants send."""

    def __init__(self, python: str, tmpdir: str, latency: float = 0.0) -> None:
        import subprocess
        import sys

        os.makedirs(tmpdir, exist_ok=True)
        port_file = os.path.join(tmpdir, f"sink-{os.getpid()}-{time.monotonic_ns()}.port")
        cmd = [python or sys.executable, os.path.abspath(__file__), "--port-file", port_file]
        if latency:
            cmd += ["--latency", str(latency)]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 15
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sink did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            self.port = int(f.read())
        os.unlink(port_file)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()


@contextlib.contextmanager
def running_sink(url: str | None, latency: float = 0.0) -> Iterator[str]:
    """``url`` if given, else the URL of a sink started here for as long as the block runs.

    Lets every benchmark script run on its own (``--sink`` omitted), exactly as the report
    prints its command.
    """
    if url:
        yield url
        return
    import sys
    import tempfile

    sink = SinkProcess(sys.executable, tempfile.gettempdir(), latency)
    try:
        yield sink.url
    finally:
        sink.stop()
