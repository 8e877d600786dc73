"""The HTTP transport against a real loopback server: request format, reuse, timeouts, answers."""

from __future__ import annotations

import base64
import email.utils
import gzip
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alf_analytics import __version__, _transport
from alf_analytics._transport import MAX_ANSWER_BYTES, HTTPTransport, parse_retry_after

from .faulty_collector import FaultyCollector

TOKEN = "transport-token-0123456789"


def payload(n: int = 1, environment: str | None = "test") -> bytes:
    """A minimal but well-formed batch body with ``n`` entries."""
    entry = {
        "startedDateTime": "2024-01-01T00:00:00.000Z",
        "request": {"method": "GET", "url": "http://x/"},
    }
    alf = {"version": "1.1.0", "serviceToken": TOKEN, "har": {"log": {"entries": [entry] * n}}}
    if environment is not None:
        alf["environment"] = environment
    return json.dumps([alf]).encode()


@pytest.fixture
def faulty() -> Iterator[FaultyCollector]:
    with FaultyCollector() as running:
        yield running


@pytest.fixture
def transport(faulty: FaultyCollector) -> Iterator[HTTPTransport]:
    sender = HTTPTransport(faulty.url, timeout=2.0)
    yield sender
    sender.close()


def test_posts_gzip_json_array_to_the_batch_endpoint(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """A send is one POST /1.1.0/batch of the gzip-compressed payload with its headers."""
    body = payload(3)
    outcome = transport.send(body)
    assert outcome.status == 200
    (seen,) = faulty.seen()
    assert (seen.method, seen.path) == ("POST", "/1.1.0/batch")
    assert seen.headers["content-encoding"] == "gzip"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"] == f"alf-analytics/{__version__}"
    assert int(seen.headers["content-length"]) == seen.wire_bytes < len(body)
    assert gzip.decompress(seen.body) == body
    assert faulty.count() == 3


def test_a_body_given_in_parts_is_sent_as_their_join(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """The worker hands a batch over in parts (never joined into one large object): they are
    compressed in turn into one gzip member of exactly their concatenation."""
    body = payload(300)
    cuts = [0, 1, 17, 4000, 4001, len(body) - 1, len(body)]
    parts = [body[start:end] for start, end in zip(cuts[:-1], cuts[1:], strict=True)]
    assert transport.send(parts).status == 200
    (seen,) = faulty.seen()
    assert int(seen.headers["content-length"]) == seen.wire_bytes < len(body)
    assert gzip.decompress(seen.body) == body
    assert faulty.count() == 300


def test_one_connection_is_reused_for_many_sends(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """Twenty sends travel over a single keep-alive TCP connection."""
    for _ in range(20):
        assert transport.send(payload()).status == 200
    assert len(faulty.seen()) == 20
    assert faulty.connections == 1


def test_timeouts_are_explicit() -> None:
    """The client carries the configured read timeout and a connect timeout of at most 5 s."""
    sender = HTTPTransport("http://127.0.0.1:9", timeout=7.5)
    try:
        assert sender.timeouts == {"connect": 5.0, "read": 7.5, "write": 7.5, "pool": 7.5}
    finally:
        sender.close()


def test_redirects_are_not_followed(faulty: FaultyCollector, transport: HTTPTransport) -> None:
    """A 3xx is reported as it is: a batch never travels to a host the URL did not name."""
    faulty.fail(307, body=b"moved")
    outcome = transport.send(payload())
    assert outcome.status == 307
    assert len(faulty.seen()) == 1


def test_idempotency_key_is_sent_as_given(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """The worker's key for a batch travels in an Idempotency-Key header (none if not given)."""
    transport.send(payload(), "0123456789abcdef0123456789abcdef")
    transport.send(payload())
    first, second = faulty.seen()
    assert first.headers["idempotency-key"] == "0123456789abcdef0123456789abcdef"
    assert "idempotency-key" not in second.headers


def test_credentials_in_the_url_become_basic_auth(faulty: FaultyCollector) -> None:
    """user:pass@ in collector_url is sent as Basic auth, never in the request line or Host."""
    url = faulty.url.replace("http://", "http://ingest%40acme:s3cr%3At@")
    sender = HTTPTransport(url, timeout=2.0)
    try:
        assert sender.send(payload()).status == 200
    finally:
        sender.close()
    (seen,) = faulty.seen()
    assert seen.path == "/1.1.0/batch"
    assert seen.headers["host"] == faulty.url.removeprefix("http://")
    expected = base64.b64encode(b"ingest@acme:s3cr:t").decode()
    assert seen.headers["authorization"] == f"Basic {expected}"
    assert "s3cr" not in sender.url


def test_refused_connection_is_not_maybe_delivered(faulty: FaultyCollector) -> None:
    """Connection refused gives status 0, an error, and a batch known not to be delivered."""
    faulty.refuse()
    sender = HTTPTransport(faulty.url, timeout=2.0)
    try:
        outcome = sender.send(payload())
    finally:
        sender.close()
    assert outcome.status == 0
    assert outcome.error is not None and "ConnectError" in outcome.error
    assert outcome.maybe_delivered is False


def test_black_holed_send_times_out_as_maybe_delivered(faulty: FaultyCollector) -> None:
    """A collector that never answers costs one read timeout and leaves the outcome unknown."""
    faulty.blackhole()
    sender = HTTPTransport(faulty.url, timeout=0.3)
    try:
        outcome = sender.send(payload())
    finally:
        sender.close()
    assert outcome.status == 0
    assert outcome.error is not None and "ReadTimeout" in outcome.error
    assert outcome.maybe_delivered is True
    assert len(faulty.seen()) == 1


def test_timeout_bounds_the_whole_request_not_each_read() -> None:
    """A collector that drips its answer a byte at a time, each within the read timeout,
    must not hold the sender for longer than ``timeout`` (it took 10 x 0.15 s here)."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            for _ in range(10):
                if done.wait(0.15):
                    return
                try:
                    conn.sendall(b"x")
                except OSError:
                    return  # the client gave up

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    sender = HTTPTransport(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    try:
        outcome = sender.send(payload())
    finally:
        done.set()
        sender.close()
        server.join(5)
        listener.close()
    assert outcome.status == 0, outcome
    assert outcome.error is not None and "ReadTimeout" in outcome.error  # not a 200 at 1.5 s
    assert outcome.maybe_delivered is True


def test_connection_closed_mid_response_is_maybe_delivered(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """A response cut short is a network error whose outcome is unknown; the next send works."""
    faulty.cut(times=1)
    outcome = transport.send(payload())
    assert outcome.status == 0
    assert outcome.maybe_delivered is True
    assert transport.send(payload()).status == 200
    assert faulty.count() == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(400, b'{"errors":["bad"]}', id="400"),
        pytest.param(413, b'{"errors":["too big"]}', id="413"),
        pytest.param(503, b"<html>down</html>", id="503-html"),
    ],
)
def test_error_answers_are_reported_with_their_body(
    faulty: FaultyCollector, transport: HTTPTransport, status: int, body: bytes
) -> None:
    """A non-2xx answer comes back as its status and body, for the worker to decide."""
    faulty.fail(status, times=1, body=body)
    outcome = transport.send(payload())
    assert (outcome.status, outcome.body, outcome.error) == (status, body, None)


def test_answer_body_is_capped(faulty: FaultyCollector, transport: HTTPTransport) -> None:
    """A huge answer is read only up to MAX_ANSWER_BYTES."""
    faulty.fail(500, times=1, body=b"x" * (MAX_ANSWER_BYTES * 4))
    outcome = transport.send(payload())
    assert outcome.status == 500
    assert len(outcome.body) == MAX_ANSWER_BYTES


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(lambda: "7", id="seconds"),
        pytest.param(lambda: email.utils.formatdate(time.time() + 7, usegmt=True), id="http-date"),
    ],
)
def test_retry_after_of_a_429_is_parsed(
    faulty: FaultyCollector, transport: HTTPTransport, header: Callable[[], str]
) -> None:
    """Retry-After (delta-seconds or HTTP-date) reaches the outcome in seconds."""
    faulty.fail(429, times=1, retry_after=header())
    outcome = transport.send(payload())
    assert outcome.status == 429
    assert outcome.retry_after is not None
    assert 5.0 <= outcome.retry_after <= 7.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="missing"),
        pytest.param("", None, id="empty"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param(" 120 ", 120.0, id="spaces"),
        pytest.param("1.5", 1.5, id="decimal"),
        pytest.param("-1", None, id="negative"),
        pytest.param("\u00b2", None, id="unicode-digit"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="past-date"),
        pytest.param("Wed, 99 Oct 2015 07:28:00 GMT", None, id="bad-date"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Retry-After values parse to seconds, a past date to 0, anything unusable to None."""
    assert parse_retry_after(value) == expected


def test_parse_retry_after_date_without_zone_is_gmt() -> None:
    """An HTTP-date with a -0000 zone (naive) counts as GMT, not local time."""
    when = email.utils.formatdate(time.time() + 100, usegmt=False).rsplit(" ", 1)[0] + " -0000"
    seconds = parse_retry_after(when)
    assert seconds is not None and 98.0 <= seconds <= 100.0


def test_close_is_idempotent_and_a_later_send_reconnects(faulty: FaultyCollector) -> None:
    """close() twice is fine; a send after close opens a fresh connection."""
    sender = HTTPTransport(faulty.url, timeout=2.0)
    assert sender.send(payload()).status == 200
    sender.close()
    sender.close()
    assert sender.send(payload()).status == 200
    sender.close()
    assert faulty.connections == 2


def test_proxy_environment_is_ignored(
    faulty: FaultyCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the README says (unlike httpx's trust_env): batches go straight to the collector
    even when the environment names a proxy (here one that refuses every connection)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sender = HTTPTransport(faulty.url, timeout=2.0)
    try:
        assert sender.send(payload()).status == 200
    finally:
        sender.close()
    (seen,) = faulty.seen()
    assert seen.path == "/1.1.0/batch"


@pytest.mark.parametrize("size", [0, 1, 1000, 3_000_000])
def test_gzip_members_read_back_with_the_standard_library(size: int) -> None:
    """Batches are gzipped by ISA-L where isal is installed (it is a dependency on this
    platform), and any gzip reader gets the exact payload back, from empty to megabytes."""
    from isal import isal_zlib

    assert _transport._deflate is isal_zlib
    body = (payload(size // 150 + 1) + bytes(range(256)) * (size // 256))[:size]
    member = _transport.gzip_compress(body)
    assert member[:3] == b"\x1f\x8b\x08"  # gzip, deflate
    assert gzip.decompress(member) == body
    assert zlib.decompress(member, 31) == body


def test_without_isal_batches_are_gzipped_by_zlib() -> None:
    """Where isal has no wheel the transport falls back to zlib, with the same gzip format."""
    script = (
        "import sys, base64\n"
        "sys.modules['isal'] = None\n"  # import isal raises ImportError
        "import zlib\n"
        "from alf_analytics import _transport\n"
        "assert _transport._deflate is zlib, _transport._deflate\n"
        "sys.stdout.write(base64.b64encode(_transport.gzip_compress(sys.stdin.buffer.read()))"
        ".decode())\n"
    )
    body = payload(50)
    done = subprocess.run(
        [sys.executable, "-c", script], input=body, capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert gzip.decompress(base64.b64decode(done.stdout)) == body


def _openssl(*args: str | os.PathLike[str]) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA of our own and a certificate it signed for 127.0.0.1 (``server.pem``/``.key``)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("ca")
    ca, ca_key = where / "ca.pem", where / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", ca_key, "-out", ca, "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    csr = where / "server.csr"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", where / "server.key", "-out", csr,
    )  # fmt: skip
    extensions = where / "ext.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "2", "-out", where / "server.pem", "-extfile", extensions,
    )  # fmt: skip
    hashed = where / "hashed"
    hashed.mkdir()
    shutil.copy(ca, hashed / "ca.pem")
    _openssl("rehash", hashed)
    return where


@pytest.fixture
def tls_collector(private_ca: Path) -> Iterator[str]:
    """An https collector on loopback whose certificate only ``private_ca`` vouches for."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca / "server.pem", private_ca / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(2)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    conn.recv(65536)
            except OSError:  # the client refused our certificate, or left
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    thread.join(5)


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_an_https_collector_with_a_private_ca_is_trusted_through_the_environment(
    private_ca: Path, tls_collector: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """As with httpx, ``SSL_CERT_FILE`` (a bundle) or ``SSL_CERT_DIR`` (a hashed directory)
    names the CAs an https collector is verified against; without them it is refused, as a
    failure that never reached the collector."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    untrusting = HTTPTransport(tls_collector, timeout=2.0)
    refused = untrusting.send(payload())
    untrusting.close()
    assert refused.status == 0 and not refused.maybe_delivered
    assert refused.error is not None and "CERTIFICATE_VERIFY_FAILED" in refused.error
    where = private_ca / ("ca.pem" if variable == "SSL_CERT_FILE" else "hashed")
    monkeypatch.setenv(variable, str(where))
    trusting = HTTPTransport(tls_collector, timeout=2.0)
    try:
        assert trusting.send(payload()).status == 200
    finally:
        trusting.close()


def test_a_keep_alive_close_that_crosses_the_next_request_is_retried_on_a_fresh_connection(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """The collector closes a kept-alive connection (its keep-alive timeout) just as the next
    POST goes out on it, unread: that POST is sent once more on a new connection and succeeds,
    instead of failing as if the collector were down (a warning, a backoff, maybe ``unknown``).
    """
    faulty.one_per_connection(linger=0.3)
    assert transport.send(payload()).status == 200
    second = transport.send(payload())
    assert (second.status, second.error) == (200, None)
    assert faulty.count() == 2
    assert [seen.connection for seen in faulty.seen()] == [1, 2]


def test_a_fresh_connection_closed_without_an_answer_is_not_resent(
    faulty: FaultyCollector, transport: HTTPTransport
) -> None:
    """Only a kept-alive connection earns the immediate second try: on a new one, a close
    with no answer is the collector's doing, and the worker retries it with backoff."""
    faulty.cut()
    outcome = transport.send(payload())
    assert outcome.status == 0 and outcome.maybe_delivered
    assert len(faulty.seen()) == 1
