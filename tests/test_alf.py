"""The pure builder: an :class:`Exchange` filled by hand in, one schema-valid ALF entry out."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from typing import Any

import pytest

from alf_analytics._alf import CONSUMER_HEADER, alf_envelope, build_entry, dumps
from alf_analytics._config import REDACTED, Config, make_config
from alf_analytics._record import Capture, Exchange, RequestInfo

from .conftest import assert_valid_alf

TOKEN = "alf-builder-token-0001"


def request_info(**changes: Any) -> RequestInfo:
    """A plain ``GET http://api.example.com/items`` from 203.0.113.7, with ``changes``."""
    info = RequestInfo(
        method="GET",
        scheme="http",
        host="api.example.com",
        path="/items",
        query="",
        http_version="HTTP/1.1",
        headers=[("host", "api.example.com")],
        peer="203.0.113.7",
        server_ip=None,
        content_length=None,
    )
    return info._replace(**changes)


def config(**options: Any) -> Config:
    return make_config({"service_token": TOKEN, "log_body": True, **options}, environ={})


def exchange(info: RequestInfo | None = None, cfg: Config | None = None, **facts: Any) -> Exchange:
    """An Exchange as an adapter would leave it, with fixed clock marks (seconds)."""
    record = Exchange(cfg or config(), info or request_info(), lambda source: source)
    record.started_at = 1_700_000_000.25
    record.t_start = 100.0
    record.t_response = 100.125
    record.t_end = 100.5
    record.status = 200
    record.reason = "OK"
    record.response_headers = [("Content-Type", "text/plain")]
    for name, value in facts.items():
        setattr(record, name, value)
    return record


def entry_of(record: Exchange) -> dict[str, Any]:
    """Build the entry and validate it, inside an ALF object, against the 1.1.0 schema."""
    entry = build_entry(record)
    alf = alf_envelope(*record.config.group)
    alf["har"]["log"]["entries"].append(entry)
    assert_valid_alf(alf)
    return entry


def header(pairs: list[dict[str, str]], name: str) -> list[str]:
    return [pair["value"] for pair in pairs if pair["name"] == name]


# -- time --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        pytest.param(1_700_000_000.25, "2023-11-14T22:13:20.250Z", id="quarter-second"),
        pytest.param(1_700_000_000.0, "2023-11-14T22:13:20.000Z", id="whole-second"),
        pytest.param(1_700_000_000.123, "2023-11-14T22:13:20.123Z", id="not-rounded-down"),
        pytest.param(1_700_000_000.9999, "2023-11-14T22:13:20.999Z", id="truncated-ms"),
        pytest.param(951_782_400.5, "2000-02-29T00:00:00.500Z", id="leap-day"),
    ],
)
def test_started_date_time_is_utc_with_milliseconds_and_z(timestamp: float, expected: str) -> None:
    """startedDateTime is the wall clock at the start, in UTC, with exactly 3 decimals and Z."""
    entry = entry_of(exchange(started_at=timestamp))
    assert entry["startedDateTime"] == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["startedDateTime"])
    parsed = datetime.fromisoformat(entry["startedDateTime"].replace("Z", "+00:00"))
    assert parsed.utcoffset() == timezone.utc.utcoffset(None)


@pytest.mark.parametrize(
    ("t_response", "t_end", "wait", "receive"),
    [
        pytest.param(100.125, 100.5, 125.0, 375.0, id="streamed"),
        pytest.param(100.25, 100.25, 250.0, 0.0, id="one-chunk"),
        pytest.param(0.0, 100.5, 500.0, 0.0, id="no-body-byte-sent"),
        pytest.param(100.0000024, 100.0000061, 0.002, 0.004, id="sub-ms-rounded"),
    ],
)
def test_time_is_send_plus_wait_plus_receive(
    t_response: float, t_end: float, wait: float, receive: float
) -> None:
    """wait runs to the first body byte, receive to the end, and time is their sum."""
    entry = entry_of(exchange(t_response=t_response, t_end=t_end))
    timings = entry["timings"]
    assert timings == {"send": 0.0, "wait": pytest.approx(wait), "receive": pytest.approx(receive)}
    total = timings["send"] + timings["wait"] + timings["receive"]
    assert entry["time"] == pytest.approx(total, abs=1e-9)
    assert entry["time"] == pytest.approx(wait + receive)


# -- request line and URL ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "url"),
    [
        pytest.param({}, "http://api.example.com/items", id="plain"),
        pytest.param(
            {"scheme": "https", "host": "api.example.com:8443", "query": "a=1&b=2"},
            "https://api.example.com:8443/items?a=1&b=2",
            id="port-and-query",
        ),
        pytest.param({"host": "[::1]:8000"}, "http://[::1]:8000/items", id="ipv6-host"),
        pytest.param({"path": ""}, "http://api.example.com/", id="empty-path"),
        pytest.param(
            {"path": "/app/v1/users/42", "query": "fields=name"},
            "http://api.example.com/app/v1/users/42?fields=name",
            id="script-name-and-path",
        ),
        pytest.param(
            {"path": "/caf%C3%A9", "query": "q=%20x"},
            "http://api.example.com/caf%C3%A9?q=%20x",
            id="percent-encoding-kept",
        ),
    ],
)
def test_url_is_absolute(changes: dict[str, Any], url: str) -> None:
    """request.url carries scheme, host, the port when given, path and query."""
    assert entry_of(exchange(request_info(**changes)))["request"]["url"] == url


@pytest.mark.parametrize(
    ("scheme", "host"),
    [
        pytest.param("http", "api.example.com:80", id="http-80"),
        pytest.param("https", "api.example.com:443", id="https-443"),
    ],
)
def test_url_omits_a_default_port_from_the_host_header(scheme: str, host: str) -> None:
    """A Host header naming the scheme's default port gives a URL without it, as Werkzeug's."""
    entry = entry_of(exchange(request_info(scheme=scheme, host=host)))
    assert entry["request"]["url"] == f"{scheme}://api.example.com/items"


def test_a_host_with_userinfo_is_invalid_and_its_header_pair_loses_the_userinfo() -> None:
    """README placeholders: ``user:pass@host`` makes the URL's host ``invalid``; the ``host``
    pair keeps the rest of the value sent, but never the userinfo ("What leaves")."""
    host = "user:hunter2@api.example.com"
    entry = entry_of(exchange(request_info(host=host, headers=[("host", host)])))
    assert entry["request"]["url"] == "http://invalid/items"
    assert header(entry["request"]["headers"], "host") == ["%5BREDACTED%5D@api.example.com"]
    assert "hunter2" not in json.dumps(entry)


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("bücher.de:8080", id="text"),
        # What a WSGI server (PEP 3333) and the ASGI reader hand over for UTF-8 bytes.
        pytest.param("bücher.de:8080".encode().decode("latin-1"), id="utf8-read-as-latin1"),
        pytest.param("bücher.de:8080".encode("latin-1").decode("latin-1"), id="latin1-bytes"),
    ],
)
def test_an_internationalised_host_is_written_as_punycode(host: str) -> None:
    """The URL names the host the client meant: UTF-8 (or Latin-1) bytes, as text, in IDNA."""
    entry = entry_of(exchange(request_info(host=host)))
    assert entry["request"]["url"] == "http://xn--bcher-kva.de:8080/items"


@pytest.mark.parametrize(
    ("query", "pairs"),
    [
        pytest.param("", [], id="none"),
        pytest.param(
            "a=1&a=2&b=&c",
            [("a", "1"), ("a", "2"), ("b", ""), ("c", "")],
            id="repeats-and-blanks",
        ),
        pytest.param(
            "q=hello+world&e=%C3%A9&x=%2F%26",
            [("q", "hello world"), ("e", "é"), ("x", "/&")],
            id="decoded",
        ),
        pytest.param("z=2&y=1&z=3", [("z", "2"), ("y", "1"), ("z", "3")], id="order-kept"),
    ],
)
def test_query_string_is_parsed_into_pairs(query: str, pairs: list[tuple[str, str]]) -> None:
    """queryString lists every parameter in order, repeats and blank values kept, [] if none."""
    entry = entry_of(exchange(request_info(query=query)))
    assert entry["request"]["queryString"] == [{"name": n, "value": v} for n, v in pairs]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("HTTP/1.0", "HTTP/1.0", id="1.0"),
        pytest.param("HTTP/1.1", "HTTP/1.1", id="1.1"),
        pytest.param("HTTP/2.0", "HTTP/2", id="2.0"),
        pytest.param("HTTP/2", "HTTP/2", id="2"),
        pytest.param("1.1", "HTTP/1.1", id="bare-1.1"),
        pytest.param("2", "HTTP/2", id="bare-2"),
        pytest.param("http/1.1", "HTTP/1.1", id="lower-case"),
        pytest.param("HTTP/3", "unknown", id="3"),
        pytest.param("SPDY/3", "unknown", id="other-protocol"),
        pytest.param("", "unknown", id="empty"),
    ],
)
def test_http_version_maps_onto_the_schema_enum(raw: str, expected: str) -> None:
    """httpVersion is one of HTTP/1, HTTP/1.0, HTTP/1.1, HTTP/2 or unknown, on both sides."""
    entry = entry_of(exchange(request_info(http_version=raw)))
    assert entry["request"]["httpVersion"] == expected
    assert entry["response"]["httpVersion"] == expected


# -- headers -----------------------------------------------------------------------------------


def test_request_headers_are_pairs_with_repeats_kept() -> None:
    """Each request header is its own pair, in order, names lower-cased, repeats kept."""
    info = request_info(
        headers=[
            ("Host", "api.example.com"),
            ("Accept", "text/html"),
            ("X-Trace", "1"),
            ("Accept", "application/json"),
        ]
    )
    assert entry_of(exchange(info))["request"]["headers"] == [
        {"name": "host", "value": "api.example.com"},
        {"name": "accept", "value": "text/html"},
        {"name": "x-trace", "value": "1"},
        {"name": "accept", "value": "application/json"},
    ]


def test_response_headers_are_pairs_with_repeats_kept() -> None:
    """Repeated response headers (Vary, Set-Cookie) each stay a separate pair."""
    record = exchange(
        response_headers=[
            ("Vary", "Accept"),
            ("Set-Cookie", "a=1"),
            ("Vary", "Cookie"),
            ("Set-Cookie", "b=2"),
        ]
    )
    headers = entry_of(record)["response"]["headers"]
    assert [pair["name"] for pair in headers] == ["vary", "set-cookie", "vary", "set-cookie"]
    assert header(headers, "vary") == ["Accept", "Cookie"]
    assert header(headers, "set-cookie") == [REDACTED, REDACTED]


def test_request_headers_size_counts_the_rebuilt_wire_form() -> None:
    """headersSize is the byte length of request line, headers and final CRLF (ALF.md 1.8)."""
    info = request_info(
        method="POST",
        query="a=1",
        headers=[("Host", "api.example.com"), ("Authorization", "Bearer abc"), ("Accept", "*/*")],
    )
    wire = (
        b"POST /items?a=1 HTTP/1.1\r\n"
        b"Host: api.example.com\r\n"
        b"Authorization: Bearer abc\r\n"
        b"Accept: */*\r\n"
        b"\r\n"
    )
    entry = entry_of(exchange(info))
    assert entry["request"]["headersSize"] == len(wire) == 91


def test_response_headers_size_counts_status_line_and_headers() -> None:
    """Response headersSize is status line + each 'Name: value' + CRLFs, redacted or not."""
    record = exchange(
        status=201,
        reason="Created",
        response_headers=[("Content-Type", "application/json"), ("Set-Cookie", "sid=abcdef")],
    )
    wire = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nSet-Cookie: sid=abcdef\r\n\r\n"
    )
    assert entry_of(record)["response"]["headersSize"] == len(wire) == 80


def test_headers_size_counts_bytes_not_characters() -> None:
    """A non-ASCII header value counts the bytes it took on the wire (WSGI str or ASGI bytes)."""
    wsgi_style = request_info(headers=[("x-name", "caf\xc3\xa9")])  # UTF-8 bytes seen as Latin-1
    asgi_style = request_info(headers=[(b"x-name", "café".encode())])
    sizes = {
        entry_of(exchange(info))["request"]["headersSize"] for info in (wsgi_style, asgi_style)
    }
    # "GET /items HTTP/1.1\r\n" + "x-name: café\r\n" (5 bytes for café) + "\r\n"
    assert sizes == {21 + (6 + 2 + 5 + 2) + 2}


@pytest.mark.parametrize(
    ("raw", "written", "wire"),
    [("HTTP/1.1", "HTTP/1.1", "HTTP/1.1"), ("1.1", "HTTP/1.1", "HTTP/1.1"),
     ("HTTP/1.2", "unknown", "HTTP/1.2"), ("2.0", "HTTP/2", "HTTP/2.0")],
)  # fmt: skip
def test_header_sizes_count_the_version_as_the_server_read_it(
    raw: str, written: str, wire: str
) -> None:
    """``httpVersion`` is the schema's name for it, but the request and status lines are
    counted with the version as it was on the wire."""
    entry = entry_of(exchange(request_info(http_version=raw, headers=[("Host", "h")])))
    assert entry["request"]["httpVersion"] == written
    assert entry["request"]["headersSize"] == len(f"GET /items {wire}\r\nHost: h\r\n\r\n")
    assert entry["response"]["headersSize"] == len(
        f"{wire} 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    )


def test_status_text_defaults_to_the_standard_phrase() -> None:
    """No reason known (ASGI: the server writes its own) is the standard phrase, '' for a
    status without one; a reason the app wrote (WSGI, Django), even empty, is kept."""
    assert entry_of(exchange(status=404, reason=None))["response"]["statusText"] == "Not Found"
    assert entry_of(exchange(status=599, reason=None))["response"]["statusText"] == ""
    assert entry_of(exchange(status=200, reason="Fine"))["response"]["statusText"] == "Fine"
    assert entry_of(exchange(status=200, reason=""))["response"]["statusText"] == ""


def test_missing_status_is_recorded_as_500() -> None:
    """An exchange that never got a status (the app failed) is a 500."""
    assert entry_of(exchange(status=0, reason=None))["response"]["status"] == 500


# -- bodies ------------------------------------------------------------------------------------


def test_bodies_are_base64_with_mime_type() -> None:
    """postData and content hold standard base64 of the exact bytes, with the Content-Type."""
    request_body = b'{"a": 1, "b": "\xc3\xa9"}\n'
    response_body = bytes(range(256))
    record = exchange(
        request_info(
            method="POST",
            headers=[("content-type", "application/json; charset=utf-8")],
            content_length=len(request_body),
        ),
        response_headers=[("Content-Type", "image/png")],
    )
    record.request_data(request_body)
    record.request_complete = True
    record.response_data(response_body)
    entry = entry_of(record)
    assert entry["request"]["postData"] == {
        "mimeType": "application/json; charset=utf-8",
        "encoding": "base64",
        "text": base64.b64encode(request_body).decode(),
    }
    assert entry["response"]["content"] == {
        "mimeType": "image/png",
        "encoding": "base64",
        "text": base64.b64encode(response_body).decode(),
    }
    assert (entry["request"]["bodySize"], entry["response"]["bodySize"]) == (20, 256)
    assert entry["request"]["bodyCaptured"] is entry["response"]["bodyCaptured"] is True


@pytest.mark.parametrize(
    "types",
    [
        pytest.param(["application/json", "x/garbage"], id="json-then-other"),
        pytest.param(["application/json", ""], id="json-then-empty"),
        pytest.param(["application/x-www-form-urlencoded", "text/plain"], id="form-then-text"),
    ],
)
def test_a_body_with_conflicting_content_types_is_left_out(types: list[str]) -> None:
    """Several Content-Type pairs that disagree (an ASGI scope, an app's response headers
    keep them all): the capture was decided on one, the redaction would follow another, so
    the body cannot be redacted reliably and is left out, never sent as it came."""
    secret = b'{"password": "hunter2"}' if "json" in types[0] else b"password=hunter2"
    record = exchange(
        request_info(
            method="POST",
            headers=[("content-type", value) for value in types],
            content_length=len(secret),
        ),
        response_headers=[("Content-Type", value) for value in types],
    )
    record.request_data(secret)
    record.request_complete = True
    record.response_data(secret)
    entry = entry_of(record)
    assert "postData" not in entry["request"] and "content" not in entry["response"]
    assert entry["request"]["bodyCaptured"] is entry["response"]["bodyCaptured"] is False
    assert (entry["request"]["bodySize"], entry["response"]["bodySize"]) == (len(secret),) * 2


def test_content_encoding_pairs_combine_as_one_list() -> None:
    """Two Content-Encoding pairs are one list (RFC 9110 5.3): ``br`` then ``identity`` is
    still a brotli body, left out as any ``br`` body is, not sent as if it were plain."""
    record = exchange(
        request_info(
            method="POST",
            headers=[
                ("content-type", "text/plain"),
                ("content-encoding", "br"),
                ("content-encoding", "identity"),
            ],
            content_length=6,
        ),
    )
    record.request_data(b"\x0b\x02\x80hi\x03")
    record.request_complete = True
    request = entry_of(record)["request"]
    assert "postData" not in request
    assert (request["bodySize"], request["bodyCaptured"]) == (6, False)


def test_a_repeated_identical_content_type_is_one() -> None:
    """The same Content-Type twice is no conflict: the body is captured and redacted."""
    record = exchange(
        request_info(
            method="POST",
            headers=[("content-type", "application/json")] * 2,
            content_length=23,
        ),
    )
    record.request_data(b'{"password": "hunter2"}')
    record.request_complete = True
    post_data = entry_of(record)["request"]["postData"]
    assert base64.b64decode(post_data["text"]) == b'{"password":"[REDACTED]"}'


def test_body_without_content_type_is_octet_stream() -> None:
    """A body without Content-Type is labelled application/octet-stream."""
    record = exchange(request_info(method="PUT"), response_headers=[])
    record.request_data(b"\x01\x02")
    record.response_data(b"\x03")
    entry = entry_of(record)
    assert entry["request"]["postData"]["mimeType"] == "application/octet-stream"
    assert entry["response"]["content"]["mimeType"] == "application/octet-stream"


def test_body_chunks_are_joined_in_order() -> None:
    """Bytes seen in several reads and chunks are captured as one body, in order."""
    record = exchange(request_info(method="POST"))
    for chunk in (b"ab", memoryview(b"cd"), b"", b"ef"):
        record.request_data(chunk)
    for chunk in (b"12", b"34"):
        record.response_data(chunk)
    entry = entry_of(record)
    assert base64.b64decode(entry["request"]["postData"]["text"]) == b"abcdef"
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"1234"
    assert (entry["request"]["bodySize"], entry["response"]["bodySize"]) == (6, 4)


def test_body_size_is_counted_when_bodies_are_not_logged() -> None:
    """With log_body off, bodySize is still the real size; nothing is captured or sent."""
    record = exchange(request_info(method="POST"), cfg=config(log_body=False))
    record.request_data(b"x" * 1000)
    record.request_complete = True
    record.response_data(b"y" * 70_000)
    entry = entry_of(record)
    assert (entry["request"]["bodySize"], entry["response"]["bodySize"]) == (1000, 70_000)
    assert entry["request"]["bodyCaptured"] is entry["response"]["bodyCaptured"] is False
    assert "postData" not in entry["request"] and "content" not in entry["response"]


def test_unread_request_body_size_comes_from_content_length() -> None:
    """When the app never read the body, bodySize is the declared Content-Length, not captured."""
    record = exchange(request_info(method="POST", content_length=512))
    entry = entry_of(record)
    assert entry["request"]["bodySize"] == 512
    assert entry["request"]["bodyCaptured"] is False
    assert "postData" not in entry["request"]


def test_empty_bodies_are_captured_but_not_sent() -> None:
    """An empty body is 'captured' (the agent saw all of it) and has no body object."""
    entry = entry_of(exchange())
    assert entry["request"]["bodySize"] == entry["response"]["bodySize"] == 0
    assert entry["request"]["bodyCaptured"] is entry["response"]["bodyCaptured"] is True
    assert "postData" not in entry["request"] and "content" not in entry["response"]


def test_a_request_body_of_unknown_length_read_in_part_is_not_called_captured() -> None:
    """No Content-Length (chunked) and the app stopped before the end: what was read is kept
    as a prefix, but bodyCaptured does not claim the whole body."""
    record = exchange(request_info(method="POST", content_length=None))
    record.request_data(b"first line\n")
    entry = entry_of(record)
    assert entry["request"]["bodySize"] == 11
    assert entry["request"]["bodyCaptured"] is False
    record.request_complete = True  # read to its end: whole
    assert entry_of(record)["request"]["bodyCaptured"] is True


def test_a_request_body_that_ended_before_its_declared_length_is_not_called_captured() -> None:
    """The client declared 1,000 bytes, sent 100 and left: the app's stream ended there (as
    gunicorn's does). bodySize is what crossed; bodyCaptured does not claim the whole body,
    and a JSON body, which could not be redacted whole, is left out."""
    for content_type, kept in (("text/plain", True), ("application/json", False)):
        info = request_info(
            method="POST", content_length=1000, headers=[("content-type", content_type)]
        )
        record = exchange(info)
        record.request_data(b"a" * 100)
        record.request_complete = True
        request = entry_of(record)["request"]
        assert (request["bodySize"], request["bodyCaptured"]) == (100, False)
        assert ("postData" in request) is kept


def test_a_body_that_redaction_makes_longer_than_the_cap_is_left_out() -> None:
    """The marker is longer than a ``0``: a JSON body within max_body_bytes can pass it once
    redacted. It is left out, as a longer body is, so a captured body never exceeds the cap
    (and the construction-time check that the cap fits a batch keeps holding)."""
    body = json.dumps([{"pin": 0}] * 100, separators=(",", ":")).encode()
    cap = len(body)
    record = exchange(
        request_info(method="POST", headers=[("content-type", "application/json")]),
        cfg=config(max_body_bytes=cap, redact_body_keys=["pin"]),
    )
    record.request_data(body)
    record.request_complete = True
    entry = entry_of(record)
    assert entry["request"]["bodySize"] == cap
    assert entry["request"]["bodyCaptured"] is False
    assert "postData" not in entry["request"]
    # With room for the markers it is captured, redacted.
    record = exchange(
        request_info(method="POST", headers=[("content-type", "application/json")]),
        cfg=config(max_body_bytes=cap * 3, redact_body_keys=["pin"]),
    )
    record.request_data(body)
    record.request_complete = True
    entry = entry_of(record)
    assert entry["request"]["bodyCaptured"] is True
    sent = base64.b64decode(entry["request"]["postData"]["text"])
    assert json.loads(sent) == [{"pin": REDACTED}] * 100


@pytest.mark.parametrize("cap", [0, 1, 5, 10])
def test_truncated_bodies_are_visible(cap: int) -> None:
    """A body over max_body_bytes keeps its prefix, its real size, and bodyCaptured false."""
    record = exchange(request_info(method="POST"), cfg=config(max_body_bytes=cap))
    for chunk in (b"hello ", b"world"):
        record.request_data(chunk)
        record.response_data(chunk.upper())
    record.request_complete = True
    entry = entry_of(record)
    sides = (("request", "postData", b"hello world"), ("response", "content", b"HELLO WORLD"))
    for side, key, body in sides:
        message = entry[side]
        assert message["bodySize"] == 11
        assert message["bodyCaptured"] is False
        if cap:
            assert base64.b64decode(message[key]["text"]) == body[:cap]
        else:
            assert key not in message


def test_body_exactly_at_the_cap_is_complete() -> None:
    """A body of exactly max_body_bytes is captured whole."""
    record = exchange(request_info(method="POST"), cfg=config(max_body_bytes=5))
    record.request_data(b"12345")
    record.request_complete = True
    entry = entry_of(record)
    assert entry["request"]["bodyCaptured"] is True
    assert base64.b64decode(entry["request"]["postData"]["text"]) == b"12345"


@pytest.mark.parametrize(
    ("method", "status"),
    [
        pytest.param("HEAD", 200, id="head"),
        pytest.param("GET", 204, id="no-content"),
        pytest.param("GET", 304, id="not-modified"),
    ],
)
def test_bodiless_responses_report_no_body(method: str, status: int) -> None:
    """Bytes an app yields for HEAD, 204 or 304 never cross the wire: bodySize 0 (ALF.md 1.6)."""
    record = exchange(request_info(method=method), status=status, reason="")
    record.response_data(b"bytes the server drops")
    entry = entry_of(record)
    assert entry["response"]["bodySize"] == 0
    assert "content" not in entry["response"]


def test_a_capture_keeps_the_cap_and_copies_what_the_app_may_change() -> None:
    """Immutable chunks that fit are kept as they are; a bytearray or memoryview the app may
    reuse is copied as it was when sent; the chunk crossing the cap is cut; short chunks
    share one buffer rather than a list of tiny objects."""
    capture = Capture()
    shared = b"s" * 2048
    buffer = bytearray(b"b" * 1500)
    capture.add(shared, 8192)
    capture.add(buffer, 8192)
    capture.add(memoryview(buffer), 8192)
    buffer[:] = b"X" * 1500  # the app reuses its buffer after sending it
    for _ in range(100):
        capture.add(b"t", 8192)
    capture.add(b"c" * 9000, 8192)  # crosses the cap: cut
    capture.add(b"late", 8192)  # past the cap: nothing
    expected = shared + b"b" * 3000 + b"t" * 100 + b"c" * (8192 - 2048 - 3100)
    assert len(capture) == 8192 and bytes(capture) == expected
    assert len(capture._parts) == 2  # the shared chunk, then one buffer for the rest
    capture.truncate(2050)  # the app rewound its input stream
    assert (len(capture), bytes(capture)) == (2050, shared + b"bb")
    capture.truncate(0)
    assert (len(capture), bytes(capture), bool(capture)) == (0, b"", False)


# -- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Authorization", "authorization", "Proxy-Authorization", "Cookie", "COOKIE"]
)
def test_sensitive_request_headers_are_redacted_by_default(name: str) -> None:
    """The name stays and the value is replaced; the secret appears nowhere in the entry."""
    info = request_info(headers=[("Host", "api.example.com"), (name, "secret-value-42")])
    entry = entry_of(exchange(info, cfg=config(log_body=False)))
    assert header(entry["request"]["headers"], name.lower()) == [REDACTED]
    assert header(entry["request"]["headers"], "host") == ["api.example.com"]
    assert "secret-value-42" not in json.dumps(entry)


def test_set_cookie_is_redacted_by_default() -> None:
    """Every Set-Cookie value of the response is redacted, other headers are kept."""
    record = exchange(
        response_headers=[("Set-Cookie", "sid=secret1"), ("set-cookie", "t=secret2"), ("X-A", "b")]
    )
    entry = entry_of(record)
    assert header(entry["response"]["headers"], "set-cookie") == [REDACTED, REDACTED]
    assert header(entry["response"]["headers"], "x-a") == ["b"]
    assert "secret" not in json.dumps(entry)


def test_custom_redact_headers() -> None:
    """Names listed in redact_headers are redacted in requests and responses, any case."""
    cfg = config(redact_headers=["X-Api-Key", "x-session", "authorization"])
    info = request_info(headers=[("x-api-key", "k-secret"), ("Authorization", "Basic secret")])
    record = exchange(info, cfg=cfg, response_headers=[("X-Session", "s-secret"), ("X-Ok", "1")])
    entry = entry_of(record)
    assert header(entry["request"]["headers"], "x-api-key") == [REDACTED]
    assert header(entry["request"]["headers"], "authorization") == [f"Basic {REDACTED}"]
    assert header(entry["response"]["headers"], "x-session") == [REDACTED]
    assert header(entry["response"]["headers"], "x-ok") == ["1"]
    assert "secret" not in json.dumps(entry)


def test_a_header_name_seen_before_keeps_its_rule_for_every_new_value() -> None:
    """The builder remembers what a header's name decides (kept, redacted, left out): a name
    seen with one value is redacted, kept or left out the same way with each new value,
    whatever byte type (WSGI text, ASGI bytes) it comes in."""
    cfg = config(log_body=False, redact_headers=["X-Api-Key"])
    for n in range(3):
        info = request_info(
            headers=[
                ("X-Api-Key", f"key-{n}"),
                (b"authorization", f"Bearer tok-{n}".encode()),
                ("Referer", f"https://example.com/?token=tok-{n}&page={n}"),
                ("X-Request-Id", f"id-{n}"),
                (CONSUMER_HEADER, f"posing-{n}"),
            ]
        )
        entry = entry_of(exchange(info, cfg=cfg))
        pairs = entry["request"]["headers"]
        assert header(pairs, "x-api-key") == [REDACTED]
        assert header(pairs, "authorization") == [f"Bearer {REDACTED}"]
        assert header(pairs, "referer") == [f"https://example.com/?token=%5BREDACTED%5D&page={n}"]
        assert header(pairs, "x-request-id") == [f"id-{n}"]
        assert header(pairs, CONSUMER_HEADER) == []
        assert f"tok-{n}" not in json.dumps(entry) and f"key-{n}" not in json.dumps(entry)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            "http://a.example/?x=1,http://u:pw-1@b.example/?token=tok-1",
            "http://a.example/?x=1,http://%5BREDACTED%5D@b.example/?token=%5BREDACTED%5D",
            id="second-absolute",
        ),
        pytest.param(
            "/a?x=1,//u:pw-1@b.example/p?api_key=tok-1#sig=tok-2",
            "/a?x=1,//%5BREDACTED%5D@b.example/p?api_key=%5BREDACTED%5D#sig=%5BREDACTED%5D",
            id="second-scheme-relative",
        ),
        pytest.param(
            "http://a.example/?x=1,2&token=tok-1",
            "http://a.example/?x=1,2&token=%5BREDACTED%5D",
            id="one-url-with-a-comma",
        ),
    ],
)
def test_a_folded_url_header_has_every_url_in_it_redacted(value: str, expected: str) -> None:
    """A WSGI server folds a repeated Referer (or Location...) into one value joined by
    ``,``: the userinfo and query secrets of every URL in it are redacted, not only the
    first's."""
    info = request_info(headers=[("host", "api.example.com"), ("referer", value)])
    entry = entry_of(exchange(info))
    assert header(entry["request"]["headers"], "referer") == [expected]
    assert "pw-1" not in json.dumps(entry) and "tok-" not in json.dumps(entry)


# -- addresses ---------------------------------------------------------------------------------

PROXIES = ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "client"),
    [
        pytest.param("203.0.113.7", [], [], "203.0.113.7", id="socket-peer"),
        pytest.param("::1", [], [], "::1", id="ipv6-peer"),
        pytest.param(
            "203.0.113.7", [("x-forwarded-for", "1.2.3.4")], [], "203.0.113.7", id="xff-ignored"
        ),
        pytest.param(
            "10.0.0.1", [("forwarded", "for=1.2.3.4")], [], "10.0.0.1", id="forwarded-ignored"
        ),
        pytest.param(
            "203.0.113.7",
            [("x-forwarded-for", "1.2.3.4")],
            PROXIES,
            "203.0.113.7",
            id="untrusted-peer-header-ignored",
        ),
        pytest.param(
            "10.0.0.1", [("x-forwarded-for", "1.2.3.4")], PROXIES, "1.2.3.4", id="trusted-xff"
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.2")],
            PROXIES,
            "1.2.3.4",
            id="forged-left-most-not-taken",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "1.2.3.4")],
            PROXIES,
            "1.2.3.4",
            id="repeated-xff-headers",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "10.0.0.3, 10.0.0.2")],
            PROXIES,
            "10.0.0.3",
            id="all-hops-trusted",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "5.6.7.8"), ("Forwarded", "for=6.6.6.6")],
            PROXIES,
            "5.6.7.8",
            id="forwarded-ignored-by-default",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "1.2.3.4:5678")],
            PROXIES,
            "1.2.3.4",
            id="xff-hop-with-port",
        ),
        pytest.param(
            "::ffff:10.0.0.1",
            [("x-forwarded-for", "1.2.3.4")],
            PROXIES,
            "1.2.3.4",
            id="ipv4-mapped-proxy",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "fe80::1%eth0")],
            PROXIES,
            "fe80::1",
            id="scoped-hop",
        ),
        pytest.param(
            "10.0.0.1",
            [("x-forwarded-for", "6.6.6.6, unknown")],
            PROXIES,
            "10.0.0.1",
            id="unknown-hop-ends-the-walk",
        ),
        pytest.param(
            "fd00::1",
            [(b"x-forwarded-for", b"2001:db8::7")],
            PROXIES,
            "2001:db8::7",
            id="ipv6-proxy-bytes-headers",
        ),
    ],
)
def test_client_ip_address(
    peer: str, headers: list[tuple[Any, Any]], trusted: list[str], client: str
) -> None:
    """The socket peer, or with trusted_proxies the first untrusted hop from the right."""
    cfg = config(trusted_proxies=trusted) if trusted else config()
    entry = entry_of(exchange(request_info(peer=peer, headers=headers), cfg=cfg))
    assert entry["clientIPAddress"] == client


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        pytest.param(
            [("forwarded", 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https')],
            "2001:db8::1",
            id="ipv6-with-port",
        ),
        pytest.param(
            [("forwarded", "for=1.2.3.4:8080;proto=https;by=10.0.0.1")],
            "1.2.3.4",
            id="ipv4-with-port",
        ),
        pytest.param(
            [("x-forwarded-for", "5.6.7.8"), ("Forwarded", "for=1.2.3.4")],
            "1.2.3.4",
            id="xff-ignored",
        ),
        pytest.param([("forwarded", 'for="[fe80::1%25eth0]"')], "fe80::1", id="scoped-ipv6"),
        pytest.param([("forwarded", "proto=https, for=_hidden")], "10.0.0.1", id="obfuscated"),
        pytest.param([("forwarded", "by=10.0.0.9")], "10.0.0.1", id="no-for"),
        pytest.param(
            [("forwarded", "for=6.6.6.6"), ("forwarded", "for=10.0.0.2")],
            "6.6.6.6",
            id="repeated-headers",
        ),
    ],
)
def test_client_ip_from_forwarded_when_configured(
    headers: list[tuple[str, str]], client: str
) -> None:
    """forwarded_header="forwarded": only RFC 7239 for= is read, walked from the right."""
    cfg = config(trusted_proxies=PROXIES, forwarded_header="forwarded")
    entry = entry_of(exchange(request_info(peer="10.0.0.1", headers=headers), cfg=cfg))
    assert entry["clientIPAddress"] == client


@pytest.mark.parametrize("peer", [None, "", "unix:/run/app.sock", "not-an-ip"])
def test_client_ip_address_absent_when_the_peer_is_not_an_ip(peer: str | None) -> None:
    """Without an IP literal for the peer, clientIPAddress is left out (the schema needs one)."""
    entry = entry_of(exchange(request_info(peer=peer, headers=[("x-forwarded-for", "1.2.3.4")])))
    assert "clientIPAddress" not in entry


@pytest.mark.parametrize(
    ("server_ip", "expected"),
    [
        pytest.param("198.51.100.1", "198.51.100.1", id="ipv4"),
        pytest.param("[2001:db8::2]", "2001:db8::2", id="bracketed-ipv6"),
        pytest.param("::1", "::1", id="ipv6"),
        pytest.param("api.example.com", None, id="host-name"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="unknown"),
    ],
)
def test_server_ip_address_only_for_ip_literals(
    server_ip: str | None, expected: str | None
) -> None:
    """serverIPAddress is present only when the server address is an IP literal."""
    entry = entry_of(exchange(request_info(server_ip=server_ip)))
    assert entry.get("serverIPAddress") == expected


# -- odd input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"path": "/caf\xc3\xa9 menu/a b"}, id="space-and-utf8-path"),
        pytest.param({"path": "/∑ unicode"}, id="unicode-path"),
        pytest.param({"path": "/100%/a#b"}, id="lone-percent-and-hash"),
        pytest.param({"path": "*", "method": "OPTIONS"}, id="asterisk-form"),
        pytest.param({"query": "q=a b&x=\xc3\xa9&%zz=1&=&&"}, id="odd-query"),
        pytest.param({"query": "a=<script>\"'`{}|\\^"}, id="unsafe-query-chars"),
        pytest.param({"host": "bad host!"}, id="bad-host"),
        pytest.param({"host": ""}, id="empty-host"),
        pytest.param({"host": "h\xe9.example"}, id="non-ascii-host"),
        pytest.param({"host": "example.com:99999999"}, id="huge-port"),
        pytest.param({"scheme": "ws"}, id="odd-scheme"),
        pytest.param({"method": "PURGE", "http_version": "HTTP/9"}, id="odd-method-version"),
        pytest.param({"headers": [("x-bin", "\xff\xfe\x80")]}, id="latin1-header"),
        pytest.param({"headers": [(b"x-bin", b"\xff\xfe\x80"), (b"\xe9", b"v")]}, id="raw-bytes"),
        pytest.param({"headers": [("x-empty", "")]}, id="empty-header-value"),
    ],
)
def test_odd_input_still_gives_a_schema_valid_entry(changes: dict[str, Any]) -> None:
    """Odd paths, queries, hosts, versions and header bytes still build a valid entry."""
    entry = entry_of(exchange(request_info(**changes)))
    assert entry["request"]["url"].split("://")[0] in ("http", "https")
    assert " " not in entry["request"]["url"]


def test_non_utf8_header_bytes_are_kept_as_latin1() -> None:
    """Header bytes that are not UTF-8 are shown as Latin-1 text, not dropped or mangled."""
    info = request_info(headers=[("x-wsgi", "\xff\xfe"), (b"x-asgi", b"\xff\xfe")])
    headers = entry_of(exchange(info))["request"]["headers"]
    assert header(headers, "x-wsgi") == header(headers, "x-asgi") == ["\xff\xfe"]


def test_utf8_header_bytes_are_decoded() -> None:
    """UTF-8 header bytes (as WSGI's Latin-1 str or ASGI bytes) are decoded to text."""
    info = request_info(headers=[("x-wsgi", "caf\xc3\xa9"), (b"x-asgi", "café".encode())])
    headers = entry_of(exchange(info))["request"]["headers"]
    assert header(headers, "x-wsgi") == header(headers, "x-asgi") == ["café"]


def test_path_bytes_are_percent_encoded_in_the_url() -> None:
    """A WSGI path holding UTF-8 bytes and spaces becomes a percent-encoded URL."""
    entry = entry_of(exchange(request_info(path="/caf\xc3\xa9 x", query="q=a b")))
    assert entry["request"]["url"] == "http://api.example.com/caf%C3%A9%20x?q=a%20b"


def test_envelope_strings_always_encode() -> None:
    """A per-request token or environment holding a lone surrogate still gives valid UTF-8."""
    record = exchange()
    alf = alf_envelope("token-\ud800-0001", "env-\udcff")
    alf["har"]["log"]["entries"].append(build_entry(record))
    assert_valid_alf(alf)
    assert json.loads(dumps(alf)) == alf
    assert alf["serviceToken"] == "token-\ufffd-0001"


def test_malformed_response_header_lists_still_give_a_valid_entry() -> None:
    """An ASGI app's bad header list (the server refuses it) never stops the entry."""
    odd: list[Any] = [(b"x-ok", b"1"), (b"x-int", 5), ("x-none", None), (1, 2, 3), "zz"]
    record = exchange(response_headers=odd)
    record.response_data(b"body")
    entry = entry_of(record)
    assert base64.b64decode(entry["response"]["content"]["text"]) == b"body"
    pairs = {(p["name"], p["value"]) for p in entry["response"]["headers"]}
    assert pairs == {("x-ok", "1"), ("x-int", "5"), ("x-none", "None")}


@pytest.mark.parametrize("size", [*range(9), 57, 4096, 65_537])
def test_body_base64_is_the_standard_encoding_at_every_length(size: int) -> None:
    """Bodies are encoded with pybase64 (SIMD) where it is installed: the same standard,
    padded, unwrapped base64 as the standard library's, whatever the length's remainder."""
    import pybase64

    from alf_analytics import _alf

    assert _alf._b64encode is pybase64.b64encode  # a dependency on CPython
    data = bytes((i * 131 + 7) % 256 for i in range(size))
    assert _alf._b64encode(data) == base64.b64encode(data)


def test_without_pybase64_the_standard_library_encodes() -> None:
    """pybase64 is optional at run time (no wheel, another interpreter): the builder falls
    back to the standard library, with the same output."""
    import subprocess
    import sys

    code = (
        "import sys, base64; sys.modules['pybase64'] = None\n"
        "from alf_analytics import _alf\n"
        "assert _alf._b64encode is base64.b64encode, _alf._b64encode\n"
        "print('fallback ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fallback ok"
