"""Shared scenario data and the sink client used by every benchmark process.

Every variant sees exactly the same request: the same path, query string, ten typical
headers and bodies, so differences between variants are the middleware's own cost.  The
sink client is deliberately tiny (one raw HTTP/1.0 request on a fresh socket) because the
benchmark processes call it while their CPU time is being measured.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"

SERVICE_TOKEN = "bench-service-token"
# Fake credentials in the formats the peers validate (they never leave loopback).
APITALLY_WRITE_TOKEN = "apt_" + "0123456789abcdefABCDEF01"
MOESIF_APPLICATION_ID = "bench-moesif-application-id"
README_API_KEY = "rdme_bench_api_key"
API_ANALYTICS_KEY = "00000000-0000-4000-8000-000000000000"

GET_PATH = "/items/42"
QUERY_STRING = "q=running+shoes&page=2&sort=price&limit=20&fields=id%2Cname"
POST_PATH = "/echo"
STREAM_PATH = "/stream"

STREAM_CHUNK = 64 * 1024
STREAM_CHUNKS = 16  # 1 MiB in all
# ASCII so that peers which decode every chunk as UTF-8 (readme-metrics WSGI) still work.
STREAM_CHUNK_BYTES = b"x" * STREAM_CHUNK

SMALL_JSON = {"id": 42, "name": "widget", "price": 9.99, "tags": ["a", "b"], "in_stock": True}


def make_json_body(size: int, seed: str, secrets: bool = False) -> bytes:
    """A JSON object of exactly ``size`` bytes (array of records, padded in a string).

    With ``secrets`` it also carries two keys the default body redaction matches
    (``password`` at the top, ``token`` inside a nested object), as a login or
    account-update request would, so the redaction benchmark has something to redact.
    """
    items = [{"id": i, "name": f"{seed}-{i}", "qty": i % 7, "ok": i % 2 == 0} for i in range(40)]
    doc: dict[str, Any] = {"items": items, "pad": ""}
    if secrets:
        doc = {"user": "bench", "password": "hunter2", "auth": {"token": "t0k3n"}, **doc}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if len(raw) > size:
        raise ValueError("base document larger than requested size")
    doc["pad"] = "p" * (size - len(raw))
    out = json.dumps(doc, separators=(",", ":")).encode()
    assert len(out) == size
    return out


REQUEST_BODY_4K = make_json_body(4096, "req", secrets=True)
RESPONSE_BODY_4K = make_json_body(4096, "rsp")

# About ten headers a browser or API client sends; lower-case as ASGI wants them.
COMMON_HEADERS: list[tuple[str, str]] = [
    ("host", "api.example.test"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench-client/1.0"),
    ("accept", "application/json, text/plain, */*"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-language", "en-GB,en;q=0.9"),
    ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTQyIn0.c2lnbmF0dXJl"),
    ("x-request-id", "5f0c6e4e-9b1a-4c1e-8f5e-2b7d9f1c3a10"),
    ("x-forwarded-for", "203.0.113.7"),
    ("cookie", "session=abc123; theme=dark"),
    ("connection", "keep-alive"),
]


def request_headers(scenario: str) -> list[tuple[str, str]]:
    """The request headers for a scenario (POST adds content type and length)."""
    headers = list(COMMON_HEADERS)
    if scenario == "post":
        headers.append(("content-type", "application/json"))
        headers.append(("content-length", str(len(REQUEST_BODY_4K))))
    return headers


@dataclass(frozen=True)
class Scenario:
    """One request shape: method, path, query, body, and whether bodies are captured."""

    name: str
    method: str
    path: str
    query: str
    body: bytes
    bodies: bool
    label: str


SCENARIOS: dict[str, Scenario] = {
    "get": Scenario("get", "GET", GET_PATH, QUERY_STRING, b"", False, "GET, bodies off"),
    "post": Scenario("post", "POST", POST_PATH, "", REQUEST_BODY_4K, True, "POST 4 KiB, bodies on"),
    "stream": Scenario("stream", "GET", STREAM_PATH, "", b"", True, "stream 1 MiB, bodies on"),
}
# Only for the memory pass of the stream scenario: the same, four times longer.
STREAM_4MIB = Scenario("stream4", "GET", STREAM_PATH, "mib=4", b"", True, "stream 4 MiB")


class SinkClient:
    """Reads the loopback sink's counters (``GET /__stats``)."""

    def __init__(self, url: str) -> None:
        rest = url.split("://", 1)[1]
        host, _, port = rest.partition(":")
        self.addr = (host, int(port.split("/", 1)[0]))

    def stats(self) -> dict[str, Any]:
        with socket.create_connection(self.addr, timeout=5) as sock:
            sock.sendall(b"GET /__stats HTTP/1.0\r\nHost: sink\r\n\r\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]

    def totals(self) -> tuple[int, int, int]:
        """(requests, wire bytes, events) received so far, over all paths.

        Events are ALF entries for us and one per reported request for the peers.
        """
        s = self.stats()
        return s["requests"], s["bytes"], s["events"]

    def wait_events(self, target: int, timeout: float) -> bool:
        """Wait until at least ``target`` events arrived in total."""
        deadline = time.monotonic() + timeout
        while True:
            if self.totals()[2] >= target:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def wait_quiet(self, quiet: float, timeout: float) -> tuple[int, int, int]:
        """Wait until the counters stop moving for ``quiet`` seconds; return them."""
        deadline = time.monotonic() + timeout
        last = self.totals()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.totals()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last
