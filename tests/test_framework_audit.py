"""Framework features met in a black-box audit on real servers, each pinned down here.

The collector runs on a fixed port range (19150-19199) rather than any free port, so these
tests can run beside servers that must stay inside a known range.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, g, stream_with_context
from flask import request as flask_request
from werkzeug.test import Client as WerkzeugClient

from alf_analytics import AnalyticsWSGIMiddleware
from alf_analytics._alf import CONSUMER_HEADER
from alf_analytics.collector import Collector

from .conftest import received_entries

TOKEN = "framework-audit-token-0123456789"


def _port_in_range() -> int:
    for port in range(19150, 19200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 19150-19199")


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(port=_port_in_range()) as running:
        yield running


def consumer_of(entry: dict[str, Any]) -> str | None:
    for header in entry["request"]["headers"]:
        if header["name"] == CONSUMER_HEADER:
            return str(header["value"])
    return None


def test_flask_identify_can_read_flask_g_and_the_request_proxy(collector: Collector) -> None:
    """identify reads the user a before_request hook put on flask.g (what login extensions
    do): Flask's app context is gone once the server closes the response, so identify must
    not wait for it (it used to raise RuntimeError there and record no consumer)."""
    app = Flask(__name__)

    @app.before_request
    def login() -> None:
        g.user = flask_request.headers.get("X-User")

    @app.get("/plain")
    def plain() -> Response:
        return Response(b"ok", mimetype="text/plain")

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"a"
            yield b"b"

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    def identify(request: Any) -> str | None:
        return f"{g.user}@{flask_request.endpoint}"

    app.wsgi_app = AnalyticsWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, service_token=TOKEN, collector_url=collector.url, identify=identify
    )
    client = WerkzeugClient(app)
    for path, user in (("/plain", "alice"), ("/stream", "bob")):
        response = client.get(path, headers={"X-User": user})
        assert response.status_code == 200
        response.close()
    entries = received_entries(collector, 2)
    assert sorted(map(str, map(consumer_of, entries))) == ["alice@plain", "bob@stream"]
