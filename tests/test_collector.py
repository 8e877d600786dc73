"""The reference collector and its CLI, over real loopback HTTP (no mocks).

Every test that stores or reads runs twice through ``collector_db`` (:mod:`tests.pg`): on
in-memory SQLite and on a fresh schema of a real PostgreSQL server, the app under uvicorn.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import select
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from alf_analytics.cli import main
from alf_analytics.collector import Collector, CollectorError, Limits
from alf_analytics.collector.storage import hash_key
from tests.pg import collector_db, pg_server
from tests.servers import reaped, sigterm

__all__ = ["collector_db", "pg_server"]  # fixtures, imported for pytest

FIXTURES = Path(__file__).parent / "fixtures" / "alf"
SRC = Path(__file__).resolve().parents[1] / "src"
VERSIONS = ("1.0.0", "1.1.0")


def load(version: str, name: str) -> Any:
    return json.loads((FIXTURES / version / name).read_text("utf-8"))


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODINGS: dict[str, tuple[str | None, Callable[[bytes], bytes]]] = {
    "plain": (None, lambda data: data),
    "gzip": ("gzip", gzip.compress),
    "deflate-zlib": ("deflate", zlib.compress),
    "deflate-raw": ("deflate", raw_deflate),
}


def make_alf(
    entries: list[tuple[str, str, int, float]],
    *,
    token: str = "token-a",
    environment: str | None = None,
) -> dict[str, Any]:
    """A valid ALF 1.1.0 with one entry per (method, url, status, time_ms)."""
    template = load("1.1.0", "minimal.json")
    base_entry = template["har"]["log"]["entries"][0]
    alf = {"version": "1.1.0", "serviceToken": token, "har": template["har"]}
    if environment is not None:
        alf["environment"] = environment
    built = []
    for method, url, status, time_ms in entries:
        entry = copy.deepcopy(base_entry)
        entry["request"]["method"] = method
        entry["request"]["url"] = url
        entry["response"]["status"] = status
        entry["time"] = time_ms
        built.append(entry)
    alf["har"] = {"log": {"creator": template["har"]["log"]["creator"], "entries": built}}
    return alf


def as_stored(alf: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`Collector.alfs` gives back for ``alf``: the collector stores entries with
    their envelope (token, environment, creator, 1.0.0 client address), not the document."""
    stored: dict[str, Any] = {"version": alf["version"], "serviceToken": alf["serviceToken"]}
    if "environment" in alf:
        stored["environment"] = alf["environment"]
    entries = alf["har"]["log"]["entries"]
    own_address = all("clientIPAddress" in entry for entry in entries)
    if alf["version"] == "1.0.0" and alf.get("clientIPAddress") and not own_address:
        stored["clientIPAddress"] = alf["clientIPAddress"]
    log = alf["har"]["log"]
    stored["har"] = {"log": {"creator": log["creator"], "entries": log["entries"]}}
    return stored


@pytest.fixture
def collector(collector_db: str) -> Iterator[Collector]:
    with Collector(collector_db) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        yield http


def post(
    client: httpx.Client,
    url: str,
    payload: Any,
    *,
    encoding: str = "plain",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content_encoding, compress = ENCODINGS[encoding]
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if content_encoding:
        all_headers["Content-Encoding"] = content_encoding
    body = compress(json.dumps(payload).encode("utf-8"))
    return client.post(url, content=body, headers=all_headers)


# --- valid fixtures --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("kind", "fixture"), [("single", "full.json"), ("batch", "multi.json")])
def test_valid_fixtures_are_accepted_and_stored(
    collector: Collector,
    client: httpx.Client,
    version: str,
    kind: str,
    fixture: str,
    encoding: str,
) -> None:
    payload = load(version, fixture)
    alfs = payload if isinstance(payload, list) else [payload]
    expected_entries = [e for alf in alfs for e in alf["har"]["log"]["entries"]]

    response = post(client, collector.endpoint(version, kind), payload, encoding=encoding)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"errors": [], "sent": len(alfs), "saved": len(alfs), "refused": 0}
    assert collector.count() == len(expected_entries)
    stored = collector.entries()
    assert [s.entry for s in stored] == expected_entries
    for s, alf, entry in zip(
        stored, [a for a in alfs for _ in a["har"]["log"]["entries"]], expected_entries, strict=True
    ):
        assert s.alf_version == version
        assert s.service_token == alf["serviceToken"]
        assert s.environment == alf.get("environment")
        assert s.creator == alf["har"]["log"]["creator"]
        assert s.method == entry["request"]["method"]
        assert s.url == entry["request"]["url"]
        assert s.status == entry["response"]["status"]
        assert s.time_ms == entry["time"]
    assert collector.alfs() == [as_stored(alf) for alf in alfs]
    [record] = collector.requests()
    assert record.endpoint == f"/{version}/{kind}"
    assert record.content_encoding == ENCODINGS[encoding][0]
    assert (record.status, record.alf_count, record.saved_count) == (200, len(alfs), len(alfs))
    assert record.entry_count == len(expected_entries)
    assert record.body_bytes == len(json.dumps(payload).encode())
    assert record.wire_bytes == len(ENCODINGS[encoding][1](json.dumps(payload).encode()))


def test_full_fixtures_store_token_environment_and_columns(
    collector: Collector, client: httpx.Client
) -> None:
    assert post(
        client, collector.endpoint("1.0.0", "single"), load("1.0.0", "full.json")
    ).is_success
    assert post(
        client, collector.endpoint("1.1.0", "single"), load("1.1.0", "full.json")
    ).is_success
    old, new = collector.entries()
    assert (old.service_token, old.environment) == ("<my service token>", "PRODUCTION")
    assert old.client_ip_address == "::1"  # on the ALF root in 1.0.0
    assert new.client_ip_address == "10.10.10.20"  # on the entry in 1.1.0
    assert new.path == "/request" and new.url == "https://mockbin.org/request"
    assert new.request_body_size == 25 and new.response_body_size == 25
    assert collector.entries(alf_version="1.0.0") == [old]
    assert collector.entries(environment="PRODUCTION") == [old, new]
    assert collector.entries(environment=None) == []


# --- invalid payloads ------------------------------------------------------------------------


INVALID = [
    (version, path.name)
    for version in VERSIONS
    for path in sorted((FIXTURES / version / "invalid").glob("*.json"))
    if path.name != "multi.json"
]


@pytest.mark.parametrize(("version", "name"), INVALID)
def test_invalid_fixtures_are_rejected(
    collector: Collector, client: httpx.Client, version: str, name: str
) -> None:
    response = post(client, collector.endpoint(version, "single"), load(version, f"invalid/{name}"))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["sent"] == 1 and body["saved"] == 0
    [error] = body["errors"]
    assert re.fullmatch(r"ALF\[0\] (entry\[\d+\] )?\$[^ ]*: .+", error), error
    assert collector.count() == 0
    assert collector.requests()[0].status == 400


def test_invalid_fixture_messages_name_the_problem(
    collector: Collector, client: httpx.Client
) -> None:
    url = collector.endpoint("1.1.0", "single")
    errors = {
        name: post(client, url, load("1.1.0", f"invalid/{name}.json")).json()["errors"][0]
        for name in ("bodysize", "properties", "service")
    }
    assert errors == {
        "bodysize": "ALF[0] entry[0] $.request.bodySize: -1 is less than the minimum of 0",
        "properties": "ALF[0] $: Additional properties are not allowed ('foo' was unexpected)",
        "service": 'ALF[0] $: "serviceToken" is a required property',
    }


def test_upstream_mixed_batch_fixture_is_a_207(collector: Collector, client: httpx.Client) -> None:
    payload = load("1.0.0", "invalid/multi.json")
    response = post(client, collector.endpoint("1.0.0", "batch"), payload)
    assert response.status_code == 207
    assert response.json() == {
        "errors": ['ALF[1] $: "version" is a required property'],
        "sent": 2,
        "saved": 1,
        "refused": 1,
    }
    assert collector.alfs() == [as_stored(payload[0])]


def test_mixed_batch_stores_only_valid_alfs(collector: Collector, client: httpx.Client) -> None:
    good_a = make_alf([("GET", "http://api.test/a", 200, 1)], token="token-a")
    good_b = make_alf([("GET", "http://api.test/b", 200, 2)], token="token-b", environment="qa")
    batch = [
        good_a,
        load("1.1.0", "invalid/bodysize.json"),
        good_b,
        load("1.1.0", "invalid/service.json"),
        "not an object",
    ]
    response = post(client, collector.endpoint("1.1.0", "batch"), batch, encoding="gzip")
    assert response.status_code == 207
    body = response.json()
    assert (body["sent"], body["saved"]) == (5, 2)
    assert [e.split(" ", 1)[0] for e in body["errors"]] == ["ALF[1]", "ALF[3]", "ALF[4]"]
    assert "bodySize" in body["errors"][0] and "serviceToken" in body["errors"][1]
    assert collector.alfs() == [as_stored(good_a), as_stored(good_b)]
    assert [(e.service_token, e.environment, e.path) for e in collector.entries()] == [
        ("token-a", None, "/a"),
        ("token-b", "qa", "/b"),
    ]
    assert collector.entries(service_token="token-b")[0].path == "/b"
    assert collector.entries(environment=None)[0].path == "/a"
    [record] = collector.requests()
    assert (record.status, record.alf_count, record.saved_count, record.entry_count) == (
        207,
        5,
        2,
        2,
    )
    assert record.errors == tuple(body["errors"])


def test_batch_where_every_alf_is_invalid_is_a_400(
    collector: Collector, client: httpx.Client
) -> None:
    batch = [load("1.1.0", "invalid/bodysize.json"), load("1.1.0", "invalid/properties.json")]
    response = post(client, collector.endpoint("1.1.0", "batch"), batch)
    assert response.status_code == 400
    assert response.json()["sent"] == 2 and response.json()["saved"] == 0
    assert len(response.json()["errors"]) == 2
    assert collector.count() == 0


def test_version_must_match_the_endpoint(collector: Collector, client: httpx.Client) -> None:
    response = post(client, collector.endpoint("1.1.0", "single"), load("1.0.0", "minimal.json"))
    assert response.status_code == 400
    assert response.json()["errors"] == [
        "ALF[0] $.version '1.0.0' does not match the endpoint version '1.1.0'"
    ]


def test_error_messages_stay_short_and_hide_the_document(
    collector: Collector, client: httpx.Client
) -> None:
    alf = make_alf([("GET", "http://api.test/", 200, 1)], token="super-secret-token-123")
    alf["har"]["log"]["entries"] = {"huge": "x" * 50_000}
    response = post(client, collector.endpoint("1.1.0", "single"), alf)
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert len(error) < 200, error
    assert "super-secret" not in error and "xxxxxxxxxx" not in error
    assert error.startswith("ALF[0] $.har.log.entries: the object is not of type"), error


@pytest.mark.parametrize(
    ("field", "value"),
    [("status", 10**20), ("status", -(10**20)), ("bodySize", 10**30), ("headersSize", 2**64)],
)
def test_an_integer_beyond_64_bits_is_out_of_range_not_a_float(
    collector: Collector, client: httpx.Client, field: str, value: int
) -> None:
    """The parser reads such an integer as a float: the answer must not call it one."""
    alf = make_alf([("GET", "http://api.test/big", 200, 1)])
    alf["har"]["log"]["entries"][0]["response"][field] = value
    response = post(client, collector.endpoint("1.1.0", "single"), alf)
    assert response.status_code == 400
    assert response.json()["errors"] == [
        f"ALF[0] entry[0] $.response.{field}: the integer is out of range"
    ]
    assert collector.entries() == []


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        ("/1.1.0/single", b"not json", {}, "body is not valid JSON"),
        ("/1.1.0/single", b'{"a": NaN}', {}, "body is not valid JSON"),
        ("/1.1.0/single", b"", {}, "body is empty"),
        ("/1.1.0/single", '{"é": 1}'.encode("latin-1"), {}, "not valid UTF-8"),
        ("/1.1.0/single", b"[]", {}, "expected an ALF object, got a JSON array"),
        ("/1.1.0/batch", b"{}", {}, "expected a JSON array of ALF objects, got object"),
        ("/1.1.0/batch", b"[]", {}, "the batch holds no ALF object"),
        ("/1.0.0/batch", gzip.compress(b"[{}]"), {}, "compressed but no Content-Encoding"),
        ("/1.0.0/batch", zlib.compress(b"[{}]"), {}, "compressed but no Content-Encoding"),
        ("/1.1.0/batch", b"[{}]", {"Content-Encoding": "gzip"}, "invalid gzip body"),
        ("/1.1.0/batch", gzip.compress(b"[{}]")[:-6], {"Content-Encoding": "gzip"}, "truncated"),
        ("/1.1.0/batch", b"\x00\x01garbage", {"Content-Encoding": "deflate"}, "invalid deflate"),
    ],
    ids=[
        "not-json",
        "nan",
        "empty",
        "latin-1",
        "array-to-single",
        "object-to-batch",
        "empty-batch",
        "gzip-without-header",
        "zlib-without-header",
        "not-gzip",
        "truncated-gzip",
        "not-deflate",
    ],
)
def test_malformed_bodies_are_400(
    collector: Collector,
    client: httpx.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    message: str,
) -> None:
    response = client.post(collector.url + path, content=body, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body_json = response.json()
    assert body_json["saved"] == 0
    [error] = body_json["errors"]
    assert message in error
    assert collector.requests()[0].status == 400
    # The connection stays usable after an error.
    assert client.get(collector.url + "/health").json() == {"status": "ok"}


def test_unknown_content_encoding_is_415(collector: Collector, client: httpx.Client) -> None:
    response = client.post(
        collector.endpoint("1.1.0", "single"), content=b"{}", headers={"Content-Encoding": "br"}
    )
    assert response.status_code == 415
    assert "br" in response.json()["errors"][0]


# --- limits ----------------------------------------------------------------------------------


def test_body_over_max_body_bytes_is_413(collector_db: str, client: httpx.Client) -> None:
    with Collector(collector_db, max_body_bytes=2_000) as small:
        url = small.endpoint("1.1.0", "batch")
        big = [make_alf([("GET", f"http://api.test/{i}", 200, 1) for i in range(20)])]
        assert len(json.dumps(big)) > 2_000
        response = post(client, url, big)
        assert response.status_code == 413
        assert "exceeds the limit of 2000 bytes" in response.json()["errors"][0]
        chunked = client.post(url, content=iter([json.dumps(big).encode()] * 2))
        assert chunked.status_code == 413
        # A compressed body is measured on the wire: this one fits.
        assert post(client, url, big, encoding="gzip").status_code == 200
        assert [r.status for r in small.requests()] == [413, 413, 200]
        assert small.requests()[0].wire_bytes == 0  # refused on its Content-Length, unread
        assert small.count() == 20


def test_zip_bomb_is_413(collector_db: str, client: httpx.Client) -> None:
    with Collector(collector_db, limits=Limits(max_decompressed_bytes=100_000)) as small:
        bomb = gzip.compress(b"[" + b" " * 5_000_000 + b"]")
        assert len(bomb) < 10_000
        response = client.post(
            small.endpoint("1.1.0", "batch"), content=bomb, headers={"Content-Encoding": "gzip"}
        )
        assert response.status_code == 413
        assert "decompressed body exceeds" in response.json()["errors"][0]


def realistic_entry(index: int = 0) -> dict[str, Any]:
    """An entry as agents send it: the minimal fixture's, with a consumer, a query string and
    two more headers (about 65 commas and colons, some inside strings; under 800 bytes, so
    that 10,000 fit in --max-decompressed-bytes)."""
    started = datetime(2026, 1, 2, 3, 4, 5, index % 1000 * 1000, tzinfo=timezone.utc)
    entry = entry_at("GET", f"https://api.test/v1/items/{index}?a=1,2", 200, 12.5, started)
    entry["request"]["headers"] += [
        {"name": "user-agent", "value": "client/1.2"},
        {"name": "x-alf-consumer", "value": "billing"},
    ]
    return entry


def test_max_entries_realistic_entries_in_one_request_are_accepted(
    collector_db: str, client: httpx.Client
) -> None:
    """The default --max-entries (10,000) is reachable: the cheap count of JSON values before
    parsing allows 100 commas and colons per entry, not a fixed 500,000 that ~8,000
    realistic entries already went over; beyond it the 413 says what to change."""
    entry = realistic_entry()
    data = json.dumps(entry, separators=(",", ":")).encode()
    assert 55 < data.count(b",") + data.count(b":") < 100 and len(data) < 800
    with Collector(collector_db) as running:
        url = running.endpoint("1.1.0", "single")
        body = gzip.compress(json.dumps(alf_of([entry] * 10_000), separators=(",", ":")).encode())
        answer = client.post(url, content=body, headers={"Content-Encoding": "gzip"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"errors": [], "sent": 1, "saved": 1, "refused": 0}
        assert running.count() == 10_000
        limits = Limits()
        assert limits.max_entries == 10_000 and limits.max_json_values == 1_000_000
        assert Limits(max_entries=100).max_json_values == 500_000  # never below the old bound
        # More separators than 100 per allowed entry: refused before parsing, nothing stored.
        padded = copy.deepcopy(entry)
        padded["request"]["headers"].append({"name": "x-list", "value": "," * 40})
        body = gzip.compress(json.dumps(alf_of([padded] * 10_000), separators=(",", ":")).encode())
        answer = client.post(url, content=body, headers={"Content-Encoding": "gzip"})
        assert answer.status_code == 413, answer.text
        message = answer.json()["errors"][0]
        assert "more than 1000000 JSON values" in message and "--max-entries" in message
        assert running.count() == 10_000


def test_a_batch_of_more_than_1000_one_entry_alf_objects_is_accepted(
    collector_db: str, client: httpx.Client
) -> None:
    """The Java agent sends one entry per ALF object: a /batch of 1,001 of them is 1,001
    entries, within --max-entries; ALF objects are bounded by --max-entries, not by 1,000."""
    with Collector(collector_db, limits=Limits(max_entries=1_200)) as running:
        url = running.endpoint("1.1.0", "batch")
        batch = [alf_of([realistic_entry(i)]) for i in range(1_001)]
        answer = post(client, url, batch, encoding="gzip")
        assert answer.status_code == 200, answer.text
        assert answer.json()["saved"] == 1_001 and running.count() == 1_001
        # ALF objects without entries (1.0.0 allows them) are bounded by --max-entries too.
        empty = [alf_of([]) for _ in range(1_201)]
        for alf in empty:
            alf["version"] = "1.0.0"
        answer = post(client, running.endpoint("1.0.0", "batch"), empty, encoding="gzip")
        assert answer.status_code == 413, answer.text
        assert "more than 1200 ALF objects" in answer.json()["errors"][0]
        assert running.count() == 1_001


def test_sizes_of_exactly_2_to_the_53_are_accepted(collector_db: str, client: httpx.Client) -> None:
    """ "Sizes may be -1 to 2^53": 2^53 itself is accepted, 2^53 + 1 refused, naming the value."""
    with Collector(collector_db) as running:
        url = running.endpoint("1.1.0", "single")
        for part in ("request", "response"):
            for key in ("bodySize", "headersSize"):
                entry = realistic_entry()
                entry[part][key] = 2**53
                answer = post(client, url, alf_of([entry]))
                assert answer.status_code == 200, (part, key, answer.text)
                entry[part][key] = 2**53 + 1
                answer = post(client, url, alf_of([entry]))
                assert answer.status_code == 400, (part, key, answer.text)
                assert f"$.{part}.{key} is out of range (-1..2^53)" in answer.text
        assert running.count() == 4
        stored = running.entries()
        assert {e.request_body_size for e in stored} >= {2**53}


# --- routing ---------------------------------------------------------------------------------


# "/" is the dashboard (GET only: POST is a 405).
@pytest.mark.parametrize("path", ["/2.0.0/single", "/1.1.0/single/", "/1.1.0", "/single"])
def test_unknown_paths_are_404(collector: Collector, client: httpx.Client, path: str) -> None:
    response = client.post(collector.url + path, content=b"{}")
    assert response.status_code == 404
    assert response.json()["errors"] == [f"no such endpoint: {path}"]
    assert client.get(collector.url + path).status_code == 404


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods_on_endpoints_are_405(
    collector: Collector, client: httpx.Client, method: str
) -> None:
    response = client.request(method, collector.endpoint("1.1.0", "single"))
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert collector.requests()[0].method == method


def test_health(collector: Collector, client: httpx.Client) -> None:
    response = client.get(collector.url + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert client.post(collector.url + "/health", content=b"{}").status_code == 405
    assert collector.requests() == []


def test_query_string_is_ignored_in_routing(collector: Collector, client: httpx.Client) -> None:
    url = collector.endpoint("1.1.0", "single") + "?source=test"
    assert post(client, url, load("1.1.0", "minimal.json")).status_code == 200
    assert collector.requests()[0].endpoint == "/1.1.0/single"


# --- transfer ---------------------------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response from a raw socket: (status line and headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head, body


def test_expect_100_continue(collector: Collector) -> None:
    payload = json.dumps(load("1.1.0", "minimal.json")).encode()
    request = (
        "POST /1.1.0/single HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: {}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        sock.sendall(request.format(5_000_000).encode())
        head, body = _read_response(sock)  # answered before any body byte is sent
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"exceeds the limit" in body
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        sock.sendall(request.format(len(payload)).encode())
        head, _ = _read_response(sock)
        assert head.startswith(b"HTTP/1.1 100 ")
        sock.sendall(payload)
        head, body = _read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body) == {"errors": [], "sent": 1, "saved": 1, "refused": 0}
    assert [r.status for r in collector.requests()] == [413, 200]


def test_bodies_of_refused_requests_are_drained(collector: Collector) -> None:
    payload = json.dumps(load("1.1.0", "minimal.json")).encode()
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        for path in ("/nowhere", "/1.1.0/single"):
            request = f"POST {path} HTTP/1.1\r\nHost: c\r\nContent-Length: {len(payload)}\r\n\r\n"
            sock.sendall(request.encode() + payload)
            head, _ = _read_response(sock)
            assert head.split(b" ")[1] == (b"404" if path == "/nowhere" else b"200")
            assert b"connection: close" not in head.lower()


def test_chunked_upload(collector: Collector, client: httpx.Client) -> None:
    data = gzip.compress(json.dumps(load("1.1.0", "multi.json")).encode())

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 100):
            yield data[start : start + 100]

    response = client.post(
        collector.endpoint("1.1.0", "batch"),
        content=chunks(),
        headers={"Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert collector.count() == 2
    [record] = collector.requests()
    assert record.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in record.headers
    assert record.wire_bytes == len(data)


def test_keep_alive_connection_serves_many_requests(
    collector: Collector, client: httpx.Client
) -> None:
    url = collector.endpoint("1.1.0", "single")
    for i in range(20):
        alf = make_alf([("GET", f"http://api.test/{i}", 200, i)])
        assert post(client, url, alf).status_code == 200
    assert [e.path for e in collector.entries()] == [f"/{i}" for i in range(20)]


def test_concurrent_clients(collector: Collector) -> None:
    url = collector.endpoint("1.1.0", "batch")

    def send(worker: int) -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as own:
            for i in range(5):
                alf = make_alf([("GET", f"http://api.test/{worker}/{i}", 200, 1)] * 2)
                assert post(own, url, [alf], encoding="gzip").status_code == 200

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert collector.count() == 8 * 5 * 2
    assert len(collector.requests()) == 8 * 5


# --- Python API ------------------------------------------------------------------------------


def test_wait_for_entries(collector: Collector, client: httpx.Client) -> None:
    url = collector.endpoint("1.1.0", "single")

    def later() -> None:
        time.sleep(0.2)
        with httpx.Client(trust_env=False) as own:
            post(own, url, make_alf([("GET", "http://api.test/", 200, 1)] * 3))

    thread = threading.Thread(target=later)
    started = time.monotonic()
    thread.start()
    assert collector.wait_for_entries(3, timeout=30.0)
    assert time.monotonic() - started > 0.15  # it waited for the late POST
    thread.join()
    started = time.monotonic()
    assert not collector.wait_for_entries(4, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert collector.wait_for_requests(1, timeout=0.1)


def test_clear_and_count(collector: Collector, client: httpx.Client) -> None:
    post(client, collector.endpoint("1.1.0", "batch"), load("1.1.0", "multi.json"))
    assert collector.count() == 2
    collector.clear()
    assert collector.count() == 0
    assert collector.entries() == [] and collector.alfs() == [] and collector.requests() == []
    post(client, collector.endpoint("1.1.0", "single"), load("1.1.0", "minimal.json"))
    assert collector.count() == 1 and collector.wait_for_entries(1, timeout=0.1)


def test_stop_is_idempotent_and_closes_everything(collector_db: str, client: httpx.Client) -> None:
    running = Collector(collector_db).start()
    url = running.endpoint("1.1.0", "single")
    assert post(client, url, load("1.1.0", "minimal.json")).status_code == 200
    running.stop()
    running.stop()
    with pytest.raises(CollectorError):
        running.entries()
    with pytest.raises(CollectorError):
        running.count()
    assert not running.wait_for_entries(1, timeout=0.1)
    with pytest.raises(httpx.TransportError):
        post(client, url, load("1.1.0", "minimal.json"))
    with pytest.raises(CollectorError):
        running.start()


def test_file_database_persists_and_uses_wal(tmp_path: Path, client: httpx.Client) -> None:
    db = tmp_path / "alf.sqlite"
    with Collector(str(db)) as first:
        post(client, first.endpoint("1.1.0", "single"), load("1.1.0", "minimal.json"))
        mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    with Collector(str(db)) as second:
        assert second.count() == 1
        post(client, second.endpoint("1.1.0", "single"), load("1.1.0", "full.json"))
        assert [e.environment for e in second.entries()] == [None, "PRODUCTION"]
    rows = (
        sqlite3.connect(db)
        .execute(
            "SELECT s.token, s.environment FROM entries e JOIN streams s ON s.id = e.stream_id "
            "ORDER BY e.id"
        )
        .fetchall()
    )
    assert rows == [("foo", None), ("<my service token>", "PRODUCTION")]


def test_refuses_a_database_of_something_else(tmp_path: Path) -> None:
    db = tmp_path / "other.sqlite"
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(CollectorError, match="not an alf-analytics collector database"):
        Collector(str(db))


def test_logs_are_quiet_by_default_and_mask_tokens(
    collector_db: str, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    token = "secret-token-abcdef-9876"
    alf = make_alf([("GET", "http://api.test/", 200, 1)], token=token)
    caplog.set_level(logging.DEBUG, logger="alf_analytics.collector")
    with Collector(collector_db, tokens=["the-only-good-token"]) as guarded:
        response = post(client, guarded.endpoint("1.1.0", "single"), alf)
        assert response.status_code == 401
        [error] = response.json()["errors"]
        assert token not in error and "9876" in error  # masked, the tail kept
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert token not in caplog.text


# --- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def summary_db(collector_db: str, tmp_path: Path) -> str:
    """A database the ``summary`` command can open: an SQLite file, or the PostgreSQL one."""
    return str(tmp_path / "alf.sqlite") if collector_db == ":memory:" else collector_db


def _fill_summary_db(db: str) -> None:
    with Collector(db) as filling, httpx.Client(trust_env=False) as http:
        url = filling.endpoint("1.1.0", "batch")
        times = list(range(100, 0, -1))  # 1..100 ms, out of order
        users = make_alf([("GET", "http://api.test/users?page=2", 200, t) for t in times])
        created = make_alf([("POST", "http://api.test/users", 201, 12.5)], token="token-b")
        staging = make_alf(
            [("GET", "http://api.test/users", 500, 7), ("GET", "http://api.test/users", 500, 3)],
            token="token-b",
            environment="staging",
        )
        assert post(http, url, [users, created]).status_code == 200
        assert post(http, url, [staging]).status_code == 200
        assert post(http, url, [load("1.1.0", "invalid/bodysize.json")]).status_code == 400


def test_summary_table(summary_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _fill_summary_db(summary_db)
    assert main(["summary", "--db", summary_db]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "environment",
        "method",
        "path",
        "status",
        "count",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
    ]
    rows = [line.split() for line in lines[1:4]]
    assert rows == [
        ["-", "GET", "/users", "200", "100", "50", "90", "99", "100"],
        ["-", "POST", "/users", "201", "1", "12.5", "12.5", "12.5", "12.5"],
        ["staging", "GET", "/users", "500", "2", "3", "7", "7", "7"],
    ]
    # Numbers are right-aligned, so aligned columns make every line of the table equally long.
    assert len({len(line) for line in lines[0:4]}) == 1
    assert lines[1].index("GET") == lines[0].index("method")
    # Refused requests are not stored (only valid entries are), so they are not counted.
    assert lines[-1] == "Total: 103 entries, 2 distinct service tokens"


def test_summary_json(summary_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _fill_summary_db(summary_db)
    assert main(["summary", "--db", summary_db, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0] == {
        "environment": None,
        "method": "GET",
        "path": "/users",
        "status": 200,
        "count": 100,
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
        "max": 100.0,
    }
    assert [row["environment"] for row in report["rows"]] == [None, None, "staging"]
    # Streams: (service token, environment) pairs; refused requests are not stored.
    assert report["totals"] == {"entries": 103, "service_tokens": 2, "streams": 3}


@pytest.mark.parametrize("options", [[], ["--json"]])
def test_summary_into_a_closed_pipe_exits_quietly(tmp_path: Path, options: list[str]) -> None:
    """``alf-analytics summary | head -1``: the reader goes away, no traceback follows."""
    db = str(tmp_path / "alf.sqlite")
    _fill_summary_db(db)
    command = [sys.executable, "-m", "alf_analytics.cli", "summary", "--db", db, *options]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()  # before the command (still importing) writes a line
        err = child.stderr.read().decode()
        code = child.wait(60)
    assert err == ""
    assert code == 1


def test_summary_of_empty_and_missing_databases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "empty.sqlite"
    Collector(str(db)).stop()
    assert main(["summary", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"No entries in {db}.")
    assert "Total: 0 entries" in out
    missing = tmp_path / "missing.sqlite"
    assert main(["summary", "--db", str(missing)]) == 2
    captured = capsys.readouterr()
    assert "not found" in captured.err and captured.out == ""
    assert not missing.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    assert main(["summary", "--db", str(junk)]) == 2


def _read_line(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the collector printed nothing"
    line = stream.readline()
    return line.decode() if isinstance(line, bytes) else str(line)


_CLI = Path(sys.executable).with_name("alf-analytics")


def cli_command(*args: str) -> list[str]:
    """``alf-analytics ARGS`` as installed (the console script), else ``python -m``."""
    if _CLI.exists():
        return [str(_CLI), *args]
    return [sys.executable, "-m", "alf_analytics.cli", *args]


def start_cli_collector(*args: str, cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``alf-analytics collector ARGS`` in a process; returns it and the URL it printed.

    Its stdout is read up to the ready line only; stderr is collected by whoever stops it
    (:func:`tests.servers.sigterm` or ``communicate``).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        cli_command("collector", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        line = _read_line(proc.stdout, timeout=60.0)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if match is None:
        proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
        pytest.fail(f"the collector printed {line!r}, not its URL; stderr: {stderr}")
    return proc, match.group(0)


def _stored(db: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["summary", "--db", db, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_collector_command_in_a_subprocess(
    tmp_path: Path, client: httpx.Client, capsys: pytest.CaptureFixture[str], stop: int
) -> None:
    db = tmp_path / "cli.sqlite"
    proc, url = start_cli_collector(
        "--port", "0", "--db", str(db), "--max-body-bytes", "50000", cwd=tmp_path
    )
    with reaped(proc):
        assert not url.endswith(":0")
        assert post(client, url + "/1.1.0/single", load("1.1.0", "full.json")).status_code == 200
        assert (
            post(
                client, url + "/1.0.0/batch", load("1.0.0", "multi.json"), encoding="gzip"
            ).status_code
            == 200
        )
        assert client.post(url + "/1.1.0/single", content=b"x" * 60_000).status_code == 413
        proc.send_signal(stop)
        stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
        # A graceful stop is a success: uvicorn's re-raise of the signal is undone.
        assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    report = _stored(str(db), capsys)
    assert report["totals"]["entries"] == 3
    assert {(r["environment"], r["count"]) for r in report["rows"]} == {
        ("PRODUCTION", 1),
        (None, 2),
    }


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout or reset while it closes: ask again
        return False


def test_sigterm_answers_the_request_in_flight_commits_and_exits_0(
    summary_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, url = start_cli_collector("--port", "0", "--db", summary_db, cwd=tmp_path)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps([make_alf([("GET", f"http://api.test/{i}", 200, 1) for i in range(50)])])
    half = len(body) // 2
    first_sent, release = threading.Event(), threading.Event()
    answers: list[httpx.Response | BaseException] = []

    def chunks() -> Iterator[bytes]:
        yield body[:half].encode()
        first_sent.set()  # asked for more: the first half is on the wire
        assert release.wait(60)
        yield body[half:].encode()

    def send() -> None:
        try:
            with httpx.Client(trust_env=False, timeout=60.0) as own:
                answers.append(own.post(url + "/1.1.0/batch", content=chunks()))
        except BaseException as exc:  # reported by the assertion below
            answers.append(exc)

    with reaped(proc):
        with httpx.Client(trust_env=False, timeout=10.0) as http:
            earlier = make_alf([("GET", "http://api.test/before", 200, 1)])
            assert post(http, url + "/1.1.0/single", earlier).status_code == 200
        sender = threading.Thread(target=send)
        sender.start()
        assert first_sent.wait(30)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _refused(port):  # shutting down: the listening socket is closed
            assert time.monotonic() < deadline, "the collector kept accepting after SIGTERM"
            time.sleep(0.01)
        release.set()
        sender.join(60)
        stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
    [answer] = answers
    assert isinstance(answer, httpx.Response), (answer, stderr)
    assert answer.status_code == 200, (answer.text, stderr)
    assert answer.json()["saved"] == 1
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert _stored(summary_db, capsys)["totals"]["entries"] == 51


# --- access control, idempotency, retention, query API (both backends) -----------------------

WRITE_TOKEN = "write-token-0123456789abcdef"
OTHER_WRITE_TOKEN = "other-write-token-fedcba9876"
READ_KEY = "read-key-abcdef0123456789"


def entry_at(
    method: str,
    url: str,
    status: int,
    time_ms: float,
    started: datetime,
    *,
    consumer: str | None = None,
    body: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """One valid ALF 1.1.0 entry (from the minimal fixture) with these values."""
    entry: dict[str, Any] = copy.deepcopy(load("1.1.0", "minimal.json")["har"]["log"]["entries"][0])
    entry["startedDateTime"] = started.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    entry["request"]["method"] = method
    entry["request"]["url"] = url
    entry["response"]["status"] = status
    entry["time"] = time_ms
    if consumer is not None:
        entry["request"]["headers"].append({"name": "x-alf-consumer", "value": consumer})
    if body is not None:
        mime_type, text = body
        entry["response"]["content"] = {
            "mimeType": mime_type,
            "encoding": "base64",
            "text": base64.b64encode(text.encode()).decode(),
        }
    return entry


def alf_of(
    entries: list[dict[str, Any]], *, token: str = WRITE_TOKEN, environment: str | None = None
) -> dict[str, Any]:
    alf = make_alf([], token=token, environment=environment)
    alf["har"]["log"]["entries"] = entries
    return alf


def reader(key: str = READ_KEY) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30.0, headers={"Authorization": f"Bearer {key}"})


API_PATHS = [
    "/api/services",
    "/api/stats",
    "/api/endpoints",
    "/api/consumers",
    "/api/entries",
    "/api/entries/1",
    "/api/entries/1.har",
    "/api/export.har",
]


def test_only_listed_service_tokens_are_stored(collector_db: str, client: httpx.Client) -> None:
    now = datetime.now(timezone.utc)
    with Collector(collector_db, tokens=[f"prod={WRITE_TOKEN}", OTHER_WRITE_TOKEN]) as guarded:
        url = guarded.endpoint("1.1.0", "batch")
        good = alf_of([entry_at("GET", "http://api.test/ok", 200, 1, now)])
        other = alf_of(
            [entry_at("GET", "http://api.test/other", 200, 1, now)], token=OTHER_WRITE_TOKEN
        )
        stranger = alf_of(
            [entry_at("GET", "http://api.test/no", 200, 1, now)], token="unknown-token-000111"
        )

        mixed = post(client, url, [good, stranger, other])
        assert mixed.status_code == 207, mixed.text
        assert mixed.json() == {
            "errors": ["ALF[1] service token ...0111 is not accepted by this collector"],
            "sent": 3,
            "saved": 2,
            "refused": 1,
        }
        refused = post(client, url, [stranger, stranger])
        assert refused.status_code == 401
        assert refused.json()["saved"] == 0 and len(refused.json()["errors"]) == 2
        single = post(client, guarded.endpoint("1.1.0", "single"), stranger)
        assert single.status_code == 401
        assert "unknown-token-000111" not in single.text

        assert [(e.service_token, e.path) for e in guarded.entries()] == [
            (WRITE_TOKEN, "/ok"),
            (OTHER_WRITE_TOKEN, "/other"),
        ]
        services = client.get(guarded.url + "/api/services").json()["services"]
        assert {s["service"] for s in services} == {"prod", "...9876"}  # a name, or masked
        listing = client.get(guarded.url + "/api/entries").text
        assert WRITE_TOKEN not in listing and OTHER_WRITE_TOKEN not in listing


@pytest.mark.parametrize("path", API_PATHS)
def test_the_read_key_guards_every_api_endpoint(collector_db: str, path: str) -> None:
    now = datetime.now(timezone.utc)
    with Collector(collector_db, tokens=[WRITE_TOKEN], read_key=READ_KEY) as guarded:
        with httpx.Client(trust_env=False, timeout=30.0) as anonymous:
            stored = post(
                anonymous,
                guarded.endpoint("1.1.0", "single"),
                alf_of([entry_at("GET", "http://api.test/secret-path", 200, 1, now)]),
            )
            assert stored.status_code == 200  # the write side needs no read key
            for headers, status in [
                ({}, 401),
                ({"Authorization": "Bearer wrong-key-000000000000"}, 401),
                ({"Authorization": f"Basic {READ_KEY}"}, 401),
                ({"Authorization": f"Bearer {WRITE_TOKEN}"}, 403),  # a token never reads
            ]:
                answer = anonymous.get(guarded.url + path, headers=headers)
                assert answer.status_code == status, (headers, answer.text)
                assert list(answer.json()) == ["errors"]
                assert "secret-path" not in answer.text and READ_KEY not in answer.text
                if status == 401:
                    assert answer.headers["www-authenticate"].startswith("Bearer")
        with reader() as allowed:
            answer = allowed.get(guarded.url + path)
            assert answer.status_code == 200, answer.text
            assert answer.headers["cache-control"] == "no-store"


def test_the_read_key_never_writes(collector_db: str, client: httpx.Client) -> None:
    now = datetime.now(timezone.utc)
    with Collector(collector_db, tokens=[WRITE_TOKEN], read_key=READ_KEY) as guarded:
        alf = alf_of([entry_at("GET", "http://api.test/", 200, 1, now)], token=READ_KEY)
        answer = post(
            client,
            guarded.endpoint("1.1.0", "single"),
            alf,
            headers={"Authorization": f"Bearer {READ_KEY}"},
        )
        assert answer.status_code == 401
        assert READ_KEY not in answer.text
        assert guarded.count() == 0


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ([], ["service tokens", "a read key"]),
        (["--token", WRITE_TOKEN], ["a read key"]),
        (["--read-key", READ_KEY], ["service tokens"]),
    ],
)
def test_cli_refuses_an_open_non_loopback_address(
    extra: list[str],
    missing: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ALF_COLLECTOR_TOKENS", raising=False)
    monkeypatch.delenv("ALF_COLLECTOR_READ_KEY", raising=False)
    assert main(["collector", "--host", "0.0.0.0", "--port", "0", "--db", ":memory:", *extra]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--insecure" in err
    for what in missing:
        assert what in err
    assert WRITE_TOKEN not in err and READ_KEY not in err


def test_cli_logs_to_the_stderr_of_the_moment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``main()`` run in-process leaves its log handler on the ``alf_analytics`` logger; a
    later line goes to the stderr of that moment, not to a replaced one since closed
    (which printed "--- Logging error ---" and lost the line)."""
    monkeypatch.delenv("ALF_COLLECTOR_TOKENS", raising=False)
    monkeypatch.delenv("ALF_COLLECTOR_READ_KEY", raising=False)
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)
    assert main(["collector", "--host", "0.0.0.0", "--port", "0", "--db", ":memory:"]) == 2
    assert "refusing to listen" in replaced.getvalue()
    monkeypatch.undo()
    replaced.close()
    logging.getLogger("alf_analytics._worker").warning("a line after the stream closed")
    err = capsys.readouterr().err
    assert "a line after the stream closed" in err and "Logging error" not in err


def test_an_idempotency_key_replays_the_first_answer(
    collector: Collector, client: httpx.Client
) -> None:
    now = datetime.now(timezone.utc)
    url = collector.endpoint("1.1.0", "batch")
    good = alf_of([entry_at("GET", "http://api.test/a", 200, 1, now)])
    bad_entry = entry_at("GET", "not a url", 200, 1, now)
    partial = alf_of([entry_at("GET", "http://api.test/b", 201, 1, now), bad_entry])
    key = {"Idempotency-Key": "batch-0001"}

    first = post(client, url, [good, partial], headers=key)
    assert first.status_code == 207, first.text
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = post(client, url, [good, partial], headers=key)
        assert again.status_code == 207
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
    assert [e.path for e in collector.entries()] == ["/a", "/b"]  # once

    reused = post(client, url, [good], headers=key)
    assert reused.status_code == 422
    assert "different request body" in reused.json()["errors"][0]
    # Without a key a client still works, at least once.
    assert post(client, url, [good]).status_code == 200
    assert post(client, url, [good]).status_code == 200
    assert [e.path for e in collector.entries()] == ["/a", "/b", "/a", "/a"]
    # Another key is another batch.
    assert post(client, url, [good], headers={"Idempotency-Key": "batch-0002"}).status_code == 200
    assert collector.count() == 5
    # A refused request stores no key: sent again once fixed, it is stored.
    assert (
        post(client, url, [alf_of([bad_entry])], headers={"Idempotency-Key": "b3"}).status_code
        == 400
    )


def test_an_idempotency_key_compares_the_body_decoded(
    collector: Collector, client: httpx.Client
) -> None:
    """The same ALF sent plain, then compressed (gzip with any mtime, deflate), is the same
    body: its retry is replayed, not a 422; another body is still a 422."""
    url = collector.endpoint("1.1.0", "batch")
    body = json.dumps(
        [alf_of([entry_at("GET", "http://api.test/z", 200, 1, datetime.now(timezone.utc))])]
    ).encode()
    key = {"Content-Type": "application/json", "Idempotency-Key": "any-encoding"}
    first = client.post(url, content=body, headers=key)
    assert first.status_code == 200, first.text
    for coding, sent in (
        ("gzip", gzip.compress(body, mtime=1)),
        ("gzip", gzip.compress(body, mtime=2)),
        ("deflate", zlib.compress(body)),
        ("deflate", raw_deflate(body)),
        ("identity", body),
    ):
        again = client.post(url, content=sent, headers={**key, "Content-Encoding": coding})
        assert again.status_code == 200, (coding, again.text)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
    assert collector.count() == 1
    other = gzip.compress(body.replace(b"/z", b"/y"), mtime=1)
    reused = client.post(url, content=other, headers={**key, "Content-Encoding": "gzip"})
    assert reused.status_code == 422, reused.text
    # Compressed first, then plain: the same.
    gzipped = {**key, "Idempotency-Key": "gzip-first", "Content-Encoding": "gzip"}
    assert (
        client.post(url, content=gzip.compress(body, mtime=5), headers=gzipped).status_code == 200
    )
    plain = client.post(url, content=body, headers={**key, "Idempotency-Key": "gzip-first"})
    assert plain.status_code == 200 and plain.headers["idempotent-replayed"] == "true"
    assert collector.count() == 2


def test_a_key_remembered_with_the_digest_of_the_body_as_sent_still_replays(
    collector: Collector, client: httpx.Client
) -> None:
    """Collectors before stored the digest of the bytes as sent: within the window, the same
    bytes sent again are still recognised after an upgrade."""
    url = collector.endpoint("1.1.0", "batch")
    body = json.dumps(
        [alf_of([entry_at("GET", "http://api.test/old", 200, 1, datetime.now(timezone.utc))])]
    ).encode()
    sent = gzip.compress(body, mtime=1)
    headers = {"Idempotency-Key": "from-before", "Content-Encoding": "gzip"}
    first = client.post(url, content=sent, headers=headers)
    assert first.status_code == 200, first.text
    with collector.store.transaction() as tx:  # as the collector before would have stored it
        tx.execute(
            "UPDATE ingests SET digest = ? WHERE key_hash = ?",
            [hashlib.sha256(sent).hexdigest(), hash_key("from-before")],
        )
    again = client.post(url, content=sent, headers=headers)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert collector.count() == 1


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "clé", "tab\there"], ids=["empty", "long", "non-ascii", "control"]
)
def test_a_bad_idempotency_key_is_a_400(
    collector: Collector, client: httpx.Client, key: str
) -> None:
    body = json.dumps(load("1.1.0", "minimal.json")).encode()
    response = client.post(
        collector.endpoint("1.1.0", "single"),
        content=body,
        headers=[(b"Idempotency-Key", key.encode("utf-8"))],
    )
    assert response.status_code == 400, response.text
    assert "Idempotency-Key must be 1 to 255 printable ASCII characters" in response.text
    assert collector.count() == 0


def test_idempotency_keys_outlive_the_collector(summary_db: str, client: httpx.Client) -> None:
    body = [alf_of([entry_at("GET", "http://api.test/once", 200, 1, datetime.now(timezone.utc))])]
    key = {"Idempotency-Key": "kept-across-restarts"}
    with Collector(summary_db) as first:
        answered = post(client, first.endpoint("1.1.0", "batch"), body, headers=key)
        assert answered.status_code == 200
    with Collector(summary_db) as second:
        again = post(client, second.endpoint("1.1.0", "batch"), body, headers=key)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == answered.json()
        assert [e.path for e in second.entries()] == ["/once"]


def test_concurrent_repeats_of_one_key_store_once(collector: Collector) -> None:
    now = datetime.now(timezone.utc)
    body = [alf_of([entry_at("GET", f"http://api.test/{i}", 200, 1, now) for i in range(20)])]
    url = collector.endpoint("1.1.0", "batch")
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(trust_env=False, timeout=30.0) as own:
            barrier.wait(30)
            answers.append(post(own, url, body, headers={"Idempotency-Key": "raced"}))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.content for a in answers} == {answers[0].content}
    assert sum(1 for a in answers if "idempotent-replayed" not in a.headers) == 1
    assert collector.count() == 20


def test_idempotency_keys_are_forgotten_after_their_window(
    collector_db: str, client: httpx.Client
) -> None:
    body = [alf_of([entry_at("GET", "http://api.test/w", 200, 1, datetime.now(timezone.utc))])]
    key = {"Idempotency-Key": "short-lived"}
    # A window long enough that the repeat right after is inside it even on a loaded machine;
    # the background pass is kept out of the way and driven by hand.
    with Collector(collector_db, idempotency_window=2.0, housekeeping_interval=3600) as brief:
        url = brief.endpoint("1.1.0", "batch")
        assert post(client, url, body, headers=key).status_code == 200
        assert post(client, url, body, headers=key).headers["idempotent-replayed"] == "true"
        housekeeping = brief.app.state.housekeeping
        deadline = time.monotonic() + 60
        while brief.store.find_answer(hash_key("short-lived")) is not None:
            assert time.monotonic() < deadline, "the key was never forgotten"
            housekeeping.run_once()
            time.sleep(0.05)
        again = post(client, url, body, headers=key)
        assert again.status_code == 200 and "idempotent-replayed" not in again.headers
        assert brief.count() == 2


def test_a_key_older_than_its_window_is_unknown_before_the_housekeeping_forgets_it(
    collector_db: str, client: httpx.Client
) -> None:
    """An answer remembered longer than --idempotency-window is not replayed, even while its
    row is still stored (the housekeeping runs every minute): the repeat is stored anew, a
    different body under the old key is no 422, and the new answer is what is replayed."""
    body = [alf_of([entry_at("GET", "http://api.test/w", 200, 1, datetime.now(timezone.utc))])]
    other = [alf_of([entry_at("GET", "http://api.test/x", 200, 1, datetime.now(timezone.utc))])]
    key = {"Idempotency-Key": "aged"}

    def age(seconds: int) -> None:  # as if received that long ago
        with brief.store.transaction() as tx:
            tx.execute("UPDATE ingests SET received = received - ?", [seconds * 1_000_000])

    with Collector(collector_db, idempotency_window=60.0, housekeeping_interval=3600) as brief:
        url = brief.endpoint("1.1.0", "batch")
        assert post(client, url, body, headers=key).status_code == 200
        age(30)  # within the window: replayed
        assert post(client, url, body, headers=key).headers["idempotent-replayed"] == "true"
        age(31)  # 61 s old: unknown, although the housekeeping has not deleted it
        assert brief.store.find_answer(hash_key("aged")) is not None
        again = post(client, url, body, headers=key)
        assert again.status_code == 200 and "idempotent-replayed" not in again.headers
        assert brief.count() == 2
        assert post(client, url, body, headers=key).headers["idempotent-replayed"] == "true"
        age(61)
        changed = post(client, url, other, headers=key)
        assert changed.status_code == 200 and "idempotent-replayed" not in changed.headers
        assert brief.count() == 3
        assert brief.store.scalar("SELECT COUNT(*) FROM ingests") == 1  # the old one replaced


def test_retention_deletes_old_entries_in_the_background(
    collector_db: str, client: httpx.Client
) -> None:
    now = datetime.now(timezone.utc)
    old = [
        entry_at("GET", f"http://api.test/old/{i}", 500, 5, now - timedelta(days=40, minutes=i * 7))
        for i in range(30)
    ]
    recent = [entry_at("GET", f"http://api.test/new/{i}", 200, 1, now) for i in range(3)]
    with Collector(collector_db, retention="30d", housekeeping_interval=0.05) as kept:
        answer = post(client, kept.endpoint("1.1.0", "batch"), [alf_of(old + recent)])
        assert answer.status_code == 200, answer.text
        assert answer.json()["saved"] == 1  # all 33 stored; the old ones then expire
        deadline = time.monotonic() + 60

        def counted() -> int:
            return int(client.get(kept.url + "/api/stats").json()["count"])

        # Entries go first, then their rollups an hour of them per transaction.
        while kept.count() > 3 or counted() > 3:
            assert time.monotonic() < deadline, f"still {kept.count()}, {counted()} entries"
            time.sleep(0.05)
        assert sorted(e.path for e in kept.entries()) == ["/new/0", "/new/1", "/new/2"]
        stats = client.get(kept.url + "/api/stats").json()
        assert (stats["count"], stats["errors"], stats["status_codes"]) == (3, 0, {"200": 3})
    # Each pass deletes a bounded chunk, so ingest is never held for long.
    with Collector(collector_db) as plain:
        base = plain.count()  # the PostgreSQL schema still holds the 3 recent entries
        expired = [
            entry_at("GET", f"http://api.test/old/{i}", 200, 1, now - timedelta(days=60))
            for i in range(5)
        ]
        assert post(client, plain.endpoint("1.1.0", "batch"), [alf_of(expired)]).status_code == 200
        before = int((now - timedelta(days=30)).timestamp() * 1_000_000)
        left = []
        while plain.store.purge(before, chunk=2):
            left.append(plain.count() - base)
        assert left[:3] == [3, 1, 0]
        assert plain.count() == base


@pytest.fixture
def filled(collector_db: str) -> Iterator[tuple[Collector, datetime]]:
    """A guarded collector holding a known traffic mix of the last ten minutes."""
    base = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=10)
    prod = [
        entry_at("GET", f"http://api.test/users/{i}", 200, 10 + i, base + timedelta(seconds=i))
        for i in range(10)
    ]
    prod += [
        entry_at(
            "POST", "http://api.test/users", 201, 30, base + timedelta(minutes=1), consumer="c1"
        ),
        entry_at(
            "GET",
            "http://api.test/users/7/orders",
            404,
            2,
            base + timedelta(minutes=2),
            consumer="c1",
        ),
        entry_at(
            "GET",
            "http://api.test/boom?x=1",
            503,
            900,
            base + timedelta(minutes=3),
            consumer="c2",
            body=("application/json", '{"error":"down","retry":true}'),
        ),
    ]
    staging = [
        entry_at("DELETE", "http://staging.test/users/1", 500, 50, base + timedelta(minutes=4))
    ]
    with Collector(
        collector_db, tokens=[f"shop={WRITE_TOKEN}", OTHER_WRITE_TOKEN], read_key=READ_KEY
    ) as running:
        with httpx.Client(trust_env=False, timeout=30.0) as http:
            answer = post(
                http,
                running.endpoint("1.1.0", "batch"),
                [
                    alf_of(prod, environment="prod"),
                    alf_of(staging, token=OTHER_WRITE_TOKEN, environment="staging"),
                ],
            )
            assert answer.status_code == 200, answer.text
        yield running, base


def test_api_services_stats_endpoints_and_consumers(filled: tuple[Collector, datetime]) -> None:
    collector, base = filled
    with reader() as api:

        def get(where: str, **params: str) -> httpx.Response:
            return api.get(collector.url + where, params=params)

        services = get("/api/services").json()["services"]
        assert [(s["service"], s["environment"], s["count"], s["errors"]) for s in services] == [
            ("shop", "prod", 13, 2),
            ("...9876", "staging", 1, 1),
        ]
        assert services[0]["first_seen"].startswith(base.strftime("%Y-%m-%dT%H:%M:00"))
        assert services[0]["last_seen"].startswith(
            (base + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M")
        )

        stats = get("/api/stats").json()
        assert (stats["count"], stats["errors"]) == (14, 3)
        assert stats["error_rate"] == pytest.approx(3 / 14, abs=1e-6)
        assert stats["status_classes"] == {"2xx": 11, "4xx": 1, "5xx": 2}
        assert stats["status_codes"] == {"200": 10, "201": 1, "404": 1, "500": 1, "503": 1}
        assert stats["p50"] is not None and stats["p50"] <= stats["p95"] <= stats["p99"]
        assert stats["p99"] == pytest.approx(900, rel=0.06)
        assert [p["count"] for p in stats["series"]] == [10, 1, 1, 1, 1]
        prod = get("/api/stats", service="shop", environment="prod").json()
        assert (prod["count"], prod["errors"]) == (13, 2)
        # since/until: ISO 8601 or epoch seconds, since inclusive, until exclusive.
        since = (base + timedelta(minutes=1)).isoformat()
        until = str((base + timedelta(minutes=3)).timestamp())
        assert get("/api/stats", since=since, until=until).json()["count"] == 2
        five = get("/api/stats", interval="300").json()
        assert five["interval"] == 300 and sum(p["count"] for p in five["series"]) == 14
        assert get("/api/stats", status="5xx").json()["count"] == 2

        endpoints = get("/api/endpoints").json()["endpoints"]
        assert [(e["method"], e["route"], e["count"], e["errors"]) for e in endpoints] == [
            ("GET", "/users/{id}", 10, 0),  # by count, then route and method
            ("GET", "/boom", 1, 1),
            ("POST", "/users", 1, 0),
            ("DELETE", "/users/{id}", 1, 1),
            ("GET", "/users/{id}/orders", 1, 1),
        ]
        slowest = get("/api/endpoints", sort="p95", limit="1").json()["endpoints"]
        assert [(e["route"], e["p95"]) for e in slowest] == [
            ("/boom", pytest.approx(900, rel=0.06))
        ]

        consumers = get("/api/consumers").json()["consumers"]
        assert [(c["consumer"], c["count"], c["errors"]) for c in consumers] == [
            ("c1", 2, 1),
            ("c2", 1, 1),
        ]
        for path, params in [
            ("/api/stats", {"interval": "61"}),
            ("/api/stats", {"since": "yesterday"}),
            ("/api/entries", {"status": "10xx"}),
            ("/api/entries", {"limit": "0"}),
            ("/api/entries", {"cursor": "not-a-cursor"}),
            ("/api/endpoints", {"sort": "name"}),
        ]:
            refused = get(path, **params)
            assert refused.status_code == 400, (path, params, refused.text)
            assert list(refused.json()) == ["errors"]


def test_api_answers_ids_and_cursors_beyond_64_bits_without_a_500(
    filled: tuple[Collector, datetime],
) -> None:
    """An id or a forged cursor too large for the store's integers is a 404 or a 400 with a
    JSON error, as the README promises for every bad value, never an Internal Server Error."""
    collector, _ = filled
    huge = "99999999999999999999"
    with reader() as api:
        for where in (f"/api/entries/{huge}", f"/api/entries/{huge}.har", "/api/entries/0"):
            missing = api.get(collector.url + where)
            assert missing.status_code == 404, (where, missing.text)
            assert missing.json() == {"errors": ["no such entry"]}
        for sort, cursor in (("newest", f"{huge}:1"), ("slowest", f"1.5:{huge}")):
            forged = base64.urlsafe_b64encode(cursor.encode()).decode()
            refused = api.get(
                collector.url + "/api/entries", params={"cursor": forged, "sort": sort}
            )
            assert refused.status_code == 400, (sort, refused.text)
            assert refused.json() == {"errors": ["cursor is not one this API gave out"]}


def test_api_entries_filters_pages_and_details(filled: tuple[Collector, datetime]) -> None:
    collector, _ = filled
    with reader() as api:

        def get(where: str, **params: str) -> httpx.Response:
            return api.get(collector.url + where, params=params)

        listed = get("/api/entries").json()
        assert listed["next_cursor"] is None
        paths = [e["path"] for e in listed["entries"]]
        assert paths[:4] == ["/users/1", "/boom", "/users/7/orders", "/users"]  # newest first
        assert len(paths) == 14
        assert {e["service"] for e in listed["entries"]} == {"shop", "...9876"}

        def paths_of(**params: str) -> list[str]:
            return [e["path"] for e in get("/api/entries", **params).json()["entries"]]

        assert paths_of(status="5xx") == ["/users/1", "/boom"]
        assert paths_of(status="404") == ["/users/7/orders"]
        assert paths_of(method="post") == ["/users"]
        assert paths_of(path="/users/7") == ["/users/7/orders", "/users/7"]
        assert paths_of(route="/users/{id}", environment="prod") == [
            f"/users/{i}" for i in range(9, -1, -1)
        ]
        assert paths_of(consumer="c1") == ["/users/7/orders", "/users"]
        assert paths_of(service=OTHER_WRITE_TOKEN) == ["/users/1"]  # the token itself works too

        pages: list[int] = []
        cursor: str | None = None
        while True:
            params = {"limit": "4", **({"cursor": cursor} if cursor else {})}
            page = get("/api/entries", **params).json()
            pages += [e["id"] for e in page["entries"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [e["id"] for e in listed["entries"]]  # no overlap, nothing missed

        [boom] = get("/api/entries", path="/boom").json()["entries"]
        detail = get(f"/api/entries/{boom['id']}").json()
        assert (detail["service"], detail["environment"]) == ("shop", "prod")
        assert detail["entry"]["request"]["url"] == "http://api.test/boom?x=1"
        assert detail["bodies"]["response"]["kind"] == "json"
        assert json.loads(detail["bodies"]["response"]["text"]) == {"error": "down", "retry": True}
        assert detail["received"] is not None
        assert get("/api/entries/999999").status_code == 404

        one = get(f"/api/entries/{boom['id']}.har")
        assert (
            one.headers["content-disposition"] == f'attachment; filename="entry-{boom["id"]}.har"'
        )
        har = one.json()["log"]
        assert har["version"] == "1.2" and [e["request"]["url"] for e in har["entries"]] == [
            "http://api.test/boom?x=1"
        ]
        export = get("/api/export.har", route="/users/{id}")
        assert export.headers["content-disposition"] == 'attachment; filename="alf-export.har"'
        exported = export.json()["log"]["entries"]
        assert len(exported) == 11 and all("/users/" in e["request"]["url"] for e in exported)

    document = httpx.get(collector.url + "/openapi.json", trust_env=False).json()
    assert set(document["paths"]) >= {
        "/api/services",
        "/api/stats",
        "/api/endpoints",
        "/api/entries",
        "/api/consumers",
        "/api/entries/{entry_id}",
        "/api/entries/{entry_id}.har",
        "/api/export.har",
    }


def test_har_exports_take_redirect_url_from_the_location_header(collector_db: str) -> None:
    """HAR 1.2: ``redirectURL`` is the target of the ``Location`` response header (the first
    one, whatever its case); "" without one; a non-empty ``redirectURL`` sent (ALF 1.0.0) is
    kept."""
    now = datetime.now(timezone.utc)
    moved = entry_at("GET", "http://api.test/old", 301, 1, now)
    moved["response"]["headers"] += [
        {"name": "Location", "value": "https://api.test/new?x=1"},
        {"name": "location", "value": "https://api.test/second"},
    ]
    plain = entry_at("GET", "http://api.test/plain", 200, 1, now - timedelta(seconds=1))
    with Collector(collector_db, tokens=[WRITE_TOKEN], read_key=READ_KEY) as running:
        with httpx.Client(trust_env=False) as client:
            answer = post(client, running.endpoint("1.1.0", "single"), alf_of([moved, plain]))
            assert answer.status_code == 200, answer.text
        with reader() as api:
            exported = api.get(running.url + "/api/export.har").json()["log"]["entries"]
            by_url = {e["request"]["url"]: e["response"]["redirectURL"] for e in exported}
            assert by_url == {
                "http://api.test/old": "https://api.test/new?x=1",
                "http://api.test/plain": "",
            }
            [listed] = api.get(running.url + "/api/entries", params={"status": "301"}).json()[
                "entries"
            ]
            one = api.get(running.url + f"/api/entries/{listed['id']}.har").json()
            [entry] = one["log"]["entries"]
            assert entry["response"]["redirectURL"] == "https://api.test/new?x=1"


# --- long values (PostgreSQL's index keys hold at most 2,704 bytes) ---------------------------


def _random(alphabet: str, n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choice(alphabet) for _ in range(n))


LONG_PATHS = {
    # Random letters: not folded, so the route is as long as the (capped) path.
    "letters": "".join("/" + _random(string.ascii_lowercase, 15, i) for i in range(200)),
    # Each "/1/ab" grows to "/{id}/ab" in the route: the route outgrows the path.
    "route-grows": "".join(
        f"/{i % 10}/{_random(string.ascii_lowercase, 2, i)}" for i in range(700)
    ),
    # Percent-encoded UTF-8 (CJK): what an agent sends for a non-ASCII path.
    "percent-encoded": "/"
    + "/".join(quote(_random("".join(map(chr, range(0x4E00, 0x4E80))), 12, i)) for i in range(40)),
    "one-segment": "/" + _random(string.ascii_letters + string.digits, 5_000, 7),
}


@pytest.mark.parametrize("name", list(LONG_PATHS))
def test_long_paths_are_stored_and_queried_back(
    collector_db: str, client: httpx.Client, name: str
) -> None:
    path = LONG_PATHS[name]
    assert len(path.encode()) > 2_700
    url = f"http://api.test{path}?q=1"
    with Collector(collector_db) as long_ok:
        entry = entry_at("GET", url, 200, 1, datetime.now(timezone.utc))
        answer = post(client, long_ok.endpoint("1.1.0", "batch"), [alf_of([entry])])
        assert answer.status_code == 200, answer.text
        [stored] = long_ok.entries()
        assert stored.url == url and path.startswith(stored.path)  # the column may be capped
        [listed] = client.get(long_ok.url + "/api/entries", params={"path": path[:2048]}).json()[
            "entries"
        ]
        detail = client.get(f"{long_ok.url}/api/entries/{listed['id']}").json()
        assert detail["entry"]["request"]["url"] == url
        [endpoint] = client.get(long_ok.url + "/api/endpoints").json()["endpoints"]
        by_route = client.get(long_ok.url + "/api/entries", params={"route": endpoint["route"]})
        assert [e["id"] for e in by_route.json()["entries"]] == [listed["id"]]


def test_long_consumers_hosts_creators_tokens_and_environments_are_stored(
    collector_db: str, client: httpx.Client
) -> None:
    cjk = "".join(map(chr, range(0x4E00, 0x9FFF)))
    consumer = _random(cjk, 3_000, 1)  # 9 KB of UTF-8
    host = _random(string.ascii_lowercase, 3_000, 2) + ".test"
    token = _random(string.ascii_letters, 4_000, 3)
    environment = _random(cjk, 2_000, 4)
    now = datetime.now(timezone.utc)
    alf = alf_of(
        [
            entry_at("GET", f"http://{host}/x", 200, 1, now),
            entry_at("GET", "http://api.test/who", 200, 1, now, consumer=consumer),
            entry_at(_random(string.ascii_uppercase, 500, 5), "http://api.test/m", 200, 1, now),
        ],
        token=token,
        environment=environment,
    )
    creator = {"name": _random(string.printable, 4_000, 6), "version": _random(cjk, 2_000, 7)}
    alf["har"]["log"]["creator"] = creator
    with Collector(collector_db) as long_ok:
        answer = post(client, long_ok.endpoint("1.1.0", "single"), alf)
        assert answer.status_code == 200, answer.text
        first, second, third = long_ok.entries()
        assert (first.service_token, first.environment) == (token, environment)
        assert host.startswith(first.host) and second.consumer is not None
        assert consumer.startswith(second.consumer)
        assert [e["request"]["method"] for e in (first.entry, second.entry, third.entry)][2] == alf[
            "har"
        ]["log"]["entries"][2]["request"]["method"]
        found = client.get(
            long_ok.url + "/api/entries", params={"consumer": second.consumer}
        ).json()["entries"]
        assert [e["id"] for e in found] == [second.id]
        [service] = client.get(long_ok.url + "/api/services").json()["services"]
        assert service["count"] == 3 and service["environment"] == environment
        assert token not in answer.text
        # The creator is kept once per distinct value: a huge one is cut (the entry is not).
        assert first.creator == {"name": creator["name"][:128], "version": creator["version"][:128]}


def test_limit_concurrency_answers_503_beyond_it(tmp_path: Path) -> None:
    """``--limit-concurrency N``: N connections open at once are all served (uvicorn, given
    N, serves N - 1: the collector gives it N + 1); with N open, the next one's request gets
    503 (from uvicorn, plain text, the connection closed, as the README says), and /health
    answers again once they are gone."""
    proc, url = start_cli_collector(
        "--port", "0", "--db", ":memory:", "--limit-concurrency", "2", cwd=tmp_path
    )
    with reaped(proc):
        port = int(url.rpartition(":")[2])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)  # let the server accept both
            for sock in held:  # each of the N connections is served, and stays open
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                head, body = _read_response(sock)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert json.loads(body) == {"status": "ok"}
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                head, body = _read_response(extra)
            assert head.startswith(b"HTTP/1.1 503 "), head
            assert body == b"Service Unavailable"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health", trust_env=False).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        sigterm(proc)


# --- times outside the years 0001 to 9999 in UTC ------------------------------------------------

OUT_OF_RANGE_TIMES = [
    "9999-12-31T23:59:59-14:00",  # the year 10000 in UTC
    "9999-12-31T23:30:00-01:00",
    "0001-01-01T00:00:00+14:00",  # the year 0
]


def _api_reads(url: str, entry_id: int) -> dict[str, int]:
    with reader() as api:
        return {
            path: api.get(url + path).status_code
            for path in [*API_PATHS[:5], f"/api/entries/{entry_id}", f"/api/entries/{entry_id}.har"]
            + ["/api/export.har", "/api/stats?interval=3600"]
        }


@pytest.mark.parametrize("started", OUT_OF_RANGE_TIMES)
def test_an_entry_dated_outside_the_years_1_to_9999_in_utc_is_refused(
    collector_db: str, client: httpx.Client, started: str
) -> None:
    """A date-time the schema allows but no year 1..9999 holds once in UTC is that entry's
    400 (207 beside good ones); it never reaches the store, where it broke every read."""
    now = datetime.now(timezone.utc)
    bad = entry_at("GET", "http://api.test/late", 200, 1, now)
    bad["startedDateTime"] = started
    with Collector(collector_db, tokens=[WRITE_TOKEN], read_key=READ_KEY) as guarded:
        answer = post(
            client,
            guarded.endpoint("1.1.0", "batch"),
            [alf_of([entry_at("GET", "http://api.test/ok", 200, 1, now), bad])],
        )
        assert answer.status_code == 207, answer.text
        [error] = answer.json()["errors"]
        assert error.startswith("ALF[0] entry[1] $.startedDateTime") and started in error, error
        assert "outside the years 0001 to 9999" in error and len(error) < 300
        assert answer.json()["refused"] == 1
        assert [e.path for e in guarded.entries()] == ["/ok"]
        single = post(client, guarded.endpoint("1.1.0", "single"), alf_of([bad]))
        assert single.status_code == 400, single.text
        [stored] = guarded.entries()
        assert set(_api_reads(guarded.url, stored.id).values()) == {200}


def test_a_stored_time_outside_the_years_1_to_9999_never_breaks_reading(
    collector_db: str, client: httpx.Client
) -> None:
    """A database may hold such a time from before ingest refused it: every read still
    answers, the time shown as the nearest one that can be (the entry itself is whole)."""
    now = datetime.now(timezone.utc)
    with Collector(collector_db, tokens=[WRITE_TOKEN], read_key=READ_KEY) as guarded:
        answer = post(
            client,
            guarded.endpoint("1.1.0", "batch"),
            [alf_of([entry_at("GET", "http://api.test/a", 200, 1, now)] * 2)],
        )
        assert answer.status_code == 200, answer.text
        late, early = (e.id for e in guarded.entries())
        year_10000 = 253_402_300_800_000_000 + 3_600_000_000
        year_0 = -62_135_596_800_000_000 - 3_600_000_000
        with guarded.store.transaction() as tx:
            for entry_id, started in ((late, year_10000), (early, year_0)):
                tx.execute("UPDATE entries SET started = ? WHERE id = ?", [started, entry_id])
            tx.execute("DELETE FROM agg_minute")
            for minute in (year_10000 // 60_000_000, year_0 // 60_000_000):
                tx.execute(
                    "INSERT INTO agg_minute (minute, stream_id, method, route, status, bucket, "
                    "n, time_sum, bytes_in, bytes_out) "
                    "SELECT ?, stream_id, 'GET', '/a', 200, 0, 1, 1.0, 0, 0 FROM entries LIMIT 1",
                    [minute],
                )
        for entry_id in (late, early):
            reads = _api_reads(guarded.url, entry_id)
            assert set(reads.values()) == {200}, reads
        with reader() as api:
            listed = api.get(guarded.url + "/api/entries").json()["entries"]
            assert [e["started"] for e in listed] == [
                "9999-12-31T23:59:59.999Z",
                "0001-01-01T00:00:00.000Z",
            ]
            [service] = api.get(guarded.url + "/api/services").json()["services"]
            assert service["first_seen"].startswith("0001-") and service["count"] == 2
            for page in ("/", "/requests", f"/requests/{late}"):
                assert api.get(guarded.url + page).status_code != 500, page
        assert {e.started_at.year for e in guarded.entries()} == {1, 9999}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("since", "0001-01-01T00:00:00+14:00"),
        ("until", "9999-12-31T23:59:59-14:00"),
        ("since", "10000000000000"),  # epoch seconds in the year 318857
        ("until", "-62135596801"),  # one second before the year 1
    ],
)
def test_since_and_until_outside_what_can_be_stored_are_a_400(
    collector: Collector, name: str, value: str
) -> None:
    """The API and the dashboard read since/until alike (Filters.from_query): a time no
    entry can have is a 400 naming the parameter on both, never a 200 here and a 500 there."""
    with httpx.Client(trust_env=False, timeout=30.0) as api:
        for path in ("/api/stats", "/api/entries", "/api/services", "/api/export.har"):
            refused = api.get(collector.url + path, params={name: value})
            assert refused.status_code == 400, (path, refused.text)
            [error] = refused.json()["errors"]
            assert error.startswith(f"{name}: ") and "outside the years 0001 to 9999" in error
        for page in ("/", "/requests"):
            assert api.get(collector.url + page, params={name: value}).status_code == 400, page
        edge = {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"}
        assert api.get(collector.url + "/api/stats", params=edge).status_code == 200
        assert api.get(collector.url + "/api/entries", params=edge).status_code == 200


# --- NUL characters (PostgreSQL's text cannot hold them) -----------------------------------------


def test_a_nul_in_indexed_text_is_stored_and_filtered_alike_on_both_stores(
    collector_db: str, client: httpx.Client
) -> None:
    """environment, x-alf-consumer and request.method may hold U+0000 (schema-valid): the
    entry is stored (on PostgreSQL too: no 503 that the agent would retry forever), its
    columns with U+FFFD instead, the entry itself whole; a filter with a NUL matches the
    same entries on both stores, and no filter is ever a 503."""
    now = datetime.now(timezone.utc)
    consumer = entry_at("GET", "http://api.test/c", 200, 1, now, consumer="a\x00b")
    method = entry_at("GE\x00T", "http://api.test/m", 200, 1, now)
    with Collector(collector_db, read_key=READ_KEY) as running:
        url = running.endpoint("1.1.0", "batch")
        good = alf_of([entry_at("GET", "http://api.test/good", 200, 1, now)], environment="e")
        answer = post(client, url, [good, alf_of([consumer, method], environment="x\x00y")])
        assert answer.status_code == 200, answer.text
        token = alf_of([entry_at("GET", "http://api.test/t", 200, 1, now)], token="tok\x00en")
        assert post(client, url, [token]).status_code == 200
        stored = {e.path: e for e in running.entries()}
        assert stored["/c"].environment == "x\ufffdy" and stored["/c"].consumer == "a\ufffdb"
        assert stored["/m"].method == "GE\ufffdT"
        assert stored["/t"].service_token == "tok\ufffden"
        assert {"name": "x-alf-consumer", "value": "a\x00b"} in stored["/c"].entry["request"][
            "headers"
        ]
        assert stored["/m"].entry["request"]["method"] == "GE\x00T"
        with reader() as api:

            def paths(**params: str) -> list[str]:
                answer = api.get(running.url + "/api/entries", params=params)
                assert answer.status_code == 200, (params, answer.text)
                return sorted(e["path"] for e in answer.json()["entries"])

            assert paths(environment="x\x00y") == ["/c", "/m"]
            assert paths(environment="x\ufffdy") == ["/c", "/m"]
            assert paths(consumer="a\x00b") == ["/c"]
            assert paths(method="ge\x00t") == ["/m"]
            assert paths(service="tok\x00en") == ["/t"]
            for name in ("service", "environment", "path", "route", "method", "consumer"):
                assert paths(**{name: "\x00"}) == [], name
                for where in ("/api/stats", "/api/endpoints", "/api/consumers", "/api/services"):
                    answer = api.get(running.url + where, params={name: "\x00"})
                    assert answer.status_code == 200, (where, name, answer.text)
            stats = api.get(running.url + "/api/stats", params={"consumer": "a\x00b"}).json()
            assert stats["count"] == 1


# --- deep nesting ---------------------------------------------------------------------------


DEEP = "@@deep@@"


def post_deep(client: httpx.Client, url: str, payload: Any, depth: int) -> httpx.Response:
    """``payload`` with each ``DEEP`` string replaced by arrays nested ``depth`` deep (too
    deep for the json module to write)."""
    nested = "[" * depth + "]" * depth
    body = json.dumps(payload).replace(json.dumps(DEEP), nested)
    return client.post(url, content=body.encode(), headers={"Content-Type": "application/json"})


def test_deeply_nested_values_are_a_400_at_any_depth(
    collector_db: str, client: httpx.Client
) -> None:
    """A value nested in arrays hundreds of levels deep is a 400 (a 207 beside good ALF
    objects) naming it, at any depth the JSON parser takes; past its limit (1,024) the body
    is a 400 too. Never a 500."""
    now = datetime.now(timezone.utc)
    with Collector(collector_db) as running:
        url = running.endpoint("1.1.0", "batch")
        for depth in (100, 255, 256, 300, 1000):
            entry = entry_at("GET", "http://api.test/deep", 200, 1, now)
            entry["request"]["headers"].append({"name": "x-deep", "value": DEEP})
            good = entry_at("GET", "http://api.test/ok", 200, 1, now)
            answer = post_deep(client, url, [alf_of([good, entry])], depth)
            assert answer.status_code == 207, (depth, answer.text)
            [error] = answer.json()["errors"]
            assert error.startswith("ALF[0] entry[1] $"), error
            envelope = alf_of([good], environment=DEEP)
            answer = post_deep(client, url, [alf_of([good]), envelope], depth)
            assert answer.status_code == 207, (depth, answer.text)
            [error] = answer.json()["errors"]
            assert error.startswith("ALF[1] $"), error
        too_deep = client.post(
            url, content=b"[" * 1100 + b"]" * 1100, headers={"Content-Type": "application/json"}
        )
        assert too_deep.status_code == 400 and "not valid JSON" in too_deep.text
        assert len(running.entries()) == 10


def test_deep_values_the_1_0_0_schema_allows_are_bounded(
    collector_db: str, client: httpx.Client
) -> None:
    """ALF 1.0.0 allows fields of any kind in an entry: one nested deeper than the collector
    stores (``MAX_NESTING``) is refused by name; one within is stored and read back through
    every read endpoint, wrapped as they wrap it, without a 500."""
    from alf_analytics.collector.ingest import MAX_NESTING

    fixture = load("1.0.0", "full.json")
    with Collector(collector_db, read_key=READ_KEY) as running:
        url = running.endpoint("1.0.0", "single")
        for depth in (MAX_NESTING, MAX_NESTING + 10, 300, 600):
            alf = copy.deepcopy(fixture)
            entry = alf["har"]["log"]["entries"][0]
            entry["_deep"] = DEEP
            alf["har"]["log"]["creator"]["_deep"] = DEEP
            answer = post_deep(client, url, alf, depth)
            if depth <= MAX_NESTING - 1:
                assert answer.status_code == 200, (depth, answer.text)
            else:
                assert answer.status_code == 400, (depth, answer.text)
                [error] = answer.json()["errors"]
                assert f"nested more than {MAX_NESTING} levels deep" in error, error
        alf = copy.deepcopy(fixture)
        alf["har"]["log"]["entries"][0]["_deep"] = DEEP
        alf["har"]["log"]["creator"]["_deep"] = DEEP + "x"
        body = json.dumps(alf).replace(json.dumps(DEEP), "[" * 200 + "]" * 200)
        body = body.replace(json.dumps(DEEP + "x"), "[" * 260 + "]" * 260)
        answer = client.post(url, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        stored = running.entries()[-1]
        assert stored.creator is not None and "_deep" not in stored.creator  # cut to its name
        with reader() as api:
            for path in (
                f"/api/entries/{stored.id}",
                f"/api/entries/{stored.id}.har",
                "/api/export.har",
                "/api/entries",
            ):
                assert api.get(running.url + path).status_code == 200, path


# --- byte sums (PostgreSQL's BIGINT) --------------------------------------------------------


def test_byte_sums_saturate_instead_of_overflowing(collector_db: str, client: httpx.Client) -> None:
    """Entries may declare sizes up to 2^53: a thousand of them in one minute sum past 2^63.
    The rollups (per minute, summed hours, late entries) and every aggregate saturate at
    2^63 - 1 on both stores: no 503 that no retry can fix, no integer overflow on reading."""
    top = 2**63 - 1
    started = datetime.now(timezone.utc).replace(minute=0, second=1, microsecond=0)
    started -= timedelta(hours=2)

    def batch(count: int) -> dict[str, Any]:
        entries = []
        for _ in range(count):
            entry = entry_at("GET", "http://api.test/big", 200, 1, started, consumer="c")
            entry["request"]["bodySize"] = entry["response"]["bodySize"] = 2**53 - 1
            entries.append(entry)
        return alf_of(entries)

    with Collector(collector_db, read_key=READ_KEY) as running:
        url = running.endpoint("1.1.0", "single")
        for count in (1_100, 600, 600):  # over 2^63 in one request, then in the store
            answer = post(client, url, batch(count), encoding="gzip")
            assert answer.status_code == 200, answer.text

        def check() -> None:
            with reader() as api:
                for params in ({}, {"since": started.isoformat()}, {"consumer": "c"}):
                    stats = api.get(running.url + "/api/stats", params=params)
                    assert stats.status_code == 200, (params, stats.text)
                    assert stats.json()["bytes_in"] == stats.json()["bytes_out"] == top
                for path in ("/api/endpoints", "/api/services", "/api/consumers", "/"):
                    assert api.get(running.url + path).status_code == 200, path

        check()
        assert running.store.compact() >= 1  # the hour is summed into agg_hour / agg_quarter
        answer = post(client, url, batch(5), encoding="gzip")  # late: added to every tier
        assert answer.status_code == 200, answer.text
        check()
        for table in ("agg_minute", "agg_hour", "agg_quarter", "agg_consumer_hour"):
            assert running.store.scalar(f"SELECT MAX(bytes_in) FROM {table}") == top, table


# --- cursors -----------------------------------------------------------------------------------


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


FORGED_CURSORS = [
    "1e308:5",
    "1.7e308:1",
    "inf:1",
    "-inf:1",
    "nan:1",
    "1e12:1",
    "-5:5",
    "5:0",
    "5:-1",
    "5:99999999999999999999",
    "99999999999999999999:5",
    "-99999999999999999999:5",
    "5",
    "5:5:5",
    ":",
    "",
    "\u00e9:1",
    "0x10:1",
]


@pytest.mark.parametrize("sort", ["newest", "slowest"])
def test_forged_cursors_are_a_400_naming_the_cursor(
    filled: tuple[Collector, datetime], sort: str
) -> None:
    collector, _ = filled
    raw = ["%%%", "\u00ff\u00fe", "A" * 5_000, base64.urlsafe_b64encode(b"\xff\xfe:1").decode()]
    with reader() as api:
        first = api.get(collector.url + "/api/entries", params={"sort": sort, "limit": "3"})
        real = first.json()["next_cursor"]
        params = {"sort": sort, "limit": "3", "cursor": real}
        assert api.get(collector.url + "/api/entries", params=params).status_code == 200
        for cursor in [*(_cursor(text) for text in FORGED_CURSORS), *raw]:
            answer = api.get(
                collector.url + "/api/entries", params={"sort": sort, "cursor": cursor}
            )
            assert answer.status_code in (200, 400), (cursor, answer.text)
            if answer.status_code == 400:
                assert answer.json() == {"errors": ["cursor is not one this API gave out"]}
        for text in ("1e308:5", "inf:1", "nan:1", "5:0", "5:-1", "5:99999999999999999999"):
            answer = api.get(
                collector.url + "/api/entries", params={"sort": sort, "cursor": _cursor(text)}
            )
            assert answer.status_code == 400, (sort, text, answer.text)
        if sort == "slowest":
            for text in ("-5:5", "1e12:1", "1.7e308:1"):  # no entry has such a time
                answer = api.get(
                    collector.url + "/api/entries", params={"sort": sort, "cursor": _cursor(text)}
                )
                assert answer.status_code == 400, (text, answer.text)


# --- service tokens as given ----------------------------------------------------------------------


def test_token_values_are_literal_and_an_empty_one_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alf_analytics.collector.settings import TokenSet

    monkeypatch.delenv("ALF_COLLECTOR_TOKENS", raising=False)
    tokens = TokenSet.from_sources(["#abc", "name=#def", "a,b"])
    assert [(t.token, t.name) for t in tokens] == [("#abc", None), ("#def", "name"), ("a,b", None)]
    listed = tmp_path / "tokens"
    listed.write_text("# a comment\n\n  # another\nfile=#kept-literally\n", "utf-8")
    from_file = TokenSet.from_sources([], str(listed), environ={"ALF_COLLECTOR_TOKENS": "x,,y,"})
    assert [t.token for t in from_file] == ["#kept-literally", "x", "y"]
    for empty in ("", "  ", "name="):
        with pytest.raises(CollectorError, match="empty"):
            TokenSet.from_sources([empty])
    assert [t.token for t in TokenSet.parse(["name=ends-in=" + "="])] == ["ends-in=="]


@pytest.mark.parametrize("value", ["", "   ", "billing="])
def test_cli_refuses_an_empty_token(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["collector", "--port", "0", "--db", ":memory:", "--token", value]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_takes_a_token_starting_with_a_hash_literally(
    tmp_path: Path, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--token '#abc'`` was read as a comment: the collector then ran with no tokens and,
    on loopback, stored ALF with any token at all."""
    monkeypatch.delenv("ALF_COLLECTOR_TOKENS", raising=False)
    proc, url = start_cli_collector(
        "--port", "0", "--db", ":memory:", "--token", "#hash-token-0123", cwd=tmp_path
    )
    with reaped(proc):
        alf = make_alf([("GET", "http://api.test/h", 200, 1)], token="#hash-token-0123")
        assert post(client, url + "/1.1.0/single", alf).status_code == 200
        other = make_alf([("GET", "http://api.test/h", 200, 1)], token="anything-else")
        assert post(client, url + "/1.1.0/single", other).status_code == 401
        sigterm(proc)


def test_workers_need_a_fixed_port(capsys: pytest.CaptureFixture[str]) -> None:
    """The default port (8700) is a fixed one; only --port 0 (any free port) cannot be
    shared by the workers, and is refused."""
    db = "postgresql://nobody@127.0.0.1:1/none"
    assert main(["collector", "--workers", "2", "--port", "0", "--db", db]) == 2
    assert "--workers needs a fixed --port (not 0)" in capsys.readouterr().err


def test_workers_refuse_an_unusable_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --workers the database was first opened by each worker: the supervisor printed
    its "listening" line, and workers that could not open the store died at startup and were
    restarted forever, a traceback each. It is opened once first, as without --workers."""
    from alf_analytics.collector import storage

    def unusable(db: str, **kwargs: object) -> storage.Store:
        raise CollectorError(f"cannot connect to {storage.masked_url(db)}: refused")

    served: list[object] = []
    monkeypatch.setattr(storage, "open_store", unusable)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: served.append(args))
    db = "postgresql://nobody:secret@127.0.0.1:1/none"
    assert main(["collector", "--workers", "2", "--port", "9140", "--db", db]) == 2
    assert served == []
    captured = capsys.readouterr()
    assert "cannot use database postgresql://nobody:***@127.0.0.1:1/none" in captured.err
    assert "secret" not in captured.err and "listening" not in captured.out


def test_workers_refuse_an_address_they_cannot_listen_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --workers an address that cannot be bound is "cannot listen on ..." and
    exit 1. With --workers the supervisor printed "listening" first, then uvicorn failed to
    bind and exited 3. 192.0.2.1 (TEST-NET-1) is no address of this machine."""
    from alf_analytics.collector import storage

    class Opened:
        def close(self) -> None:
            pass

    served: list[object] = []
    monkeypatch.setattr(storage, "open_store", lambda db, **kwargs: Opened())
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: served.append(args))
    argv = ["collector", "--workers", "2", "--host", "192.0.2.1", "--port", "9141"]
    db = "postgresql://nobody@127.0.0.1:1/none"
    assert main([*argv, "--insecure", "--db", db]) == 1
    assert served == []
    captured = capsys.readouterr()
    assert "cannot listen on 192.0.2.1:9141" in captured.err
    assert "listening" not in captured.out


# --- the OpenAPI document ------------------------------------------------------------------------

DOCUMENTED_STATUSES = {
    # The README's "Ingest" paragraph.
    "/{version}/{kind}": {200, 207, 400, 401, 405, 408, 413, 415, 422, 503},
    # /health: ok, a JSON 503 while the store does not answer (and 405 for other methods).
    "/health": {200, 405, 503},
    # The query API: a bad filter 400, no or a wrong read key 401, a service token 403, a
    # store that cannot be read 503; an unknown entry 404.
    "/api/services": {200, 400, 401, 403, 503},
    "/api/stats": {200, 400, 401, 403, 503},
    "/api/endpoints": {200, 400, 401, 403, 503},
    "/api/consumers": {200, 400, 401, 403, 503},
    "/api/entries": {200, 400, 401, 403, 503},
    "/api/entries/{entry_id}": {200, 400, 401, 403, 404, 503},
    "/api/entries/{entry_id}.har": {200, 400, 401, 403, 404, 503},
    "/api/export.har": {200, 400, 401, 403, 503},
}


def test_openapi_documents_every_route_and_every_status_it_answers(
    collector: Collector, client: httpx.Client
) -> None:
    document = client.get(collector.url + "/openapi.json").json()
    paths = document["paths"]
    expected: dict[str, set[int]] = {}
    for route, statuses in DOCUMENTED_STATUSES.items():
        if route.startswith("/{version}"):
            for version in VERSIONS:
                for kind in ("single", "batch"):
                    expected[f"/{version}/{kind}"] = statuses
        else:
            expected[route] = statuses
    assert set(paths) == set(expected)
    for route, statuses in expected.items():
        documented = {
            int(code) for operation in paths[route].values() for code in operation["responses"]
        }
        assert documented == statuses, route
    # Every route of the ALF protocol, /health and the API is in it (the dashboard's pages
    # are HTML, not part of it).
    served = {
        re.sub(r"\{(\w+):\w+\}", r"{\1}", getattr(route, "path", ""))
        for route in collector.app.routes
    }
    api = {path for path in served if path.startswith(("/1.", "/health", "/api"))}
    assert api == set(paths)
