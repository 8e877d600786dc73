"""Property-based tests: hostile or odd input never breaks the app or the ALF schema.

The adapters run in-process with the worker replaced by a recorder (a unit-level seam), so
hypothesis can try thousands of requests; every recorded exchange is built into an entry and
validated against the official 1.1.0 schema with format checks on.
"""

from __future__ import annotations

import asyncio
import gc
import io
import random
import string
import tracemalloc
from typing import Any
from urllib.parse import parse_qsl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alf_analytics import AnalyticsASGIMiddleware, AnalyticsWSGIMiddleware
from alf_analytics._alf import alf_envelope, build_entry, dumps, query_pairs
from alf_analytics._config import make_config
from alf_analytics._net import INVALID_HOST, ip_literal
from alf_analytics._record import Exchange, RequestInfo

from .conftest import assert_valid_alf

COLLECTOR = "http://127.0.0.1:9"  # never contacted: the worker is replaced by a recorder
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Recorder:
    """Stands in for the worker: keeps the exchanges the adapter hands over."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def submit(self, exchange: Exchange) -> bool:
        self.exchanges.append(exchange)
        return True


def assert_entry_valid(exchange: Exchange) -> dict[str, Any]:
    entry = build_entry(exchange)
    alf = alf_envelope(*exchange.config.group)
    alf["har"]["log"]["entries"].append(entry)
    assert_valid_alf(alf)
    assert entry["time"] == round(
        entry["timings"]["send"] + entry["timings"]["wait"] + entry["timings"]["receive"], 3
    )
    return entry


def expected_body_size(method: str, status: int, chunks: list[bytes]) -> int:
    """What reaches the client: nothing for HEAD, 1xx, 204 and 304 (servers drop it)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return 0
    return sum(map(len, chunks))


latin1_text = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
any_text = st.text(max_size=40)
header_bytes = st.binary(max_size=60)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    latin1_text,
)
content_lengths = st.one_of(
    st.none(), st.just(""), st.just("-5"), st.just("abc"), st.integers(0, 10**9).map(str)
)


def make_middleware(cls: Any, app: Any, **options: Any) -> tuple[Any, Recorder]:
    middleware = cls(app, service_token="token-for-properties", collector_url=COLLECTOR, **options)
    recorder = Recorder()
    middleware._worker = recorder
    return middleware, recorder


@PROFILE
@given(
    method=methods,
    path=any_text,
    query=any_text,
    host=latin1_text,
    headers=st.lists(st.tuples(latin1_text, latin1_text), max_size=8),
    body=st.binary(max_size=300),
    content_length=content_lengths,
    content_type=latin1_text,
    status=st.integers(100, 999),
    reason=latin1_text,
    response_headers=st.lists(st.tuples(latin1_text, latin1_text), max_size=6),
    chunks=st.lists(st.binary(max_size=100), max_size=5),
    log_body=st.booleans(),
    cap=st.integers(0, 200),
)
def test_wsgi_any_request_gives_a_valid_entry_and_an_untouched_response(
    method: str,
    path: str,
    query: str,
    host: str,
    headers: list[tuple[str, str]],
    body: bytes,
    content_length: str | None,
    content_type: str,
    status: int,
    reason: str,
    response_headers: list[tuple[str, str]],
    chunks: list[bytes],
    log_body: bool,
    cap: int,
) -> None:
    """Arbitrary methods, paths, headers, bodies, lying Content-Length: valid entry, same bytes."""
    status_line = f"{status} {reason}"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response(status_line, response_headers)
        return chunks

    middleware, recorder = make_middleware(
        AnalyticsWSGIMiddleware, app, log_body=log_body, max_body_bytes=cap
    )
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path.encode("utf-8", "surrogatepass").decode("latin-1"),
        "QUERY_STRING": query.encode("utf-8", "surrogatepass").decode("latin-1"),
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "CONTENT_TYPE": content_type,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "REMOTE_ADDR": "192.0.2.7",
    }
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    for name, value in headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in ("HTTP_HOST",):
            environ[key] = value
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    result = middleware(environ, lambda s, h, e=None: seen.append((s, h)))
    try:
        received = list(result)
    finally:
        result.close()  # type: ignore[attr-defined]

    assert received == chunks
    assert seen == [(status_line, response_headers)]
    (exchange,) = recorder.exchanges
    entry = assert_entry_valid(exchange)
    assert entry["response"]["bodySize"] == expected_body_size(method, status, chunks)
    assert entry["request"]["bodySize"] >= len(body)
    if log_body and body and cap and exchange.config.body_type_allowed(content_type):
        assert "postData" in entry["request"]
    if not log_body:
        assert "postData" not in entry["request"] and "content" not in entry["response"]


@PROFILE
@given(
    method=methods,
    raw_path=header_bytes,
    query=header_bytes,
    headers=st.lists(st.tuples(header_bytes, header_bytes), max_size=8),
    body_parts=st.lists(st.binary(max_size=80), max_size=4),
    status=st.integers(100, 999),
    response_headers=st.lists(st.tuples(header_bytes, header_bytes), max_size=6),
    chunks=st.lists(st.binary(max_size=100), max_size=4),
    http_version=st.sampled_from(["1.0", "1.1", "2", "3", ""]),
    client=st.one_of(st.none(), st.tuples(st.sampled_from(["10.0.0.1", "::1", "x"]), st.just(1))),
    log_body=st.booleans(),
)
def test_asgi_any_request_gives_a_valid_entry_and_untouched_messages(
    method: str,
    raw_path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body_parts: list[bytes],
    status: int,
    response_headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    http_version: str,
    client: tuple[str, int] | None,
    log_body: bool,
) -> None:
    """Arbitrary header bytes, paths and bodies through ASGI: valid entry, same messages."""
    sent_by_app: list[dict[str, Any]] = [
        {"type": "http.response.start", "status": status, "headers": response_headers}
    ]
    for index, chunk in enumerate(chunks):
        more = index < len(chunks) - 1
        sent_by_app.append({"type": "http.response.body", "body": chunk, "more_body": more})
    if not chunks:
        sent_by_app.append({"type": "http.response.body", "body": b""})
    incoming = [
        {"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
        for i, part in enumerate(body_parts or [b""])
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        for message in sent_by_app:
            await send(message)

    middleware, recorder = make_middleware(AnalyticsASGIMiddleware, app, log_body=log_body)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": method,
        "scheme": "https",
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 8443),
    }
    forwarded: list[Any] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        forwarded.append(message)

    asyncio.run(middleware(scope, receive, send))

    assert [id(m) for m in forwarded] == [id(m) for m in sent_by_app]
    (exchange,) = recorder.exchanges
    entry = assert_entry_valid(exchange)
    assert entry["request"]["bodySize"] == sum(map(len, body_parts))
    assert entry["response"]["bodySize"] == expected_body_size(method, status, chunks)
    assert entry["response"]["status"] == status


@PROFILE
@given(
    info=st.builds(
        RequestInfo,
        method=methods,
        scheme=st.sampled_from(["http", "https", "ftp", ""]),
        host=latin1_text,
        path=any_text,
        query=any_text,
        http_version=st.text(max_size=10),
        headers=st.lists(st.tuples(any_text, any_text), max_size=6),
        peer=st.one_of(st.none(), any_text, st.sampled_from(["10.1.2.3", "fe80::1", "[::1]"])),
        server_ip=st.one_of(st.none(), any_text),
        content_length=st.one_of(st.none(), st.integers(0, 10**12)),
        chunked=st.booleans(),
    ),
    request_body=st.binary(max_size=200),
    response_body=st.binary(max_size=200),
    status=st.integers(0, 999),
    trusted=st.booleans(),
)
def test_builder_output_always_validates(
    info: RequestInfo,
    request_body: bytes,
    response_body: bytes,
    status: int,
    trusted: bool,
) -> None:
    """Whatever an adapter's reader returns, the builder's entry passes the schema."""
    config = make_config(
        {
            "service_token": "token-for-properties",
            "collector_url": COLLECTOR,
            "log_body": True,
            "max_body_bytes": 64,
            "trusted_proxies": ["10.0.0.0/8", "::1"] if trusted else [],
        },
        environ={},
    )
    exchange = Exchange(config, info, lambda source: source)
    exchange.request_data(request_body)
    exchange.status = status
    exchange.response_headers = [(b"content-type", b"\xff\xfe odd")]
    exchange.response_data(response_body)
    entry = assert_entry_valid(exchange)
    assert entry["request"]["bodySize"] >= len(request_body)
    # Never read to its end here: a body of no declared length may go on past what was read
    # (an empty one too, when it is chunked).
    ended = info.content_length is not None or not (request_body or info.chunked)
    assert entry["request"]["bodyCaptured"] == (
        len(request_body) <= 64
        and ended
        and (info.content_length is None or info.content_length <= len(request_body))
    )


def test_random_methods_and_paths_grow_no_state() -> None:
    """20,000 requests with random methods, paths and peers leave no per-key state behind."""
    rng = random.Random(7)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def request(index: int) -> None:
        method = "".join(rng.choices(string.ascii_uppercase, k=12))
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": "/" + "".join(rng.choices(string.ascii_letters, k=30)),
            "QUERY_STRING": f"q={index}",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b""),
            "REMOTE_ADDR": f"10.{index % 250}.{index // 250 % 250}.{index % 7}",
        }
        result = middleware(environ, lambda s, h, e=None: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
        build_entry(recorder.exchanges.pop())

    middleware, recorder = make_middleware(AnalyticsWSGIMiddleware, app)
    for index in range(2_000):  # warm up caches and allocator
        request(index)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(2_000, 20_000):
            request(index)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ip_literal.cache_info().currsize <= 1024
    assert grown < 300_000, f"memory grew by {grown} bytes over 18,000 requests"


@PROFILE
@given(query=st.text(alphabet=st.sampled_from("ab=&%+;2Ez é"), max_size=40) | any_text)
def test_query_pairs_match_parse_qsl(query: str) -> None:
    """The builder's fast query parser gives exactly what urllib's parse_qsl gives."""
    expected = parse_qsl(query, keep_blank_values=True, errors="replace")
    assert [(p["name"], p["value"]) for p in query_pairs(query)] == expected


# -- hostile input through each adapter's reader -----------------------------------------------
# The examples of issue 8 and their siblings, mixed with arbitrary text: every entry must pass
# the schema WITH format checks (uri, date-time, ipv4/ipv6) and keep its numbers in range.

HOSTILE_HOSTS = [
    "[1]",
    "[1.2.3.4]",
    "[:]",
    "[::1",
    "[::1]x",
    "[::1]:99999",
    "[fe80::1%25lo]",
    "[fe80::1%lo]",
    "[v1.fe]",
    "::1",
    "a b",
    "exa\x00mple.com",
    "m\xc3\xbcnchen.example",
    "münchen.example",
    "\udcff.example",
    "example.com:0",
    "example.com:65536",
    "example.com:-1",
    "example.com:+80",
    "example.com:\u0668\u0660",
    "example.com:80:80",
    "example.com:",
    "user:pass@example.com",
    "@",
    "%41.example",
    "a/b",
    "a?b",
    "a#b",
    "..",
    "-",
    "a" * 300,
    "",
    " ",
    "EXAMPLE.com.",
]
HOSTILE_PATHS = [
    "/\udcff\ud800",
    "/a b/%zz/%/%%41",
    "/\x00\x01\x7f\t\r\n",
    "//double//slash",
    "*",
    "http://evil.example/x",
    "/#frag?not-query",
    "/caf\xc3\xa9",
    "",
]
HOSTILE_ADDRESSES = [
    "fe80::1%lo",
    "fe80::1%25eth0",
    "::ffff:10.0.0.1",
    "[::1]",
    "[::1]:80",
    "10.0.0.1:8080",
    "010.0.0.1",
    "1.2.3.4.5",
    "unix:/run/app.sock",
    "garbage",
    "",
    "\udcff",
]
HOSTILE_LENGTHS = [
    "9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999999",
    str(1 << 40),
    str((1 << 40) + 1),
    "-1",
    "1e3",
    " 12 ",
    "1_000",
    "\u0663",
    "+5",
    "0x10",
]
hostile_hosts = st.one_of(st.sampled_from(HOSTILE_HOSTS), any_text, latin1_text)
hostile_paths = st.one_of(st.sampled_from(HOSTILE_PATHS), any_text)
hostile_addresses = st.one_of(st.sampled_from(HOSTILE_ADDRESSES), any_text)
hostile_values = st.one_of(any_text, st.sampled_from(["\udcff", "a\ud800b", "\x00", "é" * 3]))
forwarding = st.lists(
    st.tuples(
        st.sampled_from(["x-forwarded-for", "forwarded"]),
        st.one_of(
            hostile_addresses,
            st.sampled_from(['for="[fe80::1%25lo]:80"', "for=unknown", "for=_x, for=1.2.3.4"]),
        ),
    ),
    max_size=3,
)


def assert_entry_in_range(entry: dict[str, Any]) -> None:
    """Numbers a collector stores: integers within 0..2**40 (or counted), finite times."""
    for side in (entry["request"], entry["response"]):
        assert 0 <= side["headersSize"] < 1 << 40
        assert 0 <= side["bodySize"] <= 1 << 40
    assert 0 <= entry["response"]["status"] <= 999
    assert entry["time"] >= 0 and entry["time"] == entry["time"]
    dumps(entry).decode("utf-8")  # encodes, as valid UTF-8


def hostile_config(trusted: bool, header: str) -> dict[str, Any]:
    options: dict[str, Any] = {"log_body": True, "forwarded_header": header}
    if trusted:
        options["trusted_proxies"] = ["0.0.0.0/0", "::/0"]
    return options


@PROFILE
@given(
    host=hostile_hosts,
    path=hostile_paths,
    query=hostile_values,
    values=st.lists(hostile_values, max_size=4),
    peer=hostile_addresses,
    server=hostile_addresses,
    content_length=st.sampled_from(HOSTILE_LENGTHS),
    forwarded=forwarding,
    trusted=st.booleans(),
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
    status=st.sampled_from(["-12 X", "0 X", "1000 X", "abc", "2000000 Y", "200 \udcff", "99 "]),
)
def test_wsgi_hostile_request_gives_a_format_valid_entry(
    host: str,
    path: str,
    query: str,
    values: list[str],
    peer: str,
    server: str,
    content_length: str,
    forwarded: list[tuple[str, str]],
    trusted: bool,
    header: str,
    status: str,
) -> None:
    """Hosts, paths, header values, addresses, lengths, statuses as a WSGI server hands them."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, [("X-Echo", v) for v in values])
        return [b"ok"]

    middleware, recorder = make_middleware(
        AnalyticsWSGIMiddleware, app, **hostile_config(trusted, header)
    )
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": server,
        "SERVER_PORT": "8080",
        "SERVER_ADDR": server,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "CONTENT_LENGTH": content_length,
        "CONTENT_TYPE": "application/json",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "REMOTE_ADDR": peer,
    }
    for index, value in enumerate(values):
        environ[f"HTTP_X_V{index}"] = value
    for name, value in forwarded:
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = environ[key] + "," + value if key in environ else value
    result = middleware(environ, lambda s, h, e=None: None)
    list(result)
    result.close()  # type: ignore[attr-defined]
    (exchange,) = recorder.exchanges
    entry = assert_entry_valid(exchange)
    assert_entry_in_range(entry)
    if entry["request"]["url"].startswith(f"http://{INVALID_HOST}/"):
        # The placeholder: the Host header as sent is still there.
        assert any(pair["name"] == "host" for pair in entry["request"]["headers"]) or not host


@PROFILE
@given(
    host=st.one_of(hostile_hosts.map(lambda h: h.encode("utf-8", "surrogatepass")), header_bytes),
    raw_path=st.one_of(
        hostile_paths.map(lambda p: p.encode("utf-8", "surrogatepass")), header_bytes
    ),
    path=hostile_paths,
    root_path=st.sampled_from(["", "/mount", "/\udcff", "/\ud800", "/a b"]),
    values=st.lists(header_bytes, max_size=4),
    peer=st.one_of(st.none(), hostile_addresses),
    server=st.one_of(st.none(), hostile_addresses),
    port=st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    content_length=st.sampled_from(HOSTILE_LENGTHS),
    forwarded=forwarding,
    trusted=st.booleans(),
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
    status=st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(["200", None, 200.5, True])),
)
def test_asgi_hostile_request_gives_a_format_valid_entry(
    host: bytes,
    raw_path: bytes,
    path: str,
    root_path: str,
    values: list[bytes],
    peer: str | None,
    server: str | None,
    port: int | None,
    content_length: str,
    forwarded: list[tuple[str, str]],
    trusted: bool,
    header: str,
    status: Any,
) -> None:
    """The same through an ASGI scope: raw bytes, a text path, odd server and client tuples."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"x-echo", v) for v in values]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware, recorder = make_middleware(
        AnalyticsASGIMiddleware, app, **hostile_config(trusted, header)
    )
    headers = [(b"host", host), (b"content-length", content_length.encode("utf-8"))]
    headers += [(b"x-v", v) for v in values]
    headers += [(n.encode(), v.encode("utf-8", "surrogatepass")) for n, v in forwarded]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": raw_path or None,
        "query_string": b"a=%zz&b=\xff",
        "root_path": root_path,
        "headers": headers,
        "client": None if peer is None else (peer, 1234),
        "server": None if server is None else (server, port),
    }
    queue = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(middleware(scope, receive, send))
    (exchange,) = recorder.exchanges
    assert_entry_in_range(assert_entry_valid(exchange))


@PROFILE
@given(
    host=hostile_hosts,
    path=hostile_paths,
    values=st.lists(hostile_values, max_size=4),
    peer=hostile_addresses,
    content_length=st.sampled_from(HOSTILE_LENGTHS),
    forwarded=forwarding,
    trusted=st.booleans(),
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
    over_asgi=st.booleans(),
)
def test_django_hostile_request_gives_a_format_valid_entry(
    host: str,
    path: str,
    values: list[str],
    peer: str,
    content_length: str,
    forwarded: list[tuple[str, str]],
    trusted: bool,
    header: str,
    over_asgi: bool,
) -> None:
    """The same through Django's middleware, with a WSGIRequest's or an ASGIRequest's META."""
    from django.core.handlers.asgi import ASGIRequest
    from django.core.handlers.wsgi import WSGIRequest
    from django.http import HttpResponse
    from django.test import override_settings

    from alf_analytics.django import AnalyticsMiddleware

    from .djangoproject import setup

    setup()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        # A WSGI server hands PATH_INFO over as Latin-1 text (Django insists on it).
        "PATH_INFO": path.encode("utf-8", "surrogatepass").decode("latin-1"),
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "CONTENT_LENGTH": content_length,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "REMOTE_ADDR": peer,
    }
    for index, value in enumerate(values):
        environ[f"HTTP_X_V{index}"] = value
    for name, value in forwarded:
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    options = {
        "service_token": "token-for-properties",
        "collector_url": COLLECTOR,
        **hostile_config(trusted, header),
    }
    with override_settings(ALF_ANALYTICS=options):
        middleware = AnalyticsMiddleware(lambda request: HttpResponse(b"ok"))
    recorder = Recorder()
    middleware._worker = recorder  # type: ignore[assignment]
    if over_asgi:
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "raw_path": path.encode("utf-8", "surrogatepass"),
            "root_path": "",
            "query_string": b"",
            "scheme": "http",
            "http_version": "1.1",
            "headers": [
                (k[5:].lower().replace("_", "-").encode(), v.encode("utf-8", "surrogatepass"))
                for k, v in environ.items()
                if k.startswith("HTTP_")
            ],
            "client": (peer, 1234),
            "server": ("127.0.0.1", 80),
        }
        request = ASGIRequest(scope, io.BytesIO(b""))
    else:
        request = WSGIRequest(environ)
    response = middleware(request)
    response.close()
    (exchange,) = recorder.exchanges
    assert_entry_in_range(assert_entry_valid(exchange))
